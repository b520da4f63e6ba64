"""The benchmark scripts' machine-readable interface (what users and the README script against)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tldr_jax.utils import hostenv

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "abc"], "--steps: comma-separated positive integers"),
        (["--steps", "5,0"], "--steps: every value must be >= 1"),
        (["--steps", "-5"], "--steps: every value must be >= 1"),
        (["--iters", "-1"], "--iters must be >= 0"),
        (["--micro-batches", "0"], "--micro-batches must be >= 1"),
        # this project never installs torch: a reference interpreter without it is said first
        (["--preset", "nf_tiny", "--reference-python", sys.executable], "cannot import torch"),
    ],
)
def test_distill_memory_rejects_bad_arguments(args, message):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_memory.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_a_failed_point_says_why():
    """A worker's last stderr line was JAX's note about removed frames, not the error."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import distill_memory
    finally:
        sys.path.pop(0)
    err = (
        "Traceback (most recent call last):\n  ...\nValueError: micro_batches=3 does not "
        "divide the student batch 32\n----\nFor simplicity, JAX has removed its internal "
        "frames from the traceback of the following exception.\n"
    )
    assert distill_memory.error_line(err) == (
        "ValueError: micro_batches=3 does not divide the student batch 32"
    )
    assert distill_memory.error_line("Killed\n") == "Killed"


