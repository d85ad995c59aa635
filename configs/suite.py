"""The experiment suite's cell: one SASRec item pipeline on ML-1M cold-start; the pipeline is the argument.

Command (every pipeline x seeds 22, 23, 24, skipping finished cells, then the tables and plots):
  python -m alphafuse_jax.experiments --suite=ml1m_sasrec
One cell by hand:
  python -m alphafuse_jax.main --config=configs/suite.py:morec --workdir=workdirs/suite_morec

The default config's settings (shuffled batches, full-softmax CE, lr 1e-3, batch 256, hidden 128,
one reference block) for every pipeline, so the pipelines differ only in their item embeddings,
at a CPU budget of 3 epochs per cell: about 2-4 minutes each on this 2-core machine for AlphaFuse,
ID, LLMInit, MoRec, WhitenRec and RLMRec, but about 21-26 minutes for LLM-ESR and about 30 for
UniSRec (0.186 s a step on one host device, which the suite picks for its cells: CELL_ENV in
alphafuse_jax/experiments/suites.py), so about 3.5 hours for the 24 cells (measured 2026-11-29). At 3
epochs every model is still improving (the default AlphaFuse run reaches val NDCG@20 0.113 at
epoch 3 and 0.136 at epoch 6): the suite compares pipelines at equal budget, not at convergence.

LLM-ESR is the expensive row: its step scores a 2h-wide table, adapts every history item and the
whole catalogue, and its item contrastive term is O((B L)^2) over the batch's history items; its
self-distillation is off here (see get_config).
"""

import os
import sys

from ml_collections import config_dict

# Config files are loaded by path; make `configs` (and a checkout's `alphafuse_jax`) importable
# from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alphafuse_jax.embeddings import registry  # pylint: disable=g-import-not-at-top
from configs import default as _default  # pylint: disable=g-import-not-at-top

# The eight SASRec pipelines of the paper's comparison (the authors' --model_type values), from
# the registry.
PIPELINES = registry.pipelines_for('sasrec')
# Variants beyond the paper that a cell may also run, each reported under its own name (never as
# AlphaFuse): AlphaFuse-Anchor (configs/convergence.py's ml1m_anchor suite).
VARIANTS = ('alphafuse_anchor',)
# Epochs per cell: the suite's equal training budget.
NUM_EPOCHS = 3


def get_config(pipeline: str = 'alphafuse') -> config_dict.ConfigDict:
  """One ML-1M SASRec suite cell: the default settings, `pipeline`'s item embeddings, 3 epochs.

  Command (every pipeline x seeds 22-24, then the tables and plots; or one cell by hand):
    python -m alphafuse_jax.experiments --suite=ml1m_sasrec
    python -m alphafuse_jax.main --config=configs/suite.py:PIPELINE --workdir=workdirs/suite
  Runtime (measured 2026-11-29, this 2-core machine): about 2-4 minutes a cell for AlphaFuse, ID,
  LLMInit, MoRec, WhitenRec and RLMRec, 21-26 for LLM-ESR and about 30 for UniSRec; about 3.5 hours
  for the 24 cells. Models are still improving at 3 epochs: the suite compares at equal budget.

  Args:
    pipeline: config.embedding.pipeline; one of `PIPELINES` or `VARIANTS`.
  """
  if pipeline not in PIPELINES + VARIANTS:
    raise ValueError(f'suite.py:{pipeline}: the pipeline must be one of {PIPELINES} or a '
                     f'variant {VARIANTS}.')
  config = _default.get_config()
  config.embedding.pipeline = pipeline
  # Zeros suit AlphaFuse (the ID starts as a no-op on the language table); every trainable ID
  # table of the other pipelines starts N(0, 1), the reference's --ID_embs_init_type default (a
  # pure ID table from zeros does not learn). LLMInit and LLM-ESR initialise theirs from text.
  config.embedding.id_init = 'zeros' if pipeline in ('alphafuse', 'alphafuse_anchor') else 'normal'
  if pipeline == 'whitenrec':
    # WhitenRec whitens all d_l = 384 MiniLM directions, three of which have numerically-zero
    # eigenvalues on ML-1M: clamp them as configs/dreamrec.py does (derivation there).
    config.embedding.eigenvalue_floor = 1e-3
  if pipeline == 'llmesr':
    # The AlphaFuse authors' LLMESR baseline (dual view, cross-attention, item contrastive term),
    # with their text-into-ID-view bug fixed, and without LLM-ESR's self-distillation: in this
    # protocol every one of the 805k prefix examples per epoch would run K=10 extra two-view
    # teacher passes (measured: the step 0.33 s -> 0.57 s on this CPU, already ~20x AlphaFuse's).
    config.embedding.llmesr_distill_weight = 0.0
  config.train.num_epochs = NUM_EPOCHS
  config.progress_bar = False
  return config
