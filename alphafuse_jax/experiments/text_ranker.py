r"""The text-only ranker: no training; the mean history text vector against every item's.

  python -m alphafuse_jax.experiments.text_ranker --config=configs/cold_items.py:text_only \
      --workdir=DIR

A user's state is the mean of the language vectors of the items in the history (pad ids left
out); an item's score is the cosine between that mean and the item's language vector. It needs no
parameters, so a new item is placed exactly like an old one: the floor that a trained text-based
model should beat on new items. `TextRanker` meets the evaluation contract of `models.base`
(`ranking_states`, `item_table`), so `evaluation.Evaluator` ranks it with the same code, metrics,
tie rule and new-item groups as a trained run, and the workdir gets the same results.json and
test_ranks.npz (best_epoch 0, no checkpoint) for the suites' report.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from alphafuse_jax import builders
from alphafuse_jax import checkpointing
from alphafuse_jax import data as data_lib
from alphafuse_jax import errors
from alphafuse_jax import evaluation
from alphafuse_jax import files
from alphafuse_jax import losses
from alphafuse_jax import parallel
from alphafuse_jax.embeddings.base import FrozenTable
from alphafuse_jax.embeddings.base import constant
from alphafuse_jax.embeddings.base import lookup


class TextRanker(nn.Module):
  """Cosine scores between mean history language vectors and item language vectors.

  Attributes:
    language_table: frozen [N, d_l] item language vectors (any scale: cosine ignores it).
    max_len: L, the history length.
  """
  language_table: FrozenTable
  max_len: int

  @property
  def num_items(self) -> int:
    return self.language_table.num_items

  def __call__(self, history: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Unit user states [B, d_l]: the normalised mean of the history's vectors (pad rows are 0).

    An all-pad history gives a zero state: every item then ties at score 0.
    """
    del deterministic
    vectors = lookup(constant(self.language_table), history)  # [B, L, d]; the pad row is zero.
    count = jnp.sum(history != self.num_items, axis=1, keepdims=True)
    return losses.l2_normalize(jnp.sum(vectors, axis=1) / jnp.maximum(count, 1))

  def ranking_states(self, history: jax.Array, index: jax.Array) -> jax.Array:
    del index
    return self(history)

  def item_table(self, *, deterministic: bool = True) -> jax.Array:
    """Unit item vectors [N, d_l], so a state's dot product with a row is their cosine."""
    del deterministic
    return losses.l2_normalize(constant(self.language_table)[:self.num_items])


def build(config: ml_collections.ConfigDict, dataset: data_lib.PreparedDataset) -> TextRanker:
  """The ranker over the config's language vectors (`builders.load_language_embeddings`)."""
  vectors = builders.load_language_embeddings(config, dataset)
  if vectors is None:
    raise errors.ConfigError(
        f'config.embedding.pipeline={config.embedding.pipeline!r} reads no item text; the text '
        "ranker needs one that does (configs/cold_items.py:text_only uses 'morec').")
  return TextRanker(FrozenTable(vectors), dataset.max_len)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Ranks val and test with `evaluation.Evaluator`; writes results.json and test_ranks.npz."""
  start = time.perf_counter()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  dataset = data_lib.load(config.data)
  model = build(config, dataset)
  dp = parallel.DataParallel(config.parallelism)
  params = dp.replicate({}) if dp.mode == 'pmap' else {}
  val_eval = evaluation.Evaluator(dp, model, config, dataset, 'val')
  test_eval = val_eval.for_split('test')
  eval_start = time.perf_counter()  # Both passes, compilation included.
  val = val_eval.evaluate(params)
  test_groups = test_eval.evaluate(params, groups=True)
  examples = val['count'] + test_groups['overall']['count']
  results = {
      'val': val, 'test': test_groups.pop('overall'), 'test_groups': test_groups,
      'best_epoch': 0, 'epochs': 0, 'train_sequences_per_second': 0.0,
      'eval_examples_per_second': examples / (time.perf_counter() - eval_start),
      'wall_seconds': time.perf_counter() - start,
      'num_trainable_params': 0, 'devices': dp.num_devices, 'parallelism': dp.mode,
      'ranker': 'text_only: cosine(mean history language vector, item language vector)',
  }
  checkpointing.write_config_record(workdir, config)
  test_eval.save_ranks(os.path.join(workdir, 'test_ranks.npz'))
  files.write_json(os.path.join(workdir, 'results.json'), results)
  return results


def _define_flags():
  """The command's flags, defined only when it runs as a program: importing this module (the
  suites, the tests) must not claim `--config`, which main.py defines too."""
  config = config_flags.DEFINE_config_file('config', 'configs/cold_items.py:text_only',
                                           'Experiment config (data, text, eval).',
                                           lock_config=True)
  return config, flags.DEFINE_string('workdir', None, 'Where results.json and test_ranks.npz go.')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('pass --workdir=<a directory for results.json>')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    results = evaluate(_CONFIG.value, _WORKDIR.value)
  except errors.AlphafuseError as e:
    print(f'error: {errors.one_line(e)}', file=sys.stderr, flush=True)
    return 2
  rows = [('val', results['val']), ('test', results['test'])] + [
      (f'test {name}', m) for name, m in results['test_groups'].items()]
  for name, m in rows:
    print(f'{name:18s} NDCG@20 {m["NDCG@20"]:.4f}  HR@20 {m["HR@20"]:.4f}  '
          f'({int(m["count"])} examples)')
  return 0


if __name__ == '__main__':
  _CONFIG, _WORKDIR = _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
