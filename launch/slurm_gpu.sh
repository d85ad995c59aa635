#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, all started by one `srun`.
# jax.distributed.initialize() (config.distributed.enabled=true with empty fields) reads the
# coordinator, process count and process id from SLURM's environment.
#
# Usage, from the repository root (SLURM runs a copy of this file, so the job finds the repo
# through $SLURM_SUBMIT_DIR):
#   sbatch [--nodes=4] launch/slurm_gpu.sh [--config=configs/default.py]
#          [--workdir=/shared/workdirs/slurm] [--config.x=y ...]
# Edit the #SBATCH lines for your cluster (partition, account, GPUs per node, time); keep
# --ntasks-per-node equal to the GPUs per node. Every task sees all GPUs of its node and JAX
# picks GPU $SLURM_LOCALID for it (jax's SLURM cluster sets local_device_ids); binding one GPU
# per task (--gpus-per-task=1) would hide that GPU's index and fail.
#
# Requirements and caveats:
# * The repository, its .venv and --workdir must be on a filesystem shared by all nodes: every
#   process writes its part of each orbax checkpoint, process 0 the metadata.
# * .venv needs the CUDA build of JAX: `.venv/bin/python -m pip install 'jax[cuda12]==0.10.2'`
#   once, on a login node, after `bash launch/test.sh` (or launch/run.sh) has created it.
# * The data are prepared once, by this script, before `srun` starts the trainers.
# * The global batch (config.train.batch_size) must be a multiple of nodes x GPUs per node.
# * Trainers ignore SIGTERM once jax.distributed is up; `scancel --signal=KILL <jobid>` stops a
#   hung job at once (plain scancel waits for SLURM's KillWait and then sends SIGKILL).
#SBATCH --job-name=alphafuse-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
ROOT="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  echo "no .venv in $ROOT: run 'bash launch/test.sh' once on a login node, then install jax[cuda12]." >&2
  exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"
source "$ROOT/launch/_args.sh"
parse_run_args "workdirs/slurm-${SLURM_JOB_ID:-local}" "$@"
mkdir -p "$WORKDIR"
echo "[slurm_gpu] preparing data for $CONFIG"
python -m alphafuse_jax.data --config="$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}"
echo "[slurm_gpu] ${SLURM_NTASKS:-?} processes on ${SLURM_JOB_NUM_NODES:-?} node(s): $CONFIG -> $WORKDIR"
# --kill-on-bad-exit: if one trainer dies the others would wait on a collective; end them all.
srun --kill-on-bad-exit=1 --label \
  python -m alphafuse_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  "${EXTRA[@]+"${EXTRA[@]}"}" --config.distributed.enabled=true
