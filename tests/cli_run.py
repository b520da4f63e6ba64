"""`tldr-jax` as a subprocess for tests, in a clean environment (CPU, no fake devices)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str,
    cwd: Path = REPO,
    timeout: float = 600,
    python: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    shell: str = "",
) -> subprocess.CompletedProcess:
    """`env`: variables added to the clean environment; `shell`: a bash command line run in
    its place, with the CLI's command as its arguments (`'"$@" >&-'` closes its stdout)."""
    clean = {
        "XLA_FLAGS": "",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    command = [sys.executable, *python, "-m", "tldr_jax.cli", *args]
    if shell:
        command = ["bash", "-c", shell, "bash", *command]
    return subprocess.run(
        command,
        cwd=cwd,
        env=clean | dict(env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
