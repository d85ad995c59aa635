"""Full-ranking metrics: HR, NDCG and MRR at K, overall and per user/item group.

The reference (reference-spec §5) ranks the target among all N items by the raw dot product, with
no history masking, and averages per example over K in (1, 5, 10, 20, 50). We count, per example
and in O(N) without a sort, the other items scoring strictly above the target (`above`) and those
tied with it (`ties`); the target's rank is then any of above+1 .. above+ties+1. The metrics of a
rank range follow the tie rule (`config.eval.ties`, `summarize_ranks`):

  * 'expected' (default): the exact expectation of each metric when ties are broken uniformly at
    random (the rank uniform on above+1 .. above+ties+1). Ties never reward a model: identical
    item vectors score HR@K = K/N, the random baseline, not 1.
  * 'pessimistic': rank = above + ties + 1, the worst rank consistent with the scores.
  * 'optimistic': rank = above + 1, the best one (the behaviour before ties were counted).

With no tie all three are the same number. The reference breaks ties by `torch.topk`, which is
arbitrary. A NaN target score gets the worst rank N (no ties).

The evaluation loop counts with `target_rank_counts_chunked` (bounded memory for any N;
`target_ranks` is the dense definition of its ranks) and averages on the host with
`summarize_ranks`.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_KS = (1, 5, 10, 20, 50)
# Integer ranks (`target_ranks`): the two ends of a tied range.
TIE_RULES = ('optimistic', 'pessimistic')
# Metrics of a tied range (`summarize_ranks`, config.eval.ties).
METRIC_TIE_RULES = ('expected', 'pessimistic', 'optimistic')


def target_ranks(scores: Array, targets: Array, exclude: Array | None = None,
                 ties: str = 'optimistic') -> Array:
  """1-based rank of each target among all N items.

  Args:
    scores: [batch, N] item scores (higher is better).
    targets: int [batch] target ids in 0..N-1.
    exclude: optional items to drop from the ranking (e.g. already-seen items), either a padded
      index list int [batch, S] whose entries >= N (the pad id N) or < 0 are ignored, or a boolean
      mask [batch, N]. The target itself is never excluded.
    ties: 'optimistic' (ties count in the target's favour) or 'pessimistic'; see the module doc.
  Returns:
    int32 [batch] ranks in 1..N.
  """
  if ties not in TIE_RULES:
    raise ValueError(f'Unknown tie rule {ties!r}; use one of {TIE_RULES}.')
  batch, num_items = scores.shape
  targets = targets.astype(jnp.int32)
  target_score = jnp.take_along_axis(scores, targets[:, None], axis=1)
  if exclude is not None:
    scores = _apply_exclusion(scores, targets, exclude)
  if ties == 'optimistic':
    ranks = 1 + jnp.sum(scores > target_score, axis=1, dtype=jnp.int32)
  else:
    # >= counts the target itself once (its score equals target_score unless it is NaN).
    ranks = jnp.maximum(jnp.sum(scores >= target_score, axis=1, dtype=jnp.int32), 1)
  return jnp.where(jnp.isnan(target_score[:, 0]), num_items, ranks).astype(jnp.int32)


def sampled_target_ranks(scores: Array, targets: Array, keys: Array, num_negatives: int,
                         exclude: Array | None = None, *, with_ties: bool = False
                         ) -> Array | tuple[Array, Array]:
  """1-based rank of each target among itself and `num_negatives` sampled negatives.

  LLM-ESR-style sampled evaluation, for comparison with papers that report it (it is NOT
  comparable to full ranking: ranks are much smaller). Negatives are drawn uniformly WITHOUT
  replacement from the items that are neither the target nor in `exclude` (the user's history),
  by taking the `num_negatives` largest of per-item uniform noise; a row with fewer eligible items
  than `num_negatives` tops up with excluded items. The rank counts the negatives strictly above
  the target; `with_ties` also returns the negatives tied with it (for `summarize_ranks`).

  Args:
    scores: [batch, N] item scores.
    targets: int [batch] target ids in 0..N-1.
    keys: [batch] PRNG keys, one per row (fold the row's index in, so a row always draws the same
      negatives whatever the batch split).
    num_negatives: K, at most N - 1.
    exclude: optional padded item lists int [batch, S] (entries >= N or < 0 ignored).
  Returns:
    int32 [batch] ranks in 1..K+1; with `with_ties`, (ranks, ties int32 [batch]).
  """
  batch, num_items = scores.shape
  if not 0 < num_negatives < num_items:
    raise ValueError(f'sampled evaluation needs 0 < num_negatives < N = {num_items}; got '
                     f'{num_negatives} (config.eval.sampled_negatives).')
  targets = targets.astype(jnp.int32)
  noise = jax.vmap(lambda k: jax.random.uniform(k, (num_items,)))(keys)
  rows = jnp.arange(batch)[:, None]
  if exclude is not None:
    valid = (exclude >= 0) & (exclude < num_items)
    noise = noise.at[rows, jnp.where(valid, exclude, num_items)].set(-1.0, mode='drop')
  noise = noise.at[rows[:, 0], targets].set(-2.0)  # The target is never its own negative.
  _, negatives = jax.lax.top_k(noise, num_negatives)
  target_score = jnp.take_along_axis(scores, targets[:, None], axis=1)
  negative_scores = jnp.take_along_axis(scores, negatives, axis=1)
  ranks = 1 + jnp.sum(negative_scores > target_score, axis=1, dtype=jnp.int32)
  is_nan = jnp.isnan(target_score[:, 0])
  ranks = jnp.where(is_nan, num_negatives + 1, ranks).astype(jnp.int32)
  if not with_ties:
    return ranks
  ties = jnp.sum(negative_scores == target_score, axis=1, dtype=jnp.int32)
  return ranks, jnp.where(is_nan, 0, ties)


def _apply_exclusion(scores: Array, targets: Array, exclude: Array) -> Array:
  """Sets excluded items' scores to -inf, except each row's target."""
  batch, num_items = scores.shape
  if exclude.dtype == jnp.bool_:
    if exclude.shape != scores.shape:
      raise ValueError(f'Boolean exclude mask has shape {exclude.shape}; expected {scores.shape}.')
    keep_target = jnp.arange(num_items)[None, :] == targets[:, None]
    return jnp.where(exclude & ~keep_target, -jnp.inf, scores)
  if exclude.ndim != 2 or exclude.shape[0] != batch:
    raise ValueError(f'Exclude index list has shape {exclude.shape}; expected [{batch}, S].')
  # Entries equal to the target, the pad id or out of range are sent to N and dropped.
  valid = (exclude >= 0) & (exclude < num_items) & (exclude != targets[:, None])
  exclude = jnp.where(valid, exclude, num_items)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], exclude.shape)
  return scores.at[rows, exclude].set(-jnp.inf, mode='drop')


def item_groups(train_item_counts: np.ndarray, head_fraction: float = 0.2) -> np.ndarray:
  """Head items: the floor(head_fraction * N) most interacted items in train.

  Ties in count are broken by item id (the lower id ranks as more popular), so the split is
  deterministic.

  Args:
    train_item_counts: [N] interaction counts of each item in the training split.
    head_fraction: share of items called head (0.2 = the 20% most popular).
  Returns:
    bool [N] is_head.
  """
  counts = np.asarray(train_item_counts)
  if counts.ndim != 1:
    raise ValueError(f'train_item_counts must be 1-D [N], got shape {counts.shape}.')
  if not 0.0 < head_fraction < 1.0:
    raise ValueError(f'head_fraction must be in (0, 1), got {head_fraction}.')
  num_head = int(np.floor(head_fraction * counts.shape[0]))
  # Stable sort on -count keeps ascending ids within equal counts.
  order = np.argsort(-counts, kind='stable')
  is_head = np.zeros(counts.shape[0], bool)
  is_head[order[:num_head]] = True
  return is_head


def summarize_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                    ties: np.ndarray | None = None, rule: str = 'expected') -> dict[str, float]:
  """Host-side means in float64 of HR@K, NDCG@K, MRR@K over gathered ranks, plus 'count'.

  HR@K = [rank <= K]; NDCG@K = [rank <= K] / log2(rank + 1); MRR@K = [rank <= K] / rank; every
  entry counts once. With `ties`, example i's rank is any of ranks[i] .. ranks[i] + ties[i]
  (ranks = 1 + #{items strictly above}) and `rule` picks its metrics: 'expected' averages each
  metric over that range (uniform random tie-breaking, exact), 'pessimistic' takes its last rank,
  'optimistic' its first. An example without ties gives the same number under every rule, bit for
  bit. An empty array gives NaN means and count 0.
  """
  if rule not in METRIC_TIE_RULES:
    raise ValueError(f'Unknown tie rule {rule!r}; use one of {METRIC_TIE_RULES} '
                     '(config.eval.ties).')
  ranks = np.asarray(ranks, np.float64).reshape(-1)
  ties = np.zeros_like(ranks) if ties is None else np.asarray(ties, np.float64).reshape(-1)
  if ties.shape != ranks.shape:
    raise ValueError(f'ties has {ties.shape[0]} entries, ranks {ranks.shape[0]}.')
  if rule == 'pessimistic':
    ranks, ties = ranks + ties, np.zeros_like(ties)
  elif rule == 'optimistic':
    ties = np.zeros_like(ties)
  count = ranks.shape[0]
  last = ranks + ties
  tied = ties > 0

  def mean(values: np.ndarray) -> float:
    return float(np.sum(values) / count) if count else float('nan')

  def tie_mean(gain, k: int, exact: np.ndarray) -> np.ndarray:
    """Per example: `exact` without ties, else gain(r) averaged over r in ranks..last (r <= k)."""
    # prefix[j] = sum of gain(r) for r = 1..j, so a range sum is a difference of two entries.
    prefix = np.concatenate([[0.0], np.cumsum(gain(np.arange(1, k + 1, dtype=np.float64)))])
    hi = np.minimum(last, k).astype(np.int64)
    lo = np.minimum(ranks - 1, k).astype(np.int64)
    return np.where(tied, (prefix[hi] - prefix[lo]) / (ties + 1.0), exact)

  out = {'count': float(count)}
  for k in ks:
    hit = (ranks <= k).astype(np.float64)
    out[f'HR@{k}'] = mean(tie_mean(np.ones_like, k, hit))
    out[f'NDCG@{k}'] = mean(tie_mean(lambda r: 1.0 / np.log2(r + 1.0), k,
                                     hit / np.log2(ranks + 1.0)))
    out[f'MRR@{k}'] = mean(tie_mean(lambda r: 1.0 / r, k, hit / ranks))
  return out


# ---- full ranking over item chunks (bounded memory) -------------------------------------------
def _chunked_table(item_table: Array, chunk_size: int) -> tuple[Array, Array]:
  """[N, h] -> zero-padded [num_chunks, chunk_size, h] and each chunk's first item id [chunks]."""
  if chunk_size < 1:
    raise ValueError(f'chunk_size={chunk_size} must be >= 1.')
  num_items, dim = item_table.shape
  num_chunks = -(-num_items // chunk_size)
  padded = jnp.pad(item_table, ((0, num_chunks * chunk_size - num_items), (0, 0)))
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
  return padded.reshape(num_chunks, chunk_size, dim), starts


def _chunk_exclusion(exclude: Array | None, targets: Array, num_items: int, chunk_size: int):
  """Normalises `exclude` (see target_ranks) into what one chunk needs to mask its scores.

  Returns (kind, data): ('none', None); ('list', int32 [B, S] ids with invalid entries and the
  target sent to -1); or ('mask', bool [B, num_chunks * chunk_size]) with each row's target
  cleared and False padding (so no chunk's slice is clamped).
  """
  batch = targets.shape[0]
  if exclude is None:
    return 'none', None
  if exclude.dtype == jnp.bool_:
    if exclude.shape != (batch, num_items):
      raise ValueError(f'Boolean exclude mask has shape {exclude.shape}; expected '
                       f'{(batch, num_items)}.')
    keep_target = jnp.arange(num_items)[None, :] == targets[:, None]
    padding = -(-num_items // chunk_size) * chunk_size - num_items
    return 'mask', jnp.pad(exclude & ~keep_target, ((0, 0), (0, padding)))
  if exclude.ndim != 2 or exclude.shape[0] != batch:
    raise ValueError(f'Exclude index list has shape {exclude.shape}; expected [{batch}, S].')
  exclude = exclude.astype(jnp.int32)
  valid = (exclude >= 0) & (exclude < num_items) & (exclude != targets[:, None])
  return 'list', jnp.where(valid, exclude, -1)


def _mask_chunk(scores: Array, start: Array, kind: str, data: Array | None) -> Array:
  """Sets the excluded items of one chunk's scores [B, C] (first id `start`) to -inf."""
  batch, chunk = scores.shape
  if kind == 'list':
    local = data - start
    local = jnp.where((data >= 0) & (local >= 0) & (local < chunk), local, chunk)  # C: dropped.
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], local.shape)
    return scores.at[rows, local].set(-jnp.inf, mode='drop')
  if kind == 'mask':
    mask = jax.lax.dynamic_slice_in_dim(data, start, chunk, axis=1)
    return jnp.where(mask, -jnp.inf, scores)
  return scores


def target_rank_counts_chunked(states: Array, item_table: Array, targets: Array,
                               exclude: Array | None = None, *, chunk_size: int
                               ) -> tuple[Array, Array]:
  """Per example, the other items scoring strictly above the target and those tied with it.

  Scans over the catalogue in chunks of `chunk_size` items, so at most O(B * chunk_size) scores
  (plus O(B * S) exclusion indices) are alive at once, instead of O(B * N): with B = 1024 and
  N = 10^6 that is 4 GB of float32 scores unchunked, 16 MB with chunk_size = 4096. The table is
  zero-padded to a multiple of the chunk size; padding rows never count.

  The target's score is computed once as <s, e_target>. Its own column is never compared with
  it, so float rounding cannot make the target outrank itself. The counts equal those of the
  unchunked scores exactly whenever the scores are exactly representable (as in the tests); with
  general floats, a different matmul blocking can move an item whose score is within rounding
  (~1 ulp) of the target's to the other side.

  Args:
    states: [B, h] user states.
    item_table: [N, h] item embeddings (scores are dot products).
    targets: int [B] target ids in 0..N-1.
    exclude: None, a padded index list int [B, S] (entries >= N or < 0 ignored), or a bool mask
      [B, N]; the target itself is never excluded (as in `target_ranks`).
    chunk_size: items scored per scan step (static).
  Returns:
    (above, ties), int32 [B] each: the target's rank is any of above+1 .. above+ties+1. A NaN
    target score gives above = N - 1 and no ties (the worst rank).
  """
  num_items = item_table.shape[0]
  targets = targets.astype(jnp.int32)
  target_score = jnp.einsum('bh,bh->b', states, jnp.take(item_table, targets, axis=0))
  above, tied = shard_rank_counts_chunked(states, item_table, target_score, targets, exclude,
                                          offset=0, num_items=num_items, chunk_size=chunk_size)
  is_nan = jnp.isnan(target_score)
  return jnp.where(is_nan, num_items - 1, above), jnp.where(is_nan, 0, tied)


def shard_rank_counts_chunked(states: Array, shard: Array, target_score: Array, targets: Array,
                              exclude: Array | None = None, *, offset: Array | int,
                              num_items: int, chunk_size: int) -> tuple[Array, Array]:
  """`target_rank_counts_chunked`'s counts over one shard of the catalogue's rows.

  `shard` [R, h] holds the items offset .. offset + R - 1 (rows at or past `num_items`, the
  padding of a table sharded over devices, never count); summed over the shards of a table, the
  counts are those of the whole table. The target's score [B] comes from the caller (its row may
  sit on another shard), and a NaN one is the caller's to handle. `exclude`: None or a padded
  index list int [B, S] of global ids (entries >= num_items or < 0 ignored).
  """
  targets = targets.astype(jnp.int32)
  rows = shard.shape[0]
  chunk_size = min(chunk_size, rows)
  chunks, starts = _chunked_table(shard, chunk_size)
  kind, data = _chunk_exclusion(exclude, targets, num_items, chunk_size)
  if kind == 'mask' and rows != num_items:
    raise ValueError('A boolean exclude mask [B, N] needs the whole table (one shard); pass an '
                     'index list [B, S] to count a shard.')
  if kind == 'list':
    data = jnp.where(data >= 0, data - offset, -1)  # Shard-local ids.
  threshold = target_score[:, None]

  def count_chunk(counts, chunk_and_start):
    chunk, start = chunk_and_start
    scores = _mask_chunk(states @ chunk.T, start, kind, data)  # [B, C]
    ids = offset + start + jnp.arange(chunk_size, dtype=jnp.int32)
    # Real items (of this shard, not padding) other than the target.
    counted = ((ids[None, :] < num_items) & (ids[None, :] < offset + rows)
               & (ids[None, :] != targets[:, None]))
    above = jnp.sum((scores > threshold) & counted, axis=1, dtype=jnp.int32)
    tied = jnp.sum((scores == threshold) & counted, axis=1, dtype=jnp.int32)
    return (counts[0] + above, counts[1] + tied), None

  zeros = jnp.zeros(targets.shape, jnp.int32)
  (above, tied), _ = jax.lax.scan(count_chunk, (zeros, zeros), (chunks, starts))
  return above, tied


def target_ranks_chunked(states: Array, item_table: Array, targets: Array,
                         exclude: Array | None = None, *, chunk_size: int,
                         ties: str = 'optimistic') -> Array:
  """`target_ranks(states @ item_table.T, targets, exclude, ties)` without the [B, N] scores.

  The ends of `target_rank_counts_chunked`'s range: 'optimistic' above + 1, 'pessimistic'
  above + ties + 1. Returns int32 [B] ranks in 1..N (N for a NaN target score).
  """
  if ties not in TIE_RULES:
    raise ValueError(f'Unknown tie rule {ties!r}; use one of {TIE_RULES}.')
  above, tied = target_rank_counts_chunked(states, item_table, targets, exclude,
                                           chunk_size=chunk_size)
  return (1 + above + (tied if ties == 'pessimistic' else 0)).astype(jnp.int32)
