#!/usr/bin/env python
"""Benchmark the deformable-conv backends against conv2d on CPU (logic in dcnv2.layers.benchmark).

Example:
    python tools/benchmark_ops.py --out results.json --plot results.png
"""

from dcnv2.layers.benchmark import main

if __name__ == "__main__":
    main()
