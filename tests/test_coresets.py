"""Coreset selectors against brute-force numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from tldr_jax.distill import coresets


def _herding_bruteforce(x: np.ndarray, budget: int) -> list[int]:
    mu, chosen = x.mean(0), []
    for _ in range(budget):
        best, best_d = -1, np.inf
        for i in range(len(x)):
            if i in chosen:
                continue
            d = np.sum((mu - x[chosen + [i]].mean(0)) ** 2)
            if d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def _kcenter_bruteforce(x: np.ndarray, budget: int, first: int) -> list[int]:
    chosen = [first]
    while len(chosen) < budget:
        d = ((x[:, None, :] - x[None, chosen, :]) ** 2).sum(-1).min(1)
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    return chosen


def test_random_is_seeded_distinct_and_sorted():
    a = coresets.random_coreset(100, 10, seed=3)
    assert len(set(a)) == 10 and np.all(np.diff(a) > 0) and a.max() < 100
    np.testing.assert_array_equal(a, coresets.random_coreset(100, 10, seed=3))
    assert not np.array_equal(a, coresets.random_coreset(100, 10, seed=4))
    with pytest.raises(ValueError):
        coresets.random_coreset(5, 6, seed=0)


def test_herding_matches_bruteforce():
    x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    got = coresets.herding(x, 12)
    assert got.tolist() == _herding_bruteforce(x.astype(np.float64), 12)
    # Its selection mean tracks the full mean better than a random subset of the same size.
    err = np.linalg.norm(x[got].mean(0) - x.mean(0))
    assert err < np.linalg.norm(x[coresets.random_coreset(40, 12, 0)].mean(0) - x.mean(0))


def test_kcenter_matches_bruteforce_and_covers():
    x = np.random.default_rng(1).normal(size=(50, 5)).astype(np.float32)
    got = coresets.kcenter(x, 8, seed=2)
    first = int(np.random.default_rng(2).integers(50))
    assert got.tolist() == _kcenter_bruteforce(x.astype(np.float64), 8, first)
    # Duplicated points never produce a repeated index.
    dup = np.concatenate([x[:3]] * 4)
    assert len(set(coresets.kcenter(dup, 5, seed=0).tolist())) == 5


def test_forgetting_counts_and_selection():
    correct = np.array(
        [
            # s0: never learned; s1: learned, kept; s2: forgotten twice; s3: once; s4: once
            [0, 1, 1, 0, 0],
            [0, 1, 0, 1, 1],
            [0, 1, 1, 0, 1],
            [0, 1, 0, 0, 0],
        ],
        bool,
    )
    counts = coresets.forgetting_counts(correct)
    want = [4, 0, 2, 1, 1]  # never learned counts as `epochs`
    assert counts.tolist() == want
    # Brute force: count 1 -> 0 transitions sample by sample.
    rng = np.random.default_rng(0)
    big = rng.random((7, 30)) < 0.6
    brute = [
        sum(big[e - 1, i] and not big[e, i] for e in range(1, 7)) if big[:, i].any() else 7
        for i in range(30)
    ]
    assert coresets.forgetting_counts(big).tolist() == brute
    # Top-3 by count: s0 (4), s2 (2), then one of the tied s3 / s4, chosen by seed.
    picks = {tuple(coresets.forgetting(correct, 3, seed=s).tolist()) for s in range(20)}
    assert picks == {(0, 2, 3), (0, 2, 4)}


def test_herding_and_kcenter_do_not_change_under_a_shared_offset():
    """Both are shift invariant; their float32 expansions |x|^2 - 2<x, y> lost the differences
    to a large common offset (herding picked other points at 1000)."""
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    want_h, want_k = coresets.herding(x, 10), coresets.kcenter(x, 10, seed=1)
    assert want_h.tolist() == _herding_bruteforce(x.astype(np.float64), 10)
    for offset in (100.0, 1000.0, 1e5):
        shifted = x + np.float32(offset)
        np.testing.assert_array_equal(coresets.herding(shifted, 10), want_h)
        np.testing.assert_array_equal(coresets.kcenter(shifted, 10, seed=1), want_k)


def test_eval_minibatches_are_whole_epochs_with_a_smaller_last_batch():
    """eval-distilled's batches: each epoch a fresh permutation of every row, cut into
    batches of 64 and a last one of the rest (100 pairs: 64 + 36), as the reference's
    DataLoader without drop_last; truncated at the step count."""
    import jax

    from tldr_jax.distill.eval_distilled import epoch_minibatches

    blocks = epoch_minibatches(jax.random.key(0), 100, 64, steps=5)
    assert [b.shape for b in blocks] == [(1, 64), (1, 36), (1, 64), (1, 36), (1, 64)]
    for a, b in ((0, 1), (2, 3)):
        epoch = np.concatenate([blocks[a].ravel(), blocks[b].ravel()])
        assert sorted(epoch.tolist()) == list(range(100))
    assert not np.array_equal(blocks[0], blocks[2])  # a fresh permutation each epoch
    even = epoch_minibatches(jax.random.key(0), 128, 64, steps=3)
    assert [b.shape for b in even] == [(2, 64), (1, 64)]
    assert sorted(even[0].ravel().tolist()) == list(range(128))


def test_bad_inputs_are_named():
    x = np.random.default_rng(0).normal(size=(10, 3))
    x[2, 0] = np.nan
    for select in (lambda f: coresets.herding(f, 3), lambda f: coresets.kcenter(f, 3, 0)):
        with pytest.raises(ValueError, match="1 rows are not finite .first: row 2"):
            select(x)
        with pytest.raises(ValueError, match="2-D"):
            select(np.zeros(10))
    ok = np.random.default_rng(0).normal(size=(10, 3))
    assert len(coresets.herding(ok.tolist(), 3)) == 3  # any array-like
    with pytest.raises(TypeError, match="budget must be an integer"):
        coresets.herding(ok, 3.0)
    # A budget of 0 is refused by every selector, not an empty coreset.
    correct = np.ones((3, 10), bool)
    for select in (
        lambda: coresets.random_coreset(10, 0, 0),
        lambda: coresets.herding(ok, 0),
        lambda: coresets.kcenter(ok, 0, 0),
        lambda: coresets.forgetting(correct, 0, 0),
    ):
        with pytest.raises(ValueError, match=r"budget must be in \[1, 10\], got 0"):
            select()
    with pytest.raises(ValueError, match="epochs, N"):
        coresets.forgetting(np.ones(10, bool), 3, 0)


def test_eval_distilled_takes_each_method_from_its_own_selector():
    from tldr_jax.distill.eval_distilled import coreset_indices

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 6)).astype(np.float32)
    correct = rng.random((5, 40)) > 0.5
    want = {
        "random": coresets.random_coreset(40, 7, 3),
        "herding": coresets.herding(feats, 7),
        "kcenter": coresets.kcenter(feats, 7, 3),
        "forgetting": coresets.forgetting(correct, 7, 3),
    }
    for method, idx in want.items():
        np.testing.assert_array_equal(coreset_indices(method, 7, 3, feats, correct), idx)
    assert len({tuple(sorted(i.tolist())) for i in want.values()}) == 4  # four different sets
    with pytest.raises(ValueError, match="unknown coreset 'greedy'"):
        coreset_indices("greedy", 7, 3, feats, correct)


def test_mean_std_over_models_is_the_population_std_per_key():
    from tldr_jax.distill.expert_trajectories import RECALL_KEYS, mean_std

    runs = [{k: v + i for i, k in enumerate(RECALL_KEYS)} for v in (10.0, 20.0, 30.0)]
    stats = mean_std(runs)
    for i, k in enumerate(RECALL_KEYS):
        assert stats[k]["mean"] == pytest.approx(20.0 + i)
        assert stats[k]["std"] == pytest.approx(np.sqrt(200.0 / 3.0))
