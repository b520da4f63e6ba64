"""Vector quantizer for the codebook captioner (SPEC A.1).

Every image token z (dimension D) is replaced by its nearest code (squared L2) from a codebook
of K codes. The discrete choice has no gradient, so the straight-through estimator copies the
gradient of z_q onto z. Three ways of learning the codebook:

- "legacy": the TL;DR reference, `mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)`; beta
  weights the *codebook* term (the encoder is pulled with weight 1).
- "standard": VQ-VAE (van den Oord et al., 2017), `mean((z_q - sg[z])^2) + beta *
  mean((sg[z_q] - z)^2)`; beta weights the *commitment* term.
- "ema": the codebook is not a parameter; it tracks an exponential moving average of the
  encoder outputs assigned to each code (VQ-VAE appendix; Sonnet's VectorQuantizerEMA), dead
  codes are revived, and the loss is the commitment term `beta * mean((sg[z_q] - z)^2)` only.

The math lives in pure functions (`squared_distances`, `nearest_codes`, `straight_through`,
`vq_loss`, `code_usage`, `ema_update`, `revive_dead_codes`); `VectorQuantizer` wires them up.
Under `jax.jit` with a data-sharded batch the sums below are global (GSPMD inserts the
all-reduces), so the EMA statistics are the same on every device without explicit psums.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

LossForm = Literal["legacy", "standard", "ema"]
LOSS_FORMS: tuple[str, ...] = ("legacy", "standard", "ema")


class EmaState(nnx.Variable):
    """Quantizer state updated by the EMA rule inside `__call__`, never by the optimiser.

    Being a non-`nnx.Param` Variable, `nnx.Optimizer(model, tx, wrt=nnx.Param)` leaves it alone
    and `nnx.split(model, nnx.Param, ...)` puts it with the rest of the (mutable) state.
    """


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """(N, D) x (K, D) -> (N, K) squared L2 distances as |z|^2 - 2 z.c + |c|^2.

    The expansion turns the N*K*D difference tensor into one (N, D) x (D, K) GEMM. HIGHEST
    precision keeps bf16/TF32 matmul passes from flipping near-tied argmins on accelerators.
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    cross = jnp.dot(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
    z2 = jnp.sum(z * z, axis=-1, keepdims=True)
    c2 = jnp.sum(codebook * codebook, axis=-1)
    return z2 - 2.0 * cross + c2[None, :]


def _argmin_rows(d: jax.Array) -> jax.Array:
    """int32 argmin over the last axis of (N, K). jnp.argmin's int64 indices under
    jax_enable_x64 changed XLA's fusion of the training step: other float32 roundings in the
    encoder's gradient."""
    return jax.lax.argmin(d, 1, jnp.int32)


def nearest_codes(z: jax.Array, codebook: jax.Array, chunk_size: int = 0) -> jax.Array:
    """Index of the nearest code for every row of z (..., D) -> int32 (...).

    `chunk_size > 0` bounds the distance matrix to (chunk_size, K) by mapping over row chunks,
    for token counts where N*K floats would not fit.
    """
    lead = z.shape[:-1]
    flat = z.reshape(-1, z.shape[-1])
    n = flat.shape[0]
    if chunk_size <= 0 or n <= chunk_size:
        idx = _argmin_rows(squared_distances(flat, codebook))
    else:
        pad = -n % chunk_size
        chunks = jnp.pad(flat, ((0, pad), (0, 0))).reshape(-1, chunk_size, flat.shape[-1])
        idx = jax.lax.map(lambda c: _argmin_rows(squared_distances(c, codebook)), chunks)
        idx = idx.reshape(-1)[:n]
    return idx.astype(jnp.int32).reshape(lead)


def straight_through(z: jax.Array, z_q: jax.Array) -> jax.Array:
    """z_q in the forward pass; identity gradient to z in the backward pass.

    Quantization is piecewise constant (zero gradient almost everywhere), so the decoder's
    gradient w.r.t. z_q is copied onto the encoder output z instead.
    """
    return z + jax.lax.stop_gradient(z_q - z)


def vq_loss(
    z: jax.Array, z_q: jax.Array, beta: float = 0.25, form: LossForm = "legacy"
) -> jax.Array:
    """Quantizer loss; z_q must be the raw gathered codes (not the straight-through output).

    commitment = mean((sg[z_q] - z)^2): gradient to the encoder only.
    codebook   = mean((z_q - sg[z])^2): gradient to the codes only.
    """
    sg = jax.lax.stop_gradient
    z = z.astype(jnp.float32)
    z_q = z_q.astype(jnp.float32)
    commitment = jnp.mean(jnp.square(sg(z_q) - z))
    codebook = jnp.mean(jnp.square(z_q - sg(z)))
    if form == "legacy":
        return commitment + beta * codebook
    if form == "standard":
        return codebook + beta * commitment
    if form == "ema":
        return beta * commitment
    raise ValueError(f"unknown VQ loss form {form!r}; expected one of {LOSS_FORMS}")


def code_counts(indices: jax.Array, num_codes: int) -> jax.Array:
    """float32 (K,) number of occurrences of each code in `indices` (any shape)."""
    return jnp.zeros((num_codes,), jnp.float32).at[indices.reshape(-1)].add(1.0)


def code_usage(indices: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """(perplexity, usage) of the batch code distribution.

    perplexity = exp(entropy of the code histogram): K when all codes are equally used, 1 when
    one code takes everything. usage = fraction of the K codes used at least once.
    """
    counts = code_counts(indices, num_codes)
    probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


def ema_update(
    ema_count: jax.Array,
    ema_sum: jax.Array,
    z: jax.Array,
    indices: jax.Array,
    *,
    decay: float,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One EMA codebook step -> (codebook, ema_count, ema_sum).

    ema_count (K,) tracks the average number of tokens assigned to each code per batch and
    ema_sum (K, D) the average sum of those tokens; each code becomes their ratio, the running
    mean of its cluster (k-means on the stream of batches). Laplace smoothing of the counts
    (`epsilon`) keeps codes with an (almost) empty cluster from dividing by zero.
    """
    num_codes = ema_count.shape[0]
    flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]).astype(jnp.float32))
    flat_idx = indices.reshape(-1)
    counts = code_counts(flat_idx, num_codes)
    sums = jax.ops.segment_sum(flat, flat_idx, num_segments=num_codes)
    ema_count = decay * ema_count + (1.0 - decay) * counts
    ema_sum = decay * ema_sum + (1.0 - decay) * sums
    total = jnp.sum(ema_count)
    smoothed = (ema_count + epsilon) / (total + num_codes * epsilon) * total
    return ema_sum / smoothed[:, None], ema_count, ema_sum


def revive_dead_codes(
    codebook: jax.Array,
    ema_count: jax.Array,
    ema_sum: jax.Array,
    z: jax.Array,
    key: jax.Array,
    threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Re-initialises codes with ema_count < threshold to random rows of z.

    Why: a code that no encoder output is nearest to gets no EMA update (and, for a learned
    codebook, no gradient), so it never moves again: a wasted slot, and with many of them the
    codebook collapses onto a few codes. Moving it onto an actual encoder output puts it where
    the data is, so it wins assignments on the next batches. Its count restarts at 1 (and its
    sum at the chosen output), so the EMA ratio equals the new code and it is not revived again
    before it has had time to attract tokens.

    Returns (codebook, ema_count, ema_sum, number of revived codes).
    """
    flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]).astype(jnp.float32))
    num_codes = codebook.shape[0]
    dead = ema_count < threshold
    # Distinct rows when the batch has enough tokens, so revived codes do not coincide.
    rows = jax.random.choice(key, flat.shape[0], (num_codes,), replace=flat.shape[0] < num_codes)
    fresh = flat[rows]
    codebook = jnp.where(dead[:, None], fresh, codebook)
    ema_sum = jnp.where(dead[:, None], fresh, ema_sum)
    ema_count = jnp.where(dead, 1.0, ema_count)
    return codebook, ema_count, ema_sum, jnp.sum(dead.astype(jnp.int32))


