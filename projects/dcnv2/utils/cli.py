"""What every ``tools/*.py`` script shares: bad input ends in one clear line, not a traceback."""

import argparse
import sys
from typing import Callable, Optional, Sequence

__all__ = ["UserInputError", "run_cli", "tool_parser"]


class UserInputError(Exception):
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


# Errors that come from what the user passed in; anything else is a bug and keeps its traceback.
_USER_ERRORS = (UserInputError, FileNotFoundError, IsADirectoryError, PermissionError)


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv=None, prog: str = "") -> int:
    """Run ``main(argv)``; on a user error print ``prog: error: <message>`` and return 2.

    Args:
        main: the tool's entry point; returns an exit code.
        argv: arguments (``sys.argv[1:]`` when None).
        prog: name printed before the message.
    """
    try:
        return main(argv)
    except _USER_ERRORS as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{prog or 'error'}: error: {message}", file=sys.stderr)
        return 2
