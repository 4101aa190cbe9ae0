"""What every ``tools/*.py`` script and ``train_net.py`` share: the command-line arguments, the
config's reading, weights loading, and bad input ending in one clear line (:mod:`dcnv2.errors`'s
exit convention), not a traceback.

The argument parsers are built without importing torch or detectron2 (they are imported by the
functions that need them), so ``--help`` and usage errors answer at once.
"""

import argparse
import os
import re
import sys
from typing import Callable, Optional, Sequence

from ..errors import USER_ERRORS, DCNv2Error, WeightsError, report_user_error

__all__ = [
    "DEFAULT_CONFIG",
    "RUN_CONFIG",
    "UserInputError",
    "add_config_arguments",
    "choose_config_file",
    "add_force_argument",
    "load_weights",
    "run_cli",
    "run_config_file",
    "setup_cfg",
    "refuse_existing_outputs",
    "tool_parser",
    "train_net_parser",
]

# The config a tool reads when neither --config-file nor a run's weights are given.
DEFAULT_CONFIG = "faster_rcnn_R50_mdconv_FPN_1x.yaml"
# The full config a training run saves in its OUTPUT_DIR, beside its checkpoints (detectron2's
# default_setup, dcnv2.engine.setup_run for YAML configs and LazyConfigs alike).
RUN_CONFIG = "config.yaml"


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
        "--force",
        action="store_true",
        help="--eval-only: replace results of other weights in OUTPUT_DIR/inference",
    )
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
    default: Optional[str] = DEFAULT_CONFIG,
    force: Optional[str] = None,
    config_default: Optional[str] = None,
) -> argparse.ArgumentParser:
    """Add ``--config-file`` (a YAML path or the name of a shipped config), ``--opts`` (``KEY
    VALUE`` overrides, the rest of the command line) and, when ``force`` names what it
    overwrites, ``--force``.

    Without ``--config-file`` (``args.config_file`` None) the tool reads the config of the run
    whose weights ``--opts MODEL.WEIGHTS`` names, else ``default`` (:func:`choose_config_file`).

    Args:
        parser: the tool's parser.
        default: the config of a tool run without weights; None: such a run is refused unless
            ``MODEL.WEIGHTS ""`` is given (see :func:`choose_config_file`).
        force: what ``--force`` overwrites, for its help; None: no ``--force``.
        config_default: what ``--config-file``'s help says its default is, for a tool that
            chooses it otherwise.

    Returns:
        ``parser``.
    """
    fallback = f"else {default}" if default else "required without MODEL.WEIGHTS"
    config_default = config_default or (
        f"the {RUN_CONFIG} beside --opts MODEL.WEIGHTS, written by the run that trained them; "
        f"{fallback}"
    )
    parser.add_argument(
        "--config-file",
        default=None,
        help=f"YAML path or name of a config shipped with dcnv2 (default: {config_default})",
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


def _weights_in(opts: Sequence[str]) -> Optional[str]:
    """The ``MODEL.WEIGHTS`` of ``KEY VALUE`` overrides (the last one wins), or None."""
    found = None
    for key, value in zip(opts[::2], opts[1::2]):
        if key == "MODEL.WEIGHTS":
            found = value
    return found


def run_config_file(weights: str) -> Optional[str]:
    """The :data:`RUN_CONFIG` in the folder of a local weights file, or None (no such file, a
    URL, or weights without it)."""
    if not weights or "://" in weights or not os.path.isfile(weights):
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), RUN_CONFIG)
    return path if os.path.isfile(path) else None


def _is_lazy_config_dump(path: str) -> bool:
    """``path`` is a LazyConfig saved as YAML: ``model`` at the top level, no ``MODEL``. Read
    from the top-level lines, as a LazyConfig's dump may hold ``!!python/object`` tags."""
    try:
        with open(path) as f:
            top = {m.group(1) for m in (re.match(r"([A-Za-z_]\w*):", line) for line in f) if m}
    except (OSError, UnicodeDecodeError):
        return False  # reading it as a YAML config gives the clear error
    return "model" in top and "MODEL" not in top