def test_distill_memory_json_interface(tmp_path):
    out = tmp_path / "dm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_memory.py"), "--modes", "remat"]
    cmd += ["--steps", "3,2", "--iters", "1", "--json", str(out)]  # ratios to the fewest
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
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
        assert point["remat_chunk"] == 1  # the small preset's parameters fit the budget
        assert point["scan_unroll"] is False
        # Children run under the CLI's malloc choice for this host (tldr_jax/utils/hostenv.py).
        assert point["malloc_hugepages"] is hostenv.malloc_hugepages_active(
            hostenv.hugepage_env(env) or env
        )
    # The printed table has one row per point with the ratio to the first syn_steps.
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("remat ")]
    rows = [r for r in rows if r[1].isdigit()]  # not the per-point progress lines
    assert [r[1] for r in rows] == ["2", "3"] and rows[0][3] == "1.00x"
    assert {p["matmul_dtype"] for p in results["remat"].values()} == {"float32"}
    # The bfloat16-matmul student (model matmul_dtype): its own matmul rate bounds its time.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_memory.py"), "--modes", "unroll"]
    cmd += ["--steps", "2", "--iters", "1", "--matmul-dtype", "bfloat16", "--json", str(out)]
    cmd += ["--scan-unroll", "--no-malloc-hugepages"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    point = json.loads(out.read_text())["unroll"]["2"]
    assert point["matmul_dtype"] == "bfloat16" and point["s_per_iter"] > 0
    assert point["scan_unroll"] is True and point["malloc_hugepages"] is False
    assert point["gflop_per_step"] > 2 * point["gflop_grad"] > 0


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_check_export_matches_the_torch_layout(tmp_path):
    """The PyTorch reference (benchmarks/reference_torch.py, run only where torch is installed)
    loads our weights by name: every parameter it builds must be in our export, in its shape
    once HWIO kernels are read as OIHW, and nothing of ours may be left over."""
    import jax
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import distill_memory
    finally:
        sys.path.pop(0)
    ref = _load_benchmark("reference_torch")

    path = tmp_path / "check.npz"
    distill_memory.export_reference_check("nf_tiny", str(path), syn_steps=2)
    npz = np.load(path)
    assert not jax.config.jax_enable_x64  # the float64 truth did not leak into this process
    for name in ("images", "texts", "lr_img", "lr_txt"):
        truth, ours = npz[f"f64_meta_grad_{name}"], npz[f"meta_grad_{name}"]
        assert truth.dtype == np.float64 and truth.shape == ours.shape
        assert np.linalg.norm(ours - truth) <= 1e-4 * np.linalg.norm(truth), name
    img_specs, blocks = ref.image_specs((1, 1), (16, 32), 8, 0, 0.2)
    txt_specs = ref.text_specs(16, 32)
    assert len(blocks) == 2 and [b[3] for b in blocks] == [True, True]  # both reshape
    for suffix in ("img", "txt"):  # the inner gradient's float64 truth, by parameter name
        for key in (k for k in npz.files if k.startswith(f"grad_{suffix}:")):
            truth, ours = npz["f64" + key], npz[key]
            assert truth.dtype == np.float64 and truth.shape == ours.shape
            assert np.linalg.norm(ours - truth) <= 1e-4 * np.linalg.norm(truth) + 1e-12, key
    for prefix in ("start", "target", "grad", "f64grad"):
        for suffix, specs in (("img", img_specs), ("txt", txt_specs)):
            names = {k.split(":", 1)[1] for k in npz.files if k.startswith(f"{prefix}_{suffix}:")}
            assert names == {n for n, _ in specs}
            for name, shape in specs:
                a = npz[f"{prefix}_{suffix}:{name}"]
                layout = (
                    (a.shape[3], a.shape[2], a.shape[0], a.shape[1]) if a.ndim == 4 else a.shape
                )
                assert layout == shape, name
    # The two flat layouts hold the same number of parameters (our student's counts).
    assert sum(int(np.prod(s)) for _, s in img_specs) == sum(
        npz[k].size for k in npz.files if k.startswith("start_img:")
    )
    assert npz["idx"].shape == (2, 8) and npz["meta_grad_images"].shape == npz["images"].shape
    # (The endpoints are the init plus 1e-3 noise, so the student overshoots: loss >> 1.)
    assert np.isfinite(npz["meta_loss"]) and float(npz["meta_loss"]) > 0
    assert np.linalg.norm(npz["meta_grad_images"]) > 0


def test_distill_memory_gpu_flags_reach_both_sides(monkeypatch):
    """--platform gpu / --precision (benchmarks/distill_gpu.sh; measured on an H200, README):
    our children run JAX on CUDA at the stated matmul precision with the caller's XLA_FLAGS
    (plus Triton GEMM off, as the CLI),
    the reference runs on `cuda` with TF32 exactly when asked, and TF32 on a CPU is refused."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import distill_memory
    finally:
        sys.path.pop(0)

    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_memory.py")]
    proc = subprocess.run(
        cmd + ["--precision", "tensorfloat32"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "needs --platform gpu" in proc.stderr

    seen = {}

    class FakePopen:  # records the child's command and environment; exits at once
        def __init__(self, cmd, env, **kwargs):
            seen["cmd"], seen["env"], self.pid, self.returncode = cmd, env, 0, 0

        def poll(self):
            return 0

        def communicate(self):
            return '{"peak_mib": 1.0}\n', ""

    monkeypatch.setattr(distill_memory.subprocess, "Popen", FakePopen)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    for platform, precision in (("gpu", "float32"), ("gpu", "tensorfloat32"), ("cpu", "float32")):
        args = argparse.Namespace(
            platform=platform,
            precision=precision,
            preset="nf_tiny",
            reference_python="/torch/python",
            max_rss_mib=1e6,
            timeout=60.0,
            no_malloc_hugepages=True,
        )
        ref = distill_memory._reference_cmd(args)
        assert ref[0] == "/torch/python" and ref[1].endswith("reference_torch.py")
        assert ("--device" in ref) is (platform == "gpu")
        assert ("--tf32" in ref) is (precision == "tensorfloat32")
        assert distill_memory._watch(["ours"], args)["peak_mib"] == 1.0
        env = seen["env"]
        if platform == "gpu":
            assert (
                env["JAX_PLATFORMS"] == "cuda" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
            )
            assert env["JAX_DEFAULT_MATMUL_PRECISION"] == precision
            # The caller's flags, and the CLI's XLA:GPU default (utils/hostenv.py).
            assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false"
        else:  # one CPU device, not a caller's fake eight; no precision override
            assert env["JAX_PLATFORMS"] == "cpu" and "XLA_FLAGS" not in env
            assert "JAX_DEFAULT_MATMUL_PRECISION" not in env


def test_data_memory_webdataset_modes_read_the_same_pixels(tmp_path):
    out = tmp_path / "dm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_memory.py"), "--webdataset"]
    cmd += ["--images", "30", "--captions", "2", "--size", "8", "--json", str(out)]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [r["mode"] for r in results] == ["wds bytes held", "wds indexed"]
    assert all(r["pairs"] == 60 and r["peak_mib"] > 0 for r in results)
    assert len({r["checksum"] for r in results}) == 1
    assert "| wds indexed | 60 |" in proc.stdout


def test_student_matmuls_forms_compute_the_products_they_time():
    import numpy as np

    sm = _load_benchmark("student_matmuls")
    forms = sm.forms(8, 24, 40)
    assert list(forms) == [
        "f32",
        "bf16 cvt",
        "bf16 ready",
        "wgrad f32",
        "wgrad bf16",
        "wgrad bf16 T",
    ]
    a, b = (np.asarray(x, np.float64) for x in forms["f32"][1])
    exact = a @ b
    scale = np.abs(exact).max()
    for name in ("f32", "bf16 cvt", "bf16 ready"):
        f, args = forms[name]
        out = np.asarray(f(*args))
        assert out.shape == (8, 40) and out.dtype == np.float32
        # float32 products to float32 rounding; bfloat16 operands to their 8-bit mantissa
        tol = 1e-5 if name == "f32" else 3e-2
        np.testing.assert_allclose(out, exact, atol=tol * scale, err_msg=name)
        if name != "f32":  # and they do round the operands
            assert np.abs(out - exact).max() > 1e-5 * scale, name
    g, b2 = (np.asarray(x, np.float64) for x in forms["wgrad f32"][1])
    np.testing.assert_allclose(
        np.asarray(forms["wgrad f32"][0](*forms["wgrad f32"][1])), g @ b2.T, rtol=1e-4, atol=1e-4
    )
    wgrad = g @ b2.T
    for name in ("wgrad bf16", "wgrad bf16 T"):
        f, args = forms[name]
        out = np.asarray(f(*args))
        assert out.shape == (8, 24) and out.dtype == np.float32
        np.testing.assert_allclose(out, wgrad, atol=3e-2 * np.abs(wgrad).max(), err_msg=name)
    rates = sm.rates(8, 24, 40, repeats=1)
    assert set(rates) == set(forms) and all(np.isfinite(r) and r > 0 for r in rates.values())


def test_profile_student_step_counts_the_matmul_flops_of_compiled_hlo():
    import jax
    import jax.numpy as jnp

    ps = _load_benchmark("profile_student_step")

    def f(a, b, c, d):
        # a plain product, one fused with elementwise work, a batched one, a transposed one
        x = jnp.tanh(a @ b)
        y = jnp.einsum("bij,bjk->bik", c, d)
        return x.sum() + y.sum() + (a.T @ a).sum()

    args = (jnp.ones((8, 24)), jnp.ones((24, 40)), jnp.ones((3, 5, 6)), jnp.ones((3, 6, 7)))
    hlo = jax.jit(f).lower(*args).compile().as_text()
    flops = ps.dot_flops(hlo)
    expected = 2 * 8 * 24 * 40 + 2 * 3 * 5 * 6 * 7 + 2 * 24 * 24 * 8
    assert sum(flops.values()) == expected, (flops, hlo)
    assert ps.dot_flops_by_operands(hlo) == {"f32 x f32": expected}

    def g(a, b):
        # a bfloat16 product (which XLA:CPU may keep or upcast) beside a float32 one
        low = jnp.matmul(
            a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        )
        return low.sum() + (a @ b).sum()

    hlo = jax.jit(g).lower(*args[:2]).compile().as_text()
    split = ps.dot_flops_by_operands(hlo)
    assert set(split) <= {"bf16 x bf16", "f32 x f32"} and split.get("f32 x f32")
    assert sum(split.values()) == 2 * (2 * 8 * 24 * 40), (split, hlo)


def test_profile_student_step_cli_reports_the_pass_and_its_matmuls(tmp_path):
    out = tmp_path / "prof.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_student_step.py")]
    cmd += ["--preset", "nf_tiny", "--repeats", "1", "--json", str(out)]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["preset"] == "nf_tiny" and r["matmul_dtype"] == "float32"
    assert r["second_order_s"] > 0 and r["op_time_s"] > 0 and r["traced_s"] > 0
    # every matmul found in the trace: their FLOPs are most of the pass's (the rest is
    # elementwise work that XLA's cost analysis also counts)
    assert 0.6 * r["cost_analysis_gflop"] <= r["dot_gflop"] <= r["cost_analysis_gflop"]
    assert 0 < r["dot_op_time_s"] < r["op_time_s"]
    assert r["op_time_by_kind_s"] and "matmuls:" in proc.stdout
    assert r["dot_gflop_by_operands"] == {"f32 x f32": pytest.approx(r["dot_gflop"], rel=1e-3)}


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("decode.py", ["--heads", "0"], "argument --heads: must be >= 1, got 0"),
        ("decode.py", ["--width", "30", "--heads", "4"], "must be a multiple of --heads 4"),
        ("data_memory.py", ["--images", "0"], "argument --images: must be >= 1"),
        ("profile_student_step.py", ["--repeats", "0"], "argument --repeats: must be >= 1"),
        ("compress_ablation.py", ["--workdir", "/nonexistent"], "no score/ folder"),
        (
            "tesla_vs_exact.py",
            ["--config", "configs/distill.py:tiny", "--workdir", "w", "--steps", "5,x"],
            "argument --steps: not an integer: 'x'",
        ),
    ],
)
def test_benchmarks_answer_bad_arguments_in_one_line(script, args, message):
    """A count of 0 ran into a ZeroDivisionError, wrote Infinity into the JSON or printed
    meaningless rows; argparse says what is wrong instead (exit 2)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
