"""Orbax checkpoints of (train state, JSON extras, grain iterator state), resumable.

Orbax writes each step into a temporary directory and renames it when complete, so a
half-written checkpoint is never seen as the latest. Restoring takes a target pytree whose
arrays carry the *current* shardings, so a run saved on 8 devices restores onto 2.

The data iterator's state is saved inside the JSON extras (`_data_state`), once for all
processes: our training iterators are indexed by global step (`data/pipeline.py`), so
their state (the next step) is the same on every process and restores onto any process
count. grain's own checkpoint handler writes one file per process
(`process_<i>-of-<n>.json`) and cannot be read by a different number of processes; it is
read only from checkpoints written before this change.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

DATA_STATE_KEY = "_data_state"

# TensorStore's errors (raised as ValueError): the OS error under a failed write, and the
# status of a read that found the files cut short or corrupt, reading an array's data or
# opening it (its OCDBT manifest or metadata: "Error opening "cast" driver: ... Error reading").
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")
_DAMAGED = re.compile(
    r"^(OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT): "
    r"Error (reading|opening .*: Error reading)"
)
# A file read whole whose bytes do not decode (overwritten in place: no status code then).
_CORRUPT = re.compile(r"Error reading .*(Error decoding|Data corruption detected)")


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2, sweep_tmp: bool = False):
        """`sweep_tmp`: the folder's own writer (a stage saving into it under its stage lock)
        removes the `<step>.orbax-checkpoint-tmp` folders a save killed midway left, which a
        rerun saving other steps (another ckpt_every) would never replace. Never where the
        folder is only read: another stage may be saving into it (`distill` beside a
        `buffer` still training), and the sweep would delete its save in progress."""
        self.directory = Path(directory).absolute()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=sweep_tmp
            ),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        extra: dict | None = None,
        data_iter: Any = None,
        force: bool = True,
    ) -> None:
        if self._mngr.latest_step() == step:  # e.g. SIGTERM right after a periodic save
            return
        extra = dict(extra or {})
        if data_iter is not None:
            extra[DATA_STATE_KEY] = data_iter.get_state()
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        items["extra"] = ocp.args.JsonSave(extra)
        try:
            self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
            self._mngr.wait_until_finished()
        except Exception as e:
            # A full or read-only disk under Orbax's writer threads: an OSError naming the
            # folder (the CLI's one line), not a ValueError traceback. The step's temporary
            # folder is swept by the next run that saves here.
            code = next(filter(None, (_OS_ERROR_CODE.search(str(x)) for x in _chain(e))), None)
            if code is None:
                raise
            errnum = int(code.group(1))
            raise OSError(
                errnum, f"{os.strerror(errnum)}: saving checkpoint step {step}", str(self.directory)
            ) from None

    def restore(self, step: int, target: Any, data_iter: Any = None) -> tuple[Any, dict]:
        """Restores into the structure, dtypes and shardings of `target` (arrays or
        jax.ShapeDtypeStruct with .sharding)."""
        import grain

        abstract = jax.tree.map(_abstract, target)
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract),
            "extra": ocp.args.JsonRestore(),
        }
        out = self._restore(step, ocp.args.Composite(**items))
        extra = dict(out["extra"] or {})
        data_state = extra.pop(DATA_STATE_KEY, None)
        if data_iter is not None:
            if data_state is not None:
                data_iter.set_state(data_state)
            else:  # a checkpoint from before the state moved into the extras
                legacy = {"data": grain.checkpoint.CheckpointRestore(data_iter)}
                self._mngr.restore(step, args=ocp.args.Composite(**legacy))
        return out["state"], extra

    def restore_part(self, step: int, target: dict[str, Any]) -> dict[str, Any]:
        """Restores only the top-level entries of the saved state that `target` names (e.g.
        {"params", "rest"} for evaluation), into its structure, dtypes and shardings; the
        others (the optimizer state, whatever optimizer made it) are not read."""
        abstract = jax.tree.map(_abstract, target)
        args = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        return self._restore(step, ocp.args.Composite(state=args))["state"]

    def _restore(self, step: int, args: Any) -> Any:
        """`restore`, with a checkpoint whose files were cut short or corrupted since it was
        written a DamagedFileError naming it (Orbax renames a step into place only once it
        is whole, so the damage came from outside)."""
        from tldr_jax.utils.io import DamagedFileError

        try:
            return self._mngr.restore(step, args=args)
        except Exception as e:  # TensorStore's status, maybe wrapped by Orbax; JSON extras
            first = _damage(e)
            if first is None:
                raise
            where = self.directory / str(step)
            raise DamagedFileError(
                f"checkpoint {where} is damaged ({first[:300]}): delete {where} to resume "
                f"from the one before it, or delete {self.directory} to start over"
            ) from None

    def close(self) -> None:
        self._mngr.close()


def _chain(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from, outermost first."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _damage(error: BaseException) -> str | None:
    """The first line of the error (or of one it was raised from) that says a checkpoint's
    files are cut short or corrupt, or None."""
    for e in _chain(error):
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        if _DAMAGED.match(first) or _CORRUPT.search(first) or isinstance(e, json.JSONDecodeError):
            return first
    return None


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
