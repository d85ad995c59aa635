#!/usr/bin/env bash
# The experiment suite: every pipeline x seed (finished cells skipped), then the tables and plots.
# Usage: bash launch/experiments.sh --suite=ml1m_sasrec [--seeds=22,23,24] [--pipelines=alphafuse,id]
#        [--report_only] [--publish_dir=docs/experiments]
# Suites: ml1m_sasrec (8 pipelines x 3 seeds, about 3.5 hours on 2 CPU cores; LLM-ESR and UniSRec
# take most of it), null_dim_sweep, smoke.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec python -m alphafuse_jax.experiments "$@"
