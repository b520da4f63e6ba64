"""Which rows to keep given cluster assignments: every strategy keeps exactly `count` rows.

All return sorted row indices (input order).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Strategy = Literal["stride", "ratio", "nearest", "random"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def target_count(target: float, n: int) -> int:
    """A fraction in (0, 1] of n rows, or an integral count > 1 (at most n)."""
    t = float(target)
    if isinstance(target, bool) or t <= 0:
        raise ValueError(f"target must be a fraction in (0, 1] or a count > 1, got {target!r}")
    if t <= 1.0:
        if isinstance(target, int | np.integer):
            raise ValueError("target 1 is ambiguous: use 1.0 (all rows) or a count > 1")
        return max(1, int(round(t * n)))
    if t != int(t):
        raise ValueError(f"a count target must be an integer, got {target!r}")
    if t > n:
        raise ValueError(f"target count {int(t)} > {n} rows")
    return int(t)


def _ranks_in_cluster(assignments: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Position of each row inside its cluster when members are ordered by `key`."""
    order = np.lexsort((key, assignments))
    sorted_a = assignments[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_a)) + 1]
    sizes = np.diff(np.r_[starts, len(order)])
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    return rank


def cluster_quotas(sizes: np.ndarray, count: int) -> np.ndarray:
    """Per-cluster counts proportional to size that sum exactly to `count` (largest remainder)."""
    n = int(sizes.sum())
    exact = sizes * (count / n)
    quota = np.floor(exact).astype(np.int64)
    short = count - int(quota.sum())
    # Ties broken by cluster index, so the result is deterministic.
    order = np.lexsort((np.arange(len(sizes)), -(exact - quota)))
    quota[order[:short]] += 1
    return quota


def _check_stride(stride: int) -> None:
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")


def stride_count(assignments: np.ndarray, stride: int) -> int:
    """How many rows the reference's stride rule keeps: sum over clusters of
    ceil(size / stride) (`select.target=0` with `select.strategy=stride`)."""
    _check_stride(stride)
    sizes = np.bincount(np.asarray(assignments, np.int64))
    return int(np.sum(-(-sizes // int(stride))))


def select_stride(assignments: np.ndarray, count: int, stride: int) -> np.ndarray:
    """The reference rule: every `stride`-th member of each cluster, in input order.

    Rows are ranked by (rank mod stride, rank div stride, cluster): taking the first
    `stride_count(assignments, stride)` = sum(ceil(size/stride)) is exactly the reference; a
    smaller count drops the deepest members across clusters evenly, a larger one continues
    with the next offset.
    """
    _check_stride(stride)
    n = len(assignments)
    rank = _ranks_in_cluster(assignments, np.arange(n))
    order = np.lexsort((assignments, rank // stride, rank % stride))
    return np.sort(order[:count])


def _take_per_cluster(assignments: np.ndarray, key: np.ndarray, count: int) -> np.ndarray:
    k = int(assignments.max()) + 1 if len(assignments) else 0
    quota = cluster_quotas(np.bincount(assignments, minlength=k), count)
    rank = _ranks_in_cluster(assignments, key)
    return np.flatnonzero(rank < quota[assignments])


def select_ratio(assignments: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded random subset of each cluster, sized proportionally to the cluster."""
    key = np.random.default_rng(seed).permutation(len(assignments))
    return _take_per_cluster(assignments, key, count)


def select_nearest(assignments: np.ndarray, distances: np.ndarray, count: int) -> np.ndarray:
    """The members closest to their centroid, per cluster proportionally to its size."""
    return _take_per_cluster(assignments, np.asarray(distances), count)


def select_random(n: int, count: int, seed: int) -> np.ndarray:
    """Seeded uniform baseline (the reference took the file's first rows, unshuffled)."""
    return np.sort(np.random.default_rng(seed).choice(n, count, replace=False))


def select(
    strategy: Strategy,
    assignments: np.ndarray,
    distances: np.ndarray,
    count: int,
    *,
    stride: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """Row indices (into `assignments`) of the `count` rows `strategy` keeps: `stride`
    every `stride`-th member of each cluster (the reference), `ratio` a seeded random part
    of each cluster, `nearest` each cluster's members closest to its centroid (`distances`),
    both in proportion to cluster size, `random` a seeded uniform sample."""
    assignments = np.asarray(assignments, np.int64)
    n = len(assignments)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= n:
        raise ValueError(f"count must be an integer in [0, {n}] (the rows), got {count!r}")
    if strategy == "stride":
        return select_stride(assignments, count, stride)
    if strategy == "ratio":
        return select_ratio(assignments, count, seed)
    if strategy == "nearest":
        return select_nearest(assignments, distances, count)
    if strategy == "random":
        return select_random(len(assignments), count, seed)
    raise ValueError(f"unknown strategy {strategy!r}")
