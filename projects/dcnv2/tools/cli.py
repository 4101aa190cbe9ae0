"""What ``train_net.py`` and every ``tools/*.py`` share: argument parsers, the config a tool reads,
weights loading, the third-party messages every entry point drops, and a user error ending as
one ``<prog>: error:`` line with exit status 2 (:mod:`dcnv2.errors`), not a traceback.
"""

import argparse
import logging
import os
import re
import sys
import warnings
from typing import Callable, Optional, Sequence

from ..checkpoint import build_checkpointer
from ..checkpoint.integrity import check_weights_file
from ..config import get_cfg
from ..data.coco import register_config_datasets
from ..errors import USER_ERRORS, DCNv2Error, WeightsError, report_user_error

# The config a tool reads when neither --config-file nor a run's weights are given.
DEFAULT_CONFIG = "faster_rcnn_R50_mdconv_FPN_1x.yaml"
# The config a training run saves in its OUTPUT_DIR, beside its checkpoints.
RUN_CONFIG = "config.yaml"

# Messages torch, fvcore and detectron2 print on every run that a dcnv2 user can do nothing
# about: (category, start of the message). pytest.ini ignores the same ones.
KNOWN_WARNINGS = (
    (FutureWarning, "`torch.jit.script` is deprecated"),  # fvcore, detectron2 at import
    (UserWarning, "torch.meshgrid: in an upcoming release, it will be required to pass the"),
    (FutureWarning, "`broadcast_buffers` is deprecated"),  # detectron2's create_ddp_model
    (UserWarning, "pkg_resources is deprecated as an API"),  # detectron2.model_zoo
)
# logger name -> start of the message it logs.
KNOWN_LOG_MESSAGES = {
    "torch.fx._symbolic_trace": "is_fx_tracing will return true for both",  # ROIPooler
    "torch.utils.cpp_extension": "No CUDA runtime is found",  # CUDA tools without a GPU
}


def _not_known(record: logging.LogRecord) -> bool:
    start = KNOWN_LOG_MESSAGES.get(record.name)
    return start is None or not record.getMessage().startswith(start)


