#!/usr/bin/env bash
# One machine, all its local devices (CPU, one or several GPUs): a plain run.
#   launch/single_machine.sh compress --config configs/tldr.py:small --workdir runs/tldr
# TLDR_BIN: the tldr-jax executable (default: tldr-jax on PATH, e.g. from . .venv/bin/activate).
set -euo pipefail
bin=${TLDR_BIN:-tldr-jax}
if ! command -v "$bin" >/dev/null 2>&1; then
  echo "$0: $bin not found: activate the environment it is installed in (. .venv/bin/activate) or set TLDR_BIN=/path/to/tldr-jax" >&2
  exit 127
fi
exec "$bin" "$@"
