#!/usr/bin/env bash
# One machine, all its local devices (CPU, one or several GPUs): a plain run.
#   launch/single_machine.sh compress --config configs/tldr.py:small --workdir runs/tldr
set -euo pipefail
exec "${TLDR_BIN:-tldr-jax}" "$@"
