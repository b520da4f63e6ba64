"""Process-level helpers for multi-host runs through JAX's own distributed runtime."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_initialized = False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Initialises `jax.distributed` when several processes are launched; no-op for one.

    Explicit arguments win; then the TLDR_COORDINATOR / TLDR_NUM_PROCESSES / TLDR_PROCESS_ID
    environment; then JAX's own auto-detection (Cloud TPU, SLURM, ...). A single plain
    process with none of these runs without the distributed runtime.
    """
    global _initialized
    if _initialized:
        return
    coordinator_address = coordinator_address or os.environ.get("TLDR_COORDINATOR")
    if num_processes is None and os.environ.get("TLDR_NUM_PROCESSES"):
        num_processes = int(os.environ["TLDR_NUM_PROCESSES"])
    if process_id is None and os.environ.get("TLDR_PROCESS_ID"):
        process_id = int(os.environ["TLDR_PROCESS_ID"])
    auto_env = any(
        k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID")
    )
    explicit = coordinator_address is not None and (num_processes or 1) > 1
    if explicit:
        # CPU processes need a cross-process collective backend; harmless on GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        _initialized = True
    elif auto_env and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
        try:
            jax.distributed.initialize()
            _initialized = True
        except Exception as e:  # one binary for one host or many
            if srun_task():
                # One of several tasks srun started: alone, each would redo the whole stage
                # in the same workdir.
                raise RuntimeError(
                    f"SLURM task {os.environ['SLURM_PROCID']} of {os.environ['SLURM_NTASKS']}: "
                    f"jax.distributed could not start ({e}); the tasks would each run the "
                    "whole stage alone (check the nodes reach each other, or run one task)"
                ) from e
            log.warning("jax.distributed not initialised (%s); running single-process", e)


def srun_task() -> bool:
    """Whether this process is one task of a SLURM job step (what `srun` sets, and what
    JAX's SLURM detection reads); an allocation's shell (`salloc`, the batch script itself)
    has SLURM_NTASKS but no step."""
    step = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    return all(k in os.environ for k in step)


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Blocks until every process reaches this point (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
