"""32-bit programs under a user's jax_enable_x64."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp


def x32_unless_wide(tree: Any) -> contextlib.AbstractContextManager:
    """A context tracing as without jax_enable_x64 when every number in `tree` is at most
    32-bit (library code that makes arrays from Python floats or counts, e.g. flax's dropout
    or optax's schedules, then keeps to 32 bits under x64); a tree holding a 64-bit number
    keeps the current setting."""
    wide = any(
        jnp.issubdtype(x.dtype, jnp.number) and x.dtype.itemsize > 4
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype")
    )
    return contextlib.nullcontext() if wide else jax.enable_x64(False)
