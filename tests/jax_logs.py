"""JAX's compile log for tests that count compiles."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def compile_log() -> Iterator[list[str]]:
    """The messages JAX logs while compile logging is on, as they come (one starting
    "Compiling" per compile)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: messages.append(r.getMessage())
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield messages
    finally:
        logger.removeHandler(handler)
