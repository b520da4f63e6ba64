"""Trajectory-matching math: exactness of remat, finite differences, TESLA, NaN guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tldr_jax.distill import matching
from tldr_jax.distill.student import flatten_params, make_student

M, SIZE, TXT_DIM, EMB = 6, 8, 5, 7


class TinyImageNet(nnx.Module):
    """Conv -> GELU -> global mean pool -> Linear; no batch statistics."""

    def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=2, param_dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(4, EMB, param_dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train=False):
        return self.out(jax.nn.gelu(self.conv(x)).mean(axis=(1, 2)))


class TinyHead(nnx.Module):
    """A small ProjectionHead look-alike with dropout (exercises the RNG plumbing)."""

    def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.inp = nnx.Linear(TXT_DIM, EMB, param_dtype=dtype, rngs=rngs)
        self.hidden = nnx.Linear(EMB, EMB, param_dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.norm = nnx.LayerNorm(EMB, param_dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train=False):
        h = self.inp(x)
        return self.norm(h + self.drop(self.hidden(jax.nn.gelu(h)), deterministic=not train))


_STUDENTS = {}


def _setup(dtype=jnp.float32, seed=0, syn_steps=5, batch_syn=4):
    # One student object per dtype so jitted functions (static on it) compile once per shape.
    if dtype not in _STUDENTS:
        rngs = nnx.Rngs(seed)
        _STUDENTS[dtype] = make_student(
            TinyImageNet(dtype=dtype, rngs=rngs), TinyHead(dtype=dtype, rngs=rngs)
        )
    student, t_img, t_txt = _STUDENTS[dtype]
    k = jax.random.split(jax.random.key(seed + 1), 6)
    syn = matching.SyntheticSet.create(
        jax.random.normal(k[0], (M, SIZE, SIZE, 3), dtype),
        jax.random.normal(k[1], (M, TXT_DIM), dtype),
        step_size=0.3,
    )
    syn = syn.replace(lr_img=syn.lr_img.astype(dtype), lr_txt=syn.lr_txt.astype(dtype))
    start = (t_img, t_txt)
    target = (
        t_img + 0.05 * jax.random.normal(k[2], t_img.shape, dtype),
        t_txt + 0.05 * jax.random.normal(k[3], t_txt.shape, dtype),
    )
    idx = matching.sample_minibatches(k[4], M, syn_steps, batch_syn)
    return student, syn, start, target, idx, k[5]


_grad_fn = jax.jit(
    matching.meta_loss_and_grad, static_argnums=(1,), static_argnames=("grad_mode", "inner")
)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


META_FIELDS = ("images", "texts", "lr_img", "lr_txt")


def _assert_same_meta_grad(got, ref, names=META_FIELDS, label=""):
    """Every field of `got` within 1e-5 relative of `ref`'s, which must not be all zero."""
    for name in names:
        a, b = getattr(got, name), getattr(ref, name)
        assert np.linalg.norm(np.asarray(b)) > 0, (label, name)
        assert _rel_err(a, b) < 1e-5, (label, name, _rel_err(a, b))


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_student_matches_module_and_flat_layout():
    rngs = nnx.Rngs(0)
    net, head = TinyImageNet(rngs=rngs), TinyHead(rngs=rngs)
    student, t_img, t_txt = make_student(net, head)
    np.testing.assert_array_equal(t_img, flatten_params(net))
    assert student.num_params == (t_img.size, t_txt.size)
    x = jax.random.normal(jax.random.key(1), (3, SIZE, SIZE, 3))
    e = jax.random.normal(jax.random.key(2), (3, TXT_DIM))
    img, txt = jax.jit(student.apply)(t_img, t_txt, x, e)
    np.testing.assert_allclose(img, net(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(txt, head(e), rtol=1e-5, atol=1e-6)
    # Dropout: deterministic for a key, different across keys, absent when off.
    drop = jax.jit(lambda k: student.apply(t_img, t_txt, x, e, rng=k, train_dropout=True)[1])
    np.testing.assert_array_equal(drop(jax.random.key(3)), drop(jax.random.key(3)))
    assert not np.allclose(drop(jax.random.key(3)), drop(jax.random.key(4)))
    # The states form (what the inner loop carries) applies alike and flattens back exactly.
    states = student.unflatten(t_img, t_txt)
    img2, txt2 = jax.jit(student.apply)(*states, x, e)
    np.testing.assert_array_equal(img2, img)
    np.testing.assert_array_equal(txt2, txt)
    back = student.flatten(*states)
    np.testing.assert_array_equal(back[0], t_img)
    np.testing.assert_array_equal(back[1], t_txt)


def test_sample_minibatches_cover_each_pair_once_per_pass():
    idx = np.asarray(matching.sample_minibatches(jax.random.key(0), 10, syn_steps=7, batch_syn=5))
    assert idx.shape == (7, 5)
    for p in range(3):  # two steps per permutation
        assert sorted(idx[2 * p : 2 * p + 2].ravel()) == list(range(10))
    full = matching.sample_minibatches(jax.random.key(0), 6, syn_steps=3, batch_syn=100)
    assert full.shape == (3, 6)


def test_contrastive_loss_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = 3.0 * an @ bn.T

    def ce(lg):
        return np.mean(np.log(np.exp(lg).sum(1)) - np.diag(lg))

    want = 0.5 * (ce(logits) + ce(logits.T))
    np.testing.assert_allclose(matching.contrastive_loss(a, b, 3.0), want, rtol=1e-5)


def test_distance_loss_is_one_without_motion_and_zero_on_target():
    student, syn, start, target, idx, rng = _setup()
    frozen = syn.replace(lr_img=jnp.zeros(()), lr_txt=jnp.zeros(()))
    loss = matching.meta_loss(frozen, student, start, target, idx, rng)
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)  # the mean of 1.0 per modality
    end = matching.student_unroll(student, syn, start, idx, rng)
    assert not np.allclose(end[0], start[0])
    np.testing.assert_allclose(matching.param_distance_loss(end, start, end), 0.0, atol=0)
    # Per modality: moving only the text head leaves the image term at exactly 1.
    half = matching.param_distance_loss((start[0], end[1]), start, (target[0], end[1]))
    np.testing.assert_allclose(half, 0.5, rtol=1e-6)


def _exact_meta(student, start, target, idx, rng):
    """(jitted syn -> (loss, meta-gradient) in unroll mode, syn -> loss) for finite differences."""
    value_and_grad = jax.jit(
        lambda s: matching.meta_loss_and_grad(
            s, student, start, target, idx, rng, grad_mode="unroll"
        )
    )
    return value_and_grad, lambda s: value_and_grad(s)[0]


def test_remat_nests_only_past_its_memory_budget():
    # Short runs never nest; longer ones nest once their per-step vectors pass the budget.
    assert matching._chunk_size(5) == 1 and matching._chunk_size(10) == 4
    assert matching._chunk_size(10, vector_mib=71.0, budget_mib=1024.0) == 1  # 710 MiB fits
    assert matching._chunk_size(15, vector_mib=71.0, budget_mib=1024.0) == 4  # 1065 does not
    assert matching._chunk_size(40, vector_mib=71.0, budget_mib=1024.0) == 7
    assert matching._chunk_size(40, vector_mib=0.5, budget_mib=1024.0) == 1  # a small student
    assert matching._chunk_size(8, vector_mib=71.0, budget_mib=0.0) == 1
    # From parameter shapes (NF-ResNet-26 + head: 71 MiB in float32), with the default budget.
    nf26 = [jax.ShapeDtypeStruct((71 * 2**18,), jnp.float32)]
    assert [matching.remat_chunk(n, nf26) for n in (5, 10, 14, 15, 40)] == [1, 1, 1, 4, 7]
    assert matching.remat_chunk(40, nf26, matching.InnerLoop(remat_budget_mib=4096.0)) == 1


@pytest.mark.parametrize("syn_steps", [5, matching.NEST_MIN_STEPS + 1])
def test_remat_gradient_equals_unroll(syn_steps):
    # 5: per-step checkpoints only; 10 with no memory budget: two nested chunks of 4 plus a
    # trailing scan of 2.
    student, syn, start, target, idx, rng = _setup(syn_steps=syn_steps)
    fn = _grad_fn
    nested = matching.InnerLoop(remat_budget_mib=0.0)
    loss_u, g_u = fn(syn, student, start, target, idx, rng, grad_mode="unroll")
    loss_r, g_r = fn(syn, student, start, target, idx, rng, grad_mode="remat", inner=nested)
    np.testing.assert_allclose(loss_r, loss_u, rtol=1e-6)
    _assert_same_meta_grad(g_r, g_u)


def test_remat_and_tesla_memory_does_not_grow_with_student_steps():
    # XLA's own buffer plan for the meta-gradient, 4 vs 16 student steps of 16 pairs at
    # 32 px (activations dominate this student's memory; its parameters are tiny): unroll
    # keeps every step's activations, remat only each step's parameters, TESLA one step's.
    student, _, start, target, _, rng = _setup()
    k = jax.random.split(jax.random.key(3), 3)
    pairs = 16
    syn = matching.SyntheticSet.create(
        jax.random.normal(k[0], (pairs, 32, 32, 3)),
        jax.random.normal(k[1], (pairs, TXT_DIM)),
        step_size=0.3,
    )

    def temp_bytes(mode, steps):
        idx = matching.sample_minibatches(k[2], pairs, steps, pairs)
        fn = jax.jit(
            lambda s, a, b, i, r: matching.meta_loss_and_grad(
                s, student, a, b, i, r, grad_mode=mode
            )
        )
        compiled = fn.lower(syn, start, target, idx, rng).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    growth = {m: temp_bytes(m, 16) / temp_bytes(m, 4) for m in ("unroll", "remat", "tesla")}
    print(f"\ntemp memory 16 vs 4 student steps: {growth}")
    assert growth["unroll"] > 2.5, growth  # linear in the steps (plus what every step shares)
    assert growth["remat"] < 1.1 and growth["tesla"] < 1.1, growth


def test_unrolled_scan_gives_the_same_meta_gradient():
    # distill.scan_unroll: the student's scan fully unrolled, the same function.
    student, syn, start, target, idx, rng = _setup(syn_steps=4)
    loss_r, g_r = _grad_fn(syn, student, start, target, idx, rng, grad_mode="unroll")
    inner = matching.InnerLoop(unroll=True)
    loss_u, g_u = _grad_fn(syn, student, start, target, idx, rng, grad_mode="unroll", inner=inner)
    np.testing.assert_allclose(loss_u, loss_r, rtol=1e-6)
    _assert_same_meta_grad(g_u, g_r)


def test_micro_batched_inner_gradient_is_exact():
    # GradCache-style slices of the image tower: the same step gradient and the same
    # meta-gradient (every path, incl. through dL/d embedding), with text dropout on.
    student, syn, start, target, idx, rng = _setup(syn_steps=3)
    inner = matching.InnerLoop(train_dropout=True)
    sliced = matching.InnerLoop(train_dropout=True, micro_batches=2)
    x, t = syn.images[idx[0]], syn.texts[idx[0]]
    g1 = matching.inner_grad(student, inner, start, x, t, rng)
    g2 = matching.inner_grad(student, sliced, start, x, t, rng)
    for a, b in zip(g2, g1, strict=True):
        assert np.linalg.norm(np.asarray(b)) > 0
        assert _rel_err(a, b) < 1e-5
    grad_fn = jax.jit(
        matching.meta_loss_and_grad, static_argnums=(1,), static_argnames=("grad_mode", "inner")
    )
    for mode in ("unroll", "remat"):
        loss1, m1 = grad_fn(syn, student, start, target, idx, rng, inner=inner, grad_mode=mode)
        loss2, m2 = grad_fn(syn, student, start, target, idx, rng, inner=sliced, grad_mode=mode)
        np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
        _assert_same_meta_grad(m2, m1, label=mode)
    with np.testing.assert_raises_regex(ValueError, "does not divide"):
        matching.inner_grad(student, matching.InnerLoop(micro_batches=3), start, x, t, rng)


def test_step_size_and_data_gradients_match_finite_differences():
    with jax.enable_x64(True):
        student, syn, start, target, idx, rng = _setup(dtype=jnp.float64, syn_steps=3)
        assert syn.images.dtype == jnp.float64 and start[0].dtype == jnp.float64
        value_and_grad, loss_fn = _exact_meta(student, start, target, idx, rng)
        _, grads = value_and_grad(syn)
        eps = 1e-5
        for name in ("lr_img", "lr_txt"):
            lr = getattr(syn, name)
            up = loss_fn(syn.replace(**{name: lr + eps}))
            down = loss_fn(syn.replace(**{name: lr - eps}))
            fd = (up - down) / (2 * eps)
            assert abs(float(fd)) > 1e-3, name
            np.testing.assert_allclose(getattr(grads, name), fd, rtol=1e-6)
        # A random direction in image and text space.
        k1, k2 = jax.random.split(jax.random.key(9))
        d_img = jax.random.normal(k1, syn.images.shape, jnp.float64)
        d_txt = jax.random.normal(k2, syn.texts.shape, jnp.float64)
        moved = lambda t: syn.replace(images=syn.images + t * d_img, texts=syn.texts + t * d_txt)  # noqa: E731
        fd = (loss_fn(moved(eps)) - loss_fn(moved(-eps))) / (2 * eps)
        want = jnp.vdot(grads.images, d_img) + jnp.vdot(grads.texts, d_txt)
        np.testing.assert_allclose(want, fd, rtol=1e-6)


def test_tesla_exact_for_one_step_and_reported_against_exact():
    fn = _grad_fn
    names = META_FIELDS

    # One student step has no cross-step terms: TESLA equals the exact gradient.
    student, syn, start, target, idx, rng = _setup(syn_steps=1)
    loss_t, g_t = fn(syn, student, start, target, idx, rng, grad_mode="tesla")
    loss_e, g_e = fn(syn, student, start, target, idx, rng, grad_mode="unroll")
    np.testing.assert_allclose(loss_t, loss_e, rtol=1e-6)
    for name in names:
        assert _rel_err(getattr(g_t, name), getattr(g_e, name)) < 1e-5, name

    # Several steps: the dropped cross-step terms make it an approximation. Report it.
    student, syn, start, target, idx, rng = _setup(syn_steps=5)
    loss_t, g_t = fn(syn, student, start, target, idx, rng, grad_mode="tesla")
    loss_e, g_e = fn(syn, student, start, target, idx, rng, grad_mode="remat")
    np.testing.assert_allclose(loss_t, loss_e, rtol=1e-6)
    print("\ntesla vs exact gradient, 5 student steps:")
    for name in names:
        a, b = getattr(g_t, name), getattr(g_e, name)
        assert np.all(np.isfinite(np.asarray(a))), name
        rel, cos = _rel_err(a, b), _cos(a, b)
        print(f"  {name:7s} relative error {rel:.3e}  cosine {cos:+.4f}")
        if np.ndim(a):  # the data gradients point the same way, but are not the same
            assert cos > 0.5, (name, cos)
            assert rel > 1e-3, (name, rel)  # cross-step terms dropped: not the exact gradient


def test_outer_step_updates_and_nan_guard_skips():
    student, syn, start, target, idx, rng = _setup(syn_steps=5)
    opt = matching.make_outer_optimizer(
        lr_images=10.0, lr_texts=10.0, lr_step_size=1e-2, step_size_param="raw"
    )
    state = opt.init(syn)
    step = jax.jit(matching.outer_step, static_argnums=(2, 3), static_argnames="grad_mode")

    new, new_state, loss, skipped = step(syn, state, opt, student, start, target, idx, rng)
    assert not bool(skipped) and np.isfinite(loss)
    _, grads = _grad_fn(syn, student, start, target, idx, rng, grad_mode="remat")
    # First SGD-momentum step: x - lr * g, with each field's own learning rate.
    step_taken = (syn.images - new.images) / 10.0
    np.testing.assert_allclose(step_taken, grads.images, atol=1e-4 * np.abs(grads.images).max())
    np.testing.assert_allclose(new.lr_img, syn.lr_img - 1e-2 * grads.lr_img, rtol=1e-6)
    # Steps at a sane learning rate on one expert segment bring the student to its target.
    slow = matching.make_outer_optimizer(
        lr_images=0.01, lr_texts=0.01, lr_step_size=1e-4, step_size_param="raw"
    )
    s, st, losses = syn, slow.init(syn), []
    for _ in range(16):
        s, st, loss, _ = step(s, st, slow, student, start, target, idx, rng)
        losses.append(float(loss))
    print("\nmeta-loss over 16 outer steps:", np.round(losses, 4))
    assert losses[-1] < 0.5 * losses[0] and np.all(np.diff(losses) < 0), losses

    # target == start: 0/0 distance -> non-finite loss -> update skipped, state untouched.
    bad, bad_state, loss, skipped = step(new, new_state, opt, student, start, start, idx, rng)
    assert bool(skipped) and not np.isfinite(loss)
    leaves = jax.tree.leaves((bad, bad_state)), jax.tree.leaves((new, new_state))
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sample_minibatches_reshuffle_every_pass():
    """Each pass over the synthetic set is a fresh permutation, not the first one repeated."""
    idx = np.asarray(matching.sample_minibatches(jax.random.key(0), 6, syn_steps=12, batch_syn=3))
    passes = {tuple(idx[2 * p : 2 * p + 2].ravel()) for p in range(6)}
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len(passes) > 1, passes


def test_outer_optimizer_per_field_rates_and_momentum():
    """SPEC B.3: SGD with momentum on every field, each with its own rate: two updates with
    the same gradient g are -lr g, then -lr (1 + momentum) g."""
    syn = matching.SyntheticSet.create(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 5)), 0.1)
    grads = matching.SyntheticSet(
        jnp.full((2, 4, 4, 3), 0.5), jnp.full((2, 5), -2.0), jnp.asarray(3.0), jnp.asarray(-1.0)
    )
    rates = {"images": 2.0, "texts": 7.0, "lr_img": 0.01, "lr_txt": 0.01}
    opt = matching.make_outer_optimizer(2.0, 7.0, 0.01, 0.5, step_size_param="raw")
    state = opt.init(syn)
    for factor in (1.0, 1.5):
        updates, state = opt.update(grads, state, syn)
        for name, lr in rates.items():
            want = -lr * factor * np.asarray(getattr(grads, name))
            np.testing.assert_allclose(getattr(updates, name), want, rtol=1e-6, err_msg=name)


