"""Full-ranking evaluation: the eval step, the `Evaluator` of one split, and group metrics.

The eval step asks the model for its ranking states (`Recommender.ranking_states`) and counts,
for each target, the items scoring above it and those tied with it
(`metrics.target_rank_counts_chunked`, chunk by chunk over the catalogue, so memory is
O(batch x chunk) for any N); the host turns them into metrics under `config.eval.ties` (by
default the exact expectation under random tie-breaking, so ties never reward a model). Every
example is counted once (padding rows of the last batch are masked). `group_masks` is the one
definition of the report's groups (head/tail target items, short/long users); results.json and
the experiment suites both use it.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alphafuse_jax import data as data_lib
from alphafuse_jax import files
from alphafuse_jax import metrics as metrics_lib
from alphafuse_jax import parallel

# The groups of every report, in table order ('overall' is every example).
GROUPS = ('overall', 'tail_items', 'head_items', 'short_users', 'long_users')


def group_masks(train_item_counts: np.ndarray, targets: np.ndarray, positions: np.ndarray, *,
                head_fraction: float, short_history: int) -> dict[str, np.ndarray]:
  """Boolean [n] masks of `GROUPS` for n examples.

  Head items are the `head_fraction` most interacted items in train (`metrics.item_groups`); a
  user is short at an example when fewer than `short_history` items precede its target (LLM-ESR's
  `seq_len < ts_user`).

  Args:
    train_item_counts: [N] train interactions per item.
    targets: int [n] target ids; positions: int [n] items before each target.
  """
  is_head = metrics_lib.item_groups(train_item_counts, head_fraction)
  head = is_head[np.asarray(targets)]
  short = np.asarray(positions) < short_history
  return {'overall': np.ones(head.shape, bool), 'tail_items': ~head, 'head_items': head,
          'short_users': short, 'long_users': ~short}


def group_metrics(ranks: np.ndarray, masks: Mapping[str, np.ndarray], ks: Sequence[int],
                  ties: np.ndarray | None = None, rule: str = 'expected'
                  ) -> dict[str, dict[str, float]]:
  """`metrics.summarize_ranks` (with `ties` under `rule`) of each non-empty group."""
  ranks = np.asarray(ranks)
  ties = np.zeros_like(ranks) if ties is None else np.asarray(ties)
  return {name: metrics_lib.summarize_ranks(ranks[m], ks=ks, ties=ties[m], rule=rule)
          for name, m in masks.items() if m.any()}


def make_eval_step(model, *, chunk_size: int, sampled_negatives: int = 0,
                   sampled_key: jax.Array | None = None):
  """Per-device eval step: ranking states -> the target's rank among all N items.

  `batch` holds history [b, L], target [b], index [b] (the row's index in the split, which seeds
  any sampling noise of the model, e.g. DreamRec's) and optionally seen [b, S] (excluded items).
  The step returns int32 [b, 2]: the full-ranking rank (1 + items strictly above the target) and
  the items tied with it. With `sampled_negatives` K > 0 it returns [b, 4], adding the rank and
  ties among the target and K negatives drawn from `fold_in(sampled_key, row index)` (the same
  negatives at every evaluation), excluding the history (and seen items when excluded); that
  opt-in path scores the whole catalogue at once.
  """

  def eval_step(params, table, batch):
    states = model.apply({'params': params}, batch['history'], batch['index'],
                         method='ranking_states')
    exclude = batch.get('seen')
    above, ties = metrics_lib.target_rank_counts_chunked(
        states, table, batch['target'], exclude, chunk_size=min(chunk_size, table.shape[0]))
    ranks = jnp.stack([above + 1, ties], axis=1)
    if not sampled_negatives:
      return ranks
    history = batch['history'] if exclude is None else jnp.concatenate(
        [batch['history'], exclude], axis=1)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(sampled_key, batch['index'])
    sampled, sampled_ties = metrics_lib.sampled_target_ranks(
        states @ table.T, batch['target'], keys, sampled_negatives, exclude=history,
        with_ties=True)
    return jnp.concatenate([ranks, jnp.stack([sampled, sampled_ties], axis=1)], axis=1)

  return eval_step


def _eval_arrays(dataset: data_lib.PreparedDataset, split: str, exclude_seen: bool
                 ) -> dict[str, np.ndarray]:
  """The split's arrays, plus `seen` [n, S] (pad-filled item lists) when seen items are excluded."""
  arrays = dict(dataset.splits[split])
  if exclude_seen:
    indptr, items = data_lib.seen_items(dataset, split)
    lengths = np.diff(indptr)
    width = max(int(lengths.max(initial=0)), 1)
    seen = np.full((len(lengths), width), dataset.num_items, np.int32)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(items)) - np.repeat(indptr[:-1], lengths)
    seen[rows, cols] = items
    arrays['seen'] = seen
  return arrays


