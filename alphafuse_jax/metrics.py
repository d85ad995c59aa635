"""Full-ranking metrics: HR, NDCG and MRR at K, overall and per user/item group.

The reference (reference-spec §5) ranks the target among all N items by the raw dot product, with
no history masking, and averages per example over K in (1, 5, 10, 20, 50). We compute the target's
rank in O(N) per row by counting the items scoring above it (no sort, no top-k), on device:

  * ties='optimistic' (default): rank = 1 + #{items scoring strictly higher than the target}.
    Tied items are counted below the target, the best rank consistent with the scores.
  * ties='pessimistic': rank = #{items scoring >= the target} (the target itself counted once),
    the worst rank consistent with the scores.

The reference breaks ties by `torch.topk`, which is arbitrary; the two agree exactly when no item
ties with the target, and with ties the reference lands somewhere between our two options (so
'optimistic' matches it only when ties are rare, as with float scores of trained models). A NaN
target score gets the worst rank N.

Per-batch functions return SUMS plus a count, so batches (including a padded last batch whose
extra rows have mask False) are accumulated and divided once at the end by `finalize`.
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DEFAULT_KS = (1, 5, 10, 20, 50)
TIE_RULES = ('optimistic', 'pessimistic')
# Group names, indexed by the group ids returned below.
ITEM_GROUP_NAMES = ('tail', 'head')
USER_GROUP_NAMES = ('short', 'long')


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


def ranking_metrics(ranks: Array, mask: Array | None = None,
                    ks: Sequence[int] = DEFAULT_KS) -> dict[str, Array]:
  """Summed HR@K, NDCG@K and MRR@K over the valid rows of a batch, and their count.

  HR@K = [rank <= K]; NDCG@K = [rank <= K] / log2(rank + 1); MRR@K = [rank <= K] / rank.

  Args:
    ranks: int [batch] 1-based ranks.
    mask: None or bool [batch]; False rows (padding) contribute nothing, not even to the count.
    ks: cut-offs.
  Returns:
    {'HR@K': sum, 'NDCG@K': sum, 'MRR@K': sum for each K, 'count': number of valid rows}, float32
    scalars.
  """
  if mask is None:
    mask = jnp.ones(ranks.shape, bool)
  weight = mask.astype(jnp.float32)
  ranks_f = ranks.astype(jnp.float32)
  out = {'count': jnp.sum(weight)}
  for k in ks:
    hit = (ranks <= k).astype(jnp.float32) * weight
    out[f'HR@{k}'] = jnp.sum(hit)
    out[f'NDCG@{k}'] = jnp.sum(hit / jnp.log2(ranks_f + 1.0))
    out[f'MRR@{k}'] = jnp.sum(hit / ranks_f)
  return out


def grouped_ranking_metrics(ranks: Array, mask: Array | None, group_ids: Array,
                            group_names: Sequence[str],
                            ks: Sequence[int] = DEFAULT_KS) -> dict[str, Array]:
  """`ranking_metrics` per group, keyed '<group>/HR@10', '<group>/count', ...

  Args:
    ranks: int [batch]; mask: None or bool [batch].
    group_ids: int [batch] in 0..len(group_names)-1 (e.g. from `item_group_ids`).
    group_names: one name per group id.
  """
  if mask is None:
    mask = jnp.ones(ranks.shape, bool)
  out = {}
  for group, name in enumerate(group_names):
    sums = ranking_metrics(ranks, mask & (group_ids == group), ks)
    out.update({f'{name}/{key}': value for key, value in sums.items()})
  return out


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


def item_group_ids(targets: Array, is_head: Array) -> Array:
  """int32 [batch]: 1 if the target is a head item, else 0 (names in ITEM_GROUP_NAMES)."""
  return jnp.take(jnp.asarray(is_head), targets).astype(jnp.int32)


def user_group_ids(history: Array, pad_id: int, threshold: int) -> Array:
  """int32 [batch]: 0 ('short') if the number of non-pad history items < threshold, else 1 ('long').

  This is LLM-ESR's user split (seq_len < ts_user is a tail user).
  """
  lengths = jnp.sum(history != pad_id, axis=-1)
  return (lengths >= threshold).astype(jnp.int32)


def summarize_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """Host-side means in float64 of HR@K, NDCG@K, MRR@K over gathered ranks, plus 'count'.

  The same definitions as `ranking_metrics`, for when every example's rank is already on the host
  (every entry of `ranks` counts once). An empty array gives NaN means and count 0.
  """
  ranks = np.asarray(ranks, np.float64).reshape(-1)
  count = ranks.shape[0]

  def mean(values: np.ndarray) -> float:
    return float(np.sum(values) / count) if count else float('nan')

  out = {'count': float(count)}
  for k in ks:
    hit = (ranks <= k).astype(np.float64)
    out[f'HR@{k}'] = mean(hit)
    out[f'NDCG@{k}'] = mean(hit / np.log2(ranks + 1.0))
    out[f'MRR@{k}'] = mean(hit / ranks)
  return out


def finalize(sums: Mapping[str, float | Array]) -> dict[str, float]:
  """Divides accumulated sums by their count: {'HR@10': mean, ..., 'count': n}.

  Handles flat keys ('HR@10', 'count') and grouped keys ('head/HR@10', 'head/count'); a group with
  count 0 gets NaN means (there is nothing to average).
  """
  out = {}
  for key, value in sums.items():
    prefix, _, name = key.rpartition('/')
    if name == 'count':
      out[key] = float(value)
      continue
    count = float(sums[f'{prefix}/count' if prefix else 'count'])
    out[key] = float(value) / count if count > 0 else float('nan')
  return out


def accumulate(total: dict[str, float] | None, batch_sums: Mapping[str, Array]) -> dict[str, float]:
  """Adds one batch's sums into a host-side float64 running total (None starts a new one)."""
  total = {} if total is None else dict(total)
  for key, value in batch_sums.items():
    total[key] = total.get(key, 0.0) + float(np.asarray(value, np.float64))
  return total
