"""Peak memory and time per outer distillation iteration, per grad mode and syn_steps.

    python benchmarks/distill_memory.py --json W/distill_memory.json
    python benchmarks/distill_memory.py --preset nf_resnet26_64 --modes remat --steps 5,40 \
        --micro-batches 4
    python benchmarks/distill_memory.py --preset nf_resnet26_64 --modes unroll,remat --steps 5 \
        --matmul-dtype bfloat16

Each (mode, syn_steps) point runs in a fresh subprocess so peak RSS (the child's VmHWM) is
that point's alone; `peak_mib` is the peak while running (the counter is reset after XLA
compiles the step), `peak_mib_with_compile` includes the compiler's own peak.
A parent-side watchdog kills a child whose RSS passes --max-rss-mib (so a
runaway unroll cannot push a shared machine into the kernel OOM killer) and one that passes
--timeout; both are recorded instead of crashing. Output JSON:
{"<mode>": {"<syn_steps>": {"peak_mib", "s_per_iter"} | {"error": ...}}}.
The trajectory endpoints are the student's init plus noise: memory and time do not depend on
their values.

`--platform gpu` runs every point (ours and, with --reference-python, the PyTorch reference on
`cuda`) on the GPU; `peak_mib` is then the device's peak allocation (JAX: the allocator's
`peak_bytes_in_use`, which also counts the compiler's autotuning buffers; torch:
`max_memory_allocated`) and `host_peak_mib` the process's RSS. `--precision` fixes both sides'
float32 matmul and convolution arithmetic on the GPU: `float32` (true float32; JAX's GPU
default and torch's default convolutions would use TensorFloat-32) or `tensorfloat32`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tldr_jax.utils import hostenv  # noqa: E402 (no JAX import: the parent stays light)

PRESETS = {
    # name: (image encoder, image size, pairs = batch, text embedding dim)
    "small": ("convnet", 16, 32, 64),
    # The reference comparison: NF-ResNet-26 (16.0M) + 768 -> 1000 text head (1.8M).
    "nf_resnet26_64": ("nf_resnet26", 64, 100, 768),
    # A seconds-long stand-in for the reference check (--reference-python).
    "nf_tiny": ("nf_resnet_tiny", 16, 8, 16),
}

# The same architecture in benchmarks/reference_torch.py (the PyTorch reference loop).
TORCH_ARCH = {
    "nf_resnet26": [],  # its defaults
    "nf_resnet_tiny": ["--depths", "1,1", "--widths", "16,32", "--stem", "8", "--head-dim", "0"],
}


def _vm_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or not permitted: the peak then includes compilation
        return False


def best_seconds(f, *args, repeats: int) -> float:
    """Best of `repeats` timed calls of `f(*args)`, after one untimed call (compilation)."""
    import jax

    jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """This machine's dense matmul rate under XLA (best of `repeats`) for operands in `dtype`
    with float32 sums: the ceiling for a student step, which is almost all matmuls (convs are
    im2col + matmul here)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    return 2 * n**3 / best_seconds(mm, a, a, repeats=repeats) / 1e9


def student_step_passes(student, inner):
    """(grad, second_order) of one student step: the inner gradient `grad(theta, x, t)` and
    its VJP `second_order(theta, x, t, ct)`, the pass the exact meta-gradient adds per step."""
    import jax

    from tldr_jax.distill import matching

    key = jax.random.key(0)

    def grad(theta, x, t):
        return matching.inner_grad(student, inner, theta, x, t, key)

    def second_order(theta, x, t, ct):
        return jax.vjp(grad, theta, x, t)[1](ct)

    return grad, second_order


