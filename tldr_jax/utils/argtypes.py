"""argparse types for the benchmark scripts: a bad count is argparse's one line and exit 2,
not a traceback from deep inside the run."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated integers >= 1 (`5,10,20`)."""
    return [positive_int(part) for part in text.split(",") if part.strip()] or _empty(text)


def _empty(text: str) -> list[int]:
    raise argparse.ArgumentTypeError(f"no values in {text!r}")