class Evaluator:
  """Full-ranking evaluation of one split: every example counted exactly once."""

  def __init__(self, dp: parallel.DataParallel, model, config: ml_collections.ConfigDict,
               dataset: data_lib.PreparedDataset, split: str):
    self.dp, self.dataset, self.split = dp, dataset, split
    self.batch_size = config.eval.batch_size
    self.arrays = _eval_arrays(dataset, split, config.eval.exclude_seen)
    self.ks = tuple(config.eval.ks)
    self.ties = config.eval.ties  # How tied ranks count (metrics.summarize_ranks).
    self.head_fraction = config.eval.head_fraction
    self.short_history = config.eval.short_history
    # Sampled metrics (opt-in): their negatives come from a fixed key of their own.
    self.sampled_negatives = int(config.eval.sampled_negatives)
    self._step = dp.map(
        make_eval_step(model, chunk_size=config.eval.item_chunk_size,
                       sampled_negatives=self.sampled_negatives,
                       sampled_key=jax.random.key(config.eval.sampled_seed)),
        ('replicated', 'replicated', 'sharded'), 'sharded')
    # The last pass: [n, 2] full-ranking (rank, ties), or [n, 4] with the sampled ones.
    self.last_ranks: np.ndarray | None = None
    self._table = jax.jit(lambda p: model.apply({'params': p}, deterministic=True,
                                                method='item_table'))
    # Steady-state speed: the first pass (which compiles) is not counted.
    self.seconds = 0.0
    self.examples = 0
    self._passes = 0

  def ranks(self, params) -> np.ndarray:
    """Every example's (rank, ties), in split order: int [n, 2] ([n, 4] with sampled ones).

    rank = 1 + the items scoring strictly above the target; ties = the items tied with it.
    """
    start = time.perf_counter()
    host_params = params if self.dp.mode == 'shard_map' else self.dp.unreplicate(params)
    table = self._table(host_params)
    table = self.dp.replicate(table) if self.dp.mode == 'pmap' else table
    out, masks = [], []
    n = len(self.arrays['target'])
    local_rows = self.batch_size // jax.process_count()
    for i, batch in enumerate(data_lib.batches(
        self.arrays, self.batch_size, seed=0, epoch=0, shuffle=False,
        num_devices=self.dp.num_local_devices, process_index=jax.process_index(),
        process_count=jax.process_count())):
      mask = batch.pop('mask')
      # The row's index in the split (seeds the model's sampling noise, if any).
      index = i * self.batch_size + jax.process_index() * local_rows + np.arange(local_rows)
      batch['index'] = index.astype(np.int32).reshape(mask.shape)
      out.append(self.dp.get_sharded(self._step(params, table, self.dp.put_batch(batch))))
      masks.append(mask.reshape(-1))
    # [num_batches, local_rows] on every process (padding rows included), so the gather below
    # sees equal shapes; process_allgather requires them.
    width = (4,) if self.sampled_negatives else (2,)
    ranks = np.stack(out) if out else np.zeros((0, local_rows) + width, np.int32)
    valid = np.stack(masks) if masks else np.zeros((0, local_rows), bool)
    ranks = ranks.reshape(valid.shape + width)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      # [processes, batches, rows] -> [batches, processes, rows]: global batch b is process 0's
      # rows then process 1's..., so the flattened ranks are in split order (group metrics).
      ranks = np.asarray(multihost_utils.process_allgather(ranks)).swapaxes(0, 1)
      valid = np.asarray(multihost_utils.process_allgather(valid.astype(np.int32))
                         ).transpose(1, 0, 2).astype(bool)
    ranks = ranks.reshape((-1,) + width)[valid.reshape(-1)]
    if len(ranks) != n:
      raise RuntimeError(f'evaluation of {self.split} counted {len(ranks)} of {n} examples.')
    self._passes += 1
    if self._passes > 1:
      self.seconds += time.perf_counter() - start
      self.examples += n
    self.last_ranks = ranks
    return ranks

  def group_masks(self) -> dict[str, np.ndarray]:
    arrays = self.dataset.splits[self.split]
    return group_masks(self.dataset.train_item_counts, arrays['target'], arrays['position'],
                       head_fraction=self.head_fraction, short_history=self.short_history)

  def evaluate(self, params, groups: bool = False) -> dict[str, Any]:
    """Full-ranking metrics; with `groups`, {group: metrics} for `GROUPS` ('sampled' when on)."""
    ranks = self.ranks(params)
    if not groups:
      return metrics_lib.summarize_ranks(ranks[:, 0], ks=self.ks, ties=ranks[:, 1],
                                         rule=self.ties)
    masks = self.group_masks()
    result = group_metrics(ranks[:, 0], masks, self.ks, ties=ranks[:, 1], rule=self.ties)
    if self.sampled_negatives:
      result['sampled'] = group_metrics(ranks[:, 2], masks, self.ks, ties=ranks[:, 3],
                                        rule=self.ties)
    return result

  def save_ranks(self, path: str) -> None:
    """Writes the last pass's ranks and ties with each example's target and position (npz).

    `rank` is 1 + the items strictly above the target and `ties` the items tied with it, so the
    metrics of results.json are `summarize_ranks(rank, ties=ties, rule=config.eval.ties)`.
    """
    arrays = self.dataset.splits[self.split]
    out = {'target': np.asarray(arrays['target'], np.int32),
           'user_id': np.asarray(arrays['user_id'], np.int32),
           'position': np.asarray(arrays['position'], np.int32)}
    out['rank'], out['ties'] = self.last_ranks[:, 0], self.last_ranks[:, 1]
    if self.sampled_negatives:
      out['sampled_rank'], out['sampled_ties'] = self.last_ranks[:, 2], self.last_ranks[:, 3]
    files.atomic_write(path, lambda f: np.savez(f, **out), mode='wb')