def test_nan_guard_skips_a_non_finite_meta_gradient_of_a_finite_loss(monkeypatch):
    """A finite meta-loss whose gradient has a NaN (one synthetic text) is skipped too."""
    syn = matching.SyntheticSet.create(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 5)), 0.1)
    grads = syn.replace(texts=jnp.ones((2, 5)).at[1, 2].set(jnp.nan))
    monkeypatch.setattr(matching, "meta_loss_and_grad", lambda *a, **k: (jnp.asarray(0.7), grads))
    opt = matching.make_outer_optimizer(1.0, 1.0, 0.01, 0.5)
    state = opt.init(syn)
    new, new_state, loss, skipped = matching.outer_step(
        syn, state, opt, None, None, None, None, None
    )
    assert bool(skipped) and float(loss) == pytest.approx(0.7)
    leaves = jax.tree.leaves((new, new_state)), jax.tree.leaves((syn, state))
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def test_log_step_size_update_stays_positive():
    syn = matching.SyntheticSet.create(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 5)), 0.1)
    grads = matching.SyntheticSet(
        jnp.ones((2, 4, 4, 3)), jnp.ones((2, 5)), jnp.asarray(3.0), jnp.asarray(-2.0)
    )
    eta, mom = 0.5, 0.5
    for mode in ("log", "raw"):
        opt = matching.make_outer_optimizer(1.0, 1.0, eta, mom, step_size_param=mode)
        state = opt.init(syn)
        new = syn
        m_img = m_txt = 0.0
        lr_img, lr_txt = 0.1, 0.1
        for _ in range(3):  # the same gradient three times: momentum accumulates
            updates, state = opt.update(grads, state, new)
            new = optax.apply_updates(new, updates)
            if mode == "log":  # SGD-momentum on u = log(lr): du = lr * dL/dlr
                m_img, m_txt = mom * m_img + lr_img * 3.0, mom * m_txt + lr_txt * -2.0
                lr_img, lr_txt = lr_img * np.exp(-eta * m_img), lr_txt * np.exp(-eta * m_txt)
            else:
                m_img, m_txt = mom * m_img + 3.0, mom * m_txt - 2.0
                lr_img, lr_txt = lr_img - eta * m_img, lr_txt - eta * m_txt
            np.testing.assert_allclose(new.lr_img, lr_img, rtol=1e-5)
            np.testing.assert_allclose(new.lr_txt, lr_txt, rtol=1e-5)
        if mode == "log":
            assert 0 < float(new.lr_img) < 0.1  # a large positive gradient cannot cross zero
        else:
            assert float(new.lr_img) < 0  # the reference's raw step size can


