"""The CLI's standard streams, made safe for the environments batch jobs run in.

A stage's product is its files in the workdir; stdout and stderr only carry its log lines,
progress and the closing `wrote W/<stage>.json` line. Where those streams misbehave the
stage still runs to its end:

- a standard file descriptor that is closed (`>&- 2>&-`, some daemons): Python sets
  `sys.stdout` / `sys.stderr` to None (the CLI died at its first flush, before writing
  anything), and the next file opened would take the free descriptor, so C++ code writing
  to descriptor 2 (XLA's logging) would write into it. Each is opened on /dev/null.
- a reader that went away (`tldr-jax ... 2>&1 | head -1`, a `tee` that was killed): Python
  ignores SIGPIPE, so a write raises BrokenPipeError; logging already drops it, but a
  progress line or the closing line killed the stage (a traceback nobody saw, exit 1).
  Writes after that go to /dev/null.
- an encoding that cannot write a character of a path or caption (`PYTHONIOENCODING=ascii`,
  a non-UTF-8 locale): written as a backslash escape, not a UnicodeEncodeError.

No JAX import here: this runs first thing in the CLI.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, TextIO

_MODES = ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY))


def _open_missing_descriptors() -> None:
    """Opens /dev/null on each of descriptors 0, 1 and 2 that is closed."""
    for fd, mode in _MODES:
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, mode)  # the lowest free descriptor: `fd` itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


class PipeSafeStream:
    """A text stream whose writes and flushes survive its reader going away: on the first
    BrokenPipeError its descriptor is pointed at /dev/null, and what follows is dropped
    there. Everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def _reader_gone(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()  # what was buffered goes to /dev/null now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _text_stream(fd: int, write: bool) -> TextIO:
    return open(  # noqa: SIM115 (the process's standard stream, open for its lifetime)
        fd,
        "w" if write else "r",
        encoding="utf-8",
        errors="backslashreplace" if write else "surrogateescape",
        buffering=1 if write else -1,  # line-buffered, as Python's own where it is a tty
        closefd=False,
    )


def guard() -> None:
    """Makes the process's standard streams safe (module docstring). Idempotent; call it
    first thing in a command-line entry point, before anything is written or opened."""
    _open_missing_descriptors()
    if sys.stdin is None:
        sys.stdin = _text_stream(0, write=False)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if isinstance(stream, PipeSafeStream):
            continue
        if stream is None:
            stream = _text_stream(fd, write=True)
        elif getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")
        setattr(sys, name, PipeSafeStream(stream))
