"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input from the user (path, flag, checkpoint): the message names the problem and the fix."""


def run_command(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
                argv: Sequence[str] | None = None) -> int:
    """Every console entry point: parse, then run as run_guarded does."""
    args = parser.parse_args(argv)
    return run_guarded(lambda: main(args))


def run_guarded(call: Callable[[], int | None]) -> int:
    """Run `call` (a command or a benchmark script's main), turning a UserError into one line on stderr and
    exit code 2."""
    try:
        return call() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