def silence_known_warnings() -> None:
    """Drop :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_MESSAGES` for the rest of the process;
    every other warning and log record still shows. Each entry point calls it once."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", re.escape(message), category)
    for name in KNOWN_LOG_MESSAGES:
        logging.getLogger(name).addFilter(_not_known)  # added once: addFilter skips a duplicate


# The entry points import this module before detectron2's engine and torch's cpp_extension, which
# print some of these messages at import.
silence_known_warnings()


class UserInputError(DCNv2Error):
    """Something the user gave (a path, an option) is missing or unusable."""


def tool_parser(doc: str, skip: int = 1) -> argparse.ArgumentParser:
    """A tool's parser: ``doc``'s first paragraph as description, the paragraphs after the first
    ``skip`` ones (examples, notes) verbatim as epilog."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", skip)[skip],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def train_net_parser(doc: str) -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` with ``doc`` as help, plus ``--force``; the process
    counts default to None, for :func:`dcnv2.engine.launch.resolve_process_counts`."""
    from detectron2.engine import default_argument_parser  # after the filters (see above)

    parser = default_argument_parser(epilog=doc.split("\n\n", 1)[1])
    parser.description = doc.split("\n\n")[0]
    parser.add_argument(
        "--force",
        action="store_true",
        help="--eval-only: replace results of other weights in OUTPUT_DIR/inference",
    )
    parser.set_defaults(num_gpus=None, num_machines=None, machine_rank=None)
    return parser


class _DeprecatedForce(argparse.Action):
    """``--overwrite``, the converters' former ``--force``: hidden, warns once."""

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
    """Add ``--force`` (overwrite ``what``) and its deprecated alias ``--overwrite``."""
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
    """Add ``--config-file``, ``--opts`` (``KEY VALUE`` overrides, the rest of the command line)
    and, when ``force`` names what it overwrites, ``--force``.

    Args:
        default: the config of a run without weights (:func:`choose_config_file`).
        force: what ``--force`` overwrites, for its help; None: no ``--force``.
        config_default: ``--config-file``'s default as its help says it.
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


def run_config_file(weights: str) -> Optional[str]:
    """The :data:`RUN_CONFIG` beside a local weights file, or None."""
    if not weights or "://" in weights or not os.path.isfile(weights):
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), RUN_CONFIG)
    return path if os.path.isfile(path) else None


def _is_lazy_config_dump(path: str) -> bool:
    """A LazyConfig saved as YAML: ``model`` at the top level, no ``MODEL``. Read line by line, as
    such a dump may hold ``!!python/object`` tags."""
    try:
        with open(path) as f:
            top = {m.group(1) for m in (re.match(r"([A-Za-z_]\w*):", line) for line in f) if m}
    except (OSError, UnicodeDecodeError):
        return False  # reading it as a YAML config gives the clear error
    return "model" in top and "MODEL" not in top


def refuse_existing_outputs(paths: Sequence[str], force: bool, what: str = "output file(s)"):
    """Raise :class:`UserInputError` before anything is written when some of ``paths`` exist
    and ``force`` is not set."""
    existing = [] if force else [p for p in paths if os.path.exists(p)]
    if existing:
        raise UserInputError(
            f"{existing[0]!r} exists ({len(existing)} {what} would be overwritten); "
            "pass --force to overwrite or choose another --output"
        )


def choose_config_file(
    config_file: Optional[str], opts: Sequence[str] = (), default: Optional[str] = DEFAULT_CONFIG
) -> str:
    """The config a tool reads: ``config_file``; else the :data:`RUN_CONFIG` beside the local
    ``MODEL.WEIGHTS`` of ``opts`` (noted on stderr); else ``default``. Without a ``default``
    (None), a run without any ``MODEL.WEIGHTS`` is refused; ``MODEL.WEIGHTS ""`` reads
    :data:`DEFAULT_CONFIG`.

    Raises:
        UserInputError: local weights without a YAML :data:`RUN_CONFIG` beside them; nothing to
            go on and no ``default``.
        WeightsError: local weights that are missing or cannot be a checkpoint.
    """
    if config_file:
        return config_file
    weights = None
    for key, value in zip(opts[::2], opts[1::2]):
        if key == "MODEL.WEIGHTS":
            weights = value
    if weights and "://" not in weights:
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
    """The frozen config a tool runs a model of; registers its ``DATASETS.DCNV2.COCO``.

    Args:
        config_file: YAML path or shipped config's name; None: :func:`choose_config_file`.
        opts: ``KEY VALUE ...`` overrides; they win over ``device``.
        confidence_threshold: minimum score of a kept detection, in [0, 1].
        device: ``MODEL.DEVICE`` unless ``opts`` sets it.
        default: as :func:`choose_config_file`.

    Raises:
        UserInputError: unknown config, bad override, threshold out of range, or a local
            ``MODEL.WEIGHTS`` that cannot be a checkpoint.
        ConfigError: bad ``DATASETS.DCNV2.COCO`` triples.
    """
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
    """Load ``cfg.MODEL.WEIGHTS`` ("" loads nothing) with dcnv2's checkpointer, following
    ``MODEL.DCNV2.ALLOW_UNSAFE_WEIGHTS`` and ``ALLOW_SHAPE_MISMATCH``.

    Raises:
        UserInputError: the file or URL cannot be read, does not fit, or is refused as unsafe.
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        return
    try:
        build_checkpointer(cfg, model).load(weights)
    except (OSError, DCNv2Error) as e:  # OSError: also a URL that cannot be fetched
        raise UserInputError(f"cannot load MODEL.WEIGHTS {weights!r}: {e}") from None


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv=None, prog: str = "") -> int:
    """A tool's entry point: :func:`silence_known_warnings`, then ``main(argv)`` (``argv`` None:
    ``sys.argv[1:]``); a user error (:data:`dcnv2.errors.USER_ERRORS`) is printed as
    ``<prog>: error: <message>`` and returns 2."""
    silence_known_warnings()
    try:
        return main(argv)
    except USER_ERRORS as e:
        return report_user_error(prog or "error", e)
