"""Coreset baselines with the same budget as a distilled set (SPEC B.5).

Each selector returns `budget` distinct int64 row indices into the real training set:
random, herding (Welling 2009, greedy mean matching as in the dataset-condensation benchmarks),
k-center (greedy farthest point, Sener & Savarese 2018) and forgetting (Toneva et al. 2019).
Feature-based selectors run on embeddings, e.g. an expert's image or joint embeddings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check_budget(n: int, budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise TypeError(f"budget must be an integer, got {budget!r}")
    if not 0 < budget <= n:
        raise ValueError(f"budget must be in [1, {n}], got {budget}")


def _features(features: np.ndarray) -> np.ndarray:
    """`features` as a finite (N, D) float64 array, or a ValueError naming what is wrong."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, D) array, got shape {x.shape}")
    bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
    if bad.size:
        raise ValueError(f"features: {bad.size} rows are not finite (first: row {bad[0]})")
    return x


def random_coreset(n: int, budget: int, seed: int) -> np.ndarray:
    """A seeded uniform sample without replacement (sorted)."""
    _check_budget(n, budget)
    return np.sort(np.random.default_rng(seed).choice(n, budget, replace=False)).astype(np.int64)


@functools.partial(jax.jit, static_argnums=1)
def _herding(x: jax.Array, budget: int) -> jax.Array:
    n = x.shape[0]
    mu = x.mean(axis=0)
    sq = jnp.sum(x * x, axis=1)

    def body(t, carry):
        chosen, total, picked = carry
        # argmin_i |mu - (total + x_i)/(t+1)|^2
        #   = argmin_i |x_i|^2 / (t+1) - 2 <mu - total/(t+1), x_i>
        score = sq / (t + 1) - 2.0 * (x @ (mu - total / (t + 1)))
        i = jnp.argmin(jnp.where(picked, jnp.inf, score))
        return chosen.at[t].set(i), total + x[i], picked.at[i].set(True)

    init = (jnp.zeros(budget, jnp.int32), jnp.zeros_like(mu), jnp.zeros(n, bool))
    return jax.lax.fori_loop(0, budget, body, init)[0]


def herding(features: np.ndarray, budget: int) -> np.ndarray:
    """Greedy mean matching: step t adds the unselected sample that brings the mean of the
    selection closest to the mean of all features. Returned in selection order; ties go to
    the lowest index."""
    x = _features(features)
    _check_budget(x.shape[0], budget)
    return np.asarray(_herding(_centered(x), budget)).astype(np.int64)


def _centered(features: np.ndarray) -> jax.Array:
    """Features less their mean (taken in float64), in float32. Herding and k-center do not
    change under a common shift, but their float32 expansions |x|^2 - 2<x, y> lose the
    differences to a large shared offset (herding picked other points at an offset of 1000)."""
    x = np.asarray(features, np.float64)
    return jnp.asarray(x - x.mean(axis=0), jnp.float32)


@functools.partial(jax.jit, static_argnums=1)
def _kcenter(x: jax.Array, budget: int, first: jax.Array) -> jax.Array:
    sq = jnp.sum(x * x, axis=1)

    def dist_to(i):
        # |x - c|^2 via the expansion: one matvec per new center, O(N) extra memory.
        return jnp.maximum(sq - 2.0 * (x @ x[i]) + sq[i], 0.0)

    def body(t, carry):
        chosen, mind = carry
        i = jnp.argmax(mind)
        return chosen.at[t].set(i), jnp.minimum(mind, dist_to(i)).at[i].set(-1.0)

    chosen = jnp.zeros(budget, jnp.int32).at[0].set(first)
    # Chosen points are marked -1 so argmax never re-picks them, even among duplicates.
    mind = dist_to(first).at[first].set(-1.0)
    return jax.lax.fori_loop(1, budget, body, (chosen, mind))[0]


def kcenter(features: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Greedy k-center: a seeded random first center, then repeatedly the point farthest
    (squared L2) from its nearest chosen center. Returned in selection order; ties go to the
    lowest index."""
    x = _features(features)
    n = x.shape[0]
    _check_budget(n, budget)
    first = int(np.random.default_rng(seed).integers(n))
    out = _kcenter(_centered(x), budget, jnp.int32(first))
    return np.asarray(out).astype(np.int64)


def forgetting_counts(correct: np.ndarray) -> np.ndarray:
    """Forgetting events per sample from an (epochs, N) bool matrix of "correct at epoch e"
    (for retrieval: the pair is retrieved at rank 1). An event is a correct -> incorrect
    transition between consecutive epochs. Samples never correct get `epochs` (more than any
    sample can reach: at most ceil((epochs-1)/2) events), so they rank as most forgettable."""
    correct = np.asarray(correct, bool)
    if correct.ndim != 2:
        raise ValueError(f"correct must be an (epochs, N) matrix, got shape {correct.shape}")
    epochs = correct.shape[0]
    counts = np.sum(correct[:-1] & ~correct[1:], axis=0).astype(np.int64)
    return np.where(correct.any(axis=0), counts, epochs)


def forgetting(correct: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """Keeps the `budget` most-forgotten samples. Ties (e.g. the many never-forgotten samples)
    are broken uniformly at random with `seed`, so the file order of the set cannot leak in."""
    counts = forgetting_counts(correct)
    _check_budget(counts.shape[0], budget)
    tiebreak = np.random.default_rng(seed).permutation(counts.shape[0])
    order = np.lexsort((tiebreak, -counts))  # last key is primary: most events first
    return order[:budget].astype(np.int64)
