#!/usr/bin/env python
r"""Draw a run's detections beside the ground truth, one picture per image (detections left,
ground truth right).

Examples:
    python tools/visualize_results.py --output vis/ --results \
        output/quick/faster_rcnn_R50_mdconv_FPN_instant/inference/coco_instances_results.json
    python tools/visualize_results.py --results detections.json --output vis/ \
        --json annotations.json --image-root images/ --conf-threshold 0.3

The dataset: --dataset NAME (a registered dataset, or one of the config's DATASETS.DCNV2.COCO),
else the first DATASETS.TEST of the config: --config-file, else the run's own (config_eval.yaml
of the eval-only run that wrote the results, else config.yaml, beside inference/); or
--json + --image-root. Category names and colours come from the dataset's metadata. Existing
pictures are never overwritten unless --force. Logic: dcnv2.tools.visualize_results.
"""

import sys

from dcnv2.errors import UserInputError
from dcnv2.tools import visualize_results as vr
from dcnv2.tools.cli import add_config_arguments, run_cli, setup_cfg, tool_parser


def parse_args(argv=None):
    parser = add_config_arguments(
        tool_parser(__doc__),
        force="existing pictures",
        config_default="the run's config_eval.yaml or config.yaml beside --results' folder",
    )
    parser.add_argument(
        "--results", required=True, help="COCO results json (OUTPUT_DIR/inference/...)"
    )
    parser.add_argument("--output", required=True, help="folder for the pictures")
    parser.add_argument("--dataset", help="registered dataset the results are of")
    parser.add_argument("--json", help="COCO-format annotations instead of a dataset name")
    parser.add_argument("--image-root", help="images of --json")
    parser.add_argument(
        "--conf-threshold", type=float, default=0.5, help="minimum score drawn (default 0.5)"
    )
    parser.add_argument("--max-images", type=int, help="draw the first N images only")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if bool(args.json) != bool(args.image_root):
        raise UserInputError("--json and --image-root go together")
    results = vr.load_results(args.results)
    if args.json:
        dicts, metadata = vr.dataset_from_json(args.json, args.image_root)
    else:
        config_file = args.config_file or vr.results_config_file(args.results)
        if config_file is None and not args.dataset:
            raise UserInputError(
                f"no config beside {args.results} (OUTPUT_DIR/config.yaml): pass --dataset, "
                "--config-file, or --json with --image-root"
            )
        if config_file and not args.config_file:
            print(f"using the run's config {config_file}", file=sys.stderr)
        cfg = setup_cfg(config_file, ["MODEL.WEIGHTS", "", *args.opts])
        dicts, metadata = vr.dataset_from_config(cfg, args.dataset)
    summary = vr.draw_results(
        dicts,
        metadata,
        results,
        args.output,
        conf_threshold=args.conf_threshold,
        force=args.force,
        max_images=args.max_images,
    )
    drawn = summary["images"]
    unmatched = summary["unmatched_results"]
    print(
        f"{len(drawn)} picture(s), {sum(d['predictions'] for d in drawn)} detection(s) >= "
        f"{args.conf_threshold} beside {sum(d['ground_truth'] for d in drawn)} ground-truth "
        f"object(s) -> {args.output}"
        + (f"; {unmatched} result(s) of images not in the dataset" if unmatched else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="visualize_results.py"))
