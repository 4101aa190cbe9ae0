#!/usr/bin/env python
"""Check and measure dcnv2 on a GPU machine: op exactness, op speed and memory, the seed model
per backend against the plain-conv model (interleaved), where a training step's time goes,
train_net.py --eval-only and a DDP run, into gpu_check.json and gpu_check.md (logic in
dcnv2.tools.gpu_check, whose docstring lists the sections).

Examples:
    python tools/gpu_check.py --out gpu_report                 # one CUDA GPU, ~5 minutes
    python tools/gpu_check.py --out gpu_report --iters 50 --time-budget 900
    python tools/gpu_check.py --out cpu_report --device cpu --quick

Exit status: 0 all passed; 1 an exactness check failed; 3 another section failed (see the
report); 2 bad command line.
"""

import sys

from dcnv2.tools.cli import run_cli
from dcnv2.tools.gpu_check import main

if __name__ == "__main__":
    sys.exit(run_cli(main, prog="gpu_check.py"))
