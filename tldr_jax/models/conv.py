"""Convolution and pooling written as matmuls, for networks that are differentiated twice.

Trajectory matching differentiates through student SGD steps, so every convolution is
differentiated twice, usually inside `lax.scan`. XLA:CPU handles those second-order convs
badly: the weight-gradient conv inside a while loop runs ~35x slower than unrolled (33 s vs
0.97 s for a 5-step meta-gradient of one 3x3 64-channel conv at batch 100), and a 3x3 kernel
on a map smaller than the kernel (the 2x2 maps of NF-ResNet's last stage at 64 px) takes a
degenerate path (0.9 s forward for one 512-channel conv, 85x the matmul form). The same
function written as im2col + one matmul lowers to dots, slices and pads only: measured on
2 CPU cores, its 3-step meta-gradient in a scan is 2.4-8.6x faster than XLA's conv unrolled
(and it has no loop penalty), while first-order forward+backward stays within 0.7-2x.
The cost is memory: the k*k-times larger patch matrix of each conv input is materialised.

Maps are channel-first, (C, B, H, W), inside the networks (`conv2d_cf`, `max_pool_cf`,
`avg_pool_cf`); images enter and features leave channel-last. With channel-last maps the
weight gradient of every conv (a sum over B*H*W) was a product of two operands transposed
along their long axis, and XLA:CPU materialised a transposed copy of the cotangent for each:
a third of a student step's second-order pass. Channel-first, every product of every
derivative order is a small weight-shaped matrix times a long contiguous one.

`matmul_dtype="bfloat16"` runs every matmul (forward, backward and second-order) on bfloat16
operands with float32 accumulation, the precision TPUs use for float32 matmuls by default.
CPUs with AMX or AVX512-BF16 run these several times faster than float32 matmuls (measured
by benchmarks/distill_memory.py: 2048^3 at 1.56 TFLOP/s vs 0.26); parameters,
activations between matmuls and all sums stay float32. A whole student step gains only where
its matmuls dominate: rounding a long float32 patch matrix inside the product runs at the
float32 rate (benchmarks/student_matmuls.py), so on a 2-core AMX machine whose step was
bound by memory passes the bfloat16 student was 1.1-1.5x slower (README).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MATMUL_DTYPES = ("float32", "bfloat16")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lowp_matmul(a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _lowp_matmul_fwd(a, b, dtype):
    # Residuals in the operand precision: half the memory of float32 ones, and exactly what
    # the forward product saw.
    a_lp, b_lp = a.astype(dtype), b.astype(dtype)
    # Through this function, not jnp.matmul: an outer derivative of this rule (second order)
    # must also take the custom path.
    out = _lowp_matmul(a_lp, b_lp, dtype)
    # Two scalars carry the operands' own dtypes: each cotangent must come back in its dtype.
    return out, (a_lp, b_lp, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))


def _lowp_matmul_bwd(dtype, res, g):
    # The backward products call this same function, so a gradient of the gradient (the
    # distillation meta-gradient) also runs on low-precision operands. JAX's own transpose of
    # a mixed-dtype dot would multiply the float32 cotangent by an upcast operand in float32.
    a_lp, b_lp, a_like, b_like = res
    k, n = b_lp.shape
    da = _lowp_matmul(g, b_lp.T, dtype)
    a_t = a_lp.reshape(-1, k).T
    if jax.default_backend() == "cpu":
        # XLA:CPU folds this transpose into the dot, and its dot runtime has no bfloat16 kernel
        # for a transposed left operand when that operand is computed (a weight-standardised
        # kernel): "UNIMPLEMENTED: Unsupported element type for DotThunk::Execute: BF16 x BF16
        # = F32". The barrier materialises the (weight-sized) transpose instead.
        a_t = jax.lax.optimization_barrier(a_t)
    db = _lowp_matmul(a_t, g.reshape(-1, n), dtype)
    return da.astype(a_like.dtype), db.astype(b_like.dtype)


_lowp_matmul.defvjp(_lowp_matmul_fwd, _lowp_matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, dtype: str = "float32") -> jax.Array:
    """`a (..., K) @ b (K, N)` in float32 out. dtype "bfloat16": operands rounded to bfloat16
    and products summed in float32, in this product and in every derivative of it."""
    if dtype == "float32":
        return a @ b
    if dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {dtype!r}")
    if b.ndim != 2:
        raise ValueError(f"b must be (K, N), got shape {b.shape}")
    return _lowp_matmul(a, b, dtype)


def _same_padding(size: int, k: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (low, high) padding of a "SAME" window, as XLA computes them."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, (total // 2, total - total // 2)


def _windows(x: jax.Array, k: int, stride: int, fill: float = 0.0) -> list[jax.Array]:
    """The k*k strided "SAME" shifts of a channel-first (C, B, H, W) map, each
    (C, B, H_out, W_out), in (row, column) order."""
    ho, ph = _same_padding(x.shape[2], k, stride)
    wo, pw = _same_padding(x.shape[3], k, stride)
    xp = jnp.pad(x, ((0, 0), (0, 0), ph, pw), constant_values=fill)
    hi, wi = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    return [xp[:, :, i : i + hi : stride, j : j + wi : stride] for i in range(k) for j in range(k)]


def kernel_matrix(w: jax.Array) -> jax.Array:
    """HWIO kernel (k, k, C_in, C_out) -> the (C_out, k*k*C_in) matrix `conv2d_cf` takes."""
    return w.reshape(-1, w.shape[-1]).T


def conv2d_cf(
    x: jax.Array, wmat: jax.Array, k: int, stride: int = 1, matmul_dtype: str = "float32"
) -> jax.Array:
    """Channel-first "SAME" convolution: x (C_in, B, H, W), wmat (C_out, k*k*C_in) (see
    `kernel_matrix`; columns in (row, column, channel) order) -> (C_out, B, H_out, W_out).

    One matmul `wmat @ cols`, cols = the (k*k*C_in, B*H_out*W_out) im2col matrix (for k = 1
    the strided input itself). With the batch and spatial axes minor, every product of every
    derivative order is a small-by-big matmul whose long axis is contiguous, a form XLA:CPU
    hands to its matmul library as is. Channel-last (B*H*W, C) operands made each weight
    gradient (a sum over B*H*W) a matmul of two transposed long operands, which XLA:CPU ran
    after materialising a transpose of the cotangent: the transposes took a third of a
    student step's second-order pass (NF-ResNet-26, 64 px, batch 100: 7.2 s channel-last,
    3.8 s channel-first, the same matmul FLOPs). matmul_dtype: see `matmul`."""
    if wmat.shape[1] != k * k * x.shape[0]:
        raise ValueError(f"kernel matrix {wmat.shape} does not fit {k}x{k} x {x.shape[0]} channels")
    if k == 1:
        cols = x[:, :, ::stride, ::stride]
    else:
        # The patch matrix stays float32 (rounded inside `matmul`): built in bfloat16, its
        # transpose (the input gradient: k*k shifted slices padded and summed) was summed in
        # bfloat16 too, a rounding per add, and ran slower (XLA:CPU emulates bfloat16 adds).
        cols = jnp.concatenate(_windows(x, k, stride), axis=0)
    c, b, h, w = cols.shape
    out = matmul(wmat, cols.reshape(c, -1), matmul_dtype)
    return out.reshape(-1, b, h, w)


def conv2d_same(
    x: jax.Array, w: jax.Array, stride: int = 1, matmul_dtype: str = "float32"
) -> jax.Array:
    """NHWC x HWIO "SAME" convolution (square kernel): `conv2d_cf` between two transposes.
    Equal to `lax.conv_general_dilated(x, w, (s, s), "SAME")`. matmul_dtype: see `matmul`."""
    k = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"square kernels only, got {w.shape[:2]}")
    y = conv2d_cf(to_cf(x), kernel_matrix(w), k, stride, matmul_dtype)
    return from_cf(y)


def to_cf(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> channel-first (C, B, H, W)."""
    return jnp.transpose(x, (3, 0, 1, 2))


