"""Full-ranking evaluation: the eval step, the `Evaluator` of one split, and group metrics.

The eval step asks the model for its ranking states (`Recommender.ranking_states`) and counts,
for each target, the items scoring above it and those tied with it
(`metrics.target_rank_counts_chunked`, chunk by chunk over the catalogue, so memory is
O(batch x chunk) for any N); the host turns them into metrics under `config.eval.ties` (by
default the exact expectation under random tie-breaking, so ties never reward a model). Every
example is counted once (padding rows of the last batch are masked). `group_masks` is the one
definition of the report's groups (head/tail target items, short/long users); results.json and
the experiment suites both use it.

New items (`cold_start_items`: `PreparedDataset.new_items`): every val/test target is a new item.
The step also counts the target's rank among the new items only (the same chunked count over the
new items' rows, `protocols.new_item_rank_counts` in a scan); results.json reports it as the
'new_items' group of `test_groups` (and val's 'new_items/<metric>'). The new items' ID rows are
what a model that never saw them has (`new_item_params`): zero for text-map pipelines (as serving
places a new item: its text row, no ID), the initial rows for free-row pipelines (LLMInit: its
text-derived initialisation; SASRec-ID: untrained random rows, so it ranks new items at random).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alphafuse_jax import builders
from alphafuse_jax import data as data_lib
from alphafuse_jax import files
from alphafuse_jax import metrics as metrics_lib
from alphafuse_jax import parallel
from alphafuse_jax.embeddings import base as emb_base
from alphafuse_jax.embeddings import registry
from alphafuse_jax.models import base

# The groups of every report, in table order ('overall' is every example).
GROUPS = ('overall', 'tail_items', 'head_items', 'short_users', 'long_users')
# cold_start_items: the test_groups key (and val's key prefix) of the rank among new items only.
NEW_ITEMS = 'new_items'


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


def rank_columns(sampled: bool, new_items: bool) -> tuple[str, ...]:
  """The names of the eval step's output columns, in order (see `make_eval_step`)."""
  return (('rank', 'ties') + (('sampled_rank', 'sampled_ties') if sampled else ())
          + (('new_rank', 'new_ties') if new_items else ()))


def make_eval_step(model, *, chunk_size: int, sampled_negatives: int = 0,
                   sampled_key: jax.Array | None = None, new_items: np.ndarray | None = None,
                   sharded_items: bool = False):
  """Per-device eval step: ranking states -> the target's rank among all N items.

  `batch` holds history [b, L], target [b], index [b] (the row's index in the split, which seeds
  any sampling noise of the model, e.g. DreamRec's) and optionally seen [b, S] (excluded items).
  The step returns int32 [b, C], the columns of `rank_columns`: the full-ranking rank (1 + items
  strictly above the target) and the items tied with it. With `sampled_negatives` K > 0 it adds
  the rank and ties among the target and K negatives drawn from `fold_in(sampled_key, row index)`
  (the same negatives at every evaluation), excluding the history (and seen items when excluded);
  that opt-in path scores the whole catalogue at once. With `new_items` (bool [N]; every target
  must be one) it adds the rank and ties among the new items only: the same chunked count over
  the new items' rows of the table (M of them, so O(b x chunk) memory again).

  `sharded_items`: the table [R, h] (R >= N, rows past N zero padding) is sharded over the 'model'
  mesh axis (`parallel`): each device counts the items of its own shard, chunk by chunk, and one
  psum over 'model' merges the counts; no device ever holds the [b, N] scores or the whole table.
  """
  num_items = model.item_embedding.num_items if sharded_items else None  # N (rows past: padding).
  if new_items is not None:
    new_ids = np.flatnonzero(new_items).astype(np.int32)  # [M]
    # Item id (or pad id N) -> its index among the new items; M (ignored) for the others.
    new_index = np.full(new_items.shape[0] + 1, new_ids.size, np.int32)
    new_index[new_ids] = np.arange(new_ids.size, dtype=np.int32)

  def eval_step(params, table, batch):
    states = model.apply({'params': params}, batch['history'], batch['index'],
                         method='ranking_states')
    exclude = batch.get('seen')
    if sharded_items:
      above, ties = _sharded_rank_counts(states, table, batch['target'], exclude,
                                         num_items=num_items, chunk_size=chunk_size)
      table = table[:num_items]  # The paths below are GSPMD-partitioned.
    else:
      above, ties = metrics_lib.target_rank_counts_chunked(
          states, table, batch['target'], exclude, chunk_size=min(chunk_size, table.shape[0]))
    columns = [above + 1, ties]
    if sampled_negatives:
      history = batch['history'] if exclude is None else jnp.concatenate(
          [batch['history'], exclude], axis=1)
      keys = jax.vmap(jax.random.fold_in, (None, 0))(sampled_key, batch['index'])
      columns += metrics_lib.sampled_target_ranks(
          states @ table.T, batch['target'], keys, sampled_negatives, exclude=history,
          with_ties=True)
    if new_items is not None:
      index = jnp.asarray(new_index)
      # Exclusions (pad-filled with N) map to new-item indices; old items map to M (ignored).
      new_exclude = None if exclude is None else jnp.where(
          (exclude >= 0) & (exclude < table.shape[0]),
          index[jnp.clip(exclude, 0, table.shape[0])], new_ids.size)
      new_above, new_ties = metrics_lib.target_rank_counts_chunked(
          states, jnp.take(table, jnp.asarray(new_ids), axis=0), index[batch['target']],
          new_exclude, chunk_size=min(chunk_size, new_ids.size))
      columns += [new_above + 1, new_ties]
    return jnp.stack(columns, axis=1).astype(jnp.int32)

  return eval_step


