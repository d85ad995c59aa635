#!/usr/bin/env bash
# Multi-process training on ONE machine: N processes on 127.0.0.1 (gloo collectives on CPU),
# the same code path as a multi-host job. For tests of the multi-host code and for CPU boxes.
#
# Usage: bash launch/multihost_local.sh NUM_PROCESSES [--config=configs/default.py]
#          [--workdir=workdirs/multihost] [--config.x=y ...]
# Env:   DEVICES_PER_PROCESS (default 1): CPU devices per process; PORT (default: a free one);
#        TIMEOUT (default 86400 s): wall-clock limit of the whole job.
# Logs:  WORKDIR/process_<i>.log; process 0's is also streamed to stdout.
#
# Processes ignore SIGTERM once jax.distributed is initialised, so the job is stopped with
# SIGKILL: on Ctrl-C, on timeout, and as soon as one process fails (the others would otherwise
# wait for a collective until the coordination service's heartbeat timeout). A process that
# raises still spends up to ~100 s in JAX's shutdown barrier before it exits.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/multihost_local.sh NUM_PROCESSES [--config=...] [--workdir=...] [--config.x=y ...]" >&2
  exit 2
fi
NUM=$1; shift
source "$(dirname "${BASH_SOURCE[0]}")/_args.sh"
parse_run_args workdirs/multihost "$@"
PORT="${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
mkdir -p "$WORKDIR"
# Prepare the data once, before the processes start (they would race on the TFDS cache).
python -m alphafuse_jax.data --config="$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
echo "[multihost_local] $NUM processes x ${DEVICES_PER_PROCESS:-1} CPU device(s), coordinator 127.0.0.1:$PORT, logs in $WORKDIR/process_*.log"
for ((i = 0; i < NUM; i++)); do
  : > "$WORKDIR/process_$i.log"  # Exists before `tail` below opens it.
  # setsid: each process leads its own group, so cleanup's SIGKILL reaches its children too.
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" ALPHAFUSE_CPU_DEVICES="${DEVICES_PER_PROCESS:-1}" \
    setsid timeout -s KILL "${TIMEOUT:-86400}" python -m alphafuse_jax.main \
    --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}" \
    --config.distributed.enabled=true \
    --config.distributed.coordinator_address="127.0.0.1:$PORT" \
    --config.distributed.num_processes="$NUM" --config.distributed.process_id="$i" \
    > "$WORKDIR/process_$i.log" 2>&1 &
  PIDS+=($!)
done
tail -n +1 -f "$WORKDIR/process_0.log" --pid="${PIDS[0]}" &
TAIL=$!
status=0
# Wait for the processes one by one as they end; any failure stops the others at once.
RUNNING=("${PIDS[@]}")
while [ "${#RUNNING[@]}" -gt 0 ]; do
  ENDED=
  if wait -n -p ENDED "${RUNNING[@]}"; then
    LEFT=()
    for pid in "${RUNNING[@]}"; do [ "$pid" = "$ENDED" ] || LEFT+=("$pid"); done
    RUNNING=("${LEFT[@]+"${LEFT[@]}"}")
  else
    status=$?
    echo "[multihost_local] a process failed (exit $status); stopping the others. See $WORKDIR/process_*.log" >&2
    break
  fi
done
wait "$TAIL" 2>/dev/null || true
exit "$status"
