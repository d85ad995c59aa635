"""SASRec on MovieLens-1M with the literature's leave-one-out protocol and seen items excluded.

Command:
  python -m alphafuse_jax.main --config=configs/leave_one_out.py --workdir=workdirs/loo
Literature (SASRec+ with full CE / gSASRec, HR@10 / NDCG@10): 0.3152 / 0.1821 and 0.3003 / 0.1726.
Training: every position predicts its next item (full-softmax CE), with the block Kang &
McAuley's code computes ('kang_code') and SASRec+'s N(0, 0.02) item and position tables, no
weight decay, and dropout 0.2 for SASRec-ID (0.1 for the text pipelines): chosen on
validation over the paper's pre-LN block (BENCHMARKS.md, "Tuning
SASRec-ID"). Measured results and runtimes are in the get_config docstring.
"""

import os
import sys

from ml_collections import config_dict

# Config files are loaded by path; make `configs` importable from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alphafuse_jax.embeddings import registry  # pylint: disable=g-import-not-at-top
from configs import default as _default  # pylint: disable=g-import-not-at-top


def get_config(pipeline: str = 'id') -> config_dict.ConfigDict:
  """SASRec (Kang & McAuley's code block, full CE) on ML-1M leave-one-out, seen items excluded.

  Command:
    python -m alphafuse_jax.main --config=configs/leave_one_out.py --workdir=workdirs/loo
  Expected (measured 2026-12-01, SASRec-ID): test HR@10 0.3205 / NDCG@10 0.1838 with seed 22
  (best epoch 59 of 79), 0.3197 / 0.1839 with seed 23 (60 of 80): 0.3201 / 0.1839 over the two
  (literature, SASRec+ with full CE: 0.3152 / 0.1821). BENCHMARKS.md, "Tuning SASRec-ID toward
  the literature's 0.1821". Runtime: 45 s an epoch on 2 host devices of a 2-core CPU beside
  another run, about an hour in all (AlphaFuse: 66-161 best epochs, 1-2.2 hours).

  Args:
    pipeline: config.embedding.pipeline (default 'id', the literature's SASRec).
  """
  config = _default.get_config()
  config.data.protocol = 'leave_one_out'
  config.data.max_len = 200
  config.embedding.pipeline = pipeline
  # SASRec+'s code (Klenitskiy & Vasilev 2023, the 0.1821 row): N(0, 0.02) item table and
  # positions. N(0, 1) items (the AlphaFuse reference's default) make the shared output logits
  # ~100 wide (epoch-1 val NDCG@20 0.0047); N(0, 1) positions, PyTorch's default, are ~4x the
  # scaled item rows at init. With the paper's pre-LN block, Xavier items and N(0, 1) positions,
  # seed 22 reached val NDCG@20 0.2178 at epoch 110; with these and kang_code, 0.2148 by epoch 19.
  config.embedding.id_init = 'normal_0.02'
  config.model.position_init_std = 0.02
  # The same block takes AlphaFuse's whitened rows (unit variance per dim) x sqrt(h) at its input
  # and scores with them; language_scale shrinks them. Chosen on val NDCG@20 after 3 epochs
  # (AlphaFuse, seed 22, this config, 2026-12-01): 0.1386 at 0.02 (the ID table's scale), 0.1385
  # at 0.05, 0.1320 at 0.01, 0.1003 at 0.1 (the choice for the paper's block and Xavier rows).
  # LLMInit's table starts there too (the other pipelines refuse the knob).
  if pipeline in registry.LANGUAGE_SCALE_PIPELINES:
    config.embedding.language_scale = 0.02
  # h = 128: with this block, val NDCG@20 0.2232 (seed 22) against h = 64's 0.2181 (seed 22) and
  # 0.2187 (seed 23). The literature's ML-1M width is 64.
  config.embedding.hidden_dim = 128
  # The block Kang & McAuley's code computes (residuals on the normalised inputs), which the
  # literature's numbers come from; the paper's pre-LN formula ('standard') lost on validation.
  config.model.block = 'kang_code'
  config.model.num_blocks = 2
  config.model.num_heads = 1
  # SASRec-ID: chosen on seed 22's validation with this block, val NDCG@20 0.2249 at 0.2 against
  # 0.2232 at 0.1 (with the paper's block 0.1 had won, 0.2178 against 0.2151). The text pipelines
  # keep 0.1, untuned: their leave-one-out cells ran with it, and a tuned baseline only makes
  # their comparison harder.
  config.model.dropout_rate = 0.2 if pipeline == 'id' else 0.1
  # No weight decay, as SASRec+'s Adam.
  config.train.l2 = 0.0
  config.train.loss = 'ce'
  config.train.batch_size = 128
  config.train.num_epochs = 200
  config.train.patience = 20
  config.eval.exclude_seen = True
  # Short users for LLM-ESR's split (`seq_len < ts_user`): its default ts_user = 10 makes no
  # ML-1M leave-one-out user short (every test target has at least 17 items before it), and its
  # scripts set the threshold per dataset. 40 makes the shortest 22% of the test users short
  # (1,354 of 6,040; the 20th percentile is 36 items).
  config.eval.short_history = 40
  return config
