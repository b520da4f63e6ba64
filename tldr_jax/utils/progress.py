"""Progress bars that stay readable in a log file.

On a terminal a tqdm bar redraws itself in place with carriage returns. Where stderr is a
file or a pipe (a batch job's log, `> log 2>&1`), those redraws pile up on one line and the
log records written between them land in the middle of a bar. There `bar` writes each
redraw as a line of its own, at most every `FILE_INTERVAL_S` seconds, so every log record
starts a line. A Jupyter kernel keeps tqdm's notebook widget.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

FILE_INTERVAL_S = 30.0  # seconds between progress lines where stderr is not a terminal
_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's moves between stacked bars


class LineStream:
    """A stream for tqdm that turns each in-place redraw into a whole line: tqdm starts a
    redraw with a carriage return and ends none; clearing (spaces) and cursor moves write
    nothing."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        for part in _CURSOR_MOVES.sub("", text).replace("\n", "\r").split("\r"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`; where stderr is not a terminal (and not a notebook), a line
    at most every `FILE_INTERVAL_S` seconds instead of redraws in place: none for a bar that
    ends sooner, and no repeats from tqdm's monitor thread (`miniters=1` keeps tqdm from
    tuning its own update rate, which is what lets that thread print)."""
    if "ipykernel" in sys.modules:
        from tqdm.auto import tqdm as auto

        return auto(iterable, **kwargs)
    stream = kwargs.get("file") or sys.stderr
    if not _is_terminal(stream):
        kwargs["file"] = LineStream(stream)
        kwargs.setdefault("mininterval", FILE_INTERVAL_S)
        kwargs.setdefault("miniters", 1)
        kwargs.setdefault("delay", kwargs["mininterval"])
    return tqdm(iterable, **kwargs)
