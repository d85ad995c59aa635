#!/usr/bin/env bash
# Parity with the authors' code on ML-1M cold-start: reference_parity.py:{alphafuse,id} x 3 seeds,
# 6 epochs each; prints one line per run and the mean test NDCG@20 per pipeline.
# Usage: [PIPELINES="alphafuse id"] bash launch/parity.sh [seeds...]   (default 22 23 24)
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
SEEDS=("${@:-22 23 24}")
[ $# -eq 0 ] && SEEDS=(22 23 24)
for pipeline in ${PIPELINES:-alphafuse id}; do
  for seed in "${SEEDS[@]}"; do
    wd="workdirs/parity_${pipeline}_s${seed}"
    rm -rf "$wd"  # A fresh run (the workdir would otherwise resume a finished one).
    python -m alphafuse_jax.main --config="configs/reference_parity.py:${pipeline}" \
      --workdir="$wd" --config.train.seed="$seed" --config.progress_bar=false > "$wd.log" 2>&1 \
      || { echo "run $wd failed; see $wd.log" >&2; exit 1; }
    python - "$wd" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + '/results.json'))
print(f"{sys.argv[1]}: test NDCG@20 {r['test']['NDCG@20']:.4f} HR@20 {r['test']['HR@20']:.4f} "
      f"best epoch {r['best_epoch']} train {r['train_sequences_per_second']:.0f} seq/s "
      f"eval {r['eval_examples_per_second'] or float('nan'):.0f} ex/s "  # null: not timed.
      f"wall {r['wall_seconds']:.0f} s")
PY
  done
done
