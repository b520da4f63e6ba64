"""InfoNCE against a NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from tldr_jax.train.losses import info_nce


def np_info_nce(img, txt, scale, targets=None):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = scale * img @ txt.T
    t = np.eye(len(img)) if targets is None else targets

    def ce(lg, tg):
        lg = lg - lg.max(axis=1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        return -(tg * logp).sum(axis=1).mean()

    return 0.5 * (ce(logits, t) + ce(logits.T, t.T))


def test_info_nce_matches_numpy():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(8, 5)).astype(np.float32)
    txt = rng.normal(size=(8, 5)).astype(np.float32)
    got = float(info_nce(jnp.asarray(img), jnp.asarray(txt), 14.3))
    assert got == pytest.approx(np_info_nce(img, txt, 14.3), rel=1e-5)
    soft = rng.dirichlet(np.ones(8), size=8).astype(np.float32)
    got_soft = float(info_nce(jnp.asarray(img), jnp.asarray(txt), 2.66, jnp.asarray(soft)))
    assert got_soft == pytest.approx(np_info_nce(img, txt, 2.66, soft), rel=1e-5)


def test_info_nce_is_low_for_aligned_pairs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, 32)).astype(np.float32))
    assert float(info_nce(x, x, 100.0)) < 1e-3
