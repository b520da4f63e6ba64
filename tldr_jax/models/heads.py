"""Projection head of the vision-language distillation reference (SPEC B.1)."""

from __future__ import annotations

import jax
from flax import nnx

from tldr_jax.utils.dtypes import x32_unless_wide


class Dropout(nnx.Dropout):
    """nnx.Dropout drawing its keep mask as it does without jax_enable_x64. nnx.Dropout draws
    it from a uniform of its Python-float keep probability's dtype: float64 under x64, which
    is another mask (results change) and a 64-bit temporary the size of the input. A 64-bit
    input keeps nnx.Dropout's own behaviour."""

    def __call__(
        self,
        inputs: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        with x32_unless_wide(inputs):
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)


class ProjectionHead(nnx.Module):
    """LayerNorm(dropout(Linear(gelu(p))) + p) with p = Linear(x): (B, in_dim) -> (B, out_dim).

    The residual around the second layer means the head starts close to a linear projection.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1, *, rngs: nnx.Rngs):
        self.in_dim: int = in_dim
        self.out_dim: int = out_dim
        self.projection = nnx.Linear(in_dim, out_dim, rngs=rngs)
        self.fc = nnx.Linear(out_dim, out_dim, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        # PyTorch's nn.LayerNorm eps and nn.GELU's exact form, as in the reference.
        self.norm = nnx.LayerNorm(out_dim, epsilon=1e-5, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Dropout is active only with train=True. `rngs` (an Rngs or a PRNG key) overrides the
        module's own dropout stream: pure-function callers pass a key per step."""
        projected = self.projection(x)
        h = self.fc(jax.nn.gelu(projected, approximate=False))
        h = self.dropout(h, deterministic=not train, rngs=rngs)
        return self.norm(h + projected)
