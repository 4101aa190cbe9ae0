#!/usr/bin/env python
"""Export a dcnv2 model: TorchScript of the whole detector, or ONNX of the backbone + FPN.

TorchScript traces the detector with detectron2's TracingAdapter (deformable convs through
torchvision's registered op: load the file after `import torchvision`). ONNX exports the
backbone + FPN (normalised inside; input: a (1, 3, H, W) 0-255 image; outputs: p2..p6) with
standard ONNX operators only, through the native backend's PyTorch-op implementation.
Both are checked against PyTorch on a random image of --height x --width (multiples of 32).

Examples:
    python tools/export_model.py --format onnx --output backbone.onnx \
        --opts MODEL.WEIGHTS output/model_final.pth
    python tools/export_model.py --format torchscript --output model.ts --height 800 --width 1216
"""

import os
import sys
import warnings

# Importing detectron2 emits torch deprecation warnings meant for its developers, not for users.
warnings.filterwarnings("ignore", category=FutureWarning)

from dcnv2.utils.cli import UserInputError, add_config_arguments, run_cli, tool_parser  # noqa: E402


def parse_args(argv=None):
    parser = add_config_arguments(tool_parser(__doc__), force="--output if it exists")
    parser.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--height", type=int, default=800, help="input height (default 800)")
    parser.add_argument("--width", type=int, default=1216, help="input width (default 1216)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        raise UserInputError(f"{args.output!r} exists; pass --force to overwrite it")
    if args.height % 32 or args.width % 32 or min(args.height, args.width) < 64:
        raise UserInputError(
            f"--height/--width must be multiples of 32 and >= 64, got {args.height}x{args.width}"
        )
    import torch
    from detectron2.modeling import build_model

    from dcnv2.utils.cli import load_weights, setup_cfg
    from dcnv2.utils.export import (
        BackboneForExport,
        detector_outputs,
        export_backbone_onnx,
        onnx_operators,
        run_onnx,
        trace_detector,
    )

    cfg = setup_cfg(args.config_file, args.opts, confidence_threshold=0.05)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg)
    else:
        print("note: no MODEL.WEIGHTS given: exporting random-init weights")
    image = torch.randint(0, 256, (3, args.height, args.width)).float()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.format == "onnx":
        names = export_backbone_onnx(model, image[None], args.output)
        with torch.no_grad():
            expected = BackboneForExport(model).eval()(image[None])
        got = run_onnx(args.output, image[None].numpy())
        errors = [
            float((torch.from_numpy(g) - e).abs().max() / e.abs().max().clamp(min=1e-12))
            for g, e in zip(got, expected)
        ]
        custom = sorted({op for (domain, op) in onnx_operators(args.output) if domain})
        print(f"wrote {args.output}: outputs {', '.join(names)}")
        print(f"onnxruntime vs PyTorch, max relative error per output: {max(errors):.2e}")
        print(f"non-standard ONNX operators: {', '.join(custom) if custom else 'none'}")
    else:
        inputs = [{"image": image}]
        traced, adapter = trace_detector(model, inputs)
        traced.save(args.output)
        loaded = torch.jit.load(args.output)
        got = detector_outputs(loaded, adapter, inputs)[0]["instances"]
        print(f"wrote {args.output}: traced detector, {len(got)} detection(s) on a random image")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="export_model.py"))