def test_meta_gradient_clipping_per_field():
    syn = matching.SyntheticSet.create(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 5)), 0.1)
    grads = syn.replace(images=jnp.full(syn.images.shape, 2.0), texts=jnp.full((2, 5), 1e-3))
    opt = matching.make_outer_optimizer(1.0, 1.0, 0.0, 0.0, max_grad_norm=1.0)
    updates, _ = opt.update(grads, opt.init(syn), syn)
    np.testing.assert_allclose(jnp.linalg.norm(updates.images), 1.0, rtol=1e-5)
    np.testing.assert_allclose(updates.texts, -grads.texts, rtol=1e-6)  # under the norm: kept


# --------------------------------------------------------------------------- LoRS (issue #5)

LORS_FIELDS = ("sim_diag", "sim_left", "sim_right")


def _with_lors(syn, rank=3, alpha=0.5, random_right=True):
    """LoRS factors; `random_right` moves S off the identity (R = 0 gives L a zero gradient)."""
    syn = syn.with_lors(jax.random.key(11), rank, alpha)
    if random_right:
        k1, k2 = jax.random.split(jax.random.key(12))
        dtype = syn.texts.dtype
        syn = syn.replace(
            sim_diag=1.0 + 0.1 * jax.random.normal(k1, syn.sim_diag.shape, dtype),
            sim_right=jax.random.normal(k2, syn.sim_right.shape, dtype),
        )
    return syn


