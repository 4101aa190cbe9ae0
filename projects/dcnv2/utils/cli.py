"""What every ``tools/*.py`` script and ``train_net.py`` share: the command-line arguments, the
config's reading, weights loading, and bad input ending in one clear line (:mod:`dcnv2.errors`'s
exit convention), not a traceback.

The argument parsers are built without importing torch or detectron2 (they are imported by the
functions that need them), so ``--help`` and usage errors answer at once.
"""

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from ..errors import USER_ERRORS, DCNv2Error, report_user_error

__all__ = [
    "DEFAULT_CONFIG",
    "UserInputError",
    "add_config_arguments",
    "add_force_argument",
    "load_weights",
    "run_cli",
    "setup_cfg",
    "tool_parser",
    "train_net_parser",
]

# The config a tool reads when --config-file is not given.
DEFAULT_CONFIG = "faster_rcnn_R50_mdconv_FPN_1x.yaml"


class UserInputError(DCNv2Error):
    """Something the user gave (a path, an option) is missing or unusable; the message says what
    was wrong and what was expected."""


def tool_parser(doc: str, skip: int = 1) -> argparse.ArgumentParser:
    """The argument parser of a tool: its docstring's first paragraph as the description, and
    the paragraphs after the first ``skip`` ones (examples, notes) verbatim as the epilog."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", skip)[skip],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def train_net_parser(doc: str) -> argparse.ArgumentParser:
    """``train_net.py``'s argument parser: detectron2's ``default_argument_parser`` options, with
    ``doc`` (the script's docstring) as description and examples. ``--num-gpus``,
    ``--num-machines`` and ``--machine-rank`` are None when not given: under torchrun or srun
    they come from the launcher (:func:`dcnv2.engine.launch.resolve_process_counts`), else they
    are 1, 1 and 0."""
    parser = tool_parser(doc)
    parser.add_argument(
        "--config-file",
        default="",
        metavar="FILE",
        help="YAML or LazyConfig (.py) path, or the name of a config shipped with dcnv2",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint named by OUTPUT_DIR/last_checkpoint, if any",
    )
    parser.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    parser.add_argument(
        "--num-gpus", type=int, help="processes per machine (default: 1; the launcher's)"
    )
    parser.add_argument(
        "--num-machines", type=int, help="total number of machines (default: 1; the launcher's)"
    )
    parser.add_argument("--machine-rank", type=int, help="the rank of this machine (default: 0)")
    # A fixed port per user, as detectron2's: an orphaned run shows up as a port in use.
    port = 2**15 + 2**14 + hash(os.getuid() if hasattr(os, "getuid") else 1) % 2**14
    parser.add_argument(
        "--dist-url",
        default=f"tcp://127.0.0.1:{port}",
        help="rendezvous URL of the processes (default: %(default)s; 'auto': a free local port;"
        " ignored under torchrun/srun)",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=None,
        help='config overrides at the end: "KEY VALUE" pairs for a YAML config, key=value for '
        "a LazyConfig",
    )
    return parser


class _DeprecatedForce(argparse.Action):
    """``--overwrite``: the converters' former name of ``--force``; sets ``force`` and warns
    once (hidden from ``--help``)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, "force", nargs=0, help=argparse.SUPPRESS)
        self._warned = False

    def __call__(self, parser, namespace, values, option_string=None):
        if not self._warned:
            print(
                f"{parser.prog}: warning: {option_string} is deprecated; use --force",
                file=sys.stderr,
            )
            self._warned = True
        namespace.force = True


def add_force_argument(parser: argparse.ArgumentParser, what: str) -> argparse.ArgumentParser:
    """Add ``--force`` (overwrite ``what``), the one overwrite option of every tool, and its
    deprecated alias ``--overwrite``.

    Returns:
        ``parser``.
    """
    parser.add_argument("--force", action="store_true", help=f"overwrite {what}")
    parser.add_argument("--overwrite", action=_DeprecatedForce)
    return parser


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    default: str = DEFAULT_CONFIG,
    force: Optional[str] = None,
) -> argparse.ArgumentParser:
    """Add ``--config-file`` (a YAML path or the name of a shipped config), ``--opts`` (``KEY
    VALUE`` overrides, the rest of the command line) and, when ``force`` names what it
    overwrites, ``--force``.

    Returns:
        ``parser``.
    """
    parser.add_argument(
        "--config-file",
        default=default,
        help=f"YAML path or name of a config shipped with dcnv2 (default: {default})",
    )
    if force is not None:
        add_force_argument(parser, force)
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


def setup_cfg(
    config_file: str,
    opts: Sequence[str] = (),
    confidence_threshold: float = 0.5,
    device: str = "cpu",
):
    """The frozen config a tool runs a model of.

    Args:
        config_file: a YAML path, or the name of a config shipped with dcnv2.
        opts: ``KEY VALUE ...`` overrides; they win over ``device``.
        confidence_threshold: minimum score of a drawn / saved detection, in [0, 1].
        device: ``MODEL.DEVICE`` unless ``opts`` sets it.

    Raises:
        UserInputError: unknown config, bad override, threshold out of range, or a local
            ``MODEL.WEIGHTS`` file that does not exist.
        ConfigError: bad ``DATASETS.DCNV2.COCO`` triples (they are registered here).
    """
    from ..config import get_cfg

    if not 0.0 <= confidence_threshold <= 1.0:
        raise UserInputError(
            f"--confidence-threshold must be in [0, 1], got {confidence_threshold}"
        )
    if len(opts) % 2:
        raise UserInputError(f"--opts needs KEY VALUE pairs, got an odd number: {list(opts)}")
    try:
        cfg = get_cfg(config_file, ["MODEL.DEVICE", device, *opts])
    except FileNotFoundError as e:
        raise UserInputError(str(e)) from None
    except (KeyError, ValueError, AssertionError) as e:
        raise UserInputError(f"bad config override in --opts {list(opts)}: {e}") from None
    from ..data.coco import register_config_datasets

    register_config_datasets(cfg)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = confidence_threshold
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UserInputError(f"MODEL.WEIGHTS file {weights!r} does not exist")
    cfg.freeze()
    return cfg


def load_weights(model, cfg) -> None:
    """Load ``cfg.MODEL.WEIGHTS`` into ``model`` with dcnv2's checkpointer, following the
    config's ``MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS`` and ``ALLOW_SHAPE_MISMATCH`` ("" loads nothing).

    Raises:
        UserInputError: the file or URL cannot be read, does not fit, or is refused as unsafe.
    """
    from ..checkpoint import build_checkpointer

    weights = cfg.MODEL.WEIGHTS
    if not weights:
        return
    try:
        build_checkpointer(cfg, model).load(weights)
    except (OSError, DCNv2Error) as e:  # OSError: also a URL that cannot be fetched
        raise UserInputError(f"cannot load MODEL.WEIGHTS {weights!r}: {e}") from None


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv=None, prog: str = "") -> int:
    """Run ``main(argv)``; on a user error (:data:`dcnv2.errors.USER_ERRORS`) print
    ``prog: error: <message>`` and return 2 (:func:`dcnv2.errors.report_user_error`).

    Args:
        main: the tool's entry point; returns an exit code.
        argv: arguments (``sys.argv[1:]`` when None).
        prog: name printed before the message.
    """
    try:
        return main(argv)
    except USER_ERRORS as e:
        return report_user_error(prog or "error", e)
