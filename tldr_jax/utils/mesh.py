"""Device mesh helpers shared by every stage: one ('data', 'fsdp') mesh, batch-major sharding."""

from __future__ import annotations

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
    n = jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the device count {n}")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices")
    return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=(AxisType.Auto,) * 2)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh; the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXES))


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
