"""Selection strategies, PCA clamp, features and the `select` stage on fake extract chunks."""

import json

import ml_collections
import numpy as np
import pytest

from configs import tldr as tldr_config
from tldr_jax import config_check
from tldr_jax.compress import select_stage
from tldr_jax.select import features, pca, strategies
from tldr_jax.utils import io


def _clusters(n=103, k=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, k, n), rng.random(n).astype(np.float32)


def test_target_count():
    assert strategies.target_count(0.25, 100) == 25
    assert strategies.target_count(1.0, 7) == 7
    assert strategies.target_count(30, 100) == 30
    assert strategies.target_count(30.0, 100) == 30
    assert strategies.target_count(0.3, 9) == 3  # 2.7 rows: rounded, not truncated
    assert strategies.target_count(0.3, 7) == 2  # 2.1
    assert strategies.target_count(1e-3, 100) == 1  # never zero rows
    for bad in (0, -0.5, 1, 2.5, 101):
        with pytest.raises(ValueError):
            strategies.target_count(bad, 100)


@pytest.mark.parametrize("strategy", ["stride", "ratio", "nearest", "random"])
@pytest.mark.parametrize("count", [1, 13, 51, 52, 80, 103])
def test_every_strategy_keeps_exact_count(strategy, count):
    a, d = _clusters()
    keep = strategies.select(strategy, a, d, count, stride=2, seed=3)
    assert len(keep) == count == len(np.unique(keep))
    assert np.all(np.diff(keep) > 0) and keep.min() >= 0 and keep.max() < len(a)


def test_stride_is_reference_rule_at_its_natural_count():
    a, d = _clusters()
    natural = sum(-(-np.sum(a == j) // 3) for j in range(7))
    assert strategies.stride_count(a, 3) == natural
    keep = strategies.select_stride(a, natural, stride=3)
    ref = np.concatenate([np.flatnonzero(a == j)[::3] for j in range(7)])
    np.testing.assert_array_equal(keep, np.sort(ref))


def test_stride_below_its_natural_count_drops_the_deepest_members_evenly():
    """Fewer rows than the stride rule gives: every cluster loses its deepest stride members
    first (level by level across clusters), not whole clusters."""
    a = np.random.default_rng(5).permutation(np.repeat([0, 1, 2], [9, 7, 5]))
    members = [np.flatnonzero(a == j)[::2] for j in range(3)]  # 5, 4, 3 stride members
    assert strategies.stride_count(a, 2) == 12
    # 8 rows: levels 0 and 1 of every cluster (6), then level 2 of clusters 0 and 1.
    keep = strategies.select_stride(a, 8, stride=2)
    for j, take in enumerate((3, 3, 2)):
        np.testing.assert_array_equal(keep[a[keep] == j], members[j][:take])


def test_nearest_and_ratio_per_cluster_quotas():
    a, d = _clusters()
    keep = strategies.select_nearest(a, d, 40)
    quota = strategies.cluster_quotas(np.bincount(a, minlength=7), 40)
    np.testing.assert_array_equal(np.bincount(a[keep], minlength=7), quota)
    for j in range(7):
        members = np.flatnonzero(a == j)
        want = members[np.argsort(d[members], kind="stable")[: quota[j]]]
        np.testing.assert_array_equal(np.sort(want), keep[a[keep] == j])
    rnd = strategies.select_random(200, 40, seed=1)
    assert len(set(rnd.tolist())) == 40 and rnd.min() >= 0 and rnd.max() < 200
    assert rnd.max() > 100  # drawn over the whole set, not its first rows
    np.testing.assert_array_equal(rnd, strategies.select_random(200, 40, seed=1))
    assert not np.array_equal(rnd, strategies.select_random(200, 40, seed=2))
    r1 = strategies.select_ratio(a, 40, seed=1)
    np.testing.assert_array_equal(r1, strategies.select_ratio(a, 40, seed=1))
    np.testing.assert_array_equal(np.bincount(a[r1], minlength=7), quota)
    assert not np.array_equal(r1, strategies.select_ratio(a, 40, seed=2))


def test_pca_clamped_and_whitened():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((500, 20)) @ rng.standard_normal((20, 20))).astype(np.float32)
    p = pca.fit_pca(x, 256, whiten=True, block=128)  # asks more than D, like the reference
    z = p.transform(x, block=100)
    assert z.shape == (500, 20)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(z.T), np.eye(20), atol=1e-3)
    from sklearn.decomposition import PCA as SkPCA

    ref = SkPCA(5).fit(x)
    p5 = pca.fit_pca(x, 5, whiten=False)
    np.testing.assert_allclose(np.abs(p5.components), np.abs(ref.components_), atol=1e-4)
    np.testing.assert_allclose(p5.variance, ref.explained_variance_, rtol=1e-4)
    # Deterministic signs: each component's largest-magnitude entry is positive.
    for comps in (p.components, p5.components):
        assert np.all(comps[np.arange(len(comps)), np.abs(comps).argmax(1)] > 0)
    assert pca.num_components(256, 50, 197) == 50


