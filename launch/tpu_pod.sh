#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra blip-jax train flags...]
#
# Runs one `blip-jax train` job on every worker of a Cloud TPU VM pod slice (e.g. v4-32, v5p-64):
#   1. packs this repository (without .git / virtual environments) and copies it to every worker
#      (gcloud compute tpus tpu-vm scp --worker=all),
#   2. on every worker: unpacks it into REMOTE_DIR, creates REMOTE_DIR/.venv and runs
#      `pip install -e . jax[tpu]`,
#   3. runs the same command on all workers at once (gcloud compute tpus tpu-vm ssh --worker=all):
#        blip-jax train --config=CONFIG --workdir=WORKDIR --distributed [extra flags]
#      `--distributed` calls jax.distributed.initialize() without arguments: on a TPU pod the TPU
#      runtime's environment names the coordinator, the process count and each worker's index.
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/blip2_stage2_opt.py:vitg_opt2.7b /mnt/shared/runs/opt \
#       --config.model.init_from=/mnt/shared/models/blip2-opt-2.7b
#
# WORKDIR (and model.init_from) must be one directory that every worker sees: all processes write
# their shards of each Orbax checkpoint into it (e.g. a Filestore NFS share or a gcsfuse-mounted
# bucket, mounted at the same path on every worker). CONFIG is a path relative to the repository.
# Rerunning the command resumes from the latest complete checkpoint in WORKDIR.
#
# Environment:
#   PROJECT        gcloud project (default: gcloud's configured one)
#   REMOTE_DIR     where the repository goes on the workers (default: blip-jax, under the home directory)
#   JAX_TPU        pip requirement for JAX on TPU (default: jax[tpu])
#   SKIP_SETUP=1   skip steps 1-2 (the code and its venv are already on the workers)
#   SETUP_ONLY=1   stop after step 2
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
TPU=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REMOTE_DIR=${REMOTE_DIR:-blip-jax}
JAX_TPU=${JAX_TPU:-jax[tpu]}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && COMMON+=(--project="$PROJECT")

quote() { printf '%q ' "$@"; }

if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
  archive=$(mktemp -d)/blip-jax.tar.gz
  tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=venv --exclude='*.egg-info' --exclude=__pycache__ \
    -czf "$archive" .
  echo "copying $(du -h "$archive" | cut -f1) to every worker of $TPU" >&2
  "${GCLOUD[@]}" scp "$archive" "$TPU":blip-jax.tar.gz "${COMMON[@]}"
  setup="set -euo pipefail; mkdir -p $(quote "$REMOTE_DIR"); tar -xzf ~/blip-jax.tar.gz -C $(quote "$REMOTE_DIR");"
  setup+=" cd $(quote "$REMOTE_DIR"); python3 -m venv .venv; .venv/bin/pip install -q -U pip;"
  setup+=" .venv/bin/pip install -q -e . $(quote "$JAX_TPU")"
  "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --command="$setup"
fi
[[ "${SETUP_ONLY:-0}" == 1 ]] && exit 0

run="cd $(quote "$REMOTE_DIR") && exec .venv/bin/blip-jax train $(quote --config="$CONFIG" --workdir="$WORKDIR" --distributed "$@")"
echo "running on every worker: $run" >&2
# every worker's output is streamed back; the command fails if any worker's does
"${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --command="$run"
