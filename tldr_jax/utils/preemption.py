"""SIGTERM handling: finish the current step, checkpoint, then exit with a resume hint."""

from __future__ import annotations

import signal
import threading

EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a terminated job

_requested = threading.Event()


class Preempted(RuntimeError):
    """Raised by a training loop after it saved a checkpoint in response to SIGTERM."""


def install_handlers() -> None:
    def _handler(signum: int, frame: object) -> None:
        _requested.set()

    signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    """True once SIGTERM arrived; loops check it after each step."""
    return _requested.is_set()


def reset() -> None:
    _requested.clear()


def stop(what: str, step: int) -> Preempted:
    return Preempted(
        f"SIGTERM received; {what} checkpointed at step {step}. "
        "Rerun the same command to resume from there."
    )
