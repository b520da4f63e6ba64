"""Recall@K (BLIP semantics) against a brute-force NumPy implementation."""

import numpy as np
import pytest

from tldr_jax.eval.retrieval import ranks_from_scores, recall_at_k, retrieval_metrics


def brute_ranks(sim: np.ndarray, txt2img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BLIP's loops, with ties broken by a stable descending sort (lower index first)."""
    n_img, n_txt = sim.shape
    img2txt = [np.flatnonzero(txt2img == i) for i in range(n_img)]
    i2t = np.zeros(n_img)
    for i in range(n_img):
        order = np.argsort(-sim[i], kind="stable")
        i2t[i] = min(np.flatnonzero(order == t)[0] for t in img2txt[i])
    t2i = np.zeros(n_txt)
    for t in range(n_txt):
        order = np.argsort(-sim[:, t], kind="stable")
        t2i[t] = np.flatnonzero(order == txt2img[t])[0]
    return i2t, t2i


def brute_force(sim: np.ndarray, txt2img: np.ndarray, ks=(1, 5, 10)) -> dict:
    i2t, t2i = brute_ranks(sim, txt2img)
    out = {f"tr_r{k}": 100.0 * np.mean(i2t < k) for k in ks}
    out.update({f"ir_r{k}": 100.0 * np.mean(t2i < k) for k in ks})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_img = 37
    # 1-6 captions per image, shuffled caption order.
    counts = rng.integers(1, 7, n_img)
    txt2img = rng.permutation(np.repeat(np.arange(n_img), counts))
    # Integer scores in a small range: many ties.
    sim = rng.integers(0, 6, (n_img, len(txt2img))).astype(np.float32)
    got = recall_at_k(sim, txt2img)
    want = brute_force(sim, txt2img)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_recall_from_embeddings_chunked_equals_full_matrix():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(50, 16)).astype(np.float32)
    txt2img = np.repeat(np.arange(50), 5)
    txt = img[txt2img] + 0.8 * rng.normal(size=(250, 16)).astype(np.float32)
    sim = img @ txt.T
    want = brute_force(sim, txt2img)
    got = retrieval_metrics(img, txt, txt2img, chunk=7)  # chunks that do not divide N
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    assert 0 < got["tr_r1"] < 100


def test_perfect_and_reversed_scores():
    txt2img = np.repeat(np.arange(20), 5)
    perfect = (np.arange(20)[:, None] == txt2img[None, :]).astype(np.float32)
    assert set(recall_at_k(perfect, txt2img).values()) == {100.0}
    worst = recall_at_k(-perfect, txt2img)
    assert worst["tr_r1"] == 0.0 and worst["ir_r10"] == 0.0


def test_a_diverged_model_scores_zero_not_one_hundred(caplog):
    """NaN compares false both ways: without care a NaN ground-truth score ranked first and a
    diverged model reported recall 100 on every key."""
    txt2img = np.repeat(np.arange(20), 5)
    img = np.eye(20, 32, dtype=np.float32)
    txt = img[txt2img].copy()
    assert set(retrieval_metrics(img, txt, txt2img).values()) == {100.0}
    with caplog.at_level("WARNING"):
        nan = retrieval_metrics(np.full_like(img, np.nan), txt, txt2img)
    assert set(nan.values()) == {0.0}
    assert "20 of 20 image and 0 of 100 caption embeddings are not finite" in caplog.text
    assert set(recall_at_k(np.full((20, 100), np.nan), txt2img).values()) == {0.0}
    # One diverged row (an infinity too): its own queries rank last, the others are unharmed.
    img[3, 0] = np.inf
    txt[7, 0] = np.nan  # caption 7 shows image 1
    one = retrieval_metrics(img, txt, txt2img)
    assert one["ir_r1"] == pytest.approx(100 * (100 - 5 - 1) / 100)  # image 3's captions, 7
    assert one["tr_r1"] == pytest.approx(100 * 19 / 20)  # image 3; image 1 keeps 4 captions


def test_txt2img_is_checked(caplog):
    sim = np.random.default_rng(0).normal(size=(3, 5))
    with pytest.raises(ValueError, match="one image index per caption .5."):
        recall_at_k(sim, np.array([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="there are 3 images"):
        recall_at_k(sim, np.array([0, 0, 1, 1, 3]))
    with pytest.raises(ValueError, match="integer"):
        recall_at_k(sim, np.array([0.0, 0, 1, 1, 1]))
    emb = np.eye(3, 4, dtype=np.float32)
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_metrics(emb, emb, np.array([0, 1]))
    # An image without a caption is a miss for image->text, said in a warning.
    r = recall_at_k(np.eye(3, 2), np.array([0, 1]), ks=(1,))
    assert r["tr_r1"] == pytest.approx(200 / 3) and r["ir_r1"] == 100.0
    assert "1 of 3 images have no caption" in caplog.text


def test_ranks_from_scores_in_chunks_cover_every_query():
    """Precomputed scores are ranked a block of queries at a time; with more captions than
    images every caption block must still be ranked (5k x 25k is 5 x 25 blocks of 1024)."""
    rng = np.random.default_rng(4)
    txt2img = rng.permutation(np.repeat(np.arange(11), 5))
    sim = rng.integers(0, 6, (11, 55)).astype(np.float32)  # ties
    want_i2t, want_t2i = brute_ranks(sim, txt2img)
    for chunk in (4, 1024):
        i2t, t2i = ranks_from_scores(sim, txt2img, chunk=chunk)
        np.testing.assert_array_equal(i2t, want_i2t)
        np.testing.assert_array_equal(t2i, want_t2i)
