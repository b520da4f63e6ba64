"""Process environment set before anything heavy loads: glibc's huge-page malloc, and one
XLA:GPU default (`xla_flags_with_gpu_defaults`).

XLA:CPU allocates each execution's scratch buffer afresh (`posix_memalign` from a worker
thread, which glibc serves with a new `mmap`): 1.5 GB per student step of the NF-ResNet-26
meta-gradient, 9.3 GB for a 5-step `unroll` iteration. On a kernel whose transparent huge
pages are in `madvise` mode (the common distribution default) every 4 KiB page of it then
faults in separately: ~380k minor faults and ~0.5 s of system time per call. glibc >= 2.35
marks its mappings `MADV_HUGEPAGE` when started with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(measured: faults 380k -> 2k, a 5-step `unroll` iteration 23.2 -> 20.4 s; README). Tunables are
read once, at process start, so the CLI re-executes itself with the tunable set (same PID,
same arguments) unless `TLDR_JAX_MALLOC_HUGEPAGES=0`.

No JAX import here: this runs before anything heavy is loaded.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "TLDR_JAX_MALLOC_HUGEPAGES"  # "0": leave the environment alone
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None for other C libraries (musl, macOS)."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    parts = name.split()
    if len(parts) != 2 or parts[0] != "glibc":
        return None
    try:
        major, minor = (int(p) for p in parts[1].split(".")[:2])
    except ValueError:
        return None
    return major, minor


def thp_mode(path: Path = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), None if unknown."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def hugepage_env(
    environ: Mapping[str, str],
    *,
    platform: str | None = None,
    glibc: tuple[int, int] | None = None,
    thp: str | None = None,
) -> dict[str, str] | None:
    """The environment to restart with so glibc's malloc asks for huge pages, or None when
    there is nothing to gain: not Linux/glibc >= 2.35, the kernel's THP mode is not `madvise`
    (`always` already backs big mappings with huge pages, `never` ignores the advice), the
    tunable is already set (either value: the user's choice stands), or the user opted out.
    `platform`, `glibc` and `thp` default to this machine's."""
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if (platform if platform is not None else sys.platform) != "linux":
        return None
    version = glibc if glibc is not None else glibc_version()
    if version is None or version < (2, 35):
        return None
    if (thp if thp is not None else thp_mode()) != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{SETTING}" if current else SETTING
    return env


def malloc_hugepages_active(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process was started with glibc's huge-page malloc on (and could use it)."""
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "").split(":")
    version = glibc_version()
    return (
        sys.platform == "linux"
        and version is not None
        and version >= (2, 35)
        and thp_mode() in ("madvise", "always")
        and any(t.strip() in (SETTING, f"{TUNABLE}=2") for t in tunables)
    )


_REEXEC_MARK = "TLDR_JAX_REEXECED"  # set for the restarted process only
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def reexec_with_malloc_hugepages() -> None:
    """Replaces this process with itself (same interpreter, flags and arguments, same PID) under
    `hugepage_env`; returns without doing anything where that is None. Call it first thing in
    a command-line entry point, before threads exist or output is pending."""
    if os.environ.pop(_REEXEC_MARK, None):
        # The restarted process: SIGINT / SIGTERM were blocked across the exec, so one sent
        # meanwhile is pending, not lost; it is delivered now (Ctrl-C: KeyboardInterrupt).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    env = hugepage_env(os.environ)
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    # Python only notes a signal in its C handler and acts between bytecodes: a Ctrl-C just
    # before exec would vanish with this image. Blocked, it stays pending across the exec.
    # (One noted before the block is acted on when the call returns: KeyboardInterrupt here.)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], {**env, _REEXEC_MARK: "1"})
    except OSError:  # e.g. a sandbox forbidding exec: run on without the tunable
        return
    finally:  # reached only where the exec did not happen: this process runs on
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


TRITON_GEMM_FLAG = "--xla_gpu_enable_triton_gemm=false"
TRITON_GEMM_OPT_IN = "TLDR_JAX_TRITON_GEMM"  # "1": leave XLA's Triton GEMM fusion on


def xla_flags_with_gpu_defaults(environ: Mapping[str, str]) -> str | None:
    """XLA_FLAGS with XLA:GPU's Triton GEMM fusion turned off, or None to leave them alone.

    Measured on an H200 with jax 0.11.2 (README, "Against the PyTorch reference"): XLA:GPU
    aborted the whole process compiling our student's meta-gradient in that pass
    ("triton_tiling_propagation.cc: Check failed: subdim_size_accumulator == dim_size"); with
    it off the matmuls go to cuBLAS and every benchmark point compiled and ran. The flag is a
    no-op on CPUs and TPUs. Left alone: the caller already set the flag either way, or
    TLDR_JAX_TRITON_GEMM=1."""
    if environ.get(TRITON_GEMM_OPT_IN, "0").strip().lower() in ("1", "true", "yes", "on"):
        return None
    current = environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" in current:
        return None
    return f"{current} {TRITON_GEMM_FLAG}".strip()
