"""A shrunken config for tests and smoke runs: MovieLens-100K, small model, one epoch.

Command:
  python -m alphafuse_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
Runtime: seconds of training after the data and MiniLM embeddings are cached.
"""

import os
import sys

from ml_collections import config_dict

# Config files are loaded by path; make `configs` importable from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default as _default  # pylint: disable=g-import-not-at-top


def get_config() -> config_dict.ConfigDict:
  """The default config shrunk for tests and smoke runs: ML-100K, 32 wide, one epoch.

  Command:
    python -m alphafuse_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
  Runtime: seconds of training after the data and MiniLM embeddings are cached.
  """
  config = _default.get_config()
  config.data.source = 'ml-100k'
  # Small model: 32 wide, 16 ID dims in the null space.
  config.embedding.hidden_dim = 32
  config.embedding.null_dim = 16
  config.train.batch_size = 64
  config.train.num_negatives = 8
  config.train.num_epochs = 1
  config.train.checkpoint_every_steps = 0
  config.eval.batch_size = 256
  config.progress_bar = False
  return config