def _sharded_rank_counts(states, table, targets, exclude, *, num_items: int, chunk_size: int):
  """`metrics.target_rank_counts_chunked` on a table sharded over 'model': per-shard counts
  (`metrics.shard_rank_counts_chunked`) summed by a psum over 'model'."""
  targets = targets.astype(jnp.int32)
  target_score = jnp.einsum('bh,bh->b', states, jnp.take(table, targets, axis=0))
  rest = () if exclude is None else (exclude,)

  def local(states, shard, score, targets, *rest):
    above, tied = metrics_lib.shard_rank_counts_chunked(
        states, shard, score, targets, rest[0] if rest else None,
        offset=parallel.item_shard_offset(shard.shape[0]), num_items=num_items,
        chunk_size=chunk_size)
    return jax.lax.psum(above, parallel.MODEL_AXIS), jax.lax.psum(tied, parallel.MODEL_AXIS)

  whole = jax.sharding.PartitionSpec()
  rows = jax.sharding.PartitionSpec(parallel.MODEL_AXIS)
  specs = (whole, rows, whole, whole) + (whole,) * len(rest)
  above, tied = parallel.over_items(local, specs, (whole, whole))(
      states, table, target_score, targets, *rest)
  is_nan = jnp.isnan(target_score)
  return jnp.where(is_nan, num_items - 1, above), jnp.where(is_nan, 0, tied)


