"""dcnv2's one error family and the exit convention of every entry point.

Each exception derives from :class:`DCNv2Error` and from the built-in a caller would catch;
:func:`report_user_error` prints one ``<prog>: error: <message>`` line (exit status 2).
"""

import sys

__all__ = [
    "AnnotationError",
    "ConfigError",
    "ConfigFileNotFoundError",
    "DCNv2Error",
    "DependencyMissingError",
    "ImageReadError",
    "LaunchError",
    "NonFiniteLossError",
    "OutputDirError",
    "TrainingInterrupted",
    "UserInputError",
    "USER_ERRORS",
    "USER_ERROR_EXIT",
    "WeightsError",
    "detectron2_missing",
    "report_user_error",
]


class DCNv2Error(Exception):
    """Root of every dcnv2 exception: a problem with the user's input, reported as one message."""

    def __str__(self) -> str:
        # OSError's str() shows errno and filename when set, KeyError's is a repr: keep the message.
        return str(self.args[0]) if self.args else ""


class ConfigError(DCNv2Error, ValueError):
    """A config with an unknown key or a value of the wrong type."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A config file (or a file its ``_BASE_`` names) that does not exist."""


class WeightsError(DCNv2Error, OSError):
    """A weights/checkpoint file that is missing, unreadable, truncated or does not fit."""


class UserInputError(DCNv2Error):
    """Something the user gave a tool (a path, an option) is missing or unusable."""


class AnnotationError(DCNv2Error, ValueError):
    """A dataset's annotation file is malformed or inconsistent."""


class ImageReadError(DCNv2Error, OSError):
    """An image of a dataset cannot be read (missing, unreadable, truncated, wrong size)."""


class OutputDirError(DCNv2Error, OSError):
    """``OUTPUT_DIR`` cannot be created or written."""


class LaunchError(DCNv2Error, ValueError):
    """The command line asks for processes or devices this machine does not have."""


class NonFiniteLossError(DCNv2Error, FloatingPointError):
    """A training loss (or gradient) became NaN or infinite; the weights were not updated with it.

    Attributes:
        diverged: the weights already diverged in an earlier update whose loss was finite.
    """

    def __init__(self, message: str, *, diverged: bool = False):
        super().__init__(message)
        self.diverged = diverged


class DependencyMissingError(DCNv2Error, ImportError):
    """A package dcnv2 needs (detectron2) is not installed in this Python."""


def detectron2_missing(cause: ImportError) -> DependencyMissingError:
    """The error ``import dcnv2`` raises when detectron2 cannot be imported (``cause``)."""
    return DependencyMissingError(
        f"dcnv2 needs detectron2, which this Python ({sys.executable}) cannot import ({cause}). "
        "Install everything with the README's set-up command, `bash tools/setup_env.sh` (a "
        "virtual environment with torch, detectron2 and dcnv2), or on a GPU machine build "
        "detectron2 from source first, so its CUDA ops are compiled (python -m pip install "
        "'git+https://github.com/facebookresearch/detectron2.git'), then run "
        "`DCNV2_SYSTEM_SITE=1 bash tools/setup_env.sh`.",
        name="detectron2",
    )


class TrainingInterrupted(DCNv2Error):
    """Training stopped cleanly on a signal after writing a checkpoint.

    Reported as ``<prog>: stopped: <message>`` with :attr:`exit_status` 128 + ``signum`` (143 for
    SIGTERM), so schedulers that requeue preempted jobs see it as preempted.
    """

    def __init__(self, message: str, *, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


# Problems with the user's input; plain OS errors name a path the user gave.
USER_ERRORS = (DCNv2Error, FileNotFoundError, IsADirectoryError, PermissionError)
# Exit status of an entry point stopped by a user error (argparse's, for its own errors).
USER_ERROR_EXIT = 2


def report_user_error(prog: str, error: BaseException) -> int:
    """Print ``error`` as ``<prog>: error: <message>`` on stderr; return the exit status."""
    message = str(error) or type(error).__name__
    if isinstance(error, TrainingInterrupted):
        print(f"{prog}: stopped: {message}", file=sys.stderr, flush=True)
        return error.exit_status
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT
