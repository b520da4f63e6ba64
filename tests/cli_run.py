"""`tldr-jax` as a subprocess for tests, in a clean environment (CPU, no fake devices)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, cwd: Path = REPO, timeout: float = 600, python: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    env = {
        "XLA_FLAGS": "",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    return subprocess.run(
        [sys.executable, *python, "-m", "tldr_jax.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