def _soft_infonce_numpy(a, b, scale, s):
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = scale * an @ bn.T

    def log_softmax(z):
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    i2t = np.mean(-np.sum(s * log_softmax(logits), axis=1))
    t2i = np.mean(-np.sum(s.T * log_softmax(logits.T), axis=1))
    return 0.5 * (i2t + t2i)


def test_soft_contrastive_loss_identity_equals_hard_and_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    hard = matching.contrastive_loss(a, b, 3.0)
    soft = matching.contrastive_loss(a, b, 3.0, jnp.eye(5))
    np.testing.assert_allclose(soft, hard, rtol=1e-6)
    # A non-symmetric soft target (rows need not sum to one) against the numpy formula.
    s = np.eye(5) + 0.3 * rng.normal(size=(5, 5))
    want = _soft_infonce_numpy(a.astype(np.float64), b.astype(np.float64), 3.0, s)
    np.testing.assert_allclose(matching.contrastive_loss(a, b, 3.0, s), want, rtol=1e-5)
    # A 2 x 2 value by hand: unit embeddings at 0 and 90 degrees, logits [[2, 0], [0, 2]].
    a2 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    s2 = np.array([[0.8, 0.2], [0.1, 0.9]])
    ls_hi, ls_lo = 2 - np.log(np.exp(2) + 1), -np.log(np.exp(2) + 1)
    # rows of log_softmax: [ls_hi, ls_lo] / [ls_lo, ls_hi], the same for logits.T
    i2t = -(0.8 * ls_hi + 0.2 * ls_lo + 0.1 * ls_lo + 0.9 * ls_hi) / 2
    t2i = -(0.8 * ls_hi + 0.1 * ls_lo + 0.2 * ls_lo + 0.9 * ls_hi) / 2
    np.testing.assert_allclose(
        matching.contrastive_loss(a2, a2, 2.0, s2), 0.5 * (i2t + t2i), rtol=1e-6
    )