def cost_gflop(compiled) -> float:
    """XLA's cost-analysis FLOPs of a compiled function, in GFLOP."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX: one dict per device
    return float(cost.get("flops", 0.0)) / 1e9


def step_flops(student, inner, syn, theta, matmul_dtype: str = "float32") -> dict:
    """XLA's FLOP count (cost analysis) of one student step's first-order gradient and of its
    VJP, the second-order pass the meta-gradient adds. Their sum is the least work of one
    student step of the exact meta-gradient (`unroll`, no recomputation; `remat` recomputes
    each step's gradient 1-2 more times), in any implementation: divided by the machine's
    matmul rate it bounds the seconds per student step from below. (Counted on one step:
    XLA's cost analysis counts a `lax.scan` body once, whatever its trip count.)"""
    import jax

    b = syn.images.shape[0]
    grad, second_order = student_step_passes(student, inner)

    def gflop(f, *args) -> float:
        return cost_gflop(jax.jit(f).lower(*args).compile())

    x, t = syn.images[:b], syn.texts[:b]
    g1 = gflop(grad, theta, x, t)
    g2 = gflop(second_order, theta, x, t, theta) - g1  # its VJP recomputes the gradient once
    peak = matmul_peak_gflops(dtype=matmul_dtype)
    return {
        "gflop_per_step": round(g1 + g2, 1),
        "gflop_grad": round(g1, 1),
        "matmul_peak_gflops": round(peak, 1),
        "min_s_per_step": round((g1 + g2) / peak, 3),
    }


def build(preset: str, matmul_dtype: str = "float32"):
    """(student, synthetic set, expert start, expert target) of a preset: the student's init
    and the endpoints as its init plus noise (memory and time do not depend on their values)."""
    import jax
    from flax import nnx

    from tldr_jax.distill import matching
    from tldr_jax.distill.student import make_student
    from tldr_jax.models.convnet import ConvNet
    from tldr_jax.models.heads import ProjectionHead
    from tldr_jax.models.nfresnet import nf_resnet26, nf_resnet_tiny

    encoder, size, pairs, txt_dim = PRESETS[preset]
    rngs = nnx.Rngs(0)
    if encoder == "convnet":
        image_net = ConvNet(
            size, width=32, depth=2, norm="instancenorm", matmul_dtype=matmul_dtype, rngs=rngs
        )
    elif encoder == "nf_resnet_tiny":
        image_net = nf_resnet_tiny(matmul_dtype=matmul_dtype, rngs=rngs)
    else:
        # No per-block remat (models/nfresnet.py remat_blocks) here: recomputing blocks inside
        # a student step that is itself differentiated twice made one step's meta-backward
        # bigger (XLA temp 1986 vs 1610 MiB at batch 100), not smaller.
        image_net = nf_resnet26(matmul_dtype=matmul_dtype, rngs=rngs)
    head = ProjectionHead(txt_dim, image_net.out_dim, rngs=rngs)
    student, t_img, t_txt = make_student(image_net, head)
    del image_net, head

    k = jax.random.split(jax.random.key(1), 5)
    syn = matching.SyntheticSet.create(
        jax.random.normal(k[0], (pairs, size, size, 3)), jax.random.normal(k[1], (pairs, txt_dim))
    )
    target = (
        t_img + 1e-3 * jax.random.normal(k[2], t_img.shape),
        t_txt + 1e-3 * jax.random.normal(k[3], t_txt.shape),
    )
    return student, syn, (t_img, t_txt), target


def export_reference_check(preset: str, path: str, syn_steps: int = 2) -> None:
    """Writes what benchmarks/reference_torch.py --check compares against: this preset's
    float32 student weights, endpoints and synthetic set by parameter name, minibatch indices,
    and our inner loss and gradient (first minibatch) and exact meta-loss and meta-gradient;
    the inner gradient and the meta-gradient also in float64 (the same inputs; `f64grad_*`,
    `f64_meta_grad_*`), the truth both float32 sides are measured against: two float32
    programs can round differently by more than they differ."""
    import jax
    import numpy as np
    from flax import nnx

    from tldr_jax.distill import matching

    student, syn, start, target = build(preset)
    pairs = syn.images.shape[0]
    idx = matching.sample_minibatches(jax.random.key(7), pairs, syn_steps, pairs)
    inner = matching.InnerLoop()
    key = jax.random.key(0)
    inner_value_and_grad = jax.jit(
        jax.value_and_grad(lambda th, x, t: matching._inner_loss(student, inner, th, x, t, key))
    )
    loss, grad = inner_value_and_grad(start, syn.images[idx[0]], syn.texts[idx[0]])
    meta_and_grad = jax.jit(
        lambda syn, a, b, mode: matching.meta_loss_and_grad(
            syn, student, a, b, idx, key, inner, grad_mode=mode
        ),
        static_argnums=3,
    )
    meta, g = meta_and_grad(syn, start, target, "remat")
    out = {
        "images": syn.images,
        "texts": syn.texts,
        "idx": idx,
        "lr_img": syn.lr_img,
        "lr_txt": syn.lr_txt,
        "inner_loss": loss,
        "meta_loss": meta,
        "meta_grad_images": g.images,
        "meta_grad_texts": g.texts,
        "meta_grad_lr_img": g.lr_img,
        "meta_grad_lr_txt": g.lr_txt,
    }
    f64 = lambda tree: jax.tree.map(
        lambda a: a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a, tree
    )
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        syn64, start64 = f64(syn), f64(start)
        _, g64 = meta_and_grad(syn64, start64, f64(target), "unroll")
        _, grad64 = inner_value_and_grad(start64, syn64.images[idx[0]], syn64.texts[idx[0]])
        g64, grad64 = jax.tree.map(np.asarray, (g64, grad64))
    finally:
        jax.config.update("jax_enable_x64", x64)
    for name in ("images", "texts", "lr_img", "lr_txt"):
        out[f"f64_meta_grad_{name}"] = getattr(g64, name)
    named = (("start", start), ("target", target), ("grad", grad), ("f64grad", grad64))
    for name, (th_img, th_txt) in named:
        for suffix, state in zip(("img", "txt"), student.unflatten(th_img, th_txt), strict=True):
            for keypath, leaf in nnx.to_flat_state(state):
                out[f"{name}_{suffix}:" + "/".join(map(str, keypath))] = leaf[...]
    np.savez(
        path, **{k: np.asarray(v, np.float64 if "f64" in k else np.float32) for k, v in out.items()}
    )


def worker(
    preset: str,
    mode: str,
    syn_steps: int,
    iters: int,
    micro_batches: int = 1,
    with_flops: bool = True,
    matmul_dtype: str = "float32",
    remat_budget_mib: float = 1024.0,
    scan_unroll: bool = False,
) -> dict:
    import jax

    from tldr_jax.distill import matching
    from tldr_jax.utils.memory import release_host_memory

    student, syn, start, target = build(preset, matmul_dtype)
    t_img, t_txt = start
    pairs = syn.images.shape[0]
    inner = matching.InnerLoop(
        micro_batches=micro_batches, remat_budget_mib=remat_budget_mib, unroll=scan_unroll
    )
    opt = matching.make_outer_optimizer()
    opt_state = opt.init(syn)

    # The expert endpoints are arguments, as in the distill stage (a closed-over array would be
    # baked into the executable as a constant, one more copy per use).
    @jax.jit
    def step(syn, opt_state, start, target, key):
        k_idx, k_drop = jax.random.split(key)
        idx = matching.sample_minibatches(k_idx, pairs, syn_steps, pairs)
        return matching.outer_step(
            syn, opt_state, opt, student, start, target, idx, k_drop, grad_mode=mode, inner=inner
        )

    flops = step_flops(student, inner, syn, start, matmul_dtype) if with_flops else {}
    t0 = time.perf_counter()
    compiled = step.lower(syn, opt_state, start, target, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    compile_peak = _vm_kib("self", "VmHWM")
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    # Hand the compiler's freed heap back to the OS (as the distill stage does after its first
    # step), then reset the peak-RSS counter (Linux clear_refs "5"): XLA's compiler alone can
    # take GBs for a big graph; the runtime peak is what a long run keeps paying.
    release_host_memory()
    reset = _reset_peak()
    t0 = time.perf_counter()
    out = compiled(syn, opt_state, start, target, jax.random.key(0))
    jax.block_until_ready(out)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(iters):
        syn, opt_state, loss, _ = compiled(syn, opt_state, start, target, jax.random.key(i + 1))
        jax.block_until_ready(loss)
    # --iters 0: peak memory only (the first iteration includes compilation).
    sec = (time.perf_counter() - t0) / iters if iters else None
    if flops and sec:
        # The exact gradient's least FLOPs per second at this speed (`remat` does more work).
        flops["effective_gflops"] = round(flops["gflop_per_step"] * syn_steps / sec, 1)
    # The process's peak RSS; on an accelerator the device allocator's peak instead.
    peak = host_peak = round(_vm_kib("self", "VmHWM") / 1024, 1)
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        flops |= {
            "peak_kind": "device",
            "host_peak_mib": host_peak,
            "device_kind": device.device_kind,
            "matmul_precision": str(getattr(jax.config, "jax_default_matmul_precision", None)),
            "jax": jax.__version__,
        }
        if "peak_bytes_in_use" in stats:
            peak = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return flops | {
        "peak_mib": peak,
        "s_per_iter": round(sec, 3) if sec else None,
        "peak_mib_with_compile": round(max(compile_peak, _vm_kib("self", "VmHWM")) / 1024, 1),
        "peak_excludes_compile": reset,
        "compile_s": round(compile_s, 2),
        "xla_temp_mib": round(temp_mib, 1),
        "first_iter_s": round(first_s, 2),
        "matmul_dtype": matmul_dtype,
        "scan_unroll": scan_unroll,
        # remat's steps per nested chunk (1: every step's parameters kept, no nesting)
        "remat_chunk": matching.remat_chunk(syn_steps, start, inner) if mode == "remat" else None,
        "params_img": int(t_img.size),
        "params_txt": int(t_txt.size),
    }


def _watch(cmd: list[str], args: argparse.Namespace) -> dict:
    """Runs one point's child process under the RSS / time watchdog; its last stdout line is
    the point's JSON."""
    env = dict(os.environ, JAX_PLATFORMS="cpu" if args.platform == "cpu" else "cuda")
    if args.platform == "cpu":
        env.pop("XLA_FLAGS", None)  # one CPU device, not the test suite's fake eight
    else:
        # Allocate as used (not 75% of the card up front), one stated matmul precision, and
        # the CLI's XLA:GPU default (Triton GEMM fusion off: it aborted compiling the
        # meta-gradient under jax 0.11.2; utils/hostenv.py).
        env |= {
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "JAX_DEFAULT_MATMUL_PRECISION": args.precision,
        }
        if (xla_flags := hostenv.xla_flags_with_gpu_defaults(env)) is not None:
            env["XLA_FLAGS"] = xla_flags
    # Both sides (ours and the PyTorch reference) run under the same malloc settings: glibc's
    # huge-page malloc where the CLI would turn it on (tldr_jax/utils/hostenv.py), or off.
    tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t]
    tunables = [t for t in tunables if not t.startswith(hostenv.TUNABLE)]
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    if not args.no_malloc_hugepages:
        env = hostenv.hugepage_env(env) or env
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    t0, peak_kib, error = time.monotonic(), 0, None
    while child.poll() is None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # child just exited
            peak_kib = max(peak_kib, _vm_kib(child.pid, "VmRSS"))
        if peak_kib > args.max_rss_mib * 1024:
            error = f"oom: RSS passed {args.max_rss_mib} MiB"
        elif time.monotonic() - t0 > args.timeout:
            error = f"timeout after {args.timeout} s"
        if error:
            child.kill()
            break
        time.sleep(0.05)
    out, err = child.communicate()
    if error:
        return {"error": error, "peak_mib_seen": round(peak_kib / 1024, 1)}
    if child.returncode != 0:
        return {"error": f"exit {child.returncode}: {error_line(err)}"}
    return json.loads(out.strip().splitlines()[-1]) | {
        "malloc_hugepages": hostenv.malloc_hugepages_active(env)
    }


def run_point(args: argparse.Namespace, mode: str, steps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", args.preset]
    cmd += ["--modes", mode, "--steps", str(steps), "--iters", str(args.iters)]
    cmd += ["--micro-batches", str(args.micro_batches), "--matmul-dtype", args.matmul_dtype]
    cmd += ["--remat-budget-mib", str(args.remat_budget_mib)]
    if args.scan_unroll:
        cmd.append("--scan-unroll")
    if args.no_flops:
        cmd.append("--no-flops")
    return _watch(cmd, args)


def _reference_cmd(args: argparse.Namespace) -> list[str]:
    encoder, size, pairs, txt_dim = PRESETS[args.preset]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_torch.py")
    cmd = [args.reference_python, script, *TORCH_ARCH[encoder]]
    if args.platform == "gpu":
        cmd += ["--device", "cuda"] + (["--tf32"] if args.precision == "tensorfloat32" else [])
    return cmd + ["--size", str(size), "--pairs", str(pairs), "--txt-dim", str(txt_dim)]


def error_line(stderr: str) -> str:
    """The line of a failed worker's stderr that says why: its last exception line (JAX ends
    a traceback with a note about its removed frames), else its last line."""
    lines = [x.strip() for x in stderr.strip().splitlines() if x.strip()]
    cause = [x for x in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", x)]
    return (cause or lines or [""])[-1]


def run_reference(args: argparse.Namespace, steps: list[int]) -> dict:
    """The PyTorch reference loop on the same model and data, one process per point, after a
    check that both sides compute the same function: our float32 weights, data, losses and
    gradients go to the torch side, which reports relative differences."""
    import tempfile

    if args.no_reference_check:
        check = {"skipped": "--no-reference-check"}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "check.npz")
            cmd = [sys.executable, os.path.abspath(__file__), "--export-check", path]
            exported = _watch(cmd + ["--preset", args.preset], args)
            check = (
                exported
                if "error" in exported
                else _watch(_reference_cmd(args) + ["--check", path], args)
            )
    print(f"reference check (relative differences, ours vs PyTorch): {check}", flush=True)
    points = {}
    for n in steps:
        cmd = _reference_cmd(args) + ["--syn-steps", str(n), "--iters", str(args.iters)]
        points[str(n)] = _watch(cmd, args) | {"check": check}
        print(f"reference syn_steps={n}: {points[str(n)]}", flush=True)
    return points


def print_ratios(results: dict, steps: list[int]) -> None:
    """Ours / reference, seconds per outer iteration and peak RSS, at each syn_steps."""
    ref = results.get("reference", {})
    print(f"{'mode':8s} {'steps':>5s} {'s/iter ours/ref':>16s} {'peak ours/ref':>14s}")
    for mode, points in results.items():
        if mode == "reference":
            continue
        for n in steps:
            ours, theirs = points.get(str(n), {}), ref.get(str(n), {})
            t = [p.get("s_per_iter") for p in (ours, theirs)]
            m = [p.get("peak_mib") for p in (ours, theirs)]
            sec = f"{t[0] / t[1]:.2f}x" if all(t) else "-"
            mem = f"{m[0] / m[1]:.2f}x" if all(m) else "-"
            print(f"{mode:8s} {n:5d} {sec:>16s} {mem:>14s}")


def print_table(results: dict, steps: list[int]) -> None:
    """Peak, its ratio to the first syn_steps, time; with the FLOP count: XLA's GFLOP of one
    exact student step, the least seconds per step at the machine's matmul rate, and the rate
    the measured time corresponds to."""
    print(
        f"{'mode':8s} {'steps':>5s} {'peak MiB':>9s} {'x peak@' + str(steps[0]):>10s} "
        f"{'s/iter':>8s} {'s/step':>7s} {'GFLOP/step':>10s} {'min s/step':>10s} {'GFLOP/s':>8s}"
    )
    for mode, points in results.items():
        base = points.get(str(steps[0]), {}).get("peak_mib")
        for n in steps:
            p = points.get(str(n), {})
            if "error" in p:
                print(f"{mode:8s} {n:5d} {p['error']}")
                continue
            ratio = f"{p['peak_mib'] / base:.2f}x" if base else "-"
            sec = p["s_per_iter"]
            timing = f"{sec:8.2f} {sec / n:7.3f}" if sec is not None else f"{'-':>8s} {'-':>7s}"
            work = "".join(
                f" {p[k]:>{w}}" if k in p else f" {'-':>{w}}"
                for k, w in (
                    ("gflop_per_step", 10),
                    ("min_s_per_step", 10),
                    ("effective_gflops", 8),
                )
            )
            print(f"{mode:8s} {n:5d} {p['peak_mib']:9.0f} {ratio:>10s} {timing}{work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--modes", default="unroll,remat,tesla")
    parser.add_argument("--steps", default="5,10,20,40")
    parser.add_argument(
        "--iters", type=int, default=2, help="timed iterations after warm-up (0: peak only)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per point")
    parser.add_argument("--max-rss-mib", type=float, default=16000.0)
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="image-tower slices per student step (distill.micro_batches; the same gradient)",
    )
    parser.add_argument(
        "--matmul-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the image tower's matmul operands (model matmul_dtype; sums stay float32)",
    )
    parser.add_argument(
        "--remat-budget-mib",
        type=float,
        default=1024.0,
        help="remat nests its checkpoints once syn_steps parameter vectors pass this "
        "(distill.remat_budget_mib; 0: always nest from 9 steps)",
    )
    parser.add_argument(
        "--scan-unroll",
        action="store_true",
        help="fully unroll the student's scan (distill.scan_unroll; compile time grows with "
        "syn_steps)",
    )
    parser.add_argument(
        "--no-malloc-hugepages",
        action="store_true",
        help="run every point (ours and the reference) without glibc's huge-page malloc "
        "(GLIBC_TUNABLES=glibc.malloc.hugetlb=1, on by default where it applies, as in the CLI)",
    )
    parser.add_argument(
        "--no-flops",
        action="store_true",
        help="skip the FLOP count of one student step and the matmul-rate probe",
    )
    parser.add_argument(
        "--reference-python",
        default="",
        help="an interpreter with torch: also run the PyTorch reference loop "
        "(benchmarks/reference_torch.py) on the same model, side by side (nf_* presets)",
    )
    parser.add_argument(
        "--platform",
        default="cpu",
        choices=["cpu", "gpu"],
        help="where every point runs (gpu: JAX on CUDA and the reference on `cuda`; peak_mib "
        "is then the device's peak allocation)",
    )
    parser.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "tensorfloat32"],
        help="GPU only: float32 matmuls / convolutions on both sides in true float32 or in "
        "TensorFloat-32 (JAX_DEFAULT_MATMUL_PRECISION; torch allow_tf32)",
    )
    parser.add_argument(
        "--no-reference-check",
        action="store_true",
        help="time the reference without first checking it computes our function (saves "
        "three compilations; run the check once on the same preset and platform instead)",
    )
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--export-check", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = args.modes.split(",")
    try:
        steps = sorted({int(s) for s in args.steps.split(",")})  # ratios are to the fewest
    except ValueError:
        parser.error(f"--steps: comma-separated positive integers, not {args.steps!r}")
    if steps[0] < 1:
        parser.error(f"--steps: every value must be >= 1 (got {args.steps!r})")
    if args.iters < 0:
        parser.error(f"--iters must be >= 0 (got {args.iters})")
    if args.micro_batches < 1:
        parser.error(f"--micro-batches must be >= 1 (got {args.micro_batches})")
    for mode in modes:
        if mode not in ("unroll", "remat", "tesla"):
            parser.error(f"unknown mode {mode!r}")

    if args.reference_python and PRESETS[args.preset][0] not in TORCH_ARCH:
        parser.error(f"no PyTorch reference model for preset {args.preset!r}")
    if args.reference_python and not (args.worker or args.export_check):
        probe = subprocess.run(
            [args.reference_python, "-c", "import torch"], capture_output=True, text=True
        )
        if probe.returncode != 0:
            parser.error(
                f"--reference-python {args.reference_python}: cannot import torch there "
                f"({error_line(probe.stderr) or 'exit ' + str(probe.returncode)})"
            )
    if args.platform == "cpu" and args.precision != "float32":
        parser.error("--precision tensorfloat32 needs --platform gpu (CPUs have no TF32)")
    if args.export_check:
        export_reference_check(args.preset, args.export_check)
        print(json.dumps({"exported": args.export_check}))
        return
    if args.worker:
        print(
            json.dumps(
                worker(
                    args.preset,
                    modes[0],
                    steps[0],
                    args.iters,
                    args.micro_batches,
                    with_flops=not args.no_flops,
                    matmul_dtype=args.matmul_dtype,
                    remat_budget_mib=args.remat_budget_mib,
                    scan_unroll=args.scan_unroll,
                )
            )
        )
        return

    from tldr_jax.utils.io import write_json

    results: dict = {}
    for mode in modes:
        for n in steps:
            point = run_point(args, mode, n)
            results.setdefault(mode, {})[str(n)] = point
            print(f"{mode} syn_steps={n}: {point}", flush=True)
            if args.json:  # after every point, so a long run keeps what it measured
                write_json(args.json, results)
    if args.reference_python:
        results["reference"] = run_reference(args, steps)
        if args.json:
            write_json(args.json, results)
    print_table(results, steps)
    if args.reference_python:
        print_ratios(results, steps)
    failed = [f"{mode}@{n}" for mode in modes for n, p in results[mode].items() if "error" in p]
    failed += [f"reference@{n}" for n, p in results.get("reference", {}).items() if "error" in p]
    if failed:
        print(f"{len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