def refuse_existing_outputs(paths: Sequence[str], force: bool, what: str = "output file(s)"):
    """Stop before anything is written when some of ``paths`` exist and ``force`` is not set.

    Raises:
        UserInputError: names the first existing path and how many ``what`` would be
            overwritten.
    """
    if force:
        return
    existing = [p for p in paths if os.path.exists(p)]
    if existing:
        raise UserInputError(
            f"{existing[0]!r} exists ({len(existing)} {what} would be overwritten); "
            "pass --force to overwrite or choose another --output"
        )


def choose_config_file(
    config_file: Optional[str], opts: Sequence[str] = (), default: Optional[str] = DEFAULT_CONFIG
) -> str:
    """The config a tool reads: ``config_file`` when given; else the :data:`RUN_CONFIG` of the
    run whose local weights ``opts`` names (``MODEL.WEIGHTS``; a note on stderr says which file);
    else, for no weights or a URL, ``default``. A tool without a default (None) refuses to run
    without any ``MODEL.WEIGHTS``; ``MODEL.WEIGHTS ""`` (a random model, on purpose) then reads
    :data:`DEFAULT_CONFIG`.

    Raises:
        UserInputError: local weights without a :data:`RUN_CONFIG` beside them, or whose run
            was a LazyConfig's; nothing to go on and no ``default``.
        WeightsError: local weights that are missing or cannot be a checkpoint.
    """
    if config_file:
        return config_file
    weights = _weights_in(opts)
    if weights and "://" not in weights:
        from ..checkpoint.integrity import check_weights_file

        # A file that cannot be weights is the first thing to say, before any config.yaml.
        check_weights_file(weights, "given by MODEL.WEIGHTS", resuming=False)
        found = run_config_file(weights)
        if found is None:
            raise UserInputError(
                f"no --config-file, and MODEL.WEIGHTS {weights!r} has no {RUN_CONFIG} beside it "
                "(a training run writes one in its OUTPUT_DIR): pass --config-file with the "
                "config the weights were trained with"
            )
        if _is_lazy_config_dump(found):
            raise UserInputError(
                f"the run's config {found} is a LazyConfig (a .py run); the tools read YAML "
                "configs: pass --config-file with a YAML config of the same model"
            )
        print(f"using the run's config {found}", file=sys.stderr, flush=True)
        return found
    if weights is None and default is None:
        raise UserInputError(
            "no config: pass --config-file (a YAML path or a shipped config's name), or --opts "
            f"MODEL.WEIGHTS with weights of a training run (the {RUN_CONFIG} beside them is used)"
        )
    return default or DEFAULT_CONFIG


def setup_cfg(
    config_file: Optional[str],
    opts: Sequence[str] = (),
    confidence_threshold: float = 0.5,
    device: str = "cpu",
    *,
    default: Optional[str] = DEFAULT_CONFIG,
):
    """The frozen config a tool runs a model of.

    Args:
        config_file: a YAML path, or the name of a config shipped with dcnv2; None: the config
            of the run whose weights ``opts`` names, else ``default`` (:func:`choose_config_file`).
        opts: ``KEY VALUE ...`` overrides; they win over ``device``.
        confidence_threshold: minimum score of a drawn / saved detection, in [0, 1].
        device: ``MODEL.DEVICE`` unless ``opts`` sets it.
        default: as :func:`choose_config_file`.

    Raises:
        UserInputError: unknown config, bad override, threshold out of range, or a local
            ``MODEL.WEIGHTS`` file that does not exist or cannot be a checkpoint (a folder,
            empty, text, cut short).
        ConfigError: bad ``DATASETS.DCNV2.COCO`` triples (they are registered here).
    """
    from ..checkpoint.integrity import check_weights_file
    from ..config import get_cfg

    if not 0.0 <= confidence_threshold <= 1.0:
        raise UserInputError(
            f"--confidence-threshold must be in [0, 1], got {confidence_threshold}"
        )
    if len(opts) % 2:
        raise UserInputError(f"--opts needs KEY VALUE pairs, got an odd number: {list(opts)}")
    config_file = choose_config_file(config_file, opts, default)
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
    try:  # a local file that cannot be a checkpoint, before the model is built
        check_weights_file(cfg.MODEL.WEIGHTS, "given by MODEL.WEIGHTS", resuming=False)
    except WeightsError as e:
        raise UserInputError(str(e)) from None
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
