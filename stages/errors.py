"""The one error type stages turn into a short message and exit code, instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable


class StageError(RuntimeError):
    """Bad params, bad input data or an unloadable model; the message says what to fix."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); print a StageError as `error: ...` and exit 2."""
    try:
        main()
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