def test_lors_similarity_starts_at_identity_and_indexes_submatrix():
    _, syn, *_ = _setup()
    assert matching.similarity(syn) is None and not syn.lors
    init = syn.with_lors(jax.random.key(0), rank=4, alpha=0.1)
    assert init.sim_left.shape == (M, 4) and init.sim_scale == pytest.approx(0.025)
    np.testing.assert_array_equal(init.sim_right, 0.0)
    assert np.linalg.norm(np.asarray(init.sim_left)) > 0
    np.testing.assert_array_equal(matching.similarity(init), np.eye(M))
    lors = _with_lors(syn, rank=3, alpha=0.5)
    a, left, right = (np.asarray(getattr(lors, f), np.float64) for f in LORS_FIELDS)
    dense = np.diag(a) + 0.5 / 3 * left @ right.T
    np.testing.assert_allclose(matching.similarity(lors), dense, rtol=1e-5, atol=1e-6)
    idx = np.array([4, 1, 3])
    np.testing.assert_allclose(
        matching.similarity(lors, jnp.asarray(idx)), dense[idx][:, idx], rtol=1e-5, atol=1e-6
    )
    # Identity targets through the whole meta-loss: the same as no LoRS.
    student, syn, start, target, idx, rng = _setup(syn_steps=2)
    with_id = syn.with_lors(jax.random.key(0))
    np.testing.assert_allclose(
        matching.meta_loss(with_id, student, start, target, idx, rng),
        matching.meta_loss(syn, student, start, target, idx, rng),
        rtol=1e-6,
    )


