"""ConvNet of the dataset-distillation literature (DC / DSA / MTT "ConvNetD3").

`depth` x [conv3x3(width) -> norm -> relu -> avgpool 2x2], then flatten (or global average).
'instancenorm' is GroupNorm with one group per channel (with affine parameters), as the MTT
code does: it normalises each sample on its own, so there are no batch statistics and the
network stays a pure function of its parameters (needed to unroll students in distillation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tldr_jax.models.conv import (
    avg_pool_cf,
    conv2d_cf,
    from_cf,
    kernel_matrix,
    per_channel,
    to_cf,
)

NORMS = ("instancenorm", "none")
POOLINGS = ("flatten", "gap")


class ConvNet(nnx.Module):
    """MTT-style ConvNet image encoder: (B,H,W,3) -> (B, out_dim)."""

    def __init__(
        self,
        image_size: int,
        *,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        pooling: str = "flatten",
        in_channels: int = 3,
        matmul_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if image_size % (2**depth):
            raise ValueError(f"image_size {image_size} is not divisible by 2**depth={2**depth}")
        self.image_size: int = image_size
        self.width: int = width
        self.depth: int = depth
        self.norm: str = norm
        self.pooling: str = pooling
        # "bfloat16": the convs multiply bfloat16 operands with float32 sums (models/conv.py).
        self.matmul_dtype: str = matmul_dtype
        self.convs = nnx.List(
            nnx.Conv(in_channels if i == 0 else width, width, (3, 3), padding="SAME", rngs=rngs)
            for i in range(depth)
        )
        # PyTorch GroupNorm's eps (1e-5), matching the reference implementation.
        self.norms = nnx.List(
            nnx.GroupNorm(width, num_groups=width, epsilon=1e-5, rngs=rngs)
            for _ in range(depth if norm == "instancenorm" else 0)
        )
        final = image_size // 2**depth
        self.out_dim: int = width * final * final if pooling == "flatten" else width

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # No dropout or batch statistics: train and eval are the same function.
        # Channel-first (C, B, H, W) inside (models/conv.py `conv2d_cf`: the students'
        # second-order gradients run several times faster on XLA:CPU as im2col + matmul, and
        # channel-first keeps every weight gradient's long axis contiguous).
        x = to_cf(x)
        for i, conv in enumerate(self.convs):
            wmat = kernel_matrix(conv.kernel[...])
            x = conv2d_cf(x, wmat, 3, 1, self.matmul_dtype) + per_channel(conv.bias[...])
            if self.norm == "instancenorm":
                x = _instance_norm(x, self.norms[i])
            x = jax.nn.relu(x)
            x = avg_pool_cf(x, 2)
        if self.pooling == "gap":
            return jnp.mean(x, axis=(2, 3)).T
        return from_cf(x).reshape(x.shape[1], -1)  # (B, H*W*C): the channel-last order


def _instance_norm(x: jax.Array, gn: nnx.GroupNorm) -> jax.Array:
    """`gn` (one group per channel) on a (C, B, H, W) map: each sample's channel normalised
    over its H x W positions, then gn's per-channel scale and bias."""
    mean = jnp.mean(x, axis=(2, 3), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(2, 3), keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + gn.epsilon)
    return y * per_channel(gn.scale[...]) + per_channel(gn.bias[...])
