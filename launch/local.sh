#!/usr/bin/env bash
# Runs N processes of a command on this machine, each with its own fake CPU devices, joined by
# jax.distributed: a stand-in for N hosts of a pod (every process runs the same program).
#
#   bash launch/local.sh 2 python -m selectit_jax.score --config=configs/smollm2_135m.py \
#       --config.engine.batch_size=8 --config.output_dir=/tmp/scores
#
# Environment: DEVICES_PER_PROCESS (4), JAX_PORT (a free port), LOG_DIR (unset: output of
# every process goes to this terminal, lines prefixed with [pI]).
set -euo pipefail
if [[ $# -lt 2 ]]; then echo "usage: $0 N command ..." >&2; exit 2; fi
N=$1; shift
DEVICES=${DEVICES_PER_PROCESS:-4}
PORT=${JAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i
    export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES ${XLA_FLAGS:-}"
    if [[ -n "${LOG_DIR:-}" ]]; then
      mkdir -p "$LOG_DIR"; exec "$@" >"$LOG_DIR/process-$i.log" 2>&1
    else
      set -o pipefail; "$@" 2>&1 | sed -u "s/^/[p$i] /"
    fi
  ) &
  pids+=($!)
done

# One failed process would leave the others waiting on collectives: stop them all.
status=0
for p in "${pids[@]}"; do
  if ! wait "$p"; then status=1; cleanup; fi
done
exit $status
