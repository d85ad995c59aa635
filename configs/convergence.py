"""Issue 20 items 1 and 3: SASRec pipelines on ML-1M cold-start users trained to early stopping.

The argument is `<pipeline>` or `<pipeline>,<train_user_fraction>`.

Commands (every row x seeds 22, 23, skipping finished cells, then the tables and plots):
  python -m alphafuse_jax.experiments --suite=ml1m_convergence      # all train users
  python -m alphafuse_jax.experiments --suite=ml1m_sparse25         # 25% of the train users
  python -m alphafuse_jax.experiments --suite=ml1m_sparse10         # 10% of the train users
One cell by hand:
  python -m alphafuse_jax.main --config=configs/convergence.py:id,0.1 --workdir=workdirs/conv_id

configs/suite.py's cell (the default config's settings: shuffled batches, full-softmax CE, lr 1e-3,
batch 256, hidden 128, one reference block, the same per-pipeline initialisation) with the equal
epoch budget replaced by early stopping: training stops after PATIENCE validations without a better
val NDCG@20, or at MAX_EPOCHS, and the test metrics are those of the best validation.

With a fraction f < 1 only the first f of the permuted train users are kept
(`config.data.train_user_fraction`); validation and test users are unchanged. An epoch then holds
about f of the steps, so validation runs every round(1 / f) epochs and the cap is MAX_EPOCHS times
that: a validation (and a unit of patience) comes after about one full-data epoch of steps at every
fraction.
"""

import os
import sys

from ml_collections import config_dict

# Config files are loaded by path; make `configs` (and a checkout's `alphafuse_jax`) importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import suite as _suite  # pylint: disable=g-import-not-at-top

# Early stopping: validations without a better val NDCG@20, and the epoch cap (never reached by
# any row in the runs so far; it bounds a cell's cost).
PATIENCE = 10
MAX_EPOCHS = 200


def get_config(arg: str = 'alphafuse') -> config_dict.ConfigDict:
  """`<pipeline>[,<train_user_fraction>]`: configs/suite.py's cell, trained to early stopping.

  Command (one cell; the suites ml1m_convergence, ml1m_sparse25 and ml1m_sparse10 run them all):
    python -m alphafuse_jax.main --config=configs/convergence.py:PIPELINE[,FRACTION] --workdir=W
  """
  pipeline, _, fraction = arg.partition(',')
  if pipeline not in _suite.PIPELINES + _suite.VARIANTS:
    raise ValueError(f'convergence.py:{arg}: the pipeline must be one of {_suite.PIPELINES} or '
                     f'a variant {_suite.VARIANTS}.')
  config = _suite.get_config(pipeline)
  config.train.num_epochs = MAX_EPOCHS
  config.train.patience = PATIENCE
  if fraction:
    try:
      f = float(fraction)
    except ValueError:
      raise ValueError(f'convergence.py:{arg}: the fraction {fraction!r} is not a number; write '
                       'e.g. convergence.py:id,0.1.') from None
    if not 0.0 < f <= 1.0:
      raise ValueError(f'convergence.py:{arg}: the fraction must lie in (0, 1].')
    config.data.train_user_fraction = f
    config.eval.every_epochs = max(1, round(1.0 / f))
    config.train.num_epochs = MAX_EPOCHS * config.eval.every_epochs
  return config
