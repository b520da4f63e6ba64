"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX.

Pre-LN encoder blocks, a learned CLS token and learned position embeddings, final LayerNorm.
`tokens` returns every output token (CLS + patches), which the codebook captioner quantizes
(TL;DR uses all 197 tokens of ViT-B/16 at 224 px); `__call__` returns the CLS feature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class EncoderBlock(nnx.Module):
    """x + MHSA(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=width, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
        self.mlp_in = nnx.Linear(width, mlp_dim, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class ViT(nnx.Module):
    """ViT image encoder: (B,H,W,3) -> CLS feature (B, width); `.tokens` -> (B, 1+P, width)."""

    def __init__(
        self,
        image_size: int,
        *,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        in_channels: int = 3,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} not divisible by patch {patch_size}")
        self.image_size: int = image_size
        self.patch_size: int = patch_size
        self.num_patches: int = (image_size // patch_size) ** 2
        self.patch_embed = nnx.Conv(
            in_channels,
            width,
            (patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            rngs=rngs,
        )
        normal = jax.nn.initializers.normal(0.02)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, width), jnp.float32))
        self.pos_embed = nnx.Param(
            normal(rngs.params(), (1, 1 + self.num_patches, width), jnp.float32)
        )
        self.blocks = nnx.List(
            EncoderBlock(width, num_heads, mlp_dim, rngs=rngs) for _ in range(depth)
        )
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
        self.out_dim: int = width

    def tokens(self, x: jax.Array) -> jax.Array:
        """All output tokens after the final LayerNorm: (B, 1 + num_patches, width)."""
        x = self.patch_embed(x)
        b, _, _, d = x.shape
        x = x.reshape(b, -1, d)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d)).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # No dropout: train and eval are the same function.
        return self.tokens(x)[:, 0]


def vit_b16_224(*, rngs: nnx.Rngs) -> ViT:
    """ViT-B/16 at 224 px: width 768, 12 layers, 12 heads, MLP 3072 -> 197 tokens, ~86M params."""
    return ViT(224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, rngs=rngs)


def vit_tiny(image_size: int = 32, *, patch_size: int = 8, rngs: nnx.Rngs) -> ViT:
    """A 2-layer, 64-wide ViT for tests and laptop-sized configs."""
    return ViT(
        image_size, patch_size=patch_size, width=64, depth=2, num_heads=4, mlp_dim=128, rngs=rngs
    )