class VectorQuantizer(nnx.Module):
    """Quantizes every token of z (..., dim) to the nearest of `num_codes` codes.

    `__call__(z, *, train)` -> (z_q_st, indices int32 (...), aux) with z_q_st the
    straight-through output and aux = {"loss", "perplexity", "usage"} (scalars). With
    loss_form "ema" and train=True the codebook is updated in place and dead codes revived.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        beta: float = 0.25,
        loss_form: LossForm = "legacy",
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        revive_threshold: float = 1e-2,
        chunk_size: int = 0,
        rngs: nnx.Rngs,
    ):
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"unknown VQ loss form {loss_form!r}; expected one of {LOSS_FORMS}")
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        self.loss_form = loss_form
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.revive_threshold = revive_threshold
        self.chunk_size = chunk_size
        # Reference initialisation: uniform in +-1/K.
        init = jax.random.uniform(
            rngs.params(), (num_codes, dim), jnp.float32, -1.0 / num_codes, 1.0 / num_codes
        )
        if loss_form == "ema":
            self.codebook = EmaState(init)
            # Count 1 with sum = code: the EMA ratio starts at the initial code.
            self.ema_count = EmaState(jnp.ones((num_codes,), jnp.float32))
            self.ema_sum = EmaState(init)
            self.revive_rngs = rngs["revive"].fork()
        else:
            self.codebook = nnx.Param(init)

    def codes(self, z: jax.Array) -> jax.Array:
        """Nearest-code indices int32 (...) for z (..., dim); no state change."""
        return nearest_codes(z, self.codebook[...], self.chunk_size)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for integer indices (...) -> (..., dim)."""
        return jnp.take(self.codebook[...], indices, axis=0)

    def __call__(
        self, z: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        codebook = self.codebook[...]
        indices = nearest_codes(z, codebook, self.chunk_size)
        z_q = jnp.take(codebook, indices, axis=0).astype(z.dtype)
        loss = vq_loss(z, z_q, self.beta, self.loss_form)
        perplexity, usage = code_usage(indices, self.num_codes)
        if self.loss_form == "ema" and train:
            new_codebook, count, total = ema_update(
                self.ema_count[...],
                self.ema_sum[...],
                z,
                indices,
                decay=self.ema_decay,
                epsilon=self.ema_epsilon,
            )
            new_codebook, count, total, _ = revive_dead_codes(
                new_codebook, count, total, z, self.revive_rngs(), self.revive_threshold
            )
            self.codebook[...] = new_codebook
            self.ema_count[...] = count
            self.ema_sum[...] = total
        aux = {"loss": loss, "perplexity": perplexity, "usage": usage}
        return straight_through(z, z_q), indices, aux