def from_cf(x: jax.Array) -> jax.Array:
    """Channel-first (C, B, H, W) -> (B, H, W, C)."""
    return jnp.transpose(x, (1, 2, 3, 0))


def per_channel(v: jax.Array) -> jax.Array:
    """A per-channel vector (C,) shaped (C, 1, 1, 1), to broadcast over a (C, B, H, W) map."""
    return v[:, None, None, None]


def max_pool_cf(x: jax.Array, k: int = 3, stride: int = 2) -> jax.Array:
    """k x k "SAME" max pool of a (C, B, H, W) map as a max over k*k shifted views: the values
    of `nnx.max_pool`, with an elementwise gradient (~3.7x faster on XLA:CPU than
    select-and-scatter)."""
    views = _windows(x, k, stride, fill=-jnp.inf)
    out = views[0]
    for v in views[1:]:
        out = jnp.maximum(out, v)
    return out


def avg_pool_cf(x: jax.Array, k: int) -> jax.Array:
    """Non-overlapping k x k average pool ("VALID", stride k) of a (C, B, H, W) map."""
    c, b, h, w = x.shape
    if h % k or w % k:
        raise ValueError(f"map {h}x{w} is not divisible by the pool size {k}")
    return x.reshape(c, b, h // k, k, w // k, k).mean(axis=(3, 5))
