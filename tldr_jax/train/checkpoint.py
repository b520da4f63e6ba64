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

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

DATA_STATE_KEY = "_data_state"


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
        self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
        self._mngr.wait_until_finished()

    def restore(self, step: int, target: Any, data_iter: Any = None) -> tuple[Any, dict]:
        """Restores into the structure, dtypes and shardings of `target` (arrays or
        jax.ShapeDtypeStruct with .sharding)."""
        import grain

        abstract = jax.tree.map(_abstract, target)
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract),
            "extra": ocp.args.JsonRestore(),
        }
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
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
        return self._mngr.restore(step, args=ocp.args.Composite(state=args))["state"]

    def close(self) -> None:
        self._mngr.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
