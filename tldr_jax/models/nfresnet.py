"""Normalizer-free ResNets (Brock, De, Smith 2021: "Characterizing signal propagation to close
the performance gap in unnormalized ResNets").

No batch norm, so a network is a pure function of its parameters, which trajectory matching
needs (a student is unrolled as `params -> loss` under `lax.scan`). Signal propagation is kept
in check analytically instead:
  * Scaled weight standardisation: every conv uses W_hat = gain * (W - mean) / (std sqrt(fan_in)),
    so a conv preserves variance at init; gamma-scaled ReLU (gamma = sqrt(2 / (1 - 1/pi)))
    restores unit variance after the activation.
  * Residual blocks: h_{i+1} = h_i + alpha * skip_gain * f(h_i / beta_i), where beta_i is the
    analytically expected std of h_i: Var(h_{i+1}) = Var(h_i) + alpha^2, reset to 1 + alpha^2 at
    each stage's first (transition) block, whose shortcut sees the normalised input.
  * `skip_gain` is a learnable scalar per block (SkipInit), initialised to `skip_init`
    (0 = every block starts as the identity on its shortcut, as in NFNets).

Layout (pre-activation bottlenecks, as DeepMind's NF-ResNets and timm's `nf_resnet*`):
stem 7x7/2 conv (64) + 3x3/2 max pool; stages of bottleneck blocks [1x1 -> 3x3 (stride) -> 1x1]
with mid width = 1/4 of the stage width; a strided 1x1 conv shortcut where the shape changes
(a subsampling conv keeps the variance, where timm's avg-pool shortcut divides it by up to 4);
final gamma-ReLU and global average pool -> (B, widths[-1]); optionally a linear head to
`head_dim` features.

Parameter count of `nf_resnet26()`: 15,995,184 = 13,946,184 in the conv trunk (convs with
gain and bias, 8 skip gains) + 2,049,000 in its 2048 -> 1000 linear head; that is the layout
and the 16.0M of timm's `nf_resnet26` (whose head is the ImageNet classifier). With
`head_dim=0` the encoder returns the 2048-d pooled trunk features instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tldr_jax.models.conv import conv2d_cf, from_cf, matmul, max_pool_cf, per_channel, to_cf

# E[relu(z)^2] - E[relu(z)]^2 = (1 - 1/pi) / 2 for z ~ N(0, 1): this gain makes it 1.
RELU_GAMMA = float(np.sqrt(2.0 / (1.0 - 1.0 / np.pi)))


def scaled_relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x) * RELU_GAMMA


def _split(n: int) -> tuple[int, int]:
    """(r, q) with r * q >= n, both near sqrt(n): r the largest divisor of n up to sqrt(n)
    where one is at least half of it, else ceil(sqrt(n)) (the rows are then zero-padded)."""
    root = int(np.sqrt(n))
    r = max(d for d in range(1, root + 1) if n % d == 0)
    if 2 * r < root:
        r = root + (root * root < n)
    return r, -(-n // r)


def column_mean(a: jax.Array) -> jax.Array:
    """Mean over the rows of a (n, c) matrix as a (1, c) row, summed in two chains of
    ~sqrt(n) terms: a (1, r) @ (r, q * c) product over the free reshape of a's rows (row i * q
    + j at (i, j)), then a sum over the q partial rows.

    One (1, n) @ (n, c) product accumulates each column in one chain of n terms: on the
    4608-row kernels of NF-ResNet-26 that put the student's float32 image meta-gradient 2.3e-3
    from float64 (as the PyTorch reference's), 4.3e-6 with this sum, in the same time (it is
    still a product, which XLA:CPU runs far faster than a column reduction)."""
    n, c = a.shape
    r, q = _split(n)
    if r * q != n:
        a = jnp.pad(a, ((0, r * q - n), (0, 0)))
    ones = jnp.full((1, r), 1.0 / n, a.dtype)
    return jnp.sum((ones @ a.reshape(r, q * c)).reshape(q, c), axis=0, keepdims=True)


def standardize_kernel_matrix(kernel: jax.Array, gain: jax.Array, eps: float = 1e-4) -> jax.Array:
    """Scaled WS of an HWIO kernel as the (C_out, fan_in) matrix `conv2d_cf` takes: every row
    (output channel) with zero mean and 1/fan_in variance, times its gain."""
    fan_in = int(np.prod(kernel.shape[:-1]))
    # Standardised in the kernel's own (fan_in, C_out) layout, transposed once at the end (XLA
    # folds that transpose into the conv matmuls). Per-channel sums are products
    # (`column_mean`), not reductions: XLA:CPU's column reductions took ~48 ms for one
    # 1024 x 2048 kernel (its first and second derivatives, in every student step, were 0.7 of
    # 3.4 s). Standardising a transposed copy instead ((C_out, fan_in) @ (fan_in, 1) sums)
    # made XLA run those sums and their derivatives as transposing loop fusions: 11-15%
    # slower per student step (benchmarks/profile_student_step.py, README).
    flat = kernel.reshape(fan_in, -1)
    mean = column_mean(flat)
    var = column_mean(jnp.square(flat - mean))
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain[None, :]
    return ((flat - mean) * scale).T


def standardize_kernel(kernel: jax.Array, gain: jax.Array, eps: float = 1e-4) -> jax.Array:
    """Scaled WS on an HWIO kernel: zero mean, 1/fan_in variance per output channel, * gain."""
    return standardize_kernel_matrix(kernel, gain, eps).T.reshape(kernel.shape)


class WSConv(nnx.Module):
    """Conv2D with scaled weight standardisation and a learnable per-channel gain, on
    channel-first (C, B, H, W) maps (models/conv.py `conv2d_cf`); the kernel is HWIO."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        stride: int = 1,
        *,
        matmul_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.stride: int = stride
        self.matmul_dtype: str = matmul_dtype
        init = jax.nn.initializers.normal(1.0)  # any scale: the kernel is standardised
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.gain = nnx.Param(jnp.ones((out_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        wmat = standardize_kernel_matrix(self.kernel[...], self.gain[...])
        k = self.kernel.shape[0]
        y = conv2d_cf(x, wmat, k, self.stride, self.matmul_dtype)
        return y + per_channel(self.bias[...])


class NFBottleneck(nnx.Module):
    """Pre-activation bottleneck: out = shortcut + alpha * skip_gain * f(relu(x / beta))."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stride: int,
        *,
        alpha: float,
        beta: float,
        bottle_ratio: float,
        skip_init: float,
        matmul_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        mid = max(1, int(round(out_features * bottle_ratio)))
        self.alpha: float = alpha
        self.beta: float = beta
        dt = matmul_dtype
        self.conv1 = WSConv(in_features, mid, 1, matmul_dtype=dt, rngs=rngs)
        self.conv2 = WSConv(mid, mid, 3, stride, matmul_dtype=dt, rngs=rngs)
        self.conv3 = WSConv(mid, out_features, 1, matmul_dtype=dt, rngs=rngs)
        self.shortcut = (
            WSConv(in_features, out_features, 1, stride, matmul_dtype=dt, rngs=rngs)
            if stride != 1 or in_features != out_features
            else None
        )
        self.skip_gain = nnx.Param(jnp.full((), skip_init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        out = scaled_relu(x / self.beta)
        shortcut = x
        if self.shortcut is not None:
            # Transition block: the shortcut sees the normalised input (variance resets).
            shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(scaled_relu(out))
        out = self.conv3(scaled_relu(out))
        return shortcut + out * (self.alpha * self.skip_gain[...])


def _call(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


class NFResNet(nnx.Module):
    """Normalizer-free bottleneck ResNet image encoder: (B,H,W,3) -> (B, out_dim)."""

    def __init__(
        self,
        *,
        depths: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (256, 512, 1024, 2048),
        stem_width: int = 64,
        bottle_ratio: float = 0.25,
        alpha: float = 0.2,
        skip_init: float = 0.0,
        head_dim: int = 0,
        in_channels: int = 3,
        remat_blocks: bool = False,
        matmul_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        if len(depths) != len(widths):
            raise ValueError(f"depths {depths} and widths {widths} differ in length")
        # Recompute each block's activations in the backward pass instead of storing them:
        # a distillation student differentiates its inner SGD step again, which otherwise
        # keeps every block's forward and backward intermediates of the step alive.
        self.remat_blocks: bool = remat_blocks
        self.depths: tuple[int, ...] = tuple(depths)
        self.widths: tuple[int, ...] = tuple(widths)
        # "bfloat16": every conv and the head multiply bfloat16 operands with float32 sums, in
        # all derivative orders (models/conv.py `matmul`); parameters stay float32.
        self.matmul_dtype: str = matmul_dtype
        self.stem = WSConv(in_channels, stem_width, 7, 2, matmul_dtype=matmul_dtype, rngs=rngs)
        blocks = []
        expected_var = 1.0  # the stem conv preserves the unit variance of normalised pixels
        in_features = stem_width
        for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            for i in range(depth):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(
                    NFBottleneck(
                        in_features,
                        width,
                        stride,
                        alpha=alpha,
                        beta=float(np.sqrt(expected_var)),
                        bottle_ratio=bottle_ratio,
                        skip_init=skip_init,
                        matmul_dtype=matmul_dtype,
                        rngs=rngs,
                    )
                )
                if i == 0:
                    expected_var = 1.0  # transition: shortcut = conv(normalised input)
                expected_var += alpha**2
                in_features = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(self.widths[-1], head_dim, rngs=rngs) if head_dim else None
        self.out_dim: int = head_dim or self.widths[-1]

    def features_cf(self, x: jax.Array) -> jax.Array:
        """Spatial features before the final activation, channel-first: (B, H, W, 3) images ->
        (widths[-1], B, H/32, W/32). Every map inside is channel-first (see WSConv)."""
        x = self.stem(to_cf(x))
        x = max_pool_cf(x, 3, 2)
        for block in self.blocks:
            x = nnx.remat(_call)(block, x) if self.remat_blocks else block(x)
        return x

    def features(self, x: jax.Array) -> jax.Array:
        """Spatial features before the final activation: (B, H/32, W/32, widths[-1])."""
        return from_cf(self.features_cf(x))

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # No dropout or batch statistics: train and eval are the same function.
        x = jnp.mean(scaled_relu(self.features_cf(x)), axis=(2, 3)).T
        if self.head is None:
            return x
        return matmul(x, self.head.kernel[...], self.matmul_dtype) + self.head.bias[...]


def nf_resnet26(
    *,
    width_multiplier: float = 1.0,
    skip_init: float = 0.0,
    alpha: float = 0.2,
    head_dim: int = 1000,
    remat_blocks: bool = False,
    matmul_dtype: str = "float32",
    rngs: nnx.Rngs,
) -> NFResNet:
    """NF-ResNet-26: bottleneck blocks [2, 2, 2, 2], widths 256-512-1024-2048, stem 64, and a
    linear head to `head_dim` (16.0M parameters at the defaults; 13.9M with head_dim=0)."""
    widths = tuple(int(round(w * width_multiplier)) for w in (256, 512, 1024, 2048))
    return NFResNet(
        depths=(2, 2, 2, 2),
        widths=widths,
        stem_width=int(round(64 * width_multiplier)),
        alpha=alpha,
        skip_init=skip_init,
        head_dim=head_dim,
        remat_blocks=remat_blocks,
        matmul_dtype=matmul_dtype,
        rngs=rngs,
    )


def nf_resnet_tiny(
    *,
    skip_init: float = 0.0,
    head_dim: int = 0,
    matmul_dtype: str = "float32",
    rngs: nnx.Rngs,
) -> NFResNet:
    """Two stages of one block each, 16/32 wide: for tests and laptop-sized configs."""
    return NFResNet(
        depths=(1, 1),
        widths=(16, 32),
        stem_width=8,
        skip_init=skip_init,
        head_dim=head_dim,
        matmul_dtype=matmul_dtype,
        rngs=rngs,
    )
