#!/usr/bin/env python
r"""Export a dcnv2 model to ONNX (the whole detector, or the backbone + FPN) or TorchScript, and
check the file against PyTorch; optionally time the deployment runtimes.

ONNX: every deformable conv is one standard `DeformConv` node (opset 19); the file takes any
image height and width that are multiples of 32 (input "image": (3, H, W) float 0-255 in the
config's INPUT.FORMAT, not resized; outputs: pred_boxes, pred_classes, scores [, pred_masks],
image_size; see dcnv2.tools.export_model.export_detector_onnx). `--part backbone` exports the
backbone + FPN (input (1, 3, H, W), outputs p2..p6); `--deform-op decomposed` writes the
backbone with gathers and matmuls instead, for runtimes without DeformConv (fixed input size).
The tool runs the file in onnxruntime and compares it with PyTorch at --height x --width and at
a second size: features to 1e-4 relative, detections one to one (boxes to 2e-4 of
the longest side, at least 1e-2 px).
TorchScript traces the detector (deformable convs through torchvision's op: load the file after
`import torchvision`).

Examples:
    python tools/export_model.py --format onnx --output model.onnx \
        --opts MODEL.WEIGHTS output/quick/faster_rcnn_R50_mdconv_FPN_instant/model_final.pth
    python tools/export_model.py --format onnx --output model.onnx --benchmark bench.json
    python tools/export_model.py --format torchscript --output model.ts --height 800 --width 1216

Without --config-file the tool reads the config.yaml the training run wrote beside its weights
(without weights: faster_rcnn_R50_mdconv_FPN_1x.yaml, random-init).
"""

import os
import sys

# dcnv2 before detectron2's modules: it keeps their import quiet
from dcnv2.tools.cli import (
    UserInputError,
    add_config_arguments,
    load_weights,
    run_cli,
    setup_cfg,
    tool_parser,
)

# isort: split
import torch
from detectron2.modeling import build_model

from dcnv2.tools import deploy_benchmark
from dcnv2.tools.export_model import (
    BackboneForExport,
    ExportError,
    compare_detections,
    detector_instances,
    detector_outputs,
    export_backbone_onnx,
    export_detector_onnx,
    onnx_detections,
    onnx_operators,
    onnx_session,
    relative_errors,
    run_onnx,
    trace_detector,
)


def parse_args(argv=None):
    parser = add_config_arguments(tool_parser(__doc__), force="--output if it exists")
    parser.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    parser.add_argument(
        "--part", choices=("detector", "backbone"), default="detector", help="ONNX: what to export"
    )
    parser.add_argument(
        "--deform-op",
        choices=("DeformConv", "decomposed"),
        default="DeformConv",
        help="ONNX: standard DeformConv nodes, or standard gathers/matmuls (backbone only)",
    )
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--height", type=int, default=800, help="input height (default 800)")
    parser.add_argument("--width", type=int, default=1216, help="input width (default 1216)")
    parser.add_argument(
        "--benchmark",
        metavar="JSON",
        default="",
        help="ONNX detector: also time PyTorch eager, torch.compile and onnxruntime on the two "
        "check images, print a table and write it to this JSON file",
    )
    parser.add_argument("--repeats", type=int, default=3, help="--benchmark repeats (default 3)")
    return parser.parse_args(argv)


def _check_args(args) -> None:
    if os.path.exists(args.output) and not args.force:
        raise UserInputError(f"{args.output!r} exists; pass --force to overwrite it")
    if args.height % 32 or args.width % 32 or min(args.height, args.width) < 64:
        raise UserInputError(
            f"--height/--width must be multiples of 32 and >= 64, got {args.height}x{args.width}"
        )
    if args.deform_op == "decomposed" and args.part != "backbone":
        raise UserInputError(
            "--deform-op decomposed exports the backbone only: add --part backbone"
        )
    if args.benchmark and (args.format != "onnx" or args.part != "detector"):
        raise UserInputError("--benchmark times the ONNX detector: use --format onnx")


def main(argv=None) -> int:
    args = parse_args(argv)
    _check_args(args)
    cfg = setup_cfg(args.config_file, args.opts, confidence_threshold=0.05)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg)
    else:
        print("note: no MODEL.WEIGHTS given: exporting random-init weights")
    # A second size of another aspect ratio checks that the file is not tied to the first.
    sizes = [(args.height, args.width), (args.height + 64, max(64, args.width - 64))]
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=generator).float() for h, w in sizes]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    try:
        if args.format == "torchscript":
            return _torchscript(model, images[0], args.output)
        if args.part == "backbone":
            return _onnx_backbone(model, images, args)
        status = _onnx_detector(model, images, args.output, _score_threshold(cfg))
    except ExportError as e:
        raise UserInputError(str(e)) from None
    if args.benchmark:
        result = deploy_benchmark.benchmark_runtimes(
            model, images, args.output, repeats=args.repeats
        )
        print(deploy_benchmark.format_table(result))
        deploy_benchmark.write_json(result, args.benchmark)
        print(f"wrote {args.benchmark}")
    return status


def _score_threshold(cfg) -> float:
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return cfg.MODEL.RETINANET.SCORE_THRESH_TEST
    return cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST


def _torchscript(model, image, path) -> int:
    inputs = [{"image": image}]
    traced, adapter = trace_detector(model, inputs)
    traced.save(path)
    got = detector_outputs(torch.jit.load(path), adapter, inputs)[0]["instances"]
    print(f"wrote {path}: traced detector, {len(got)} detection(s) on a random image")
    return 0


def _onnx_backbone(model, images, args) -> int:
    names = export_backbone_onnx(model, images[0][None], args.output, deform_op=args.deform_op)
    print(f"wrote {args.output}: outputs {', '.join(names)}; {_operators(args.output)}")
    # The decomposed file takes only the size it was exported with.
    checked = images if args.deform_op == "DeformConv" else images[:1]
    worst = 0.0
    for image in checked:
        with torch.no_grad():
            expected = BackboneForExport(model).eval()(image[None])
        error = max(relative_errors(run_onnx(args.output, image[None].numpy()), expected))
        worst = max(worst, error)
        print(f"{_size(image)}: onnxruntime vs PyTorch, max relative error {error:.2e}")
    return 0 if worst <= 1e-4 else 1


def _onnx_detector(model, images, path, score_threshold) -> int:
    names, adapter = export_detector_onnx(model, images[0], path)
    print(f"wrote {path}: outputs {', '.join(names)}; {_operators(path)}")
    session = onnx_session(path)
    ok = True
    for image in images:
        got = onnx_detections(session, adapter, image)
        with torch.no_grad():
            expected = detector_instances(model, image)
        s = compare_detections(got, expected, score_threshold)
        ok = ok and s["agree"]
        print(
            f"{_size(image)}: {s['count']} detection(s) >= {score_threshold} in PyTorch, "
            f"{s['count_other']} in onnxruntime, {s['unmatched']} unmatched, max box difference "
            f"{s['max_box_diff']:.2e} px (tolerance {s['box_tolerance']:.1e}), max score "
            f"difference {s['max_score_diff']:.2e}" + ("" if s["agree"] else "  <- MISMATCH")
        )
    return 0 if ok else 1


def _operators(path) -> str:
    ops = onnx_operators(path)
    custom = sorted({op for (domain, op) in ops if domain not in ("", "ai.onnx")})
    return (
        f"{ops.get(('', 'DeformConv'), 0)} DeformConv node(s), non-standard operators: "
        f"{', '.join(custom) if custom else 'none'}"
    )


def _size(image) -> str:
    return f"{image.shape[1]}x{image.shape[2]}"


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="export_model.py"))
