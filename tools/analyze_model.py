#!/usr/bin/env python
"""FLOPs, activations and parameters per module, and the structure of a dcnv2 model.

Counts with fvcore (one fused multiply-add = one flop), on one fixed random image of the given
size, in inference mode. Deformable convs are counted (dense conv + 4 multiply-adds per
bilinearly sampled value + 1 per modulation), not skipped as unknown ops; batch norm and
elementwise ops are not counted (as in detectron2's analysis). Random-init weights are fine: the
backbone's counts depend on the input size only; the heads' on the number of proposals.

Examples:
    python tools/analyze_model.py --tasks flop parameter --height 800 --width 1216
    python tools/analyze_model.py --config-file faster_rcnn_R50_FPN_1x.yaml --tasks structure

Without --config-file the tool reads the config.yaml the training run wrote beside
--opts MODEL.WEIGHTS (without weights: faster_rcnn_R50_mdconv_FPN_1x.yaml).
"""

import json
import sys

# dcnv2 before detectron2's modules: it keeps their import quiet
from dcnv2.tools.cli import (
    UserInputError,
    add_config_arguments,
    choose_config_file,
    load_weights,
    run_cli,
    setup_cfg,
    tool_parser,
)

# isort: split
import torch
from detectron2.modeling import build_model

from dcnv2.tools.analyze_model import TASKS, analyze_model, model_inputs


def parse_args(argv=None):
    parser = add_config_arguments(tool_parser(__doc__))
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=["flop", "activation", "parameter"],
        help="what to report (default: flop activation parameter)",
    )
    parser.add_argument("--height", type=int, default=800, help="input height (default 800)")
    parser.add_argument("--width", type=int, default=1216, help="input width (default 1216)")
    parser.add_argument("--max-depth", type=int, default=4, help="depth of the tables (default 4)")
    parser.add_argument("--json", help="also write the totals (and flops per operator) here")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights and image (default 0)"
    )
    return parser.parse_args(argv)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.height < 32 or args.width < 32:
        raise UserInputError(f"--height/--width must be >= 32, got {args.height}x{args.width}")
    # Random init unless the user gives weights; seeded, because the heads' counts follow the
    # number of proposals, which follows the weights.
    config_file = choose_config_file(args.config_file, args.opts)
    cfg = setup_cfg(config_file, ["MODEL.WEIGHTS", "", *args.opts])
    torch.manual_seed(args.seed)
    model = build_model(cfg).eval()
    load_weights(model, cfg)
    inputs = model_inputs(args.height, args.width, seed=args.seed)
    report = analyze_model(model, inputs, args.tasks, args.max_depth)
    printed = set()
    for task in args.tasks:
        table = report[task]["table"]
        if table not in printed:
            print(table, end="\n\n")
            printed.add(table)
    summary = {task: report[task]["total"] for task in args.tasks if "total" in report[task]}
    input_size = f"{args.height}x{args.width}"
    for task, total in summary.items():
        where = "" if task == "parameter" else f" ({input_size} input)"
        print(f"total {task}s{where}: {_human(total)} ({total})")
    if "flop" in report:
        by_op = ", ".join(f"{k} {_human(v)}" for k, v in report["flop"]["by_operator"].items())
        print(f"flops by operator: {by_op}")
        if report["flop"]["unsupported"]:
            skipped = ", ".join(f"{k} x{v}" for k, v in report["flop"]["unsupported"].items())
            print(f"not counted (no flop handle): {skipped}")
    if args.json:
        out = {"config": config_file, "input": [args.height, args.width], **summary}
        if "flop" in report:
            out["flops_by_operator"] = report["flop"]["by_operator"]
            out["unsupported_ops"] = report["flop"]["unsupported"]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="analyze_model.py"))
