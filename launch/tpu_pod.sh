#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker (one process per host);
# jax.distributed.initialize() finds the coordinator and process ids from the TPU metadata.
#
# Usage (from your workstation, with gcloud authenticated):
#   TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-project] bash launch/tpu_pod.sh \
#     [--config=configs/default.py] [--workdir=/mnt/shared/workdirs/pod] [--config.x=y ...]
# Env: REPO_DIR (default ~/alphafuse-jax on the workers), JAX_VERSION (default 0.10.2),
#      SKIP_SYNC=1 to reuse code already on the workers, SKIP_SETUP=1 to skip installation.
#
# Requirements and caveats:
# * --workdir must be the SAME directory on every worker (NFS/Filestore/GCS-fuse mount): every
#   process writes its part of each orbax checkpoint and process 0 writes the metadata. train.py
#   creates the workdir with os.makedirs, so a plain gs:// URL is not supported; mount it.
# * The data are prepared on every worker into its local data dir before training (the
#   processes must not race on one TFDS cache); MiniLM embeddings are cached the same way.
# * The global batch (config.train.batch_size) must be a multiple of the total TPU cores.
# * Workers ignore SIGTERM once jax.distributed is up: to stop a run, kill -9 the python processes
#   (Ctrl-C on this script does that, by the pid each worker recorded).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR="${REPO_DIR:-~/alphafuse-jax}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
source "$(dirname "${BASH_SOURCE[0]}")/_args.sh"
parse_run_args /mnt/shared/workdirs/pod "$@"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
on_all() {  # Runs a shell command on every worker of the slice, in parallel.
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"
}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUOTED_EXTRA="$(printf ' %q' "${EXTRA[@]+"${EXTRA[@]}"}")"

if [ "${SKIP_SYNC:-0}" != 1 ]; then
  echo "[tpu_pod] copying the repository to $REPO_DIR on every worker"
  tarball="$(mktemp /tmp/alphafuse-jax.XXXXXX.tar.gz)"
  git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
  "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME":/tmp/alphafuse-jax.tar.gz "${WHERE[@]}" --worker=all
  rm -f "$tarball"
  on_all "mkdir -p $REPO_DIR && tar -xzf /tmp/alphafuse-jax.tar.gz -C $REPO_DIR"
fi
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  echo "[tpu_pod] installing the venv and jax[tpu]==$JAX_VERSION on every worker"
  on_all "cd $REPO_DIR && source launch/_env.sh && python -m pip install -q 'jax[tpu]==$JAX_VERSION'"
fi
echo "[tpu_pod] preparing data on every worker"
on_all "cd $REPO_DIR && source launch/_env.sh && python -m alphafuse_jax.data --config=$CONFIG$QUOTED_EXTRA"
echo "[tpu_pod] training: $CONFIG -> $WORKDIR"
PIDFILE=/tmp/alphafuse-jax-main.pid
trap 'on_all "kill -9 \$(cat $PIDFILE) 2>/dev/null || true"' INT
# Each worker records its trainer's pid, so Ctrl-C kills exactly that process (SIGKILL).
on_all "cd $REPO_DIR && source launch/_env.sh && mkdir -p $WORKDIR && \
  bash -c 'echo \$\$ > $PIDFILE; exec python -m alphafuse_jax.main --config=$CONFIG \
  --workdir=$WORKDIR$QUOTED_EXTRA --config.distributed.enabled=true' 2>&1 \
  | tee -a $WORKDIR/worker_\$(hostname).log"
