"""Image encoders and the projection head: shapes, parameter counts, numpy references,
signal propagation, and the "student is a pure function of its parameters" property."""

import functools
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tldr_jax.models import make_image_encoder
from tldr_jax.models.conv import avg_pool_cf, conv2d_same, from_cf, matmul, max_pool_cf, to_cf
from tldr_jax.models.convnet import ConvNet
from tldr_jax.models.heads import ProjectionHead
from tldr_jax.models.nfresnet import (
    NFResNet,
    column_mean,
    nf_resnet26,
    scaled_relu,
    standardize_kernel,
)
from tldr_jax.models.vit import vit_b16_224


def n_params(module: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# XLA's CPU backend at -O0 compiles the (random-number-heavy) initialisers ~4x faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def build(factory, *args, **kwargs):
    """factory(*args, **kwargs, rngs=Rngs(0)), initialised by one quickly compiled program."""
    make = lambda: factory(*args, **kwargs, rngs=nnx.Rngs(0))
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    init = jax.jit(lambda: nnx.state(make())).lower().compile(FAST_COMPILE)
    state = init()
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    return nnx.merge(graphdef, state)


def fast_jit(fn, *example_args):
    """jax.jit(fn) compiled at -O0 for the shapes of example_args (closed-over modules are
    read as constants)."""
    return jax.jit(fn).lower(*example_args).compile(FAST_COMPILE)


def images(b: int, size: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


# One model per config for the whole file: on CPU, initialisers and ops compile per shape.
CONFIGS = {
    "convnet": ("convnet", {"width": 8, "depth": 2}, 16, 8 * 4 * 4),
    "convnet_gap": ("convnet", {"width": 8, "depth": 2, "pooling": "gap", "norm": "none"}, 16, 8),
    "vit": ("vit", {"preset": "tiny", "patch_size": 8}, 32, 64),
    "nfresnet": ("nfresnet", {"preset": "tiny"}, 32, 32),
}


@pytest.fixture(scope="module")
def encoders():
    """name -> (module, pure apply(params, x), params); built once per file."""
    built = {}
    for key, (name, kwargs, size, _) in CONFIGS.items():
        model = build(make_image_encoder, name, kwargs, size)
        graphdef, params = nnx.split(model, nnx.Param)
        apply = lambda p, x, g=graphdef: nnx.merge(g, p)(x, train=True)
        built[key] = (model, apply, params)
    return built


@pytest.mark.parametrize("key", list(CONFIGS))
def test_encoder_is_pure_function_of_params(encoders, key):
    _, _, size, out_dim = CONFIGS[key]
    model, apply, params = encoders[key]
    assert model.out_dim == out_dim
    # No batch statistics, RNG state or caches: every variable is a trainable nnx.Param.
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model))

    x = images(4, size, seed=2)
    pure = fast_jit(apply, params, x)
    y = pure(params, x)
    assert y.shape == (4, out_dim) and y.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y)))
    # The split-and-merge pure function computes what the module computes.
    np.testing.assert_allclose(y, fast_jit(lambda x: model(x), x)(x), rtol=1e-5, atol=1e-5)
    # Each sample's feature depends on that sample only (no batch statistics).
    others = pure(params, x.at[1:].set(images(3, size, seed=3)))
    np.testing.assert_allclose(others[:1], y[:1], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(others[1:] - y[1:]).max()) > 1e-4
    # And it is a differentiable function of the parameters.
    grads = fast_jit(jax.grad(lambda p: jnp.sum(apply(p, x) ** 2)), params)(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_unknown_encoder_and_preset():
    with pytest.raises(ValueError, match="unknown image encoder"):
        make_image_encoder("resnet", {}, 32, nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown nfresnet preset"):
        make_image_encoder("nfresnet", {"preset": "nf_resnet50"}, 32, nnx.Rngs(0))
    with pytest.raises(ValueError, match="224"):
        make_image_encoder("vit", {"preset": "b16"}, 32, nnx.Rngs(0))


def test_switching_encoder_leaves_the_other_encoders_keys_out(caplog):
    """`--config.model.image=nfresnet` on a ConvNet config: ConvNet-only keys are left out
    (logged once), the encoder's own keys are kept, a key no encoder takes is an error."""
    from tldr_jax.config_check import ConfigError
    from tldr_jax.models import encoder_kwargs

    convnet_kw = {"depth": 2, "width": 8, "norm": "instancenorm", "pooling": "flatten"}
    kw = {**convnet_kw, "matmul_dtype": "float32", "preset": ""}
    assert encoder_kwargs("convnet", kw) == ({**convnet_kw, "matmul_dtype": "float32"}, [])
    used, dropped = encoder_kwargs("nfresnet", {**kw, "preset": "tiny"})
    assert used == {"matmul_dtype": "float32", "preset": "tiny"}
    assert dropped == ["depth", "norm", "pooling", "width"]
    with caplog.at_level("WARNING"):
        for _ in range(2):
            model = make_image_encoder("nfresnet", {**kw, "preset": "tiny"}, 16, nnx.Rngs(0))
    assert type(model).__name__ == "NFResNet"
    assert sum("does not take image_kwargs" in r.message for r in caplog.records) == 1
    # ViT takes depth and width itself: kept; norm and pooling left out.
    used, dropped = encoder_kwargs("vit", {**convnet_kw, "num_heads": 2, "patch_size": 4})
    assert used == {"depth": 2, "width": 8, "num_heads": 2, "patch_size": 4}
    assert dropped == ["norm", "pooling"]
    with pytest.raises(ValueError, match="widht: not an argument of convnet"):
        encoder_kwargs("convnet", {"widht": 8})
    # What the constructor refuses is a ConfigError (one line in the CLI), not a traceback.
    with pytest.raises(ConfigError, match="image encoder vit .* divisible"):
        make_image_encoder("vit", convnet_kw, 16, nnx.Rngs(0))


# ----------------------------------------------------------------------------- ConvNet


def _numpy_convnet_layer(x, kernel, bias, scale, shift, eps=1e-5):
    """conv3x3 SAME -> per-sample per-channel norm -> relu -> avgpool 2x2, by brute force."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            y += np.einsum("bhwc,cd->bhwd", xp[:, i : i + h, j : j + w], kernel[i, j])
    y += bias
    mean = y.mean(axis=(1, 2), keepdims=True)
    var = y.var(axis=(1, 2), keepdims=True)
    y = (y - mean) / np.sqrt(var + eps) * scale + shift
    y = np.maximum(y, 0)
    return y.reshape(b, h // 2, 2, w // 2, 2, -1).mean(axis=(2, 4))


def test_convnet_matches_numpy(encoders):
    model = nnx.clone(encoders["convnet"][0])
    # Non-trivial affine parameters so the norm's scale/shift are exercised.
    for k, gn in enumerate(model.norms):
        gn.scale[...] = jnp.linspace(0.5, 1.5, 8) + k
        gn.bias[...] = jnp.linspace(-0.2, 0.2, 8)
    x = np.asarray(images(2, 16, seed=4), np.float64)
    ref = x
    for conv, gn in zip(model.convs, model.norms, strict=True):
        ref = _numpy_convnet_layer(
            ref,
            np.asarray(conv.kernel[...], np.float64),
            np.asarray(conv.bias[...]),
            np.asarray(gn.scale[...]),
            np.asarray(gn.bias[...]),
        )
    x = jnp.asarray(x, jnp.float32)
    y = fast_jit(lambda x: model(x), x)(x)
    np.testing.assert_allclose(y, ref.reshape(2, -1), atol=1e-4)


def test_convnet_default_is_mtt_convnet_d3():
    model = nnx.eval_shape(lambda: ConvNet(32, rngs=nnx.Rngs(0)))
    assert (model.width, model.depth, model.norm, model.out_dim) == (128, 3, "instancenorm", 2048)
    # 3 convs (3->128, 128->128 x2) + 3 GroupNorm affine pairs.
    assert n_params(model) == (27 * 128 + 128) + 2 * (9 * 128 * 128 + 128) + 3 * 256
    with pytest.raises(ValueError):
        ConvNet(30, depth=3, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- ViT


def test_vit_tokens_and_cls(encoders):
    model, apply, params = encoders["vit"]
    x = images(2, 32)
    tokens = fast_jit(lambda x: model.tokens(x), x)(x)
    assert tokens.shape == (2, 1 + 16, 64) and model.num_patches == 16
    np.testing.assert_allclose(fast_jit(apply, params, x)(params, x), tokens[:, 0], atol=1e-5)
    # Final LayerNorm (scale 1, bias 0 at init): every token is standardised.
    np.testing.assert_allclose(tokens.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(tokens.var(-1), 1.0, atol=1e-3)


def test_vit_feature_depends_on_patch_positions(encoders):
    """Learned position embeddings: the same patches in another order give another CLS feature
    (self-attention alone is blind to the order of its tokens)."""
    _, apply, params = encoders["vit"]
    x = images(2, 32, seed=6)
    swapped = x.at[:, :8, :8].set(x[:, 24:, 24:]).at[:, 24:, 24:].set(x[:, :8, :8])
    pure = fast_jit(apply, params, x)
    assert float(jnp.abs(pure(params, swapped) - pure(params, x)).max()) > 1e-3


def test_vit_b16_224_shapes_without_running():
    model = nnx.eval_shape(lambda: vit_b16_224(rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    tokens = nnx.eval_shape(lambda m, x: m.tokens(x), model, x)
    assert tokens.shape == (2, 197, 768)
    assert model.out_dim == 768
    # timm vit_base_patch16_224 without its classifier has exactly this many parameters.
    assert n_params(model) == 85_798_656


# ----------------------------------------------------------------------------- NFResNet


def test_nf_resnet26_parameter_count_and_layout():
    model = nnx.eval_shape(lambda: nf_resnet26(rngs=nnx.Rngs(0)))
    count = n_params(model)
    assert count == 15_995_184 and abs(count / 16.0e6 - 1) < 0.01
    assert model.depths == (2, 2, 2, 2) and model.widths == (256, 512, 1024, 2048)
    assert model.out_dim == 1000
    trunk = nnx.eval_shape(lambda: nf_resnet26(head_dim=0, rngs=nnx.Rngs(0)))
    assert n_params(trunk) == 13_946_184 and trunk.out_dim == 2048
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    assert nnx.eval_shape(lambda m, x: m(x), model, x).shape == (2, 1000)
    feats = nnx.eval_shape(lambda m, x: m.features(x), trunk, x)
    assert feats.shape == (2, 7, 7, 2048)


def test_standardize_kernel_matches_numpy():
    kernel = np.asarray(jax.random.normal(jax.random.key(0), (3, 3, 5, 4))) * 3 + 1
    gain = np.array([1.0, 2.0, 0.5, 1.5], np.float32)
    w = np.asarray(standardize_kernel(jnp.asarray(kernel), jnp.asarray(gain)))
    flat = kernel.reshape(-1, 4)
    ref = (flat - flat.mean(0)) / (flat.std(0) * np.sqrt(45)) * gain
    np.testing.assert_allclose(w.reshape(-1, 4), ref, rtol=1e-4, atol=1e-6)
    # Hence Var(output) = gain^2 * Var(input) for a unit-variance input at each position.
    np.testing.assert_allclose((w.reshape(-1, 4) ** 2).sum(0), gain**2, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 3, 27, 131, 1143, 4608])
def test_column_mean_is_float64_accurate_in_float32(n):
    """Weight standardisation's per-channel means (also of the squared deviations) in two
    ~sqrt(n) summation chains, padded where n has no divisor near sqrt(n) (131, 1143): within
    a few float32 roundings of float64 on data with an offset, where one n-term chain (a
    (1, n) @ (n, c) product) is 2.2e-6 off at n = 4608 on XLA:CPU."""
    rng = np.random.default_rng(n)
    a = (1.0 + 0.1 * rng.standard_normal((n, 96))).astype(np.float32)
    got = np.asarray(column_mean(jnp.asarray(a)))
    exact = a.astype(np.float64).mean(axis=0, keepdims=True)
    assert got.shape == (1, 96)
    assert np.abs(got - exact).max() <= 5e-7 * np.abs(exact).max()
    # Its derivative is the mean's: 1/n for every entry.
    g = jax.grad(lambda x: column_mean(x).sum())(jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(g), np.full_like(a, 1.0 / n), rtol=1e-6)


def _block_variances(model: NFResNet, x: jax.Array) -> jax.Array:
    """Mean channel variance of the output of every residual block."""
    h = max_pool_cf(model.stem(to_cf(x)), 3, 2)  # channel-first (C, B, H, W) inside
    variances = []
    for block in model.blocks:
        h = block(h)
        variances.append(jnp.var(h, axis=(1, 2, 3)).mean())
    return jnp.stack(variances)


@pytest.mark.parametrize(
    "size,k,stride",
    [(5, 1, 1), (5, 1, 2), (2, 3, 1), (1, 3, 1), (4, 3, 2), (3, 3, 2), (6, 3, 1), (9, 7, 2)],
)
def test_conv2d_same_equals_xla_conv_with_gradients(size, k, stride):
    # The matmul / im2col paths must be the same function as the XLA conv, values and VJPs.
    kx, kw = jax.random.split(jax.random.key(size * 100 + k * 10 + stride))
    x = jax.random.normal(kx, (2, size, size + 1, 4))
    w = jax.random.normal(kw, (k, k, 4, 5))

    def ref(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    np.testing.assert_allclose(conv2d_same(x, w, stride), ref(x, w), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv2d_same(x, w, stride))), (0, 1))(x, w)
    theirs = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), (0, 1))(x, w)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """Operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            inner = getattr(inner, "jaxpr", inner)
            if hasattr(inner, "eqns"):
                out += _dot_operand_dtypes(inner)
    return out


def test_bf16_matmul_in_every_derivative_order():
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (3, 4, 6))
    b = jax.random.normal(kb, (6, 5))
    np.testing.assert_array_equal(matmul(a, b), a @ b)  # float32: the plain product
    with pytest.raises(ValueError, match="matmul_dtype"):
        matmul(a, b, "float16")

    def loss(a, b, dtype):
        return jnp.sum(jnp.tanh(matmul(a, b, dtype)) ** 2)

    def meta(a, b, dtype):  # the norm of a gradient, differentiated again: second order
        return jnp.sum(jax.grad(loss, 1)(a, b, dtype) ** 2)

    # Values and derivatives (up to the third order) stay within a few bfloat16 roundings
    # (2^-8 relative each) of float32 ...
    for f in (loss, meta):
        for argnum in (None, 0, 1):
            fn = f if argnum is None else jax.grad(f, argnum)
            lo, hi = fn(a, b, "bfloat16"), fn(a, b, "float32")
            err = np.linalg.norm(np.ravel(lo - hi)) / np.linalg.norm(np.ravel(hi))
            assert 0 < err < 5e-2, (f.__name__, argnum, err)
    # ... and every product of the second-order program runs on bfloat16 operands (JAX's own
    # transpose of a mixed-precision dot would multiply the float32 cotangent in float32).
    jaxpr = jax.make_jaxpr(jax.grad(meta, (0, 1)), static_argnums=2)(a, b, "bfloat16")
    dtypes = _dot_operand_dtypes(jaxpr.jaxpr)
    assert len(dtypes) >= 6 and set(dtypes) == {("bfloat16", "bfloat16")}, dtypes


def test_bf16_encoders_close_to_float32():
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    for factory, kwargs in (
        (NFResNet, dict(depths=(1, 1), widths=(16, 32), stem_width=8, head_dim=6)),
        (ConvNet, dict(image_size=16, width=8, depth=2)),
    ):
        f32 = build(factory, **kwargs)
        bf16 = build(factory, **kwargs, matmul_dtype="bfloat16")
        nnx.update(bf16, nnx.state(f32))  # the same parameters
        want, got = f32(x), bf16(x)
        assert got.dtype == jnp.float32
        err = np.linalg.norm(np.ravel(got - want)) / np.linalg.norm(np.ravel(want))
        assert 0 < err < 2e-2, (factory.__name__, err)


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_max_pool_cf_equals_nnx_max_pool(size):
    x = jax.random.normal(jax.random.key(size), (2, size, size + 1, 3))
    ref = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    np.testing.assert_array_equal(from_cf(max_pool_cf(to_cf(x), 3, 2)), ref)


def test_avg_pool_cf_equals_nnx_avg_pool():
    x = jax.random.normal(jax.random.key(0), (2, 8, 4, 3))
    ref = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_allclose(from_cf(avg_pool_cf(to_cf(x), 2)), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        avg_pool_cf(to_cf(x[:, :7]), 2)


def test_nfresnet_signal_propagation():
    """Block-output variance follows the analytic beta^2 = 1 + k alpha^2 (k blocks into a
    stage) with live residual branches; with SkipInit's zero gains blocks are identities and a
    transition rescales by 1 / beta^2 of its input."""
    alpha = 0.3
    model = build(
        NFResNet, depths=(2, 2, 2), widths=(16, 32, 64), stem_width=8, alpha=alpha, skip_init=1.0
    )
    betas = np.array([b.beta for b in model.blocks])
    k = np.tile([1, 2], 3)
    # Beta of a block = sqrt of the expected variance of its input.
    expected_var = 1.0 + k * alpha**2
    np.testing.assert_allclose(betas[1:], np.sqrt(expected_var[:-1]), rtol=1e-6)
    # Smooth, unit-variance "images" (natural images are spatially correlated).
    x = jax.image.resize(images(8, 8), (8, 64, 64, 3), "cubic")
    x = x / jnp.std(x)
    variances = fast_jit(lambda x: _block_variances(model, x), x)(x)
    np.testing.assert_allclose(variances, expected_var, rtol=0.25)

    for block in model.blocks:
        block.skip_gain[...] = 0.0
    h = to_cf(images(2, 8, seed=1)[..., :1].repeat(16, -1))
    np.testing.assert_allclose(fast_jit(lambda h: model.blocks[1](h), h)(h), h, rtol=1e-6)
    variances = np.asarray(fast_jit(lambda x: _block_variances(model, x), x)(x))
    np.testing.assert_allclose(variances[1::2], variances[::2], rtol=1e-5)  # identity blocks
    ratios = variances[[2, 4]] / variances[[0, 2]]
    np.testing.assert_allclose(ratios, 1 / betas[[2, 4]] ** 2, rtol=0.1)


def _nfresnet_nhwc_reference(model: NFResNet, x: jax.Array) -> jax.Array:
    """The NF-ResNet forward written plainly: channel-last maps, XLA's own convolution and
    max pool, the HWIO standardised kernels."""

    def conv(m, h):
        w = standardize_kernel(m.kernel[...], m.gain[...])
        s = (m.stride, m.stride)
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(h, w, s, "SAME", dimension_numbers=dims) + m.bias[...]

    act = scaled_relu
    h = nnx.max_pool(conv(model.stem, x), (3, 3), strides=(2, 2), padding="SAME")
    for blk in model.blocks:
        out = act(h / blk.beta)
        shortcut = conv(blk.shortcut, out) if blk.shortcut is not None else h
        out = conv(blk.conv3, act(conv(blk.conv2, act(conv(blk.conv1, out)))))
        h = shortcut + out * (blk.alpha * blk.skip_gain[...])
    h = jnp.mean(act(h), axis=(1, 2))
    return h @ model.head.kernel[...] + model.head.bias[...]


def test_nfresnet_channel_first_equals_channel_last_reference():
    # Channel-first im2col inside; the same function (values, gradients w.r.t. parameters
    # and images) as the plain channel-last network on XLA's convolutions.
    model = build(NFResNet, depths=(1, 1), widths=(16, 32), stem_width=8, head_dim=6, skip_init=0.5)
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(3), (3, 13, 16, 3))

    def loss(fn, p, x):
        return jnp.sum(jnp.sin(fn(nnx.merge(graphdef, p), x)))

    ours = lambda m, x: m(x)
    np.testing.assert_allclose(
        ours(model, x), _nfresnet_nhwc_reference(model, x), rtol=1e-5, atol=1e-5
    )
    assert model.features(x).shape == (3, 2, 2, 32)
    g_ours = jax.grad(lambda p, x: loss(ours, p, x), (0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: loss(_nfresnet_nhwc_reference, p, x), (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- ProjectionHead


def _numpy_head(head: ProjectionHead, x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    p = x @ np.asarray(head.projection.kernel[...]) + np.asarray(head.projection.bias[...])
    g = 0.5 * p * (1 + erf(p / np.sqrt(2)))
    h = g @ np.asarray(head.fc.kernel[...]) + np.asarray(head.fc.bias[...]) + p
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    return h * np.asarray(head.norm.scale[...]) + np.asarray(head.norm.bias[...])


@functools.partial(nnx.jit, static_argnames="train")
def run_head(head: ProjectionHead, x: jax.Array, train: bool = False, key=None) -> jax.Array:
    return head(x, train=train, rngs=key)


def test_projection_head_matches_numpy_in_eval():
    head = build(ProjectionHead, 6, 32, dropout=0.5)
    x = np.asarray(images(1, 4)).reshape(8, 6)
    y = run_head(head, jnp.asarray(x))
    np.testing.assert_allclose(y, _numpy_head(head, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run_head(head, jnp.asarray(x)), y)  # eval is deterministic


def test_projection_head_residual_and_layernorm():
    head = build(ProjectionHead, 6, 32, dropout=0.5)
    x = images(1, 4, seed=3).reshape(8, 6)
    head.fc.kernel[...] = jnp.zeros_like(head.fc.kernel[...])
    projected = x @ head.projection.kernel[...] + head.projection.bias[...]
    mean, var = projected.mean(-1, keepdims=True), projected.var(-1, keepdims=True)
    # With the inner layer zeroed, the head is exactly LayerNorm(projection(x)).
    expected = (projected - mean) / jnp.sqrt(var + 1e-5)
    np.testing.assert_allclose(run_head(head, x), expected, atol=1e-5)


def test_projection_head_dropout_only_in_train():
    head = build(ProjectionHead, 6, 32, dropout=0.5)
    x = images(1, 4, seed=5).reshape(8, 6)
    eval_out = run_head(head, x)
    a = run_head(head, x, True, jax.random.key(1))
    b = run_head(head, x, True, jax.random.key(1))
    c = run_head(head, x, True, jax.random.key(2))
    np.testing.assert_allclose(a, b)  # a key fixes the mask: usable as a pure function
    assert float(jnp.abs(a - c).max()) > 1e-3 and float(jnp.abs(a - eval_out).max()) > 1e-3
    # Without a key, the module's own dropout stream advances between calls.
    assert float(jnp.abs(run_head(head, x, True) - run_head(head, x, True)).max()) > 1e-3
    no_drop = build(ProjectionHead, 6, 32, dropout=0.0)
    np.testing.assert_allclose(run_head(no_drop, x, True), run_head(no_drop, x), rtol=1e-6)


def test_a_preset_only_key_is_left_out_under_another_preset():
    """nf_resnet26's `width_multiplier` (no class takes it) is another encoder's key, not
    an unknown one: left out under the tiny preset, kept under its own."""
    from tldr_jax.models import encoder_kwargs

    kw = {"width_multiplier": 0.5, "skip_init": 0.0}
    assert encoder_kwargs("nfresnet", {**kw, "preset": "tiny"}) == (
        {"skip_init": 0.0, "preset": "tiny"},
        ["width_multiplier"],
    )
    assert encoder_kwargs("nfresnet", {**kw, "preset": "nf_resnet26"}) == (
        {**kw, "preset": "nf_resnet26"},
        [],
    )
    assert encoder_kwargs("vit", {"width_multiplier": 0.5}) == ({}, ["width_multiplier"])


def x64_dtype_problems() -> list[str]:
    """Run with jax_enable_x64 on (`test_models_and_steps_stay_32_bit_under_jax_enable_x64`):
    builds every model abstractly and traces one step of each (nothing is compiled). Returns
    each state leaf or output of a 64-bit dtype and the first equation making a 64-bit float in
    each program."""
    import optax
    from jax.extend import core as jcore

    from configs import distill as distill_config
    from configs import pretrain as pretrain_config
    from configs import tldr as tldr_config
    from tldr_jax.caption.generate import generate_captions
    from tldr_jax.compress import caption_stage, captioner_stage
    from tldr_jax.distill import expert_trajectories, matching
    from tldr_jax.models.bert import BertEncoder, pool
    from tldr_jax.models.vq import LOSS_FORMS
    from tldr_jax.train import pretrain, state

    try:  # where an equation comes from (private: only for the message)
        from jax._src.source_info_util import summarize
    except ImportError:
        summarize = lambda info: "?"

    assert jax.config.jax_enable_x64
    wide = {np.dtype(t) for t in ("float64", "int64", "uint64", "complex128")}
    bad: list[str] = []

    def check(what, tree):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            dtype = getattr(x, "dtype", None)
            if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
                continue
            if np.dtype(dtype) in wide:
                bad.append(f"{what}{jax.tree_util.keystr(path)}: {x.dtype}")

    def walk(what, jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                dtype = v.aval.dtype
                if jax.dtypes.issubdtype(dtype, jnp.floating) and dtype.itemsize == 8:
                    where = summarize(eqn.source_info)
                    bad.append(f"{what}: {eqn.primitive} -> {v.aval.str_short()} at {where}")
                    return
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                        walk(what, getattr(sub, "jaxpr", sub))

    def check_program(what, fn, *args):
        closed, out = jax.make_jaxpr(fn, return_shape=True)(*args)
        walk(what, closed.jaxpr)
        check(f"{what} output", out)
        return out

    def f32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    def i32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    def train_step(what, model, loss_fn, tc, batch, make=state.make_train_step):
        model_def, params, rest = state.split_model(model)
        tx = state.make_optimizer(tc, 10)
        st = jax.eval_shape(lambda p, r: state.init_state(p, r, tx), params, rest)
        check(f"{what} train state", st)
        check_program(f"{what} train step", make(model_def, tx, loss_fn, 0), st, batch)

    for name, kwargs, size in [
        ("convnet", {"width": 8, "depth": 2}, 16),
        ("vit", {"preset": "tiny"}, 32),
        ("nfresnet", {"preset": "tiny"}, 32),
    ]:
        make = lambda n=name, kw=kwargs, size=size: make_image_encoder(n, kw, size, nnx.Rngs(0))
        gd, s = nnx.split(nnx.eval_shape(make))
        check(f"{name} state", s)
        forward = lambda s, x, gd=gd: nnx.merge(gd, s)(x)
        check_program(f"{name} forward", forward, s, f32(2, size, size, 3))

    def bert():
        return BertEncoder(
            vocab_size=50,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            rngs=nnx.Rngs(0),
        )

    gd, s = nnx.split(nnx.eval_shape(bert))
    check("bert state", s)
    encode = lambda s, ids, mask: pool(nnx.merge(gd, s)(ids, mask), mask)
    check_program("bert forward", encode, s, i32(2, 8), i32(2, 8))

    config = pretrain_config.get_config("tiny")
    size = int(config.data.image_size)
    model = nnx.eval_shape(lambda: pretrain.build_model(config, 16, 0))
    batch = {"image": f32(4, size, size, 3), "text_emb": f32(4, 16)}
    train_step("dual encoder", model, pretrain.contrastive_loss, config.train, batch)

    config = tldr_config.get_config("tiny")
    size = int(config.data.image_size)
    seq = int(config.captioner.max_len) + 2
    batch = {
        "image": f32(2, size, size, 3),
        "input_ids": i32(2, seq),
        "attention_mask": i32(2, seq),
    }
    for form in LOSS_FORMS:
        config.captioner.vq_loss = form
        model = nnx.eval_shape(lambda: captioner_stage.build_codebook_captioner(config, 40, 1))
        loss_fn, tc = captioner_stage.codebook_loss, config.captioner.train
        train_step(f"captioner ({form})", model, loss_fn, tc, batch, captioner_stage.make_step)

    model = nnx.eval_shape(lambda: caption_stage.build_captioner(config, 40, 1, seq))

    def caption_loss(m, b, train):
        return m.loss(b["image"], b["input_ids"], b["attention_mask"], prompt_len=2, train=train)

    train_step("plain captioner", model, caption_loss, config.caption.train, batch)
    gd, s = nnx.split(model)
    for method in ("greedy", "beam", "nucleus"):

        def decode(s, x, method=method):
            model = nnx.merge(gd, s)
            kw = dict(method=method, max_len=4, beam_size=2, bos_id=1, eos_id=2, pad_id=0)
            return generate_captions(model, x, [5, 6], rng=jax.random.key(0), **kw)

        out = check_program(f"{method} decoding", decode, s, batch["image"])
        assert out.dtype == jnp.int32, out.dtype

    config = distill_config.get_config("tiny")
    size = int(config.data.image_size)
    student = expert_trajectories.build_student(config, 16)
    theta = jax.eval_shape(lambda: expert_trajectories.init_params(config, 16, 0))
    check("student parameters", theta)
    tx = optax.sgd(0.1, momentum=0.5)

    def student_step(theta, images, texts):  # an expert's / evaluation model's step
        def loss(theta):
            key = jax.random.key(0)
            img, txt = student.apply(*theta, images, texts, rng=key, train_dropout=True)
            return matching.contrastive_loss(img, txt, expert_trajectories.LOGIT_SCALE)

        value, grads = jax.value_and_grad(loss)(theta)
        updates, _ = tx.update(grads[0], tx.init(theta[0]), theta[0])
        return value, theta[0] + updates

    check_program("student step", student_step, theta, f32(4, size, size, 3), f32(4, 16))

    syn = jax.eval_shape(matching.SyntheticSet.create, f32(4, size, size, 3), f32(4, 16))
    outer_tx = matching.make_outer_optimizer(1000.0, 30.0, 0.1, 0.5)
    opt_state = jax.eval_shape(outer_tx.init, syn)
    inner = matching.InnerLoop(train_dropout=True)
    for mode in matching.GRAD_MODES:

        def outer(syn, opt_state, start, target, idx, mode=mode):
            key = jax.random.key(0)
            args = (syn, opt_state, outer_tx, student, start, target, idx, key, inner)
            return matching.outer_step(*args, grad_mode=mode)

        check_program(f"distill ({mode})", outer, syn, opt_state, theta, theta, i32(2, 2))
    return bad


def test_models_and_steps_stay_32_bit_under_jax_enable_x64():
    """With jax_enable_x64 on (many notebooks set it), every model the library builds (the
    three image encoders, BERT, the dual encoder, the codebook captioner of each VQ loss form,
    the plain captioner, the distillation student) has float32 / int32 state (parameters,
    optimiser state), and no equation of a jitted training step, decoding (greedy, beam,
    nucleus), expert step or distill outer step (each grad_mode) makes a 64-bit float:
    memory, speed and results are those of an x32 run. It caught a float64 ViT pos_embed,
    float64 dropout masks and one-hot targets, BERT's numpy-scalar attention scale, and optax's
    float64 schedule and Adam bias correction. A subprocess: x64 is process-wide."""
    env = {"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PATH": "/usr/bin:/bin"}
    code = (
        "import sys; from tests.test_models import x64_dtype_problems as f; "
        "p = f(); print(*p, sep='\\n'); sys.exit(1 if p else 0)"
    )
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
