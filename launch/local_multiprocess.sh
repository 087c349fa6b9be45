#!/usr/bin/env bash
# Usage: launch/local_multiprocess.sh N CONFIG WORKDIR [extra blip-jax train flags...]
#
# Runs one `blip-jax train` job as N processes on this machine (127.0.0.1), connected through
# jax.distributed (--coordinator/--num_processes/--process_id) with gloo CPU collectives
# (--cpu_collectives): a localhost rehearsal of a multi-host job. Every process runs the same
# command; process 0 writes metrics.jsonl, TensorBoard events and the JSON summary.
#
#   launch/local_multiprocess.sh 2 configs/blip2_stage1.py:tiny /tmp/mp --config.total_steps=10
#
# Environment:
#   BLIP_JAX_TRAIN      command to run (default: `blip-jax train`, else `python -m blip_jax.cli train`)
#   LOCAL_DEVICES       CPU devices per process (default 1; sets --xla_force_host_platform_device_count)
#   COORDINATOR_PORT    coordinator port on 127.0.0.1 (default: a free port)
#   LOG_DIR             where process i's output goes, as process_<i>.log (default: WORKDIR/logs);
#                       process 0 also prints to this terminal
# The script waits for every process and exits with the first non-zero status; if one process
# fails, the others are stopped (a jax.distributed job cannot continue without a member).
# Needs bash >= 5.1 (wait -n -p).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
N=$1; CONFIG=$2; WORKDIR=$3; shift 3
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "N must be a positive integer, got '$N'" >&2; exit 2; fi

if [[ -n "${BLIP_JAX_TRAIN:-}" ]]; then
  read -r -a TRAIN <<< "$BLIP_JAX_TRAIN"
elif command -v blip-jax >/dev/null 2>&1; then
  TRAIN=(blip-jax train)
else
  TRAIN=(python -m blip_jax.cli train)
fi
PORT=${COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
mkdir -p "$WORKDIR" "$LOG_DIR"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="--xla_force_host_platform_device_count=${LOCAL_DEVICES:-1} ${XLA_FLAGS:-}"

# each process in its own process group, so that stopping it stops its children too
set -m
pids=()
stop() { kill -TERM -- "-$1" 2>/dev/null || kill -TERM "$1" 2>/dev/null || true; }
trap 'for pid in "${pids[@]}"; do stop "$pid"; done; exit 130' INT TERM

for ((i = 0; i < N; i++)); do
  cmd=("${TRAIN[@]}" --config="$CONFIG" --workdir="$WORKDIR" --coordinator="127.0.0.1:$PORT"
       --num_processes="$N" --process_id="$i" --cpu_collectives "$@")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" > >(tee "$LOG_DIR/process_$i.log") 2>&1 &
  else
    "${cmd[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
remaining=("${pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  # wait for whichever process ends first; on a failure, stop the rest
  set +e
  wait -n -p done_pid "${remaining[@]}"
  rc=$?
  set -e
  if [[ -z "${done_pid:-}" ]]; then  # `wait` leaves it unset when no listed job is left
    # bash already reaped what was left (processes stopped after a failure can leave its job table
    # before `wait` asks): nothing more to wait for
    [[ $status -eq 0 ]] && status=$rc
    break
  fi
  next=()
  for pid in "${remaining[@]}"; do [[ "$pid" != "$done_pid" ]] && next+=("$pid"); done
  remaining=("${next[@]+"${next[@]}"}")
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "local_multiprocess: a process exited with status $rc; stopping the others (logs: $LOG_DIR)" >&2
    for pid in "${remaining[@]+"${remaining[@]}"}"; do stop "$pid"; done
  fi
done
wait  # process 0's tee
exit $status
