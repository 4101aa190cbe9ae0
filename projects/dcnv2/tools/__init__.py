"""Logic of the command-line tools in ``tools/``: demo, sampling-location pictures, model
analysis (FLOPs, activations, parameters), training-curve plots and export (the benchmarks are
in :mod:`dcnv2.tools`).

Each module is importable on its own; the scripts in ``tools/`` only parse arguments.
"""
