"""Where one student step's time goes: a profile of the meta-gradient's second-order pass.

    python benchmarks/profile_student_step.py --preset nf_resnet26_64 [--matmul-dtype bfloat16] \
        [--json PATH] [--trace-dir DIR]

Times (best of --repeats) the student's inner gradient and the second-order pass the exact
meta-gradient adds per student step (the VJP of that gradient: what `unroll` runs once per
step and `remat` after recomputing the gradient), then runs the pass once more under
`jax.profiler` and sums the XLA:CPU op times of the trace by kind of op. Every matmul of the
compiled program (a dot, or a fusion whose computation holds one) is matched to its HLO to
count its FLOPs, so the matmuls' rate is measured on the program itself, not on a probe.

`dot_gflop_by_operands` splits the pass's matmul FLOPs by the operand dtypes of the compiled
dots: with `--matmul-dtype bfloat16` XLA:CPU keeps only the products in the plain (M, K) x
(K, N) form in bfloat16 and upcasts those with a transposed operand (most weight and input
gradients) to float32.

On a CPU the runtime runs independent ops concurrently on its threads, so the summed op time
exceeds the wall time; `dot_wall_s_est` is the wall time at the matmuls' share of op time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

from tldr_jax.utils.argtypes import positive_int

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SHAPE = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_DTYPE = re.compile(r"%([\w.\-]+) = (\w+)\[")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*?\) -> .*?\{\n(.*?)\n\}", re.S | re.M)
_FUSION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = .*? fusion\(.*?calls=%([\w.\-]+)", re.M)
_DOT = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* dot\(([^)]*)\)(.*)$", re.M)


def _dims(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _flops(dot: re.Match, shapes: dict[str, str]) -> float:
    """2 * M * N * K of one `_DOT` match (output elements times the contracted size)."""
    lhs = re.search(r"%([\w.\-]+)", dot.group(3)).group(1)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.group(4))
    lhs_dims = _dims(shapes[lhs])
    k = math.prod(lhs_dims[i] for i in _dims(contracting.group(1)))
    return 2.0 * math.prod(_dims(dot.group(2))) * k


def dot_flops(hlo: str) -> dict[str, float]:
    """FLOPs of every op of an optimised HLO module that multiplies matrices: a `dot`
    instruction (keyed by its name) or a fusion whose called computation holds dots (keyed by
    the fusion's name, the name its trace events carry)."""
    shapes = {m.group(1): m.group(2) for m in _SHAPE.finditer(hlo)}
    fusions = {f.group(1): f.group(2) for f in _FUSION.finditer(hlo)}
    fused = set(fusions.values())
    per_comp: dict[str, float] = collections.defaultdict(float)
    per_dot: dict[str, float] = {}  # dots that run as ops of their own, not inside a fusion
    for comp in _COMP.finditer(hlo):
        for d in _DOT.finditer(comp.group(2)):
            flops = _flops(d, shapes)
            per_comp[comp.group(1)] += flops
            if comp.group(1) not in fused:
                per_dot[d.group(1)] = flops
    out = dict(per_dot)
    for name, called in fusions.items():
        if per_comp.get(called):
            out[name] = per_comp[called]
    return out


def dot_flops_by_operands(hlo: str) -> dict[str, float]:
    """FLOPs of the dots of an optimised HLO module by operand dtypes, e.g. "bf16 x bf16".

    What the compiled program multiplies, not what the model asked for: XLA:CPU upcasts a
    bfloat16 product to float32 where its runtime has no bfloat16 kernel for the operands'
    layout (a `matmul_dtype="bfloat16"` student's transposed-operand products)."""
    shapes = {m.group(1): m.group(2) for m in _SHAPE.finditer(hlo)}
    dtypes = {m.group(1): m.group(2) for m in _DTYPE.finditer(hlo)}
    out: dict[str, float] = collections.defaultdict(float)
    for d in _DOT.finditer(hlo):
        ops = re.findall(r"%([\w.\-]+)", d.group(3))[:2]
        out[" x ".join(dtypes[o] for o in ops)] += _flops(d, shapes)
    return dict(out)


def op_times(trace_dir: str, module: str) -> dict[str, float]:
    """Summed duration (seconds) per op name of one HLO module in a jax.profiler trace."""
    path = sorted(
        glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    )
    if not path:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
    with gzip.open(path[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    times: dict[str, float] = collections.defaultdict(float)
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            times[args["hlo_op"]] += e.get("dur", 0.0) / 1e6
    return dict(times)


def profile(preset: str, matmul_dtype: str, repeats: int, trace_dir: str) -> dict:
    import distill_memory as dm
    import jax

    from tldr_jax.distill import matching

    student, syn, start, _ = dm.build(preset, matmul_dtype)
    # The same two passes distill_memory.py counts the FLOPs of (`step_flops`).
    grad, second_order = dm.student_step_passes(student, matching.InnerLoop())
    args = (start, syn.images, syn.texts, start)
    grad_c = jax.jit(grad).lower(*args[:3]).compile()
    second_c = jax.jit(second_order).lower(*args).compile()
    grad_s = dm.best_seconds(grad_c, *args[:3], repeats=repeats)
    second_s = dm.best_seconds(second_c, *args, repeats=repeats)

    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    traced_start = time.perf_counter()
    jax.block_until_ready(second_c(*args))
    traced_s = time.perf_counter() - traced_start
    jax.profiler.stop_trace()

    hlo = second_c.as_text()
    module = re.search(r"^HloModule ([\w.\-]+)", hlo, re.M).group(1)
    times = op_times(trace_dir, module)
    flops = dot_flops(hlo)
    total = sum(times.values())
    dot_s = sum(t for op, t in times.items() if op in flops)
    dot_gflop = sum(flops[op] for op in times if op in flops) / 1e9
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, t in times.items():
        kinds[re.sub(r"\.\d+$", "", op)] += t
    dot_wall = traced_s * dot_s / total if total else 0.0
    by_operands = dot_flops_by_operands(hlo)
    return {
        "preset": preset,
        "matmul_dtype": matmul_dtype,
        "grad_s": round(grad_s, 4),
        "second_order_s": round(second_s, 4),
        "traced_s": round(traced_s, 4),
        "op_time_s": round(total, 4),
        "dot_op_time_s": round(dot_s, 4),
        "dot_gflop": round(dot_gflop, 4),
        "cost_analysis_gflop": round(dm.cost_gflop(second_c), 4),
        "dot_wall_s_est": round(dot_wall, 4),
        "dot_gflops_wall_est": round(dot_gflop / dot_wall, 1) if dot_wall else None,
        "other_wall_s_est": round(traced_s - dot_wall, 4),
        "dot_gflop_by_operands": {
            k: round(v / 1e9, 4) for k, v in sorted(by_operands.items(), key=lambda kv: -kv[1])
        },
        "op_time_by_kind_s": {
            k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="nf_resnet26_64", choices=("nf_resnet26_64", "nf_tiny", "small")
    )
    parser.add_argument("--matmul-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--trace-dir", default="", help="keep the trace here (default: a temp dir)")
    parser.add_argument("--top", type=int, default=15, help="op kinds to print")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = profile(args.preset, args.matmul_dtype, args.repeats, args.trace_dir or tmp)
    print(
        f"{r['preset']} ({r['matmul_dtype']}): inner gradient {r['grad_s']:.3f} s, "
        f"second-order pass {r['second_order_s']:.3f} s (traced run {r['traced_s']:.3f} s, "
        f"{r['op_time_s']:.3f} s of op time)"
    )
    print(
        f"matmuls: {r['dot_gflop']:.1f} GFLOP (cost analysis of the pass: "
        f"{r['cost_analysis_gflop']:.1f}) in {r['dot_op_time_s']:.3f} s of op time, "
        f"~{r['dot_wall_s_est']:.3f} s of wall time at their share "
        f"(~{r['dot_gflops_wall_est']} GFLOP/s); the rest ~{r['other_wall_s_est']:.3f} s"
    )
    split = ", ".join(f"{k} {v:.1f}" for k, v in r["dot_gflop_by_operands"].items())
    print(f"matmul GFLOP by operand dtypes, as compiled: {split}")
    for kind, t in list(r["op_time_by_kind_s"].items())[: args.top]:
        print(f"  {t * 1e3:9.1f} ms  {kind}")
    if args.json:
        from tldr_jax.utils.io import write_json

        write_json(args.json, r)


if __name__ == "__main__":
    main()
