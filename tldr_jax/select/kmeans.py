"""JIT k-means that runs unchanged on one CPU, one GPU or a pod.

Layout: points are split over every device of the mesh (leading axis), centroids are
replicated. One Lloyd step is a `shard_map` in which each device walks its rows in blocks of
`block_size`: one GEMM against all centroids, fused with the min/argmin, then a segment-sum of
the block into per-cluster sums and counts. Memory is O(block_size x K), never N x K. The sums,
counts and objective are `psum`-ed over the mesh and the (cheap, replicated) update runs on
every device. Out-of-core data goes through `kmeans_streaming`, which makes passes over chunks.

Every random draw of the initialisation is made over the N real rows (never over the padding
that rounds N up to a multiple of the devices), so seeds and results do not depend on the
number of devices or processes. Inputs are checked up front: a NaN/inf row, a negative weight
or a degenerate argument is a ValueError, not NaN centroids.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tldr_jax.utils import mesh as mesh_lib

Init = Literal["kmeans++", "kmeans||"]
INITS: tuple[str, ...] = typing.get_args(Init)
# dtypes the distance GEMM can run in (`gemm_dtype`, config `select.gemm_dtype`).
GEMM_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
# Relative split applied when an empty cluster takes half of the largest one (as faiss).
_SPLIT_EPS = 1.0 / 1024.0


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (K, D) float32
    assignments: np.ndarray  # (N,) int32
    sq_distances: np.ndarray  # (N,) float32, to the assigned centroid
    objective: float  # sum of squared distances (weighted) after the last update
    objective_history: np.ndarray  # (iterations,) objective of each step's assignment
    empty_reseeded: int  # empty clusters re-seeded over all iterations


# ----------------------------------------------------------------------------------------
# Per-device building blocks (operate on local rows; no collectives).
# ----------------------------------------------------------------------------------------


def _dot_xt(x: jax.Array, c: jax.Array, gemm_dtype: Any) -> jax.Array:
    """x @ c.T in `gemm_dtype` with float32 accumulation (true fp32 on TPU/GPU too)."""
    gemm_dtype = jnp.dtype(gemm_dtype)
    precision = lax.Precision.HIGHEST if gemm_dtype == jnp.float32 else None
    return lax.dot_general(
        x.astype(gemm_dtype),
        c.astype(gemm_dtype),
        (((1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _nearest(
    xb: jax.Array, c: jax.Array, c_sq: jax.Array, gemm_dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of each row of a block, and min_j |c_j|^2 - 2 x.c_j (not a distance).

    ||x||^2 does not change the argmin, so the GEMM form drops it. The argmin is
    spelled as min-then-first-match: two single-operand reductions vectorise on XLA CPU,
    a variadic (value, index) reduce does not (measured ~2x slower). Ties pick the lowest index.
    """
    d = c_sq[None, :] - 2.0 * _dot_xt(xb, c, gemm_dtype)
    dmin = jnp.min(d, axis=1)
    iota = lax.broadcasted_iota(jnp.int32, d.shape, 1)
    idx = jnp.min(jnp.where(d == dmin[:, None], iota, d.shape[1]), axis=1)
    # NaN rows would match nothing; clamp so the scatter stays in range.
    return jnp.minimum(idx, d.shape[1] - 1), dmin


