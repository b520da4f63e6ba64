"""glibc huge-page malloc and XLA:GPU defaults for the CLI process (tldr_jax.utils.hostenv)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tldr_jax.utils import hostenv

HOST = {"platform": "linux", "glibc": (2, 36), "thp": "madvise"}
ARGS = ("--config", "configs/distill.py:tiny", "--workdir")


def test_hugepage_env_adds_the_tunable_where_it_pays_off():
    env = hostenv.hugepage_env({"PATH": "/bin"}, **HOST)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # The user's other tunables are kept, ours appended.
    env = hostenv.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **HOST)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # glibc 2.35 is the first with the tunable.
    env = hostenv.hugepage_env({}, **(HOST | {"glibc": (2, 35)}))
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize(
    "environ, host",
    [
        ({hostenv.OPT_OUT: "0"}, {}),  # opted out
        ({hostenv.OPT_OUT: "off"}, {}),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user's choice stands
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, {}),  # already on: no restart loop
        ({}, {"platform": "darwin"}),
        ({}, {"glibc": (2, 34)}),  # no hugetlb tunable before 2.35
        ({}, {"thp": "always"}),  # the kernel already backs big mappings with huge pages
        ({}, {"thp": "never"}),  # the advice would be ignored
    ],
)
def test_hugepage_env_leaves_the_environment_alone(environ, host):
    assert hostenv.hugepage_env(environ, **(HOST | host)) is None


def test_xla_flags_turn_off_triton_gemm_unless_the_user_chose():
    flag = hostenv.TRITON_GEMM_FLAG
    assert hostenv.xla_flags_with_gpu_defaults({}) == flag
    # The user's other flags are kept, ours appended.
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert hostenv.xla_flags_with_gpu_defaults(env) == f"{env['XLA_FLAGS']} {flag}"
    # Their own choice either way stands; the opt-in keeps XLA's default.
    assert hostenv.xla_flags_with_gpu_defaults({"XLA_FLAGS": flag}) is None
    on = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    assert hostenv.xla_flags_with_gpu_defaults(on) is None
    assert hostenv.xla_flags_with_gpu_defaults({hostenv.TRITON_GEMM_OPT_IN: "1"}) is None


def test_thp_mode_and_glibc_version_parse(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostenv.thp_mode(f) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hostenv.thp_mode(f) == "always"
    assert hostenv.thp_mode(tmp_path / "missing") is None
    version = hostenv.glibc_version()
    if sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION"):
        assert version is not None and version >= (2, 17)


def test_reexec_replaces_the_process_with_the_same_command(monkeypatch):
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit(0)  # what a real exec would be to this process: gone

    monkeypatch.setattr(hostenv, "hugepage_env", lambda environ: {"X": "1"})
    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "-m", "tldr_jax.cli", "buffer"])
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with pytest.raises(SystemExit):
        hostenv.reexec_with_malloc_hugepages()
    # The restarted process is told so (it unblocks SIGINT / SIGTERM, blocked across the
    # exec so that one sent meanwhile stays pending); here, where no exec happened, the
    # signal mask is as it was.
    command = [sys.executable, "-X", "utf8", "-m", "tldr_jax.cli", "buffer"]
    assert calls == [(sys.executable, command, {"X": "1", "TLDR_JAX_REEXECED": "1"})]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask

    # Nothing to gain: no exec; and a failing exec runs on where it is.
    calls.clear()
    monkeypatch.setattr(hostenv, "hugepage_env", lambda environ: None)
    hostenv.reexec_with_malloc_hugepages()
    assert calls == []

    def failing_execve(path, argv, env):
        raise PermissionError("exec not allowed")

    monkeypatch.setattr(hostenv, "hugepage_env", lambda environ: {"X": "1"})
    monkeypatch.setattr(os, "execve", failing_execve)
    hostenv.reexec_with_malloc_hugepages()


def test_cli_process_restarts_under_the_tunable(tmp_path):
    """The real thing: `python -m tldr_jax.cli` restarts itself (same PID) where the host gains
    from it, and every stage summary says whether the tunable was on."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    env.pop(hostenv.OPT_OUT, None)
    expected = hostenv.hugepage_env(env) is not None
    for opt_out, want in (("1", expected), ("0", False)):
        workdir = tmp_path / opt_out
        r = subprocess.run(
            [sys.executable, "-m", "tldr_jax.cli", "make-world", *ARGS, str(workdir)],
            cwd=repo,
            env=env | {hostenv.OPT_OUT: opt_out},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((workdir / "make-world.json").read_text())
        assert summary["malloc_hugepages"] is want
        # The process ran with XLA:GPU's Triton GEMM fusion off, the caller's flags kept.
        flags = summary["xla_flags"].split()
        assert hostenv.TRITON_GEMM_FLAG in flags
        assert set(env.get("XLA_FLAGS", "").split()) <= set(flags)
