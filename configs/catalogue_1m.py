r"""A catalogue of a million items, end to end on one CPU machine (issue 17's acceptance run).

Command:
  python -m alphafuse_jax.main --config=configs/catalogue_1m.py --workdir=workdirs/catalogue_1m
A smaller catalogue with the same settings (minutes; the data is generated once per size):
  python -m alphafuse_jax.main --config=configs/catalogue_1m.py:10000 --workdir=/tmp/c1e4

Data: the `synthetic` source (alphafuse_jax/data/synthetic.py) with N = 10^6 items, 384-d text
vectors, U = 200,000 users of mean length 50: 10^7 interactions, generated chunk by chunk into
`data.data_dir` on the first run (about a minute). Protocol: leave-one-out without the k-core
filter, so all N items stay (5-core would keep 17% of them), with seen items excluded: one val and
one test example per user, ranked against all N items.

Training: AlphaFuse-SASRec (k = 128 kept directions, n = 64 null dims), the sampled softmax with
K = 256 popularity negatives (logQ-corrected) plus in-batch negatives, and the row-sparse item
updates, so a step costs the same at any N; one epoch. Evaluation: full ranking over the whole
catalogue, chunked. results.json also reports the popularity ranker (`test_popularity`).
"""

import os
import sys

from ml_collections import config_dict

# Config files are loaded by path; make `configs` importable from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default as _default  # pylint: disable=g-import-not-at-top

NUM_ITEMS = 1_000_000


def get_config(num_items: str = '') -> config_dict.ConfigDict:
  """The million-item run; `num_items` (a config argument) sets another catalogue size.

  Command:
    python -m alphafuse_jax.main --config=configs/catalogue_1m.py --workdir=workdirs/catalogue_1m
  Runtime: see BENCHMARKS.md, "A million items end to end".
  """
  n = int(num_items) if num_items else NUM_ITEMS
  config = _default.get_config()
  data = config.data
  data.source = 'synthetic'
  data.protocol = 'leave_one_out'
  data.max_len = 50
  # No k-core filter: it would drop the long tail (at N = 10^6, 5-core keeps ~17% of the items).
  data.min_interactions = 0
  data.synthetic.num_items = n
  # 10^7 interactions at N = 10^6 (U x mean length); smaller N scale U with it.
  data.synthetic.num_users = max(2_000, n // 5)
  data.synthetic.mean_length = 50
  data.synthetic.text_dim = 384
  data.synthetic.num_clusters = max(100, n // 1_000)
  config.text.encoder = 'file'
  config.text.embeddings_file = ''  # Empty: the generated vectors (builders finds them).
  config.embedding.pipeline = 'alphafuse'
  config.embedding.hidden_dim = 128
  config.embedding.null_dim = 64
  config.train.loss = 'sampled_softmax'
  config.train.num_negatives = 256
  config.train.sampler = 'popularity'
  config.train.in_batch_negatives = True
  config.train.sparse_item_updates = True
  config.train.batch_size = 256
  config.train.num_epochs = 1
  config.train.checkpoint_every_steps = 200
  config.eval.exclude_seen = True
  config.eval.batch_size = 1024
  config.eval.item_chunk_size = 16_384
  config.progress_bar = False
  return config
