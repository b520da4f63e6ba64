"""Vector quantizer: distances, straight-through gradient, loss forms, EMA, revival, metrics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tldr_jax.models import vq


def _np_nearest(z, codebook):
    return np.argmin(((z[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)


def test_nearest_codes_matches_brute_force_and_chunking():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(37, 6)).astype(np.float32)
    codebook = rng.normal(size=(11, 6)).astype(np.float32)
    want = _np_nearest(z, codebook)
    d = vq.squared_distances(jnp.asarray(z), jnp.asarray(codebook))
    np.testing.assert_allclose(d, ((z[:, None] - codebook[None]) ** 2).sum(-1), atol=1e-4)
    np.testing.assert_array_equal(vq.nearest_codes(jnp.asarray(z), jnp.asarray(codebook)), want)
    chunked = vq.nearest_codes(jnp.asarray(z), jnp.asarray(codebook), chunk_size=8)
    np.testing.assert_array_equal(chunked, want)
    shaped = vq.nearest_codes(jnp.asarray(z[:36]).reshape(4, 9, 6), jnp.asarray(codebook))
    np.testing.assert_array_equal(shaped, want[:36].reshape(4, 9))


def test_straight_through_gradient_is_the_gradient_at_z_q():
    z = jnp.array([[0.3, -1.0], [2.0, 0.5]])
    z_q = jnp.array([[0.0, -1.0], [2.5, 0.0]])
    f = lambda x: jnp.sum(jnp.sin(x) * x**2)
    g_st = jax.grad(lambda z: f(vq.straight_through(z, z_q)))(z)
    np.testing.assert_allclose(vq.straight_through(z, z_q), z_q)
    np.testing.assert_allclose(g_st, jax.grad(f)(z_q), rtol=1e-6)


# Tiny example: N=2 tokens, D=1; z = [1, 3], z_q = [0, 5] -> squared errors 1 and 4, mean 2.5.
_Z = jnp.array([[1.0], [3.0]])
_ZQ = jnp.array([[0.0], [5.0]])


@pytest.mark.parametrize(
    "form, value, enc_scale, code_scale",
    [
        # legacy: commitment (weight 1) + beta * codebook.
        ("legacy", 2.5 + 0.25 * 2.5, 1.0, 0.25),
        # standard: codebook (weight 1) + beta * commitment.
        ("standard", 2.5 + 0.25 * 2.5, 0.25, 1.0),
        # ema: beta * commitment only; the codebook gets no gradient.
        ("ema", 0.25 * 2.5, 0.25, 0.0),
    ],
)
def test_vq_loss_values_and_which_term_feeds_which_side(form, value, enc_scale, code_scale):
    loss = vq.vq_loss(_Z, _ZQ, beta=0.25, form=form)
    np.testing.assert_allclose(loss, value, rtol=1e-6)
    g_z, g_zq = jax.grad(lambda z, zq: vq.vq_loss(z, zq, 0.25, form), argnums=(0, 1))(_Z, _ZQ)
    # d/dz mean((z - z_q)^2) = 2 (z - z_q) / N = [1, -2]; d/dz_q is its negative.
    np.testing.assert_allclose(g_z, enc_scale * np.array([[1.0], [-2.0]]), rtol=1e-6)
    np.testing.assert_allclose(g_zq, code_scale * np.array([[-1.0], [2.0]]), rtol=1e-6)


def test_vq_loss_rejects_unknown_form():
    with pytest.raises(ValueError, match="unknown VQ loss form"):
        vq.vq_loss(_Z, _ZQ, 0.25, "mse")


def test_code_usage_on_known_distributions():
    ppl, usage = vq.code_usage(jnp.array([0, 1, 2, 3]), 8)
    np.testing.assert_allclose([ppl, usage], [4.0, 0.5], rtol=1e-6)
    ppl, usage = vq.code_usage(jnp.array([[5, 5], [5, 5]]), 8)
    np.testing.assert_allclose([ppl, usage], [1.0, 1 / 8], rtol=1e-6)
    ppl, _ = vq.code_usage(jnp.array([0, 0, 0, 1]), 4)
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(ppl, np.exp(-(p * np.log(p)).sum()), rtol=1e-6)


def _np_ema(count, total, z, idx, decay, eps):
    k = count.shape[0]
    n = np.bincount(idx, minlength=k).astype(np.float64)
    s = np.zeros_like(total, dtype=np.float64)
    for i, j in enumerate(idx):
        s[j] += z[i]
    count = decay * count + (1 - decay) * n
    total = decay * total + (1 - decay) * s
    smoothed = (count + eps) / (count.sum() + k * eps) * count.sum()
    return total / smoothed[:, None], count, total


def test_ema_update_matches_numpy():
    rng = np.random.default_rng(1)
    count = rng.uniform(0.5, 2.0, size=5)
    total = rng.normal(size=(5, 3))
    z = rng.normal(size=(12, 3))
    idx = np.array([0, 0, 1, 3, 3, 3, 1, 0, 0, 3, 1, 1])  # code 2 and 4 unused
    want = _np_ema(count, total, z, idx, decay=0.9, eps=1e-3)
    got = vq.ema_update(
        jnp.asarray(count, jnp.float32),
        jnp.asarray(total, jnp.float32),
        jnp.asarray(z, jnp.float32),
        jnp.asarray(idx),
        decay=0.9,
        epsilon=1e-3,
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_revive_dead_codes_moves_only_dead_codes_onto_batch_outputs():
    codebook = jnp.arange(12.0).reshape(4, 3)
    count = jnp.array([5.0, 1e-4, 2.0, 0.0])
    total = codebook * count[:, None]
    z = jax.random.normal(jax.random.key(0), (2, 10, 3)) + 100.0
    new_code, new_count, new_sum, n = vq.revive_dead_codes(
        codebook, count, total, z, jax.random.key(1), threshold=1e-2
    )
    assert int(n) == 2
    np.testing.assert_array_equal(new_code[jnp.array([0, 2])], codebook[jnp.array([0, 2])])
    np.testing.assert_array_equal(new_count, [5.0, 1.0, 2.0, 1.0])
    flat = np.asarray(z).reshape(-1, 3)
    for k in (1, 3):  # each revived code is one of the batch's encoder outputs
        assert np.min(np.abs(flat - np.asarray(new_code[k])).sum(-1)) == 0.0
        np.testing.assert_array_equal(new_sum[k], new_code[k])
    assert not np.array_equal(new_code[1], new_code[3])  # distinct rows drawn


def test_quantizer_module_forms_and_state():
    z = jax.random.normal(jax.random.key(2), (3, 5, 4))
    legacy = vq.VectorQuantizer(16, 4, loss_form="legacy", rngs=nnx.Rngs(0))
    cb = np.asarray(legacy.codebook[...])
    assert np.abs(cb).max() <= 1 / 16 and isinstance(legacy.codebook, nnx.Param)
    z_st, idx, aux = legacy(z, train=True)
    chex.assert_shape(idx, (3, 5))
    np.testing.assert_array_equal(idx, _np_nearest(np.asarray(z).reshape(-1, 4), cb).reshape(3, 5))
    np.testing.assert_allclose(z_st, cb[np.asarray(idx)], atol=1e-6)
    assert set(aux) == {"loss", "perplexity", "usage"}
    np.testing.assert_array_equal(legacy.codebook[...], cb)  # learned by gradients, not in call

    ema = vq.VectorQuantizer(16, 4, loss_form="ema", ema_decay=0.5, rngs=nnx.Rngs(0))
    assert isinstance(ema.codebook, vq.EmaState)
    assert not jax.tree.leaves(nnx.state(ema, nnx.Param))  # nothing for the optimiser
    before = np.asarray(ema.codebook[...])
    _, idx, aux = ema(z, train=False)
    np.testing.assert_array_equal(ema.codebook[...], before)  # eval: no update
    _, _, aux_train = ema(z, train=True)
    np.testing.assert_allclose(aux_train["loss"], aux["loss"], rtol=1e-6)
    want, _, _ = _np_ema(
        np.ones(16), before.astype(np.float64), np.asarray(z).reshape(-1, 4),
        np.asarray(idx).reshape(-1), decay=0.5, eps=1e-5,
    )  # fmt: skip
    used = np.unique(np.asarray(idx))
    # Used codes follow the EMA rule; none of them is dead (count >= 0.5 >= threshold).
    np.testing.assert_allclose(np.asarray(ema.codebook[...])[used], want[used], rtol=1e-4)


@pytest.mark.parametrize("form", ["legacy", "standard"])
def test_quantizer_loss_is_vq_loss_on_the_raw_codes_with_its_beta(form):
    """The module's loss is `vq_loss` of its own beta on the gathered codes (not on the
    straight-through output, through which the codebook would get no gradient): same value,
    same gradients to the encoder output and to the codebook."""
    z = jax.random.normal(jax.random.key(4), (2, 3, 4))
    quantizer = vq.VectorQuantizer(8, 4, beta=0.7, loss_form=form, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(quantizer)
    codebook = quantizer.codebook[...]
    idx = vq.nearest_codes(z, codebook)

    def module_loss(state, z):
        return nnx.merge(graphdef, state)(z, train=True)[2]["loss"]

    def reference(codebook, z):
        return vq.vq_loss(z, jnp.take(codebook, idx, axis=0), 0.7, form)

    got, (g_state, g_z) = jax.value_and_grad(module_loss, (0, 1))(state, z)
    want, (w_codebook, w_z) = jax.value_and_grad(reference, (0, 1))(codebook, z)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(g_z, w_z, rtol=1e-5, atol=1e-7)
    (g_codebook,) = jax.tree.leaves(g_state)
    assert float(jnp.abs(w_codebook).sum()) > 0
    np.testing.assert_allclose(g_codebook, w_codebook, rtol=1e-5, atol=1e-7)