def test_lors_meta_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        student, syn, start, target, idx, rng = _setup(dtype=jnp.float64, syn_steps=3)
        syn = _with_lors(syn)
        assert syn.sim_left.dtype == jnp.float64
        value_and_grad, loss_fn = _exact_meta(student, start, target, idx, rng)
        _, grads = value_and_grad(syn)
        eps = 1e-5
        keys = jax.random.split(jax.random.key(13), 3)
        for name, key in zip(LORS_FIELDS, keys, strict=True):
            field = getattr(syn, name)
            d = jax.random.normal(key, field.shape, jnp.float64)
            up = loss_fn(syn.replace(**{name: field + eps * d}))
            down = loss_fn(syn.replace(**{name: field - eps * d}))
            fd = (up - down) / (2 * eps)
            assert abs(float(fd)) > 1e-6, name
            np.testing.assert_allclose(jnp.vdot(getattr(grads, name), d), fd, rtol=1e-6)


def test_lors_gradients_remat_tesla_and_micro_batches_agree():
    names = (*META_FIELDS, *LORS_FIELDS)
    grad_fn = jax.jit(
        matching.meta_loss_and_grad, static_argnums=(1,), static_argnames=("grad_mode", "inner")
    )
    # remat == unroll; micro-batched student steps (GradCache) give the same gradient too.
    student, syn, start, target, idx, rng = _setup(syn_steps=3)
    syn = _with_lors(syn)
    x, t = syn.images[idx[0]], syn.texts[idx[0]]
    targets = matching.similarity(syn, idx[0])
    sliced = matching.InnerLoop(micro_batches=2)
    g1 = matching.inner_grad(student, matching.InnerLoop(), start, x, t, rng, targets)
    g2 = matching.inner_grad(student, sliced, start, x, t, rng, targets)
    g0 = matching.inner_grad(student, matching.InnerLoop(), start, x, t, rng)
    for a, b, hard in zip(g2, g1, g0, strict=True):
        assert _rel_err(a, b) < 1e-5
        assert _rel_err(hard, b) > 1e-3  # the soft targets do change the step
    _, ref = grad_fn(syn, student, start, target, idx, rng, grad_mode="unroll")
    for mode, inner in (("remat", matching.InnerLoop()), ("unroll", sliced)):
        _, got = grad_fn(syn, student, start, target, idx, rng, inner=inner, grad_mode=mode)
        _assert_same_meta_grad(got, ref, names, label=mode)
    # TESLA: exact for one student step, LoRS factors included.
    student, syn, start, target, idx, rng = _setup(syn_steps=1)
    syn = _with_lors(syn)
    _, g_t = grad_fn(syn, student, start, target, idx, rng, grad_mode="tesla")
    _, g_e = grad_fn(syn, student, start, target, idx, rng, grad_mode="unroll")
    for name in names:
        assert np.linalg.norm(np.asarray(getattr(g_e, name))) > 0, name
        assert _rel_err(getattr(g_t, name), getattr(g_e, name)) < 1e-5, name