def test_histogram_features():
    codes = np.array([[0, 2, 2, 3], [1, 1, 1, 1]])
    h = features.histogram_features(codes, 5)
    np.testing.assert_allclose(h, [[0.25, 0, 0.5, 0.25, 0], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(features.sequence_features(codes), codes.astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(features.l2_normalize(h), axis=1), 1.0)


def write_fake_extract(workdir, n=240, t=12, vocab=16, seed=0):
    """A fake `extract` output under workdir: W/extract/codes-NNNNN.npz, ids.json, extract.json.

    Chunks are written out of order (as by several processes); rows follow one of 4 code
    patterns. Returns (ids, codes, pattern of each row). Also used by tests/test_multihost.py.
    """
    rng = np.random.default_rng(seed)
    ids = np.array([f"img-{i:04d}" for i in rng.permutation(n)])
    group = rng.integers(0, 4, n)  # 4 well-separated code patterns
    patterns = rng.integers(0, vocab, (4, t))
    codes = patterns[group].copy()
    codes[:, 0] = np.arange(n) % vocab  # a little per-row variation
    ex = workdir / "extract"
    chunks = np.array_split(np.arange(n), 5)
    for c in (3, 0, 4, 1, 2):  # chunk files land in any order, by several processes
        rows = chunks[c][::-1]  # and rows inside a chunk need not be in input order
        io.write_npz(ex / f"codes-{c:05d}.npz", ids=ids[rows], codes=codes[rows].astype(np.int32))
    io.write_json(ex / "ids.json", list(ids))
    io.write_json(workdir / "extract.json", {"codebook_size": vocab})
    return ids, codes, group


def test_load_codes_keyed_by_id(tmp_path):
    ids, codes, _ = write_fake_extract(tmp_path)
    got_ids, got_codes = select_stage.load_codes(tmp_path / "extract")
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_codes, codes)
    (tmp_path / "extract" / "ids.json").unlink()  # fallback: chunk then row order
    got_ids, got_codes = select_stage.load_codes(tmp_path / "extract")
    lookup = dict(zip(ids, map(tuple, codes), strict=True))
    assert all(lookup[i] == tuple(c) for i, c in zip(got_ids, got_codes, strict=True))


def select_config(**select):
    """The `select` config of the stage tests (tiny: 4 clusters, 5 iterations)."""
    base = {
        "feature": "sequence",
        "pca_dim": 256,
        "whiten": False,
        "num_clusters": 4,
        "iterations": 5,
        "init": "kmeans++",
        "spherical": False,
        "gemm_dtype": "float32",
        "strategy": "stride",
        "stride": 2,
        "target": 0.25,
        "seed": 1,
        "max_in_memory_mb": 4096,
        "stream_chunk_rows": 64,
    }
    # The shipped config around it: the stage records a signature of the keys it reads.
    config = tldr_config.get_config("tiny")
    with config.unlocked():
        config.seed = 0
        config.select = ml_collections.ConfigDict({**base, **select})
    return config


def test_select_checks_count_and_stride():
    a = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    d = np.arange(10.0)
    for strategy in strategies.STRATEGIES:
        for count in (-1, 11, 2.5):
            with pytest.raises(ValueError, match=r"count must be an integer in \[0, 10\]"):
                strategies.select(strategy, a, d, count)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        strategies.select("stride", a, d, 3, stride=0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        strategies.stride_count(a, 0)
    assert len(strategies.select("ratio", a, d, 10)) == 10


@pytest.mark.parametrize(
    "feature,budget,gemm_dtype",
    [
        ("sequence", 4096, "float32"),
        ("histogram", 4096, "float32"),
        ("histogram", 1e-3, "float32"),
        ("sequence", 4096, "bfloat16"),
        ("histogram", 1e-3, "bfloat16"),
    ],
)
def test_select_stage_end_to_end(tmp_path, monkeypatch, feature, budget, gemm_dtype):
    ids, _, group = write_fake_extract(tmp_path)
    # budget 1e-3 MB: features memory-mapped, PCA to a second map, k-means streamed.
    config = select_config(feature=feature, max_in_memory_mb=budget, gemm_dtype=gemm_dtype)
    clustered = []
    real_kmeans = select_stage._kmeans

    def spy(feats, *args):
        clustered.append(np.array(feats))
        return real_kmeans(feats, *args)

    monkeypatch.setattr(select_stage, "_kmeans", spy)
    summary = select_stage.run(config, str(tmp_path))
    # k-means clusters the PCA-reduced features, each row L2-normalised
    (feats,) = clustered
    assert feats.shape == (240, summary["pca_dim"])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert summary["gemm_dtype"] == gemm_dtype
    assert summary["seed"] == 1  # select.seed's own (the global seed is 0)
    assert summary["input_rows"] == 240 and summary["kept_rows"] == 60
    assert summary["pca_dim"] == (12 if feature == "sequence" else 16)  # clamped from 256
    sel = np.load(tmp_path / "select" / "selected.npz")
    clu = np.load(tmp_path / "select" / "clusters.npz")
    np.testing.assert_array_equal(clu["ids"], ids)
    assert len(sel["ids"]) == 60 and set(sel["ids"]) <= set(ids)
    pos = {s: i for i, s in enumerate(ids)}
    assert np.all(np.diff([pos[s] for s in sel["ids"]]) > 0)  # input order
    # Rows sharing a code pattern share a cluster: features followed their ids.
    a = clu["assignments"]
    for g in range(4):
        assert len(np.unique(a[group == g])) == 1
    assert (tmp_path / "select" / "cluster_sizes.png").stat().st_size > 0
    assert summary["streamed"] == (budget < 1)
    assert not list((tmp_path / "select").glob("*.tmp.npy"))  # temporary maps removed
    json.dumps(summary)


def test_stride_target_zero_keeps_the_reference_size(tmp_path):
    """select.target=0 with the stride strategy: every stride-th member of each cluster, as
    many rows as that rule gives (the reference's size), not a fraction of the rows."""
    write_fake_extract(tmp_path)
    summary = select_stage.run(select_config(target=0, stride=3), str(tmp_path))
    clu = np.load(tmp_path / "select" / "clusters.npz")
    sel = np.load(tmp_path / "select" / "selected.npz")
    a, pos = clu["assignments"], {s: i for i, s in enumerate(clu["ids"])}
    want = np.sort(np.concatenate([np.flatnonzero(a == j)[::3] for j in np.unique(a)]))
    np.testing.assert_array_equal(np.sort([pos[s] for s in sel["ids"]]), want)
    assert summary["kept_rows"] == len(want) == strategies.stride_count(a, 3)
    assert summary["target_asked"] == 0
    # 0 is the stride rule's own size: another strategy is told to take a fraction or count
    config = tldr_config.get_config("tiny")
    config.select.target = 0
    assert config_check.problems(config) == [
        "select.target=0.0 with select.strategy='nearest': 0 (keep every select.stride-th member "
        "of each cluster) is the stride strategy's own size; give the others a fraction or a "
        "count"
    ]
    config.select.strategy = "stride"
    assert config_check.problems(config) == []
    config.select.target = -1
    assert "or 0 with select.strategy='stride'" in config_check.problems(config)[0]


def test_gemm_dtype_config_key_checked():
    config = tldr_config.get_config("tiny")
    assert config.select.gemm_dtype == "float32"
    assert config_check.problems(config) == []
    config.select.gemm_dtype = "float16"
    assert config_check.problems(config) == [
        "select.gemm_dtype='float16': must be one of float32 | bfloat16"
    ]


def test_select_stage_stops_on_non_finite_features(tmp_path):
    ids, codes, _ = write_fake_extract(tmp_path)
    # A corrupt chunk: float codes with NaN/inf (extract writes int32, so only corruption).
    path = tmp_path / "extract" / "codes-00002.npz"
    with np.load(path) as z:
        chunk_ids, bad = z["ids"], z["codes"].astype(np.float32)
    bad[5, 3], bad[9, 0] = np.nan, np.inf
    io.write_npz(path, ids=chunk_ids, codes=bad)
    with pytest.raises(ValueError, match=r"2 of 48 feature rows from .*codes-00002.npz") as e:
        select_stage.run(select_config(), str(tmp_path))
    assert repr(str(chunk_ids[5])) in str(e.value)
    assert not (tmp_path / "select" / "selected.npz").exists()


def test_count_target_above_the_rows_keeps_all_of_them(tmp_path):
    write_fake_extract(tmp_path)
    summary = select_stage.run(select_config(target=100000), str(tmp_path))
    assert summary["kept_rows"] == 240 and summary["target_asked"] == 100000
    assert len(np.load(tmp_path / "select" / "selected.npz")["ids"]) == 240


def test_select_alone_records_its_signature_without_reading_the_data(tmp_path):
    """`select` reads only extract's files: its signature takes the data fingerprint from
    extract's, and a lone rerun with other settings redoes it and records them."""
    from tldr_jax.compress import common

    write_fake_extract(tmp_path)
    io.write_json(
        common.signature_path(tmp_path, "extract"),
        {"train_data.pairs": 240, "train_data.sha256": "abc"},
    )
    select_stage.run(select_config(target=0.25), str(tmp_path))
    summary = select_stage.run(select_config(target=0.5), str(tmp_path))
    assert summary["kept_rows"] == 120
    recorded = io.read_json(common.signature_path(tmp_path, "select"))
    assert recorded["select.target"] == 0.5 and recorded["train_data.sha256"] == "abc"


def test_temporary_maps_of_processes_this_run_lacks_are_removed(tmp_path):
    """A streamed run killed with 2 processes and rerun with 1 leaves no map of process 1."""
    write_fake_extract(tmp_path)
    (tmp_path / "select").mkdir(exist_ok=True)
    for name in ("features-1.tmp.npy", "features-pca-1.tmp.npy"):
        np.save(tmp_path / "select" / name, np.zeros(3))
    select_stage.run(select_config(max_in_memory_mb=1e-3), str(tmp_path))
    assert not list((tmp_path / "select").glob("*.tmp.npy"))


def test_alignment_filter_over_selected_or_all_rows():
    """score.filter_over: `selected` keeps the best half of select's rows (exact size); `all`
    keeps select's rows that are in the best half of every row (the reference's
    intersection), so its size follows how selection and alignment agree."""
    from tldr_jax.compress.score import filter_rows

    scores = np.arange(10, dtype=np.float32)  # row i scores i: rows 5..9 are the best half
    selected = np.array([9, 8, 7, 1, 0, 6])
    np.testing.assert_array_equal(filter_rows(scores, selected, 0.5), [7, 8, 9])
    np.testing.assert_array_equal(filter_rows(scores, selected, 0.5, "all"), [6, 7, 8, 9])
    np.testing.assert_array_equal(filter_rows(scores, np.array([0, 1, 2]), 0.5, "all"), [])
    with pytest.raises(ValueError, match="selected | all"):
        filter_rows(scores, selected, 0.5, "both")
    # A fraction that keeps no row is refused before the scorer trains.
    from tldr_jax.compress.score import check_keeps_some
    from tldr_jax.config_check import ConfigError

    check_keeps_some(0.5, "selected", 2, 10)
    with pytest.raises(ConfigError, match=r"keep_fraction=0.5 .* keeps none of the 1 rows select"):
        check_keeps_some(0.5, "selected", 1, 10)
    with pytest.raises(ConfigError, match=r"keeps none of the 10 rows read"):
        check_keeps_some(0.01, "all", 5, 10)
    config = tldr_config.get_config("tiny")
    config.score.filter_over = "both"
    assert config_check.problems(config) == [
        "score.filter_over='both': must be one of selected | all"
    ]


def test_cluster_quotas_are_proportional_with_largest_remainders():
    quotas = strategies.cluster_quotas
    assert quotas(np.array([10, 30, 60]), 10).tolist() == [1, 3, 6]
    assert quotas(np.array([10, 30, 60]), 50).tolist() == [5, 15, 30]
    # 7 of (5, 3, 2): exact 3.5 / 2.1 / 1.4 -> floors 3 / 2 / 1, the one left to the largest
    # remainder (0.5)
    assert quotas(np.array([5, 3, 2]), 7).tolist() == [4, 2, 1]
    assert quotas(np.array([1, 1, 1]), 2).tolist() == [1, 1, 0]  # a tie: the lower index
    assert quotas(np.array([4, 0, 4]), 3).tolist() == [2, 0, 1]  # an empty cluster gets none


def test_load_codes_without_ids_json_orders_by_chunk_then_row_and_drops_duplicates(tmp_path):
    """No ids.json: rows come in chunk file name order, then row order inside a chunk (not
    sorted by id); a chunk rewritten under another name (a restart) adds no second copy."""
    ids, codes, _ = write_fake_extract(tmp_path)
    ex = tmp_path / "extract"
    (ex / "ids.json").unlink()
    files = sorted(ex.glob("codes-*.npz"))
    want_ids = np.concatenate([np.load(f)["ids"] for f in files])
    want_codes = np.concatenate([np.load(f)["codes"] for f in files])
    assert not np.array_equal(want_ids, np.sort(want_ids))  # file order is not id order
    with np.load(files[1]) as z:  # the same rows again, in a later file
        io.write_npz(ex / "codes-00009.npz", ids=z["ids"], codes=z["codes"])
    got_ids, got_codes = select_stage.load_codes(ex)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_codes, want_codes)


def test_select_stage_writes_the_strategys_rows_with_their_clusters_and_distances(
    tmp_path, monkeypatch
):
    """With k-means' result fixed (cluster 2 empty): selected.npz holds the rows
    select.strategy keeps, each with its cluster and Euclidean (not squared) distance; the
    summary counts the non-empty clusters; the size plot gets every cluster's size."""
    from tldr_jax.select.kmeans import KMeansResult

    ids, _, group = write_fake_extract(tmp_path)
    n = len(ids)
    assignments = np.array([0, 1, 3, 3])[group].astype(np.int32)
    sq = np.random.default_rng(3).permutation(n).astype(np.float32) + 1.0
    fake = KMeansResult(
        centroids=np.zeros((4, 2), np.float32),
        assignments=assignments,
        sq_distances=sq,
        objective=float(sq.sum()),
        objective_history=np.zeros(1, np.float32),
        empty_reseeded=0,
    )
    monkeypatch.setattr(select_stage, "_kmeans", lambda *args: fake)
    plotted = []
    monkeypatch.setattr(select_stage, "_plot_cluster_sizes", lambda s, p: plotted.append(s))
    summary = select_stage.run(select_config(strategy="nearest"), str(tmp_path))
    keep = strategies.select("nearest", assignments, sq, 60)
    sel = np.load(tmp_path / "select" / "selected.npz")
    clu = np.load(tmp_path / "select" / "clusters.npz")
    np.testing.assert_array_equal(sel["ids"], ids[keep])
    np.testing.assert_array_equal(sel["cluster"], assignments[keep])
    np.testing.assert_allclose(sel["distance"], np.sqrt(sq[keep]), rtol=1e-6)
    np.testing.assert_allclose(clu["distance"], np.sqrt(sq), rtol=1e-6)
    assert summary["kept_rows"] == 60 and summary["num_clusters"] == 4
    assert summary["nonempty_clusters"] == 3
    (sizes,) = plotted
    np.testing.assert_array_equal(sizes, np.bincount(assignments, minlength=4))
