"""SIGTERM handling: finish the current step, checkpoint, then exit with a resume hint.

One process: our SIGTERM handler sets a flag that checkpointing loops read after each step
(`agreed()`, or `requested()` in loops with no collectives). A SIGTERM that arrives while no
such loop runs (a stage without checkpoints, e.g. `select`, or the evaluation after a
training loop) stops the stage at once with `Preempted`: nothing half-written is kept
(outputs are written atomically) and a rerun starts that stage again.

Several processes (`jax.distributed`): SIGTERM is taken by JAX's own preemption service,
which `jax.distributed.initialize` starts. A notice on any one process reaches all of them,
and `agreed()` (`multihost_utils.reached_preemption_sync_point` over a per-process call
counter) turns True on every process at the same call, so all of them checkpoint the same
step and exit together. A per-process flag read at different steps would send one process
into the checkpoint's collectives and another into the next step's, and hang both. Every
process must therefore call `agreed()` the same number of times in the same order, which
the loops that use it (pretrain, train-captioner, buffer, distill) do: they run in lockstep.
Loops with no collectives (`extract` chunks, caption generation) and stages without
checkpoints do not see the notice there; they run to their end (or the scheduler's SIGKILL,
after which a rerun resumes), and the next checkpointing loop stops at its first step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a terminated job

_requested = threading.Event()
_state = {"calls": 0, "agreed": False, "polling": 0, "seen": False}


class Preempted(RuntimeError):
    """Raised by a training loop after it saved a checkpoint in response to SIGTERM."""


def _jax_service() -> object | None:
    """JAX's preemption sync manager when this is a multi-process run, else None."""
    import jax
    from jax._src import distributed

    if jax.process_count() <= 1 or distributed.global_state.client is None:
        return None
    return distributed.global_state.preemption_sync_manager


def _handler(signum: int, frame: object) -> None:
    _requested.set()
    if not _state["polling"]:
        raise Preempted(
            "SIGTERM received while no checkpointed loop was running; this stage's "
            "unfinished work was not kept (finished outputs and earlier stages are). "
            "Rerun the same command to run it again."
        )


def install_handlers() -> None:
    """Takes SIGTERM for this process, unless JAX's preemption service has it (multi-process)."""
    if _jax_service() is not None:
        return
    signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def polling() -> Iterator[None]:
    """Marks a loop that reads `agreed()` / `requested()` after each step and checkpoints:
    a SIGTERM inside it waits for the loop instead of stopping the stage at once."""
    _state["polling"] += 1
    try:
        yield
    finally:
        _state["polling"] -= 1
    if not _state["polling"] and _requested.is_set() and not _state["seen"]:
        # The signal came after the loop's last look (while its final checkpoint was
        # written): its work is kept, and the stage stops here rather than going on into
        # work the signal was meant to stop (an evaluation after training).
        raise Preempted(
            "SIGTERM received as a checkpointed loop finished; its work is kept. Rerun the "
            "same command to go on from there."
        )


def requested() -> bool:
    """True once SIGTERM arrived at this process (loops with no collectives read it)."""
    _state["seen"] = _requested.is_set()
    return _state["seen"]


def agreed() -> bool:
    """Whether to checkpoint and stop now; the same answer on every process.

    Call it once per step of a loop that every process runs in lockstep. Once True it stays
    True.
    """
    if _state["agreed"]:
        return True
    service = _jax_service()
    if service is None:
        _state["agreed"] = _requested.is_set()
    else:
        _state["calls"] += 1
        _state["agreed"] = bool(service.reached_sync_point(_state["calls"]))
        if _state["agreed"]:
            _requested.set()
    _state["seen"] = _state["agreed"]
    return _state["agreed"]


def reset() -> None:
    _requested.clear()
    _state.update(calls=0, agreed=False, polling=0, seen=False)


def stop(what: str, step: int) -> Preempted:
    return Preempted(
        f"SIGTERM received; {what} checkpointed at step {step}. "
        "Rerun the same command to resume from there."
    )
