"""The matmul rate of the NF-ResNet-26 student's own products, alone, in float32 and bfloat16.

`benchmarks/distill_memory.py` reports `matmul_peak_gflops` from one square 2048^3 product.
A student step of the distillation meta-gradient (64 px, batch 100, im2col convolutions,
models/conv.py) multiplies small weight-shaped matrices by long (K, B*H*W) ones instead; this
prints what XLA:CPU reaches on those shapes, one jitted product at a time:

  f32          float32 operands (the default student)
  bf16 cvt     float32 operands rounded to bfloat16 inside the jitted product (what a
               `matmul_dtype="bfloat16"` student does: activations stay float32)
  bf16 ready   operands already bfloat16 (the product alone, no conversion)
  wgrad f32    the weight-gradient form, (M, N) x (K, N)^T, both long operands along N
  wgrad bf16   the same on bfloat16 operands (float32 sums)
  wgrad bf16 T the same with the (K, N) operand first transposed to (N, K) (materialised, not
               timed), so the product is in the plain (M, N) x (N, K) form

A weight gradient contracts the long B*H*W axis; XLA:CPU upcasts a bfloat16 product with a
transposed operand to float32 (profile_student_step.py `dot_gflop_by_operands`).

    python benchmarks/student_matmuls.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from tldr_jax.utils.argtypes import positive_int

# (M, K, N) of the student's products: conv output channels x fan-in x B*H*W, and the square
# probe distill_memory.py uses.
SHAPES = (
    (64, 147, 102400),  # 7x7/2 stem: 3 * 49 fan-in, 100 images at 32 x 32
    (64, 576, 25600),  # stage 1, 3x3 conv, 16 x 16 maps
    (256, 64, 25600),  # stage 1, 1x1 expansion
    (512, 128, 6400),  # stage 2, 1x1 expansion, 8 x 8 maps
    (2048, 1024, 400),  # stage 4, 2 x 2 maps
    (2048, 2048, 2048),  # the square probe
)


def _seconds(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def forms(m: int, k: int, n: int) -> dict[str, tuple]:
    """Each form's jitted function and its arguments (see the module docstring)."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    a = jax.random.normal(jax.random.key(0), (m, k))
    b = jax.random.normal(jax.random.key(1), (k, n))
    g = jax.random.normal(jax.random.key(2), (m, n))
    return {
        "f32": (jax.jit(lambda a, b: a @ b), (a, b)),
        "bf16 cvt": (
            jax.jit(
                lambda a, b: jnp.matmul(
                    a.astype(bf16), b.astype(bf16), preferred_element_type=jnp.float32
                )
            ),
            (a, b),
        ),
        "bf16 ready": (
            jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)),
            (a.astype(bf16), b.astype(bf16)),
        ),
        "wgrad f32": (jax.jit(lambda g, b: jnp.einsum("mn,kn->mk", g, b)), (g, b)),
        "wgrad bf16": (
            jax.jit(lambda g, b: jnp.einsum("mn,kn->mk", g, b, preferred_element_type=f32)),
            (g.astype(bf16), b.astype(bf16)),
        ),
        "wgrad bf16 T": (
            jax.jit(lambda g, bt: jnp.matmul(g, bt, preferred_element_type=f32)),
            (g.astype(bf16), jax.block_until_ready(b.T.astype(bf16))),
        ),
    }


def rates(m: int, k: int, n: int, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of one (M, K) x (K, N) product in each form."""
    gflop = 2.0 * m * k * n / 1e9
    return {
        name: gflop / _seconds(f, *args, repeats=repeats)
        for name, (f, args) in forms(m, k, n).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=20)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; GFLOP/s per product")
    header = ("M x K x N", "f32", "bf16 cvt", "bf16 ready", "wgrad f32", "wgrad bf16")
    header += ("wgrad bf16 T",)
    print(f"{header[0]:>18s}" + "".join(f"{h:>13s}" for h in header[1:]))
    for m, k, n in SHAPES:
        r = rates(m, k, n, args.repeats)
        print(f"{f'{m}x{k}x{n}':>18s}" + "".join(f"{r[h]:13.0f}" for h in header[1:]))


if __name__ == "__main__":
    main()
