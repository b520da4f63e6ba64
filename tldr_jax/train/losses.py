"""Contrastive losses on L2-normalised embeddings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def info_nce(
    img: jax.Array,
    txt: jax.Array,
    logit_scale: float | jax.Array = 1.0 / 0.07,
    targets: jax.Array | None = None,
) -> jax.Array:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

    img, txt: (B, D) raw embeddings (normalised here). logit_scale multiplies the cosine
    similarities (1/temperature). targets: optional (B, B) soft targets (rows sum to 1) for
    the image->text direction; its transpose is used for text->image. Default: identity.
    """
    img = l2_normalize(img.astype(jnp.float32))
    txt = l2_normalize(txt.astype(jnp.float32))
    logits = logit_scale * img @ txt.T
    if targets is None:
        labels = jnp.arange(img.shape[0])
        i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    else:
        i2t = optax.softmax_cross_entropy(logits, targets)
        t2i = optax.softmax_cross_entropy(logits.T, targets.T)
    return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def loss_at_chance(loss: float, batch: int, above: bool = True) -> bool:
    """Whether a symmetric contrastive loss (`info_nce`) over `batch` pairs is within 1% of
    chance, log batch (every logit alike: the model tells no pair from another), or over it
    (`above=False`: within 1% either side; an untrained model starts above chance)."""
    chance = math.log(batch)
    return loss >= 0.99 * chance and (above or loss <= 1.01 * chance)