def _assign_block(
    xb: jax.Array,
    c: jax.Array,
    c_sq: jax.Array,
    gemm_dtype: Any,
    shift: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Nearest centroid of each row of a block and the exact squared distance to it.

    The expanded form cancels badly (and bf16 GEMMs are coarse): the returned distance is
    recomputed directly from the chosen centroid, O(B D) next to the O(B K D) GEMM.
    shift (D,): the rows are moved by -shift before the GEMM, and `c`, `c_sq` must be the
    centroids moved the same way (see `_gemm_centroids`); distances do not change.
    """
    if shift is not None:
        xb = xb - shift
    idx, _ = _nearest(xb, c, c_sq, gemm_dtype)
    return idx, jnp.sum(jnp.square(xb - c[idx]), axis=1)


def _low_precision(gemm_dtype: Any) -> bool:
    return jnp.dtype(gemm_dtype) != jnp.float32


def _gemm_centroids(
    c: jax.Array, shift: jax.Array, gemm_dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Centroids, their squared norms and the row shift as the distance GEMM sees them.

    A bf16 GEMM keeps ~3 significant digits of x.c: on data far from the origin
    (x ~ 100 + N(0, 1)) |c|^2 - 2 x.c is then all rounding. Squared distances are translation
    invariant, so points and centroids are both moved by -shift (a fixed point near the data,
    its weighted mean) first. float32 takes them as they are (shift unused).
    """
    if not _low_precision(gemm_dtype):
        return c, jnp.sum(jnp.square(c), axis=1), None
    cs = c - shift
    return cs, jnp.sum(jnp.square(cs), axis=1), shift


def _for_blocks(n: int, block: int, fn: Callable[[Any, int, int], Any], carry: Any) -> Any:
    """Runs fn(carry, start, size) over [0, n) in blocks: a loop over full blocks + static tail."""
    nb, tail = divmod(n, block)
    if nb:
        carry = lax.fori_loop(0, nb, lambda i, c: fn(c, i * block, block), carry)
    if tail:
        carry = fn(carry, nb * block, tail)
    return carry


def _varying(tree: Any, axes: tuple[str, ...]) -> Any:
    """Marks loop-carry initial values as per-device inside shard_map (no-op outside)."""
    return lax.pcast(tree, axes, to="varying") if axes else tree


def _local_stats(
    x: jax.Array,
    w: jax.Array,
    c: jax.Array,
    shift: jax.Array,
    *,
    block: int,
    gemm_dtype: Any,
    axes: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-cluster weighted sums, counts and the objective of this device's rows."""
    k, dim = c.shape
    cg, cg_sq, gshift = _gemm_centroids(c, shift, gemm_dtype)

    def body(carry, start, size):
        sums, counts, obj = carry
        xb = lax.dynamic_slice_in_dim(x, start, size).astype(jnp.float32)
        wb = lax.dynamic_slice_in_dim(w, start, size)
        if not _low_precision(gemm_dtype):
            # Lloyd steps only need the argmin; their objective (a diagnostic) takes the
            # expanded form instead of a gather + recompute, which costs ~15% of a step on
            # CPU. The final assignment pass returns exact distances.
            idx, dmin = _nearest(xb, cg, cg_sq, gemm_dtype)
            d2 = jnp.maximum(dmin + jnp.sum(jnp.square(xb), axis=1), 0.0)
        else:
            idx, d2 = _assign_block(xb, cg, cg_sq, gemm_dtype, gshift)
        # segment_sum (a scatter-add, O(B*D)) not a one-hot matmul (O(B*K*D), as costly
        # as the distance GEMM itself).
        sums = sums + jax.ops.segment_sum(xb * wb[:, None], idx, k)
        counts = counts + jax.ops.segment_sum(wb, idx, k)
        return sums, counts, obj + jnp.sum(wb * d2)

    init = (jnp.zeros((k, dim), jnp.float32), jnp.zeros((k,), jnp.float32), jnp.float32(0))
    return _for_blocks(x.shape[0], block, body, _varying(init, axes))


def _local_assign(
    x: jax.Array,
    c: jax.Array,
    shift: jax.Array,
    *,
    block: int,
    gemm_dtype: Any,
    axes: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    cg, cg_sq, gshift = _gemm_centroids(c, shift, gemm_dtype)
    n = x.shape[0]

    def body(carry, start, size):
        idx_all, d2_all = carry
        xb = lax.dynamic_slice_in_dim(x, start, size).astype(jnp.float32)
        idx, d2 = _assign_block(xb, cg, cg_sq, gemm_dtype, gshift)
        idx_all = lax.dynamic_update_slice_in_dim(idx_all, idx, start, 0)
        return idx_all, lax.dynamic_update_slice_in_dim(d2_all, d2, start, 0)

    init = (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.float32))
    return _for_blocks(n, block, body, _varying(init, axes))


# ----------------------------------------------------------------------------------------
# Replicated update.
# ----------------------------------------------------------------------------------------


def _normalize_rows(c: jax.Array, fallback: jax.Array | float) -> jax.Array:
    norm = jnp.linalg.norm(c, axis=1, keepdims=True)
    return jnp.where(norm > 0, c / jnp.maximum(norm, 1e-30), fallback)


def reseed_empty(c: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each empty cluster takes half of the currently largest one (split by +-eps, as faiss).

    Returns (centroids, counts, number re-seeded). Deterministic: empties in index order.
    """
    sign = jnp.where(jnp.arange(c.shape[1]) % 2 == 0, 1.0, -1.0).astype(c.dtype)

    def cond(state):
        _, cnt, _ = state
        return jnp.any(cnt == 0) & (jnp.max(cnt) > 0)

    def body(state):
        c, cnt, n = state
        j = jnp.argmax(cnt == 0)
        big = jnp.argmax(cnt)
        c_big = c[big]
        c = (
            c.at[j]
            .set(c_big * (1 + _SPLIT_EPS * sign))
            .at[big]
            .set(c_big * (1 - _SPLIT_EPS * sign))
        )
        half = cnt[big] / 2
        cnt = cnt.at[j].set(half).at[big].set(cnt[big] - half)
        return c, cnt, n + 1

    return lax.while_loop(cond, body, (c, counts, jnp.int32(0)))


def update_centroids(
    c: jax.Array, sums: jax.Array, counts: jax.Array, *, spherical: bool
) -> tuple[jax.Array, jax.Array]:
    """Means of the assigned points; empty clusters re-seeded; unit norm in spherical mode."""
    mean = sums / jnp.maximum(counts, 1e-30)[:, None]
    new = jnp.where((counts > 0)[:, None], mean, c)
    new, _, n_reseeded = reseed_empty(new, counts)
    if spherical:
        # A cluster whose unit vectors cancel out keeps its old direction.
        new = _normalize_rows(new, c)
    return new, n_reseeded


# ----------------------------------------------------------------------------------------
# Sharded programs.
# ----------------------------------------------------------------------------------------


def _sharded_stats(mesh: Mesh, block: int, gemm_dtype: Any) -> Callable:
    axes = mesh_lib.DATA_AXES

    def local(x, w, c, shift):
        sums, counts, obj = _local_stats(
            x, w, c, shift, block=block, gemm_dtype=gemm_dtype, axes=axes
        )
        return lax.psum((sums, counts, obj), axes)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()), out_specs=(P(), P(), P())
    )


def _sharded_assign(mesh: Mesh, block: int, gemm_dtype: Any) -> Callable:
    axes = mesh_lib.DATA_AXES
    local = functools.partial(_local_assign, block=block, gemm_dtype=gemm_dtype, axes=axes)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(P(axes), P(), P()), out_specs=(P(axes), P(axes))
    )


def _weighted_sum(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(D,) weighted sum of the rows and the sum of the weights (padding rows have w = 0).

    Their ratio, the weighted data mean, is the shift of a low-precision GEMM."""
    return jnp.sum(x.astype(jnp.float32) * w[:, None], axis=0), jnp.sum(w)


@functools.lru_cache(maxsize=32)
def _lloyd_program(
    mesh: Mesh, iterations: int, block: int, gemm_dtype: Any, spherical: bool
) -> Callable:
    stats = _sharded_stats(mesh, block, gemm_dtype)
    assign = _sharded_assign(mesh, block, gemm_dtype)

    def run(x, w, c):
        if _low_precision(gemm_dtype):
            total, wsum = _weighted_sum(x, w)  # once: one O(N D) pass
            shift = total / wsum
        else:
            shift = jnp.zeros((x.shape[1],), jnp.float32)  # unused by float32

        def step(i, state):
            c, hist, reseeded = state
            sums, counts, obj = stats(x, w, c, shift)
            c, n = update_centroids(c, sums, counts, spherical=spherical)
            return c, hist.at[i].set(obj), reseeded + n

        state = (c, jnp.zeros((iterations,), jnp.float32), jnp.int32(0))
        # iterations = 0: the initial centroids and the assignment to them.
        c, hist, reseeded = lax.fori_loop(0, iterations, step, state) if iterations else state
        idx, d2 = assign(x, c, shift)
        return c, idx, d2, jnp.sum(w * d2), hist, reseeded

    data, rep = mesh_lib.data_sharding(mesh), mesh_lib.replicated(mesh)
    return jax.jit(
        run, in_shardings=(data, data, rep), out_shardings=(rep, data, data, rep, rep, rep)
    )


# ----------------------------------------------------------------------------------------
# Initialisation.
# ----------------------------------------------------------------------------------------


def _sample_log_weights(key: jax.Array, logw: jax.Array) -> jax.Array:
    """One index drawn with probability ~ exp(logw); uniform if every entry is -inf."""
    logw = jnp.where(jnp.all(jnp.isneginf(logw)), 0.0, logw)
    return jax.random.categorical(key, logw)


@functools.partial(jax.jit, static_argnames=("k", "local_trials"))
def kmeans_plus_plus(
    key: jax.Array,
    x: jax.Array,
    k: int,
    weights: jax.Array | None = None,
    local_trials: int | None = None,
) -> jax.Array:
    """Greedy (weighted) k-means++ seeding, as scikit-learn's.

    Each step draws `local_trials` (default 2 + log k) candidates with probability ~ w D(x)^2
    and keeps the one that lowers the potential most: plain one-draw k-means++ misses a
    well-separated cluster noticeably often. O(trials k N D) sequential work: run it on a
    subsample (see `kmeans`) or on k-means|| candidates. The draws are over the rows given
    (zero-weight rows included), so pass real rows only, never device padding.
    """
    k = _integer("k", k, 1)
    trials = _integer("local_trials", local_trials, 1) if local_trials else 2 + int(np.log(k))
    x = x.astype(jnp.float32)
    w = jnp.ones(x.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
    logw = jnp.log(w)
    x_sq = jnp.sum(x * x, axis=1)
    key, sub = jax.random.split(key)
    first = x[_sample_log_weights(sub, logw)]
    c = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)
    d2 = jnp.sum(jnp.square(x - first), axis=1)

    def body(i, state):
        c, d2, key = state
        key, sub = jax.random.split(key)
        # Points already chosen have d2 = 0 -> log 0 = -inf: never drawn again.
        logits = logw + jnp.log(d2)
        logits = jnp.where(jnp.all(jnp.isneginf(logits)), logw, logits)
        cand = x[jax.random.categorical(sub, logits, shape=(trials,))]
        # Expanded form: (trials, N) memory, not (trials, N, D).
        dc = x_sq[None] - 2.0 * _dot_xt(cand, x, jnp.float32) + jnp.sum(cand * cand, 1)[:, None]
        d2_cand = jnp.minimum(d2[None], jnp.maximum(dc, 0.0))
        best = jnp.argmin(jnp.sum(w[None] * d2_cand, axis=1))
        return c.at[i].set(cand[best]), d2_cand[best], key

    c, _, _ = lax.fori_loop(1, k, body, (c, d2, key))
    return c


def _kmeans_parallel(
    key: jax.Array,
    x: jax.Array,
    w: jax.Array,
    k: int,
    mesh: Mesh,
    *,
    n: int,
    rounds: int,
    oversampling: int,
    block: int,
) -> jax.Array:
    """k-means|| (Bahmani et al., 2012) with a fixed `oversampling` draws per round.

    Each round draws `oversampling` points without replacement with probability ~ w D(x)^2
    (Gumbel top-k, so the candidate set has a static size); the 1 + rounds * oversampling
    candidates are then weighted by how many points they attract and reduced to k by
    weighted k-means++. Only the first n rows of x are real (the rest pad to the devices):
    every draw is over those n, so padding never changes the noise nor becomes a candidate.
    """
    data, rep = mesh_lib.data_sharding(mesh), mesh_lib.replicated(mesh)
    assign = _sharded_assign(mesh, block, jnp.float32)
    no_shift = jnp.zeros((x.shape[1],), jnp.float32)  # float32 GEMM: no shift
    draws = min(oversampling, n)

    @functools.partial(jax.jit, out_shardings=rep)
    def gather(x, idx):
        return x[idx]

    @functools.partial(jax.jit, out_shardings=rep)
    def pick_first(key, w):
        return jax.random.categorical(key, jnp.log(w[:n]))

    @functools.partial(jax.jit, out_shardings=rep)
    def draw(key, w, d2):
        score = jnp.log(w[:n]) + jnp.log(d2[:n]) + jax.random.gumbel(key, (n,), jnp.float32)
        return lax.top_k(score, draws)[1]

    @functools.partial(jax.jit, out_shardings=data)
    def closer(x, cand, d2):
        return jnp.minimum(d2, assign(x, cand, no_shift)[1])

    @functools.partial(jax.jit, out_shardings=rep)
    def candidate_weights(x, w, cand):
        return jax.ops.segment_sum(w, assign(x, cand, no_shift)[0], cand.shape[0])

    keys = jax.random.split(key, rounds + 2)
    first = pick_first(keys[0], w)
    cands = [gather(x, first[None])]
    # The largest finite float, not inf, as the "no candidate yet" distance: the minimum with
    # the first candidate's (finite) distances is the same, and JAX_DEBUG_INFS stays quiet.
    big = jnp.finfo(jnp.float32).max
    d2 = closer(x, cands[0], jax.device_put(jnp.full(x.shape[:1], big, jnp.float32), data))
    for r in range(rounds):
        idx = draw(keys[r + 1], w, d2)
        new = gather(x, idx)
        cands.append(new)
        d2 = closer(x, new, d2)
    cand = jnp.concatenate(cands)
    cw = candidate_weights(x, w, cand)
    return kmeans_plus_plus(keys[-1], cand, k, cw)


# ----------------------------------------------------------------------------------------
# Argument and input checks.
# ----------------------------------------------------------------------------------------


def _integer(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _gemm_dtype(gemm_dtype: Any) -> np.dtype:
    try:
        dtype = jnp.dtype(gemm_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in GEMM_DTYPES:
        raise ValueError(f"gemm_dtype must be one of {', '.join(GEMM_DTYPES)}, got {gemm_dtype!r}")
    return dtype


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected 'kmeans++' or 'kmeans||'")


def _check_shape(shape: tuple[int, ...], what: str = "x") -> None:
    if len(shape) != 2:
        raise ValueError(f"{what} must be 2-D (rows, features), got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{what} has no rows")
    if shape[1] == 0:
        raise ValueError(f"{what} rows have no features (D = 0)")


@jax.jit
def _row_problems(x: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    """Counts and first indices of non-finite rows and of bad (non-finite / negative) weights,
    and the sum of the weights. One fused O(N D) pass on the devices (also for global arrays)."""
    bad_x = ~jnp.all(jnp.isfinite(x), axis=1)
    bad_w = ~jnp.isfinite(w) | (w < 0)
    return (
        jnp.sum(bad_x, dtype=jnp.int32),
        jnp.argmax(bad_x),
        jnp.sum(bad_w, dtype=jnp.int32),
        jnp.argmax(bad_w),
        jnp.sum(jnp.where(bad_w, 0.0, w)),
    )


def _check_rows(x: jax.Array, w: jax.Array, n: int, where: str = "", offset: int = 0) -> None:
    """ValueError (as scikit-learn's) if a row has a NaN/inf or a weight is bad or all are 0.

    `where` names the rows (e.g. ' of chunk 3'), `offset` is their first row in the stream."""
    nx, fx, nw, fw, wsum = (v.item() for v in _row_problems(x, w))
    if nx:
        at = f"row {fx}" + (f" (row {offset + fx} of the stream)" if offset else "")
        raise ValueError(
            f"{nx} of {n} rows{where} contain NaN or inf; the first is {at}. "
            "k-means needs finite rows: drop or repair them first."
        )
    if nw:
        raise ValueError(f"{nw} weights{where} are negative, NaN or inf; the first is row {fw}")
    if not wsum > 0:
        raise ValueError(f"the weights{where} sum to 0: no row to cluster")


def _check_centroids(c: Any, k: int | None, dim: int) -> np.ndarray:
    c = np.asarray(c, np.float32)
    want = (k if k is not None else "k", dim)
    if c.ndim != 2 or c.shape[1] != dim or (k is not None and c.shape[0] != k) or not len(c):
        raise ValueError(f"init_centroids shape {c.shape} != {want}")
    if not np.isfinite(c).all():
        raise ValueError("init_centroids contain NaN or inf")
    return c


# ----------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------


def _to_global(x: Any, w: Any, mesh: Mesh) -> tuple[jax.Array, jax.Array, int]:
    """Host rows -> sharded arrays, padded with zero-weight rows to a multiple of the devices.

    Numpy rows are the full data set, held identically by every process (each places only its
    own shards; padding is added per shard, so `x` is never copied whole on the host). A global
    jax Array that is not fully addressable is taken as is (the caller padded it).
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if w is None:
            w = jax.device_put(jnp.ones(x.shape[:1], jnp.float32), mesh_lib.data_sharding(mesh))
        elif w.shape != x.shape[:1]:
            raise ValueError(f"weights shape {w.shape} != {x.shape[:1]}")
        return x, w, x.shape[0]
    x = x if isinstance(x, np.ndarray) and x.dtype == np.float32 else np.asarray(x, np.float32)
    n = x.shape[0]
    w = np.ones((n,), np.float32) if w is None else np.asarray(w, np.float32)
    if w.shape != (n,):
        raise ValueError(f"weights shape {w.shape} != {(n,)}")
    rows = n + (-n % mesh.devices.size)
    sharding = mesh_lib.data_sharding(mesh)

    def padded(a: np.ndarray) -> jax.Array:
        def shard(index: tuple[slice, ...]) -> np.ndarray:
            start, stop, _ = index[0].indices(rows)
            part = np.asarray(a[start : min(stop, n)])
            if stop <= n:
                return part
            return np.concatenate([part, np.zeros((stop - max(start, n), *a.shape[1:]), a.dtype)])

        return jax.make_array_from_callback((rows, *a.shape[1:]), sharding, shard)

    return padded(x), padded(w), n


def _all_rows(a: jax.Array, n: int) -> np.ndarray:
    """The first n rows of a data-sharded result, on every process."""
    if not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        a = multihost_utils.process_allgather(a, tiled=True)
    return np.asarray(a)[:n]


def seed_centroids(
    x: np.ndarray,
    k: int,
    *,
    init: Init = "kmeans++",
    seed: int = 0,
    mesh: Mesh | None = None,
    block_size: int = 1024,
) -> np.ndarray:
    """Initial centroids (K, D) computed from host rows x (e.g. a subsample for streaming)."""
    mesh = mesh or mesh_lib.make_mesh()
    k, block_size = _integer("k", k, 1), _integer("block_size", block_size, 1)
    _check_init(init)
    _check_shape(np.shape(x))
    xg, wg, n = _to_global(x, None, mesh)
    _check_rows(xg, wg, n)
    if k > n:
        raise ValueError(f"k={k} clusters for only {n} points")
    c = initial_centroids(
        xg, wg, k, init=init, seed=seed, mesh=mesh, init_sample=n, block_size=block_size, n=n
    )
    return np.asarray(c)


def initial_centroids(
    x: jax.Array,
    w: jax.Array,
    k: int,
    *,
    init: Init,
    seed: int,
    mesh: Mesh,
    init_sample: int,
    block_size: int,
    n: int | None = None,
) -> jax.Array:
    """Seeded initial centroids for global (sharded) rows x with weights w.

    Rows from n on (default: none) are padding: no draw ever covers them, so the result is
    the same for any number of devices. 'kmeans++': exact k-means++ on a seeded weighted
    subsample without replacement of at most `init_sample` of the n rows (all when fewer).
    'kmeans||': k-means|| over all n rows (5 rounds of 2k draws).
    """
    _check_init(init)
    n = x.shape[0] if n is None else n
    key = jax.random.key(seed)
    if init == "kmeans||":
        return _kmeans_parallel(
            key, x, w, k, mesh, n=n, rounds=5, oversampling=2 * k, block=block_size
        )
    m = min(n, init_sample)
    key, sub = jax.random.split(key)
    rep = mesh_lib.replicated(mesh)

    @functools.partial(jax.jit, out_shardings=(rep, rep))
    def subsample(key, x, w):
        if m == n:
            return x[:n], w[:n]
        # Gumbel top-m over the n real rows: weighted, without replacement.
        idx = lax.top_k(jnp.log(w[:n]) + jax.random.gumbel(key, (n,), jnp.float32), m)[1]
        return x[idx], w[idx]

    xs, ws = subsample(sub, x, w)
    return kmeans_plus_plus(key, xs, k, ws)


def _unit_rows_jnp(x: jax.Array) -> jax.Array:
    return _normalize_rows(x.astype(jnp.float32), 0.0)


# Rows scaled to unit L2 norm (zero rows stay zero), on the devices, sharding kept.
_unit_rows = jax.jit(_unit_rows_jnp)
# The same for arrays this module made from host rows: their buffer is reused.
_unit_rows_owned = jax.jit(_unit_rows_jnp, donate_argnums=0)


def kmeans(
    x: np.ndarray | jax.Array,
    k: int,
    *,
    iterations: int = 20,
    init: Init = "kmeans++",
    init_centroids: np.ndarray | jax.Array | None = None,
    spherical: bool = False,
    seed: int = 0,
    weights: np.ndarray | None = None,
    mesh: Mesh | None = None,
    block_size: int = 1024,
    gemm_dtype: Any = jnp.float32,
    init_sample: int | None = None,
) -> KMeansResult:
    """Lloyd's k-means: `iterations` x (assign + update), then a final assignment.

    x: (N, D) numpy rows (split over the mesh here; with several processes every process
    passes the same full rows and gets every row's result) or an already sharded global jax
    Array (multi-process: build it with `mesh.shard_batch`; results are this process's rows).
    Rows must be finite and weights finite and >= 0 (ValueError otherwise).
    iterations=0 returns the initial centroids and the assignment to them.
    spherical: rows and centroids are L2-normalised, i.e. cosine k-means.
    gemm_dtype="bfloat16" computes the distance GEMM in bf16 with fp32 accumulation, on rows
    and centroids shifted by the weighted data mean (for GPU/TPU; "float32" by default).
    init_sample: rows used by 'kmeans++' (default 64 k).
    """
    mesh = mesh or mesh_lib.make_mesh()
    k = _integer("k", k, 1)
    iterations = _integer("iterations", iterations, 0)
    block_size = _integer("block_size", block_size, 1)
    dtype = _gemm_dtype(gemm_dtype)
    if init_centroids is None:
        _check_init(init)
        init_sample = _integer("init_sample", init_sample or 64 * k, 1)
    if not isinstance(x, jax.Array):
        x = x if isinstance(x, np.ndarray) else np.asarray(x, np.float32)
    _check_shape(x.shape)
    distributed = isinstance(x, jax.Array) and not x.is_fully_addressable
    rows = (lambda a, n: _host_rows(a)) if distributed else _all_rows
    xg, wg, n = _to_global(x, weights, mesh)
    _check_rows(xg, wg, n)
    if spherical:
        xg = _unit_rows_owned(xg) if xg is not x else _unit_rows(xg)
    if k > n:
        raise ValueError(f"k={k} clusters for only {n} points")
    if init_centroids is None:
        c0 = initial_centroids(
            xg,
            wg,
            k,
            init=init,
            seed=seed,
            mesh=mesh,
            init_sample=init_sample,
            block_size=block_size,
            n=n,
        )
    else:
        c0 = jnp.asarray(_check_centroids(init_centroids, k, xg.shape[1]))
    if spherical:
        c0 = _unit_rows(c0)
    program = _lloyd_program(mesh, iterations, block_size, dtype, spherical)
    c, idx, d2, obj, hist, reseeded = program(xg, wg, c0)
    return KMeansResult(
        centroids=np.asarray(c),
        assignments=rows(idx, n),
        sq_distances=rows(d2, n),
        objective=float(obj),
        objective_history=np.asarray(hist),
        empty_reseeded=int(reseeded),
    )


def kmeans_streaming(
    chunks: Callable[[], Iterable[np.ndarray]],
    init_centroids: np.ndarray,
    *,
    iterations: int = 20,
    spherical: bool = False,
    mesh: Mesh | None = None,
    block_size: int = 1024,
    gemm_dtype: Any = jnp.float32,
) -> KMeansResult:
    """k-means over data larger than device memory: each iteration is one pass over `chunks()`.

    `chunks()` returns a fresh iterable of (n_i, D) numpy blocks (e.g. read from the extract
    chunk files or a memory map), the same rows on every pass; only one chunk is on the devices
    at a time. Assignments are in chunk order. With several processes every process passes the
    same chunks. The first pass checks every chunk (a NaN/inf row is a ValueError naming the
    chunk); empty chunks are skipped. gemm_dtype="bfloat16" adds one pass for the data mean
    (the GEMM shift, see `kmeans`).
    """
    mesh = mesh or mesh_lib.make_mesh()
    iterations = _integer("iterations", iterations, 0)
    block_size = _integer("block_size", block_size, 1)
    dtype = _gemm_dtype(gemm_dtype)
    c0 = np.asarray(init_centroids, np.float32)
    _check_shape(c0.shape, "init_centroids")
    c0 = _check_centroids(c0, None, c0.shape[1])
    k, dim = c0.shape
    rep = mesh_lib.replicated(mesh)
    c = jax.device_put(jnp.asarray(c0), rep)
    if spherical:
        c = _unit_rows(c)
    stats = jax.jit(_sharded_stats(mesh, block_size, dtype), out_shardings=rep)
    assign = jax.jit(_sharded_assign(mesh, block_size, dtype))
    update = jax.jit(functools.partial(update_centroids, spherical=spherical))
    first_pass_rows: list[int] = []  # rows of the first (checked) pass

    def each_chunk() -> Iterable[tuple[jax.Array, jax.Array, int]]:
        check = not first_pass_rows
        total = 0
        for i, chunk in enumerate(chunks()):
            if not isinstance(chunk, np.ndarray):
                chunk = np.asarray(chunk, np.float32)
            if chunk.ndim != 2 or chunk.shape[1] != dim:
                raise ValueError(f"chunk {i} has shape {chunk.shape}; expected (rows, {dim})")
            if not len(chunk):
                continue
            xg, wg, n = _to_global(chunk, None, mesh)
            if check:
                _check_rows(xg, wg, n, where=f" of chunk {i}", offset=total)
            yield (_unit_rows_owned(xg) if spherical else xg), wg, n
            total += n
        if not total:
            raise ValueError("chunks() yielded no rows")
        if check:
            first_pass_rows.append(total)
        elif total != first_pass_rows[0]:
            raise ValueError(
                f"chunks() yielded {total} rows on this pass but {first_pass_rows[0]} on the "
                "first: it must return the same rows on every pass"
            )

    if _low_precision(dtype):
        weighted_sum = jax.jit(_weighted_sum)
        parts = [weighted_sum(xg, wg) for xg, wg, _ in each_chunk()]
        shift = sum(s for s, _ in parts) / sum(t for _, t in parts)
    else:
        shift = jnp.zeros((dim,), jnp.float32)
    shift = jax.device_put(shift, rep)

    hist, reseeded = [], 0
    for _ in range(iterations):
        sums = jnp.zeros((k, dim), jnp.float32)
        counts = jnp.zeros((k,), jnp.float32)
        obj = jnp.float32(0)
        for xg, wg, _ in each_chunk():
            s, n_, o = stats(xg, wg, c, shift)
            sums, counts, obj = sums + s, counts + n_, obj + o
        c, n_re = update(c, sums, counts)
        hist.append(float(obj))
        reseeded += int(n_re)
    idx_parts, d2_parts = [], []
    for xg, _, n in each_chunk():
        idx, d2 = assign(xg, c, shift)
        idx_parts.append(_all_rows(idx, n))
        d2_parts.append(_all_rows(d2, n))
    d2_all = np.concatenate(d2_parts)
    return KMeansResult(
        centroids=np.asarray(c),
        assignments=np.concatenate(idx_parts),
        sq_distances=d2_all,
        objective=float(d2_all.astype(np.float64).sum()),
        objective_history=np.asarray(hist, np.float32),
        empty_reseeded=reseeded,
    )


def _host_rows(a: jax.Array) -> np.ndarray:
    """This process's rows of a data-sharded result (all rows on a single process)."""
    if a.is_fully_addressable:
        return np.asarray(a)
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