def popularity_rank_counts(train_item_counts: np.ndarray, targets: np.ndarray,
                           seen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The popularity ranker's (rank, ties) per example: items ordered by train interactions.

  rank = 1 + the items with more train interactions than the target, ties = the other items with
  as many (so the `ties` rules apply as to a model's scores). `seen` (a padded id list [n, S],
  entries outside 0..N-1 ignored, repeats counted once) is excluded as the evaluation excludes it;
  the target itself never is. O(n S + N log N), no [n, N] array.
  """
  counts = np.asarray(train_item_counts)
  targets = np.asarray(targets, np.int64)
  ordered = np.sort(counts)
  c = counts[targets]
  right = np.searchsorted(ordered, c, 'right')
  above = counts.size - right
  ties = right - np.searchsorted(ordered, c, 'left') - 1
  if seen is not None and seen.size:
    # In row blocks: the temporaries are a few [rows, S] arrays, not [n, S] (at 2 x 10^5 examples
    # with long histories those are gigabytes each).
    for lo in range(0, len(targets), _POPULARITY_ROWS):
      hi = lo + _POPULARITY_ROWS
      block = np.sort(np.asarray(seen[lo:hi], np.int64), axis=1)
      first = np.ones(block.shape, bool)
      first[:, 1:] = block[:, 1:] != block[:, :-1]
      valid = first & (block >= 0) & (block < counts.size) & (block != targets[lo:hi, None])
      block_counts = counts[np.clip(block, 0, counts.size - 1)]
      above[lo:hi] -= np.sum(valid & (block_counts > c[lo:hi, None]), axis=1)
      ties[lo:hi] -= np.sum(valid & (block_counts == c[lo:hi, None]), axis=1)
  return (above + 1).astype(np.int64), ties.astype(np.int64)


_POPULARITY_ROWS = 4096  # Examples per block of `popularity_rank_counts`' seen-item pass.


def new_item_params(params: Any, new_items: np.ndarray, initial: Any | None = None) -> Any:
  """`params` with the new items' rows of every `id_table` [N + 1, ...] replaced.

  A new item was never a target nor in a history, so its ID rows hold no knowledge; what they
  hold after training is only the optimiser's weight decay. They become `initial`'s rows (the
  same tree at initialisation) or, with `initial` None, zeros (as `serving.extend_model` places a
  new item: its text row and a zero ID row). Other leaves are returned as they are.
  """
  keep = ~np.append(np.asarray(new_items, bool), False)  # The pad row is kept.
  rows = keep.shape[0]

  def reset(path, leaf, *start):
    # Tables sharded over a 'model' axis have extra zero rows past the pad row: kept as well.
    if not parallel.is_item_table(path) or leaf.shape[0] < rows:
      return leaf
    fill = start[0] if start else jnp.zeros_like(leaf)
    mask = jnp.asarray(np.pad(keep, (0, leaf.shape[0] - rows), constant_values=True))
    return jnp.where(mask.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf, fill)

  trees = (params,) if initial is None else (params, initial)
  return jax.tree_util.tree_map_with_path(reset, *trees)


def initial_params(model, config: ml_collections.ConfigDict) -> Any:
  """The params `train.init_params` starts the run of `config.train.seed` from (same key split)."""
  init_key, _ = jax.random.split(jax.random.key(config.train.seed))
  history = jnp.full((1, model.max_len), model.item_embedding.num_items, jnp.int32)
  return model.init(base.rng_streams(init_key) | {'params': init_key}, history,
                    method='init_all')['params']


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
    self.dp, self.dataset = dp, dataset
    self.batch_size = config.eval.batch_size
    self.exclude_seen = config.eval.exclude_seen
    self.ks = tuple(config.eval.ks)
    self.ties = config.eval.ties  # How tied ranks count (metrics.summarize_ranks).
    self.head_fraction = config.eval.head_fraction
    self.short_history = config.eval.short_history
    # Sampled metrics (opt-in): their negatives come from a fixed key of their own.
    self.sampled_negatives = int(config.eval.sampled_negatives)
    # cold_start_items: the new items (every target is one), ranked among themselves too.
    self.new_items = None if dataset.new_items is None else np.asarray(dataset.new_items, bool)
    self._use_split(split)
    self._initial = None  # The new items' ID rows at init, for free-row pipelines.
    if self.new_items is not None:
      if not registry.get_pipeline(config.embedding.pipeline).text_map:
        self._initial = initial_params(model, config)
    self.columns = rank_columns(bool(self.sampled_negatives), self.new_items is not None)
    step = make_eval_step(model, chunk_size=config.eval.item_chunk_size,
                          sampled_negatives=self.sampled_negatives,
                          sampled_key=jax.random.key(config.eval.sampled_seed),
                          new_items=self.new_items, sharded_items=dp.sharded_items)
    table = lambda p: model.apply({'params': p}, deterministic=True, method='item_table')
    if dp.sharded_items:
      # Frozen tables as sharded arguments; the scoring table padded and sharded like them.
      tables, frozen = builders.frozen_item_tables(dp, model)
      step = emb_base.with_frozen_args(step, tables)
      padded = lambda p: emb_base.pad_rows(table(p), dp.model_shards)
      table_fn = jax.jit(emb_base.with_frozen_args(padded, tables),
                         out_shardings=dp.item_table_sharding())
      self._table = lambda p: table_fn(frozen, p)
      mapped = dp.map(step, ('replicated',) * 3 + ('sharded',), 'sharded')
      self._step = lambda *args: mapped(frozen, *args)
    else:
      self._table = jax.jit(table)
      self._step = dp.map(step, ('replicated', 'replicated', 'sharded'), 'sharded')

  def _use_split(self, split: str) -> None:
    """The split's arrays, and its pass record from zero."""
    if split not in self.dataset.splits:
      raise ValueError(f'no split {split!r} to evaluate; the dataset has '
                       f'{sorted(self.dataset.splits)}.')
    self.split = split
    # The last pass: [n, len(columns)], the columns of `rank_columns`.
    self.last_ranks: np.ndarray | None = None
    # Steady-state speed: the first pass (which compiles) is not counted.
    self.seconds = 0.0
    self.examples = 0
    self._passes = 0
    self.arrays = _eval_arrays(self.dataset, split, self.exclude_seen)
    if self.new_items is not None and not self.new_items[np.asarray(self.arrays['target'])].all():
      raise ValueError(f'the {split} split of a dataset with new items has old-item targets; '
                       'only cold_start_items val/test splits (all targets new) rank new items.')

  def for_split(self, split: str) -> Evaluator:
    """This evaluator on another split of its dataset, running the programs this one compiled
    (a new `Evaluator` would trace and compile the same eval step again)."""
    other = copy.copy(self)
    other._use_split(split)  # pylint: disable=protected-access
    return other

  def ranks(self, params) -> np.ndarray:
    """Every example's ranks, in split order: int [n, len(self.columns)] (`rank_columns`).

    rank = 1 + the items scoring strictly above the target; ties = the items tied with it.
    """
    start = time.perf_counter()
    host_params = params if self.dp.mode == 'shard_map' else self.dp.unreplicate(params)
    if self.new_items is not None:
      # The new items' ID rows as a model that never saw them (module docstring).
      host_params = new_item_params(host_params, self.new_items, self._initial)
      params = host_params if self.dp.mode == 'shard_map' else self.dp.replicate(host_params)
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
    width = (len(self.columns),)
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

  def _summary(self, ranks: np.ndarray, name: str) -> dict[str, float]:
    """`summarize_ranks` of the columns '<name>rank' and '<name>ties' of every example."""
    rank, ties = self.columns.index(f'{name}rank'), self.columns.index(f'{name}ties')
    return metrics_lib.summarize_ranks(ranks[:, rank], ks=self.ks, ties=ranks[:, ties],
                                       rule=self.ties)

  def evaluate(self, params, groups: bool = False) -> dict[str, Any]:
    """Full-ranking metrics; with `groups`, {group: metrics} for `GROUPS` ('sampled' when on).

    With new items, the rank among them: {'new_items/<metric>': value} beside the metrics, and
    with `groups` the group NEW_ITEMS (every example, ranked among the new items only).
    """
    ranks = self.ranks(params)
    if not groups:
      result = self._summary(ranks, '')
      if self.new_items is not None:
        result.update({f'{NEW_ITEMS}/{k}': v for k, v in self._summary(ranks, 'new_').items()})
      return result
    masks = self.group_masks()
    result = group_metrics(ranks[:, 0], masks, self.ks, ties=ranks[:, 1], rule=self.ties)
    if self.sampled_negatives:
      sampled = self.columns.index('sampled_rank')
      result['sampled'] = group_metrics(ranks[:, sampled], masks, self.ks,
                                        ties=ranks[:, sampled + 1], rule=self.ties)
    if self.new_items is not None:
      result[NEW_ITEMS] = self._summary(ranks, 'new_')
    return result

  def popularity(self) -> dict[str, float]:
    """The popularity ranker's metrics on this split (the baseline a model must beat), with the
    same exclusions and tie rule as the model's."""
    rank, ties = popularity_rank_counts(self.dataset.train_item_counts,
                                        self.arrays['target'], self.arrays.get('seen'))
    return metrics_lib.summarize_ranks(rank, ks=self.ks, ties=ties, rule=self.ties)

  def save_ranks(self, path: str) -> None:
    """Writes the last pass's ranks and ties with each example's target and position (npz).

    `rank` is 1 + the items strictly above the target and `ties` the items tied with it, so the
    metrics of results.json are `summarize_ranks(rank, ties=ties, rule=config.eval.ties)`.
    """
    arrays = self.dataset.splits[self.split]
    out = {'target': np.asarray(arrays['target'], np.int32),
           'user_id': np.asarray(arrays['user_id'], np.int32),
           'position': np.asarray(arrays['position'], np.int32)}
    # rank, ties, and sampled_rank/sampled_ties, new_rank/new_ties when on (`rank_columns`).
    out.update({name: self.last_ranks[:, i] for i, name in enumerate(self.columns)})
    files.atomic_write(path, lambda f: np.savez(f, **out), mode='wb')
