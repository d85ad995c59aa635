#!/usr/bin/env bash
# Issue 20: every cell of the convergence, leave-one-out, sparse-data, variant and DreamRec suites,
# one cell at a time in priority order (the rows the conclusions need first), then each suite's
# report. Finished cells, here or archived in docs/runs/ by another machine, are skipped; an
# interrupted one resumes from its checkpoints. Commit docs/runs/ as cells finish: the workdirs
# under results/ never leave this machine.
# On a 2-core CPU (measured): a convergence cell 0.6-1.8 hours, a sparse-data cell 15-30 min, a
# leave-one-out cell 1-2 hours, a DreamRec cell up to 80 min; about 50 hours in all.
# Usage: bash launch/paper_claims.sh [--dry_run | --status]
#   --dry_run: print the cells, run nothing; --status: each suite's cells with their state
#   (finished, archived, running, interrupted at epoch E, not started), run nothing.
set -u
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
DRY=0; [ "${1:-}" = "--dry_run" ] && DRY=1
QUEUE=(  # suite pipeline seed
  "ml1m_convergence alphafuse 22" "ml1m_convergence id 22"
  "ml1m_convergence alphafuse 23" "ml1m_convergence id 23"
  "ml1m_loo id 22" "ml1m_loo id 23" "ml1m_loo alphafuse 22" "ml1m_loo alphafuse 23"
  "ml1m_sparse25 alphafuse 22" "ml1m_sparse25 id 22" "ml1m_sparse25 alphafuse 23" "ml1m_sparse25 id 23"
  "ml1m_sparse10 alphafuse 22" "ml1m_sparse10 id 22" "ml1m_sparse10 alphafuse 23" "ml1m_sparse10 id 23"
  "ml1m_loo llminit 22" "ml1m_loo llminit 23"
  "ml1m_sparse25 llminit 22" "ml1m_sparse25 llminit 23" "ml1m_sparse10 llminit 22" "ml1m_sparse10 llminit 23"
  "ml1m_convergence llminit 22" "ml1m_convergence llminit 23"
  "ml1m_convergence whitenrec 22" "ml1m_convergence whitenrec 23"
  "ml1m_anchor alphafuse_anchor_w10 22" "ml1m_anchor alphafuse_anchor_w10 23"
  "ml1m_anchor alphafuse_anchor_w1 22" "ml1m_anchor alphafuse_anchor_w1 23"
  "ml1m_anchor alphafuse_anchor_w100 22" "ml1m_anchor alphafuse_anchor_w100 23"
  "ml1m_dreamrec alphafuse 22" "ml1m_dreamrec id 22" "ml1m_dreamrec idreamrec 22"
  "ml1m_dreamrec alphafuse 23" "ml1m_dreamrec id 23" "ml1m_dreamrec idreamrec 23"
  "ml1m_dreamrec alphafuse 24" "ml1m_dreamrec id 24" "ml1m_dreamrec idreamrec 24"
)
if [ "${1:-}" = "--status" ]; then  # The queue's suites, in their first cell's order.
  for suite in $(printf '%s\n' "${QUEUE[@]}" | awk '!seen[$1]++ {print $1}'); do
    echo "== $suite"
    python -m alphafuse_jax.experiments --suite="$suite" --status || exit 1
  done
  exit 0
fi
failed=0
for entry in "${QUEUE[@]}"; do
  read -r suite pipeline seed <<< "$entry"
  if [ "$DRY" = 1 ]; then echo "$suite $pipeline $seed"; continue; fi
  echo "=== $(date -u '+%F %H:%M') $suite $pipeline seed $seed"
  python -m alphafuse_jax.experiments --suite="$suite" --pipelines="$pipeline" --seeds="$seed" \
    --spectrum=false || failed=1
done
[ "$DRY" = 1 ] && exit 0
# Every suite's report over all of its rows and seeds (finished or archived cells); the sparse
# suites twice, so that each data-thinning section reads the others' final summaries.
for suite in ml1m_sparse25 ml1m_sparse10 ml1m_convergence ml1m_sparse25 ml1m_sparse10 ml1m_loo \
             ml1m_anchor ml1m_dreamrec; do
  python -m alphafuse_jax.experiments --suite="$suite" --report_only || failed=1
done
exit "$failed"
