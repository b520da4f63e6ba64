"""Device mesh helpers shared by every stage: one ('data', 'fsdp') mesh, batch-major sharding."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
    """A 2-D ('data', 'fsdp') mesh over all devices; `data=-1` takes what `fsdp` leaves.

    Axes are `Auto` (the compiler propagates shardings from jit's in/out_shardings), which is
    how every stage here declares its layout; jax.make_mesh's default would be `Explicit`.
    """
    data, fsdp = mesh_shape(data, fsdp, jax.device_count())
    return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=(AxisType.Auto,) * 2)


def mesh_shape(data: int, fsdp: int, devices: int) -> tuple[int, int]:
    """(data, fsdp) of the mesh over `devices`; a ConfigError naming mesh.data / mesh.fsdp
    where they do not fit (`data=-1` takes what fsdp leaves)."""
    from tldr_jax.config_check import ConfigError

    if fsdp < 1 or devices % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp}: must divide the {devices} devices")
    if data == -1:
        data = devices // fsdp
    if data * fsdp != devices:
        raise ConfigError(
            f"mesh.data={data} x mesh.fsdp={fsdp} != the {devices} devices: set mesh.data=-1 "
            "(all the devices fsdp leaves)"
        )
    return data, fsdp


# Training batches each stage splits over every device (`shard_batch`).
SHARDED_BATCHES: dict[str, tuple[str, ...]] = {
    "pretrain": ("train.batch_size",),
    "score": ("train.batch_size",),
    "train-captioner": ("captioner.train.batch_size",),
    "caption": ("caption.train.batch_size",),
    "compress": ("captioner.train.batch_size", "train.batch_size", "caption.train.batch_size"),
}


def check_setup(config: Any, stage: str) -> None:
    """Before a stage reads anything: its mesh fits the devices and the training batches it
    splits over them divide evenly (a ConfigError naming the key; an uneven batch failed
    inside the first training step, after the caption embeddings were computed)."""
    from tldr_jax.config_check import ConfigError, lookup

    devices = jax.device_count()
    mesh_cfg = config.get("mesh") if hasattr(config, "get") else None
    if mesh_cfg is not None:
        mesh_shape(int(mesh_cfg.data), int(mesh_cfg.fsdp), devices)
    bad = []
    for key in SHARDED_BATCHES.get(stage, ()):
        _, batch = lookup(config, key)
        if isinstance(batch, int) and batch % devices:
            up = -(-batch // devices) * devices
            bad.append(f"{key}={batch}: must be a multiple of the {devices} devices (e.g. {up})")
    if bad:
        raise ConfigError("; ".join(bad) + ": each device takes an equal share of a batch")


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh; the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXES))


def split_batch_sharding(mesh: Mesh, batch: int) -> NamedSharding | None:
    """A sharding of a batch's leading axis over g = gcd(batch, devices) of the mesh's devices,
    replicated over the rest (batch 100 on 8 devices: 4 slices of 25, each on 2 devices);
    None where g is 1 (one device, or a batch no device count divides)."""
    devices = mesh.devices.reshape(-1)
    g = math.gcd(int(batch), len(devices))
    if g <= 1:
        return None
    grid = devices.reshape(g, len(devices) // g)
    split = Mesh(grid, ("batch", "replica"), axis_types=(AxisType.Auto,) * 2)
    return NamedSharding(split, P("batch"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Process-local numpy arrays -> global jax Arrays split over the leading axis.

    Each process passes its own slice (the global leading size is the sum over processes);
    the local leading size must divide evenly over this process's devices.
    """
    sharding = data_sharding(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, tree)