def test_lors_outer_step_updates_factors_with_own_lr():
    student, syn, start, target, idx, rng = _setup(syn_steps=3)
    syn = syn.with_lors(jax.random.key(0), rank=3, alpha=0.1)  # S = I: R = 0
    opt = matching.make_outer_optimizer(
        lr_images=10.0, lr_texts=10.0, lr_step_size=1e-2, step_size_param="raw", lr_lors=5.0
    )
    state = opt.init(syn)
    step = jax.jit(matching.outer_step, static_argnums=(2, 3), static_argnames="grad_mode")
    _, grads = _grad_fn(syn, student, start, target, idx, rng, grad_mode="unroll")
    new, new_state, loss, skipped = step(
        syn, state, opt, student, start, target, idx, rng, grad_mode="unroll"
    )
    assert not bool(skipped) and np.isfinite(loss)
    assert new.images.shape == syn.images.shape and new.texts.shape == syn.texts.shape
    # First SGD step: x - lr * g with the LoRS rate. With R = 0, dL/dL = scale * G R = 0 exactly.
    for name in ("sim_diag", "sim_right"):
        g = np.asarray(getattr(grads, name))
        assert np.abs(g).max() > 0, name
        moved = (np.asarray(getattr(syn, name)) - np.asarray(getattr(new, name))) / 5.0
        np.testing.assert_allclose(moved, g, atol=1e-4 * np.abs(g).max())
    np.testing.assert_array_equal(grads.sim_left, 0.0)
    np.testing.assert_array_equal(new.sim_left, syn.sim_left)
    assert np.abs(np.asarray(matching.similarity(new)) - np.eye(M)).max() > 0
    # Second step: R != 0 now, so L moves as well.
    newer, *_ = step(new, new_state, opt, student, start, target, idx, rng, grad_mode="unroll")
    assert not np.array_equal(np.asarray(newer.sim_left), np.asarray(new.sim_left))
    # The NaN guard covers the LoRS fields and their momentum too.
    bad, bad_state, loss, skipped = step(new, new_state, opt, student, start, start, idx, rng)
    assert bool(skipped)
    leaves = jax.tree.leaves((bad, bad_state)), jax.tree.leaves((new, new_state))
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    # An optimiser without a LoRS rate refuses a set with factors.
    with pytest.raises(ValueError, match="lr_lors"):
        matching.make_outer_optimizer().init(syn)


