"""The benchmark scripts' machine-readable interface (what users and the README script against)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_distill_memory_json_interface(tmp_path):
    out = tmp_path / "dm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_memory.py"), "--modes", "remat"]
    cmd += ["--steps", "2,3", "--iters", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results) == {"remat"} and set(results["remat"]) == {"2", "3"}
    for point in results["remat"].values():
        assert point["peak_mib"] > 100  # a whole JAX process, in MiB
        assert point["s_per_iter"] > 0
        assert point["peak_excludes_compile"] in (True, False)
        assert point["xla_temp_mib"] > 0  # XLA's own figure for the step's scratch buffers
        # One exact student step's work: the first-order gradient plus its VJP, which costs
        # more than the gradient; the time bound is that work at the measured matmul rate.
        assert point["gflop_per_step"] > 2 * point["gflop_grad"] > 0
        assert point["matmul_peak_gflops"] > 0
        assert point["min_s_per_step"] == pytest.approx(
            point["gflop_per_step"] / point["matmul_peak_gflops"], rel=0.01, abs=1e-3
        )
        assert point["effective_gflops"] > 0
    # The printed table has one row per point with the ratio to the first syn_steps.
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("remat ")]
    rows = [r for r in rows if r[1].isdigit()]  # not the per-point progress lines
    assert [r[1] for r in rows] == ["2", "3"] and rows[0][3] == "1.00x"
    assert {p["matmul_dtype"] for p in results["remat"].values()} == {"float32"}
    # The bfloat16-matmul student (model matmul_dtype): its own matmul rate bounds its time.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_memory.py"), "--modes", "unroll"]
    cmd += ["--steps", "2", "--iters", "1", "--matmul-dtype", "bfloat16", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    point = json.loads(out.read_text())["unroll"]["2"]
    assert point["matmul_dtype"] == "bfloat16" and point["s_per_iter"] > 0
    assert point["gflop_per_step"] > 2 * point["gflop_grad"] > 0
