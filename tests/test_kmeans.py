"""JIT k-means against brute-force numpy and scikit-learn; sharding, streaming, re-seeding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

from tldr_jax.select import kmeans as km


def _blobs(n=1200, d=8, k=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * 6
    label = rng.integers(0, k, n)
    x = centres[label] + rng.standard_normal((n, d)).astype(np.float32)
    # One row of each blob as the initial centroids: no cluster starts empty.
    c0 = np.stack([x[np.flatnonzero(label == j)[0]] for j in range(k)])
    return x.astype(np.float32), c0


def _mesh(n_devices):
    return jax.make_mesh(
        (n_devices, 1),
        ("data", "fsdp"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=jax.devices()[:n_devices],
    )


def test_assign_block_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 5)).astype(np.float32)
    c = rng.standard_normal((7, 5)).astype(np.float32)
    idx, d2 = km._assign_block(jnp.asarray(x), jnp.asarray(c), jnp.sum(c * c, 1), jnp.float32)
    ref = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(idx), ref.argmin(1))
    np.testing.assert_allclose(np.asarray(d2), ref.min(1), rtol=1e-4, atol=1e-4)


def test_matches_sklearn_same_init():
    x, c0 = _blobs(n=1500, d=8, k=6)
    ours = km.kmeans(x, 6, iterations=5, init_centroids=c0, block_size=128, mesh=_mesh(1))
    ref = KMeans(6, init=c0, n_init=1, max_iter=5, tol=0.0, algorithm="lloyd").fit(x)
    np.testing.assert_array_equal(ours.assignments, ref.labels_)
    np.testing.assert_allclose(ours.centroids, ref.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert abs(ours.objective - ref.inertia_) / ref.inertia_ < 1e-4
    assert ours.empty_reseeded == 0


def test_hard_problem_matches_numpy_lloyd():
    """Overlapping data where assignments keep moving: every step equals float64 Lloyd."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((900, 6)).astype(np.float32)
    c0 = x[:12].copy()
    ours = km.kmeans(x, 12, iterations=4, init_centroids=c0, block_size=100, mesh=_mesh(1))
    c = c0.astype(np.float64)
    for it in range(4):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        a = d.argmin(1)
        np.testing.assert_allclose(ours.objective_history[it], d.min(1).sum(), rtol=1e-5)
        assert np.bincount(a, minlength=12).min() > 0
        c = np.stack([x[a == j].mean(0) for j in range(12)])
    np.testing.assert_allclose(ours.centroids, c, atol=1e-4)


def test_same_result_on_1_and_8_devices():
    x, c0 = _blobs(n=1003, d=8, k=6, seed=3)  # 1003 rows: padding on 8 devices
    one = km.kmeans(x, 6, iterations=4, init_centroids=c0, block_size=64, mesh=_mesh(1))
    eight = km.kmeans(x, 6, iterations=4, init_centroids=c0, block_size=64, mesh=_mesh(8))
    np.testing.assert_array_equal(one.assignments, eight.assignments)
    np.testing.assert_allclose(one.centroids, eight.centroids, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one.objective, eight.objective, rtol=1e-5)
    assert len(eight.assignments) == 1003


def test_empty_cluster_reseeded_from_largest():
    x, c0 = _blobs(n=600, d=4, k=3, seed=4)
    far = np.full((1, 4), 1e4, np.float32)  # attracts nothing: empty after the first step
    init = np.concatenate([c0, far])
    r = km.kmeans(x, 4, iterations=3, init_centroids=init, mesh=_mesh(1))
    assert r.empty_reseeded >= 1
    assert np.bincount(r.assignments, minlength=4).min() > 0
    assert np.abs(r.centroids).max() < 100


def test_reseed_splits_largest():
    c = jnp.asarray([[1.0, 2.0], [5.0, 5.0], [0.0, 0.0]])
    counts = jnp.asarray([10.0, 2.0, 0.0])
    new, cnt, n = km.reseed_empty(c, counts)
    assert int(n) == 1
    np.testing.assert_allclose(np.asarray(cnt), [5.0, 2.0, 5.0])
    eps = 1 / 1024
    np.testing.assert_allclose(np.asarray(new[2]), [1 + eps, 2 * (1 - eps)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new[0]), [1 - eps, 2 * (1 + eps)], rtol=1e-6)


def test_spherical_unit_centroids_no_collapse():
    x, _ = _blobs(n=800, d=6, k=5, seed=5)
    r = km.kmeans(x, 5, iterations=5, spherical=True, seed=1, mesh=_mesh(2))
    np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, rtol=1e-5)
    assert len(np.unique(r.assignments)) == 5


@pytest.mark.parametrize("init", ["kmeans++", "kmeans||"])
def test_init_seeded_and_sane(init):
    x, _ = _blobs(n=1000, d=8, k=6, seed=6)
    a = km.kmeans(x, 6, iterations=5, init=init, seed=3, mesh=_mesh(4))
    b = km.kmeans(x, 6, iterations=5, init=init, seed=3, mesh=_mesh(4))
    np.testing.assert_array_equal(a.assignments, b.assignments)
    # Well-separated blobs: a good seeding finds all six.
    ref = KMeans(6, n_init=5, random_state=0).fit(x).inertia_
    assert a.objective < 1.05 * ref


def test_kmeans_plus_plus_picks_distinct_rows():
    x, _ = _blobs(n=300, d=4, k=5, seed=7)
    c = np.asarray(km.kmeans_plus_plus(jax.random.key(0), jnp.asarray(x), 5))
    rows = [np.flatnonzero((x == ci).all(1)) for ci in c]
    assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == 5


def test_streaming_equals_in_memory():
    x, c0 = _blobs(n=1000, d=8, k=6, seed=8)
    mem = km.kmeans(x, 6, iterations=3, init_centroids=c0, mesh=_mesh(2))
    stream = km.kmeans_streaming(
        lambda: (x[s : s + 300] for s in range(0, 1000, 300)), c0, iterations=3, mesh=_mesh(2)
    )
    np.testing.assert_array_equal(mem.assignments, stream.assignments)
    np.testing.assert_allclose(mem.centroids, stream.centroids, rtol=1e-5, atol=1e-5)


def test_bf16_gemm_close():
    x, c0 = _blobs(n=600, d=8, k=6, seed=9)
    f32 = km.kmeans(x, 6, iterations=3, init_centroids=c0, mesh=_mesh(1))
    bf16 = km.kmeans(x, 6, iterations=3, init_centroids=c0, mesh=_mesh(1), gemm_dtype=jnp.bfloat16)
    assert (f32.assignments == bf16.assignments).mean() > 0.99
    assert abs(bf16.objective - f32.objective) / f32.objective < 1e-2
