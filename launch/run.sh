#!/usr/bin/env bash
# The main job on the bundled default: MovieLens-1M, cold-start users, AlphaFuse-SASRec.
# Usage: bash launch/run.sh [--config=configs/default.py] [--workdir=workdirs/default] [--config.x=y ...]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
source "$(dirname "${BASH_SOURCE[0]}")/_args.sh"
parse_run_args workdirs/default "$@"
echo "[run] preparing data for $CONFIG"
python -m alphafuse_jax.data --config="$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}"
echo "[run] training $CONFIG in $WORKDIR"
python -m alphafuse_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}"
