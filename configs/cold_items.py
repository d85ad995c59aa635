r"""The cold-start-items suite's cell: does freezing the semantic row space place new items well?

Command (every row x seeds 22, 23, 24, skipping finished cells, then the table and the plot):
  python -m alphafuse_jax.experiments --suite=ml1m_cold_items --publish_dir=docs/cold_items
One cell by hand (a trained row, or the text-only ranker, which trains nothing):
  python -m alphafuse_jax.main --config=configs/cold_items.py:alphafuse --workdir=workdirs/ci
  python -m alphafuse_jax.experiments.text_ranker --config=configs/cold_items.py:text_only \
      --workdir=workdirs/ci_text

Protocol (`cold_start_items`, data/protocols.py): the newest 10% of ML-1M's items by first
interaction (370 of 3,706) are new; training never sees them (not as targets, not in histories,
not in the training softmax, not in the decomposition's moments); validation and test are the
positions whose target is a new item, split by user: 7,817 val and 7,350 test examples (968,146
train examples from all 6,040 users). Ranking is over all 3,706 items; results.json adds the
rank among the 370 new items only (`test_groups.new_items`).

Every trained row keeps configs/suite.py's settings (the default config: full-softmax CE, lr 1e-3,
batch 256, hidden 128, one reference block; LLM-ESR without self-distillation), so the rows differ
only in their item embeddings, at an equal budget of NUM_EPOCHS epochs.
"""

import os
import sys

from ml_collections import config_dict

# Config files are loaded by path; make `configs` (and a checkout's `alphafuse_jax`) importable
# from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import suite as _suite  # pylint: disable=g-import-not-at-top

# The rows in table order: the text-map pipelines, LLMInit (its new rows are its initial,
# text-derived rows: flagged in the report), the untrained text-only ranker, and SASRec-ID (its
# new rows are untrained random rows: the random-level sanity check).
ROWS = ('alphafuse', 'morec', 'whitenrec', 'unisrec', 'llmesr', 'llminit', 'text_only', 'id')
# The row that trains nothing (alphafuse_jax/experiments/text_ranker.py ranks it).
TEXT_ONLY = 'text_only'
# Epochs per trained cell: the suite's equal budget. One epoch (968k examples) fits the CPU
# budget of the whole suite (configs/suite.py's 3 epochs would take about 4 hours here).
NUM_EPOCHS = 1


def get_config(row: str = 'alphafuse') -> config_dict.ConfigDict:
  """One ML-1M cold-start-items cell: configs/suite.py's `row` on the cold_start_items split.

  Command (every row x seeds 22-24, then the table and the plot; or one cell by hand):
    python -m alphafuse_jax.experiments --suite=ml1m_cold_items --publish_dir=docs/cold_items
    python -m alphafuse_jax.main --config=configs/cold_items.py:ROW --workdir=workdirs/ci

  Args:
    row: one of `ROWS`: a SASRec item pipeline, or 'text_only'.
  """
  if row not in ROWS:
    raise ValueError(f'cold_items.py:{row}: the row must be one of {ROWS}.')
  # The text-only ranker reads the raw scaled MiniLM vectors, which is MoRec's input table.
  config = _suite.get_config('morec' if row == TEXT_ONLY else row)
  # New items: the newest 10% of the items by first interaction; never seen in training.
  config.data.protocol = 'cold_start_items'
  # The newest fraction of the catalogue that is new (issue #16's 10%).
  config.data.new_item_fraction = 0.1
  # Half the users' new-item examples are validation: 7,817 val / 7,350 test examples instead of
  # 1,513 / 13,654 at 0.1, so the best-epoch choice rests on a steadier estimate.
  config.data.val_fraction = 0.5
  # The suite's equal training budget (see NUM_EPOCHS).
  config.train.num_epochs = NUM_EPOCHS
  return config
