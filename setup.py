#!/usr/bin/env python
"""dcnv2: Deformable ConvNets v2 for detectron2.

The package lives in ``projects/dcnv2`` (detectron2's layout for projects) and is imported as
``dcnv2``. The repository's ``configs/`` folder is shipped inside the package (through the
``projects/dcnv2/configs`` link), so ``dcnv2.get_config_file(name)`` works without a checkout.
"""

from setuptools import find_packages, setup

setup(
    name="dcnv2",
    version="0.1.0",
    description="Deformable ConvNets v2 (modulated deformable conv and RoI pooling) for detectron2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.8",
    packages=["dcnv2"] + [f"dcnv2.{p}" for p in find_packages("projects/dcnv2")],
    package_dir={"dcnv2": "projects/dcnv2"},
    package_data={
        # configs resolve by name without a checkout; the C++ sources and the headers they
        # include are compiled on first use
        "dcnv2": [
            "configs/*.yaml",
            "configs/**/*.yaml",
            "configs/**/*.py",
            "layers/csrc/*.cpp",
            "layers/csrc/*.h",
        ]
    },
    # detectron2 is not on PyPI under its own name and must match the user's torch/CUDA build,
    # so it is not a requirement here: see README (tools/setup_env.sh installs it).
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pillow",
        "pycocotools",
        "fvcore",
        "iopath",
        "tqdm",
        "matplotlib",  # tools/visualize_sampling.py and tools/plot_metrics.py
        # the demo's videos and INPUT.DCNV2.RESIZE_BACKEND "opencv" (MMDetection's resize); the
        # headless build, since a library installed on servers needs no GUI (see README)
        "opencv-python-headless",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout",
            "hypothesis",
            "black",
            "isort",
            "ruff",
            # tools/export_model.py: ONNX export (torch's dynamo exporter needs onnxscript) and
            # the check of the exported backbone in onnxruntime.
            "onnx",
            "onnxscript",
            "onnxruntime",
        ],
    },
)
