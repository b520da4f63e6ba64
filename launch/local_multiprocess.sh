#!/usr/bin/env bash
# Start N processes of `tldr-jax STAGE ARGS...` on this machine, joined through
# jax.distributed (coordinator on localhost), and wait for all of them.
#
#   launch/local_multiprocess.sh 2 pretrain --config configs/pretrain.py:small --workdir /tmp/w
#
# Each process sees the devices JAX gives it; on CPU, fake several per process with
#   XLA_FLAGS=--xla_force_host_platform_device_count=2 launch/local_multiprocess.sh 2 ...
# Environment: TLDR_BIN the tldr-jax executable (default: tldr-jax on PATH, e.g. from
# . .venv/bin/activate); TLDR_PORT the coordinator's port (default: a free one); TLDR_LOGDIR
# a folder for one log per process (default: all processes write to this terminal).
# Ctrl-C or SIGTERM reaches every process as SIGTERM: they checkpoint at the same step and
# stop (the same command again resumes).
# Exit status: 0 if every process succeeded, else the first non-zero status.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES STAGE [ARGS...]" >&2
  exit 2
fi
n=$1; shift
stage=$1; shift
bin=${TLDR_BIN:-tldr-jax}
if ! command -v "$bin" >/dev/null 2>&1; then
  echo "$0: $bin not found: activate the environment it is installed in (. .venv/bin/activate) or set TLDR_BIN=/path/to/tldr-jax" >&2
  exit 127
fi
port=${TLDR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logdir=${TLDR_LOGDIR:-}
pids=()
for ((i = 0; i < n; i++)); do
  if [ -n "$logdir" ]; then
    mkdir -p "$logdir"
    "$bin" "$stage" "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
      --process_id="$i" >"$logdir/process_$i.log" 2>&1 &
  else
    "$bin" "$stage" "$@" --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
      --process_id="$i" &
  fi
  pids+=($!)
done
# Forward SIGTERM/SIGINT to every process so a preempted job checkpoints everywhere.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "$pid"
  rc=$?
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
done
exit $status