@pytest.mark.parametrize("encoder", ["convnet", "nf_resnet_tiny"])
def test_bf16_matmul_meta_gradient_close_to_float32(encoder):
    # model matmul_dtype="bfloat16" (models/conv.py): the student's convs multiply bfloat16
    # operands in every derivative order; the meta-gradient must still point the same way.
    # NF-ResNet: its input gradients multiply a computed (weight-standardised) kernel, which
    # XLA:CPU's dot runtime refused in bfloat16 until models/conv.py materialised the transpose.
    from tldr_jax.models.convnet import ConvNet
    from tldr_jax.models.nfresnet import nf_resnet_tiny

    _, syn, _, _, idx, rng = _setup(syn_steps=4)
    grads, losses = {}, {}
    for dtype in ("float32", "bfloat16"):
        rngs = nnx.Rngs(3)
        if encoder == "convnet":
            net = ConvNet(SIZE, width=EMB, depth=2, pooling="gap", matmul_dtype=dtype, rngs=rngs)
        else:  # skip gains at 0.5, not SkipInit's 0: every conv is on the gradient's path
            net = nf_resnet_tiny(skip_init=0.5, head_dim=EMB, matmul_dtype=dtype, rngs=rngs)
        student, t_img, t_txt = make_student(net, TinyHead(rngs=rngs))
        start = (t_img, t_txt)
        target = tuple(t + 0.05 * jax.random.normal(jax.random.key(9), t.shape) for t in start)
        losses[dtype], grads[dtype] = _grad_fn(
            syn, student, start, target, idx, rng, grad_mode="remat"
        )
    rtol = 1e-2 if encoder == "convnet" else 2e-2
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=rtol)
    for name in META_FIELDS:
        a, b = getattr(grads["bfloat16"], name), getattr(grads["float32"], name)
        assert np.linalg.norm(np.asarray(b)) > 0, name
        # Measured, ConvNet: cosine 0.985 and 17% relative error for images and texts, 1-3% for
        # the step sizes: a usable ascent direction, not the float32 gradient (opt-in speed
        # mode). NF-ResNet is worse conditioned (weight standardisation subtracts each kernel's
        # mean, so bfloat16 rounding of the large mean component of a kernel gradient survives
        # in the small remainder: its first-order gradient is already 22% off, cosine 0.984):
        # cosine 0.84 / 0.97 and 81% / 55% error for images / texts, 4-6% for the step sizes.
        cos_min, err_max, lr_max = (0.97, 0.3, 0.05) if encoder == "convnet" else (0.8, 0.9, 0.1)
        if name.startswith("lr"):
            assert _rel_err(a, b) < lr_max, (name, _rel_err(a, b))
        else:
            assert _cos(a, b) > cos_min and _rel_err(a, b) < err_max, (name, _cos(a, b))
        if name == "texts" and encoder != "convnet":
            assert _cos(a, b) > 0.95, _cos(a, b)


@pytest.mark.parametrize("grad_mode", ["remat", "tesla"])
def test_split_student_batch_runs_sliced_and_gives_the_same_meta_gradient(grad_mode):
    """InnerLoop.batch_sharding (distill.shard_student_batch): the compiled meta-gradient
    holds each device's slice of the student batch (4 of 8 fake devices for a batch of 4,
    one pair each) and all-reduces the parameter gradients; the values equal the unsplit
    ones up to summation order."""
    import re

    from tldr_jax.utils.mesh import make_mesh, replicated, split_batch_sharding

    student, syn, start, target, idx, rng = _setup(batch_syn=4)
    mesh = make_mesh()
    split = matching.InnerLoop(batch_sharding=split_batch_sharding(mesh, 4))
    assert split.batch_sharding.mesh.shape == {"batch": 4, "replica": 2}
    rep = replicated(mesh)

    def run(inner):
        f = jax.jit(
            lambda s, a, b, i, r: matching.meta_loss_and_grad(
                s, student, a, b, i, r, inner, grad_mode=grad_mode
            ),
            in_shardings=rep,
            out_shardings=rep,
        )
        args = jax.device_put((syn, start, target, idx, rng), rep)
        return f(*args), f.lower(*args).compile().as_text()

    (loss, grads), hlo = run(split)
    (ref_loss, ref), ref_hlo = run(matching.InnerLoop())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    _assert_same_meta_grad(grads, ref, label=grad_mode)
    sliced = rf"f32\[1,{SIZE},{SIZE},3\]"  # one synthetic image per device
    assert re.search(sliced, hlo) and re.search(r"all-reduce", hlo)
    assert not re.search(sliced, ref_hlo) and not re.search(r"all-reduce", ref_hlo)
