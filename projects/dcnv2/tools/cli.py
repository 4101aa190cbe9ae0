"""What ``train_net.py`` and every ``tools/*.py`` share: parsers, the config a tool reads,
weights loading, silenced third-party messages, user errors as one ``<prog>: error:`` line."""

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
from ..errors import USER_ERRORS, DCNv2Error, UserInputError, WeightsError, report_user_error

# The config a tool reads when neither --config-file nor a run's weights are given.
DEFAULT_CONFIG = "faster_rcnn_R50_mdconv_FPN_1x.yaml"
# The config a training run saves in its OUTPUT_DIR, beside its checkpoints.
RUN_CONFIG = "config.yaml"

# Messages a dcnv2 user can do nothing about: (category, start). pytest.ini ignores the same.
KNOWN_WARNINGS = (
    (FutureWarning, "`torch.jit.script` is deprecated"),  # fvcore, detectron2 at import
    (UserWarning, "torch.meshgrid: in an upcoming release, it will be required to pass the"),
    (FutureWarning, "`broadcast_buffers` is deprecated"),  # detectron2's create_ddp_model
    (UserWarning, "pkg_resources is deprecated as an API"),  # detectron2.model_zoo
)
KNOWN_LOG_MESSAGES = {
    "torch.fx._symbolic_trace": "is_fx_tracing will return true for both",  # ROIPooler
    "torch.utils.cpp_extension": "No CUDA runtime is found",  # CUDA tools without a GPU
}


def _not_known(record: logging.LogRecord) -> bool:
    start = KNOWN_LOG_MESSAGES.get(record.name)
    return start is None or not record.getMessage().startswith(start)


def silence_known_warnings() -> None:
    """Drop :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_MESSAGES` for the rest of the process."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", re.escape(message), category)
    for name in KNOWN_LOG_MESSAGES:
        logging.getLogger(name).addFilter(_not_known)  # added once: addFilter skips a duplicate


# Entry points import this module before modules that print some of these messages at import.
silence_known_warnings()


def tool_parser(doc: str, skip: int = 1) -> argparse.ArgumentParser:
    """A parser with ``doc``'s first paragraph as description, the paragraphs after the first
    ``skip`` as epilog."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", skip)[skip],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def train_net_parser(doc: str) -> argparse.ArgumentParser:
    """detectron2's ``default_argument_parser`` with ``doc`` as help and ``--force``; process
    counts default to None."""
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
    """``--overwrite``, the converters' former ``--force``: sets ``force`` with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated; use --force", file=sys.stderr
        )
        namespace.force = True


def add_force_argument(parser: argparse.ArgumentParser, what: str) -> argparse.ArgumentParser:
    """Add ``--force`` (overwrite ``what``) and its hidden, deprecated alias ``--overwrite``."""
    parser.add_argument("--force", action="store_true", help=f"overwrite {what}")
    parser.add_argument(
        "--overwrite", action=_DeprecatedForce, dest="force", nargs=0, help=argparse.SUPPRESS
    )
    return parser


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    default: Optional[str] = DEFAULT_CONFIG,
    force: Optional[str] = None,
    config_default: Optional[str] = None,
) -> argparse.ArgumentParser:
    """Add ``--config-file``, ``--opts`` and, when ``force`` names what it overwrites, ``--force``.

    Args:
        default: the config of a run without weights (:func:`choose_config_file`).
        config_default: ``--config-file``'s default as its help says it.
    """
    fallback = f"else {default}" if default else "required without MODEL.WEIGHTS"
    config_default = (
        config_default or f"the {RUN_CONFIG} of the run that wrote --opts MODEL.WEIGHTS; {fallback}"
    )
    parser.add_argument(
        "--config-file",
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


def refuse_existing_outputs(paths: Sequence[str], force: bool, what: str = "output file(s)"):
    """Raise :class:`UserInputError` when some of ``paths`` exist and ``force`` is not set."""
    existing = [] if force else [p for p in paths if os.path.exists(p)]
    if existing:
        raise UserInputError(
            f"{existing[0]!r} exists ({len(existing)} {what} would be overwritten); "
            "pass --force to overwrite them, or write to another path"
        )


def choose_config_file(
    config_file: Optional[str], opts: Sequence[str] = (), default: Optional[str] = DEFAULT_CONFIG
) -> str:
    """``config_file``; else the :data:`RUN_CONFIG` beside the local ``MODEL.WEIGHTS`` of
    ``opts``; else ``default``. Without a ``default``, a run without ``MODEL.WEIGHTS`` is
    refused; ``MODEL.WEIGHTS ""`` reads :data:`DEFAULT_CONFIG`."""
    if config_file:
        return config_file
    weights = dict(zip(opts[::2], opts[1::2])).get("MODEL.WEIGHTS")  # the last one counts
    if weights and "://" not in weights:
        # A file that cannot be weights is the first thing to say, before any config.yaml.
        check_weights_file(weights, "given by MODEL.WEIGHTS")
        found = os.path.join(os.path.dirname(os.path.abspath(weights)), RUN_CONFIG)
        if not os.path.isfile(found):
            raise UserInputError(
                f"no --config-file, and MODEL.WEIGHTS {weights!r} has no {RUN_CONFIG} beside it "
                "(a training run writes one in its OUTPUT_DIR): pass --config-file with the "
                "config the weights were trained with"
            )
        # A LazyConfig saved as YAML has "model:" and no "MODEL:" (read by line: it may hold tags).
        with open(found, errors="replace") as f:
            top = {m.group(1) for m in (re.match(r"([A-Za-z_]\w*):", line) for line in f) if m}
        if "model" in top and "MODEL" not in top:
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
        opts: ``KEY VALUE ...`` overrides; they win over ``device``.
        default: as :func:`choose_config_file`.
    """
    if not 0.0 <= confidence_threshold <= 1.0:
        raise UserInputError(
            f"--confidence-threshold must be in [0, 1], got {confidence_threshold}"
        )
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
        check_weights_file(cfg.MODEL.WEIGHTS, "given by MODEL.WEIGHTS")
    except WeightsError as e:
        raise UserInputError(str(e)) from None
    cfg.freeze()
    return cfg


def load_weights(model, cfg) -> None:
    """Load ``cfg.MODEL.WEIGHTS`` ("" loads nothing) with dcnv2's checkpointer; UserInputError
    when it cannot be read, does not fit or is refused as unsafe."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        return
    try:
        build_checkpointer(cfg, model).load(weights)
    except (OSError, DCNv2Error) as e:  # OSError: also a URL that cannot be fetched
        raise UserInputError(f"cannot load MODEL.WEIGHTS {weights!r}: {e}") from None


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv=None, prog: str = "") -> int:
    """A tool's entry point: ``main(argv)``, a user error printed as ``<prog>: error: ...``
    returning 2."""
    silence_known_warnings()
    try:
        return main(argv)
    except USER_ERRORS as e:
        return report_user_error(prog or "error", e)
