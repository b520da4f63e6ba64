"""k-means wall time: ours (tldr_jax.select.kmeans) vs faiss-cpu vs scikit-learn, one process.

    python benchmarks/kmeans.py [--n 200000 --d 128 --k 1024 --iters 10] [--json out.json]

Same float32 data, same initial centroids, same number of Lloyd iterations (assign + update),
and every library ends with the labels of all points: faiss = `Kmeans.train` + `index.search`,
scikit-learn = `KMeans(algorithm="lloyd", tol=0).fit` (its final E-step is part of fit),
ours = `kmeans()` (its final assignment pass is part of the call). Our one-off compilation is
done in a warm-up call and reported separately. Each contender runs `--repeats` times,
interleaved, and the minimum is kept (the host may be shared). Objectives are recomputed the
same way for all three: nearest final centroid in float64 numpy, sum of squared distances.
faiss and scikit-learn are benchmark-only dependencies (`pip install tldr-jax[bench]`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from tldr_jax.utils.argtypes import positive_int


def make_data(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian blobs around 2k centres, plus k initial centroids from the rows.

    Overlap keeps clusters from emptying, so all three libraries follow the same trajectory
    (each treats an empty cluster differently).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2 * k, d), dtype=np.float32)
    x = centres[rng.integers(0, 2 * k, n)] + rng.standard_normal((n, d), dtype=np.float32)
    c0 = x[rng.choice(n, k, replace=False)].copy()
    return np.ascontiguousarray(x), c0


def objective64(x: np.ndarray, c: np.ndarray, block: int = 16384) -> float:
    """Sum over rows of the squared distance to the nearest centroid, in float64."""
    c = c.astype(np.float64)
    c_sq = (c * c).sum(1)
    total = 0.0
    for s in range(0, len(x), block):
        xb = x[s : s + block].astype(np.float64)
        d = (xb * xb).sum(1)[:, None] + c_sq[None, :] - 2.0 * xb @ c.T
        total += float(np.maximum(d.min(1), 0.0).sum())
    return total


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=positive_int, default=200_000)
    ap.add_argument("--d", type=positive_int, default=128)
    ap.add_argument("--k", type=positive_int, default=1024)
    ap.add_argument("--iters", type=positive_int, default=10)
    ap.add_argument("--repeats", type=positive_int, default=2)
    ap.add_argument("--block", type=positive_int, default=1024, help="our assignment block (rows)")
    ap.add_argument("--bf16", action="store_true", help="our distance GEMM in bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the figures to this JSON path")
    args = ap.parse_args()
    try:
        import faiss
    except ImportError:
        ap.error("faiss is not installed (the comparison needs it: pip install faiss-cpu)")
    import jax
    import jax.numpy as jnp
    from sklearn.cluster import KMeans

    from tldr_jax.select.kmeans import kmeans
    from tldr_jax.utils import io

    n, d, k, iters = args.n, args.d, args.k, args.iters
    x, c0 = make_data(n, d, k, args.seed)
    gemm_dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    threads = os.cpu_count()
    faiss.omp_set_num_threads(threads)

    def ours() -> np.ndarray:
        r = kmeans(
            x, k, iterations=iters, init_centroids=c0, block_size=args.block, gemm_dtype=gemm_dtype
        )
        return r.centroids

    def run_faiss() -> np.ndarray:
        km = faiss.Kmeans(
            d, k, niter=iters, seed=args.seed, verbose=False, max_points_per_centroid=10**9
        )
        km.train(x, init_centroids=c0)
        km.index.search(x, 1)  # labels, as the other two return them
        return km.centroids

    def run_sklearn() -> np.ndarray:
        km = KMeans(k, init=c0, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
        return km.fit(x).cluster_centers_.astype(np.float32)

    xj, cj = jax.device_put(x), jax.device_put(c0)
    gemm = jax.jit(lambda a, b: a @ b.T)

    def bare_gemm() -> np.ndarray:
        return gemm(xj, cj).block_until_ready()

    compile_s, _ = timed(ours)  # warm-up: compiles, and runs once
    bare_gemm()
    times: dict[str, list[float]] = {"ours": [], "faiss": [], "sklearn": [], "gemm": []}
    cents: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("faiss", run_faiss), ("sklearn", run_sklearn)):
            t, cents[name] = timed(fn)
            times[name].append(t)
        times["gemm"].append(timed(bare_gemm)[0])
    best = {name: min(ts) for name, ts in times.items()}
    objective = {name: objective64(x, c) for name, c in cents.items()}

    flop = 2.0 * n * k * d * iters
    per_iter = {name: best[name] / iters for name in ("ours", "faiss", "sklearn")}
    print(
        f"k-means N={n} D={d} K={k} iters={iters} float32, {threads} threads, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, min of {args.repeats}"
    )
    print(f"{'':10s} {'wall s':>8s} {'s/iter':>8s} {'GFLOP/s':>8s} {'objective':>16s}")
    for name in ("ours", "faiss", "sklearn"):
        print(
            f"{name:10s} {best[name]:8.3f} {per_iter[name]:8.4f} {flop / best[name] / 1e9:8.1f} "
            f"{objective[name]:16.6e}"
        )
    gemm_gflops = 2.0 * n * k * d / best["gemm"] / 1e9
    print(f"{'XLA GEMM':10s} {'':8s} {best['gemm']:8.4f} {gemm_gflops:8.1f}   (one x @ c.T)")
    result = {
        "ours_s": best["ours"],
        "faiss_s": best["faiss"],
        "sklearn_s": best["sklearn"],
        "gemm_s": best["gemm"],
        "ratio_faiss": best["ours"] / best["faiss"],
        "ratio_sklearn": best["ours"] / best["sklearn"],
        "ratio_gemm": per_iter["ours"] / best["gemm"],
        "objective_ours": objective["ours"],
        "objective_faiss": objective["faiss"],
        "objective_sklearn": objective["sklearn"],
    }
    rel = max(abs(objective["ours"] - objective[o]) / objective[o] for o in ("faiss", "sklearn"))
    print(
        f"ours/faiss {result['ratio_faiss']:.3f}  ours/sklearn {result['ratio_sklearn']:.3f}  "
        f"ours-per-iter/GEMM {result['ratio_gemm']:.3f}  objective max rel diff {rel:.2e}  "
        f"(our compile+first run {compile_s:.2f} s)"
    )
    if args.json:
        io.write_json(args.json, {**result, "n": n, "d": d, "k": k, "iters": iters})


if __name__ == "__main__":
    main()
