"""Protocols: hand-computed splits of the GroupLens fixture, k-core, and ML-100K counts.

The fixture (tests/fixtures/grouplens/ml-1m) has 10 users and movies 10..70 (70 never rated, so
dropped): item index = sorted movie id, 10 -> 0, ..., 60 -> 5, pad id N = 6. Chronological
sequences (ties keep file order): u1 [0 2 1 3], u2 [0 4 5], u3 [5 0 1], u4 [2 1],
u5 [0 1 2 3 4], u6 [3], u7 [4 3], u8 [5 5], u9 [1 0 2], u10 [1 2]; user_id = key - 1.
default_rng(0).permutation(10) = [4 6 2 7 3 5 9 0 8 1]: train = user_ids {0,2,3,4,5,6,7,9},
val = {8}, test = {1}. Cold-start rows list users in that permutation order (train: 4, 6, 2, 7,
3, 9, 0; user 5 has one item, so no example), each user's positions ascending.
"""

import csv
import importlib.util
import pathlib

import numpy as np
import pandas as pd
import pytest

from alphafuse_jax import data
from alphafuse_jax.data import protocols
from alphafuse_jax.data import sources

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'grouplens'
P = 6  # Pad id.

SEQUENCES = [[0, 2, 1, 3], [0, 4, 5], [5, 0, 1], [2, 1], [0, 1, 2, 3, 4], [3], [4, 3], [5, 5],
             [1, 0, 2], [1, 2]]

COLD_START_L3 = {
    'train': {
        'user_id': [4, 4, 4, 4, 6, 2, 2, 7, 3, 9, 0, 0, 0],
        'position': [1, 2, 3, 4, 1, 1, 2, 1, 1, 1, 1, 2, 3],
        'history': [[P, P, 0], [P, 0, 1], [0, 1, 2], [1, 2, 3], [P, P, 4], [P, P, 5], [P, 5, 0],
                    [P, P, 5], [P, P, 2], [P, P, 1], [P, P, 0], [P, 0, 2], [0, 2, 1]],
        'target': [1, 2, 3, 4, 3, 0, 1, 5, 1, 2, 2, 1, 3]},
    'val': {'user_id': [8, 8], 'position': [1, 2], 'history': [[P, P, 1], [P, 1, 0]],
            'target': [0, 2]},
    'test': {'user_id': [1, 1], 'position': [1, 2], 'history': [[P, P, 0], [P, 0, 4]],
             'target': [4, 5]},
}

# min_interactions=0 (no filter): users with >= 3 items get val/test, the rest are train-only;
# train rows at position 0 (empty history) are not produced.
LEAVE_ONE_OUT_L3 = {
    'train': {'user_id': [0, 3, 4, 6, 7, 9], 'position': [1, 1, 2, 1, 1, 1],
              'history': [[P, P, 0], [P, P, 2], [P, 0, 1], [P, P, 4], [P, P, 5], [P, P, 1]],
              'target': [2, 1, 2, 3, 5, 2]},
    'val': {'user_id': [0, 1, 2, 4, 8], 'position': [2, 1, 1, 3, 1],
            'history': [[P, 0, 2], [P, P, 0], [P, P, 5], [0, 1, 2], [P, P, 1]],
            'target': [1, 4, 0, 3, 0]},
    'test': {'user_id': [0, 1, 2, 4, 8], 'position': [3, 2, 2, 4, 2],
             'history': [[0, 2, 1], [P, 0, 4], [P, 5, 0], [1, 2, 3], [P, 1, 0]],
             'target': [3, 5, 1, 4, 2]},
}


def assert_splits_equal(actual, expected):
  for split, fields in expected.items():
    for field, values in fields.items():
      got = actual[split][field]
      assert got.dtype == np.int32, (split, field, got.dtype)
      np.testing.assert_array_equal(got, np.asarray(values), err_msg=f'{split}/{field}')


@pytest.fixture(scope='module', params=['ml-1m', 'ml-100k'])
def fixture_raw(request):
  """The same interactions in both GroupLens formats."""
  return sources.read_grouplens(FIXTURES / request.param)


def test_cold_start_fixture_row_by_row(fixture_raw):
  ds = protocols.cold_start_users(fixture_raw, max_len=3, split_seed=0, train_fraction=0.8,
                                  val_fraction=0.1)
  assert ds.num_items == 6 and ds.max_len == 3
  assert ds.item_keys == [10, 20, 30, 40, 50, 60]
  assert ds.user_keys == list(range(1, 11))
  assert_splits_equal(ds.splits, COLD_START_L3)
  indptr, items = ds.user_sequences
  assert [items[indptr[u]:indptr[u + 1]].tolist() for u in range(10)] == SEQUENCES
  # Every interaction of the 8 train users (u6's single item counts too).
  np.testing.assert_array_equal(ds.train_item_counts, [3, 5, 4, 4, 2, 3])
  assert ds.stats() == {'num_items': 6, 'splits': {'train': {'users': 7, 'examples': 13},
                                                    'val': {'users': 1, 'examples': 2},
                                                    'test': {'users': 1, 'examples': 2}}}


def test_leave_one_out_fixture_row_by_row(fixture_raw):
  ds = protocols.leave_one_out(fixture_raw, max_len=3, min_interactions=0)
  assert_splits_equal(ds.splits, LEAVE_ONE_OUT_L3)
  # Train portion: all but the last two items of users with >= 3 items, all items otherwise.
  np.testing.assert_array_equal(ds.train_item_counts, [3, 4, 4, 2, 1, 3])


def test_long_history_keeps_most_recent_items(fixture_raw):
  ds = protocols.cold_start_users(fixture_raw, max_len=1, split_seed=0, train_fraction=0.8,
                                  val_fraction=0.1)
  np.testing.assert_array_equal(ds.splits['train']['history'][:, 0],
                                np.asarray(COLD_START_L3['train']['history'])[:, -1])
  wide = protocols.cold_start_users(fixture_raw, max_len=6, split_seed=0, train_fraction=0.8,
                                    val_fraction=0.1)
  np.testing.assert_array_equal(wide.splits['train']['history'][3], [P, P, 0, 1, 2, 3])


def test_seen_items_is_sequence_prefix(fixture_raw):
  ds = protocols.cold_start_users(fixture_raw, max_len=2, split_seed=0, train_fraction=0.8,
                                  val_fraction=0.1)
  indptr, items = data.seen_items(ds, 'train')
  rows = [items[indptr[r]:indptr[r + 1]].tolist() for r in range(len(indptr) - 1)]
  expected = [SEQUENCES[u][:p] for u, p in zip(COLD_START_L3['train']['user_id'],
                                                COLD_START_L3['train']['position'])]
  assert rows == expected
  assert rows[3] == [0, 1, 2, 3]  # Longer than L=2: all seen items, not just the history.


def test_item_fields_follow_item_index(fixture_raw):
  ds = protocols.leave_one_out(fixture_raw, max_len=3, min_interactions=0)
  assert ds.item_fields[1] == {'title': 'Beta Story, The', 'year': '1991', 'genres': ['Action']}
  assert ds.item_fields[3]['title'] == 'Délta Night'  # latin-1 decoded.
  assert len(ds.item_fields) == 6  # Movie 70 has no ratings: dropped.


def test_k_core_iterates_to_fixed_point():
  # Users 1 and 2 rate {a, b}; user 3 rates {b, c}; user 4 rates {c, d}.
  users = np.array([1, 1, 2, 2, 3, 3, 4, 4])
  items = np.array(['a', 'b', 'a', 'b', 'b', 'c', 'c', 'd'], dtype=object)
  keep = protocols.k_core(users, items, 2)
  # Round 1: d (1 user) goes -> user 4 has 1 item. Round 2: user 4 goes -> c has 1 user.
  # Round 3: c goes -> user 3 has only b. Round 4: user 3 goes. Fixed point: users 1, 2.
  np.testing.assert_array_equal(keep, [1, 1, 1, 1, 0, 0, 0, 0])
  assert protocols.k_core(users, items, 0).all()


def test_max_len_below_one_is_an_error(fixture_raw):
  with pytest.raises(data.DataError, match='max_len'):
    protocols.cold_start_users(fixture_raw, max_len=0, split_seed=0, train_fraction=0.8,
                               val_fraction=0.1)
  with pytest.raises(data.DataError, match='max_len'):
    protocols.leave_one_out(fixture_raw, max_len=0, min_interactions=0)


def test_empty_split_is_an_error(fixture_raw):
  # 10 users, fractions 0.8 / 0.05: int(0.85 * 10) = 8 = int(0.8 * 10), so no val users.
  with pytest.raises(data.DataError, match='val split is empty'):
    protocols.cold_start_users(fixture_raw, max_len=3, split_seed=0, train_fraction=0.8,
                               val_fraction=0.05)
  with pytest.raises(data.DataError, match='train_fraction'):
    protocols.cold_start_users(fixture_raw, max_len=3, split_seed=0, train_fraction=0.9,
                               val_fraction=0.1)
  with pytest.raises(data.DataError, match='core filter'):
    protocols.leave_one_out(fixture_raw, max_len=3, min_interactions=6)


# --------------------------------------------------------------------------------------------
# MovieLens-100K from the recbole package, cross-checked with an independent pandas computation.

@pytest.fixture(scope='module')
def ml100k():
  return sources.read_recbole('ml-100k')


@pytest.fixture(scope='module')
def ml100k_frame():
  root = pathlib.Path(list(importlib.util.find_spec('recbole').submodule_search_locations)[0])
  frame = pd.read_csv(root / 'dataset_example/ml-100k/ml-100k.inter', sep='\t',
                      quoting=csv.QUOTE_NONE)
  frame.columns = [c.split(':')[0] for c in frame.columns]
  return frame


def test_ml100k_cold_start_counts(ml100k, ml100k_frame):
  ds = protocols.cold_start_users(ml100k, max_len=10, split_seed=0, train_fraction=0.8,
                                  val_fraction=0.1)
  assert ds.stats() == {'num_items': 1682, 'splits': {
      'train': {'users': 754, 'examples': 77700}, 'val': {'users': 94, 'examples': 10535},
      'test': {'users': 95, 'examples': 10822}}}
  # Independent oracle: per-user counts from pandas, users permuted in numeric order.
  counts = ml100k_frame.groupby('user_id').size().sort_index()
  perm = np.random.default_rng(0).permutation(len(counts))
  per_user = counts.to_numpy()[perm] - 1
  assert [per_user[:754].sum(), per_user[754:848].sum(), per_user[848:].sum()] == [
      77700, 10535, 10822]
  # Rows list the users in the permutation's order (every ML-100K user has >= 20 ratings).
  for split, users in (('train', perm[:754]), ('val', perm[754:848]), ('test', perm[848:])):
    np.testing.assert_array_equal(pd.unique(ds.splits[split]['user_id']), users)
  # Last test example of the first test user: the pandas stable sort gives the same target.
  frame = ml100k_frame.sort_values(['user_id', 'timestamp'], kind='stable')
  user_key = counts.index[perm[848:]].min()
  expected = frame[frame.user_id == user_key].item_id.to_numpy()
  test = ds.splits['test']
  last = np.flatnonzero(test['user_id'] == test['user_id'].min())[-1]
  assert ds.item_keys[test['target'][last]] == expected[-1]
  assert [ds.item_keys[i] for i in test['history'][last]] == list(expected[-11:-1])


def test_ml100k_leave_one_out_counts(ml100k, ml100k_frame):
  ds = protocols.leave_one_out(ml100k, max_len=200, min_interactions=5)
  assert ds.stats() == {'num_items': 1349, 'splits': {
      'train': {'users': 943, 'examples': 943}, 'val': {'users': 943, 'examples': 943},
      'test': {'users': 943, 'examples': 943}}}
  assert ds.user_sequences[1].size == 99287
  # Independent 5-core in pandas.
  frame = ml100k_frame
  while True:
    users = frame.groupby('user_id').item_id.transform('size')
    items = frame.groupby('item_id').user_id.transform('size')
    kept = frame[(users >= 5) & (items >= 5)]
    if len(kept) == len(frame):
      break
    frame = kept
  assert len(frame) == 99287 and frame.item_id.nunique() == 1349
  # Train popularity = everything but each user's last two interactions.
  assert ds.train_item_counts.sum() == 99287 - 2 * 943


# --------------------------------------------------------------------------------------------
# cold_start_items: a hand-built fixture, the tie rule, leakage, ML-100K against a loop oracle.
#
# Items by age (first interaction): A t1, B t2, C t5, D t8, E t9; keys A=30, B=10, C=50, D=20,
# E=40, so ids (sorted keys) are B0 D1 A2 E3 C4 and the newest 2 of 5 (fraction 0.4) are D and E:
# ids 1 and 3, not the last ids. Sequences by user id (u1..u4 -> 0..3):
#   0: A B E C B -> [2 0 3 4 0]   1: B E A -> [0 3 2]   2: C D A B -> [4 1 2 0]   3: A C -> [2 4]
# default_rng(0).permutation(4) = [2 0 1 3]; val_fraction 0.5 -> val users {2, 0}, test {1, 3}.
# L = 3, pad 5. Old targets: 0/p1 [P P 2] kept; 0/p3 [2 0 3] ends in new 3 -> dropped; 0/p4
# [0 3 4] -> cut after 3 -> [P P 4]; 1/p2 [P 0 3] dropped; 2/p2 [P 4 1] dropped; 2/p3 [4 1 2]
# -> [P P 2]; 3/p1 [P P 2]. New targets keep their full windows.
HAND_ROWS = [(1, 30, 1), (1, 10, 2), (1, 40, 10), (1, 50, 11), (1, 10, 12), (2, 10, 3), (2, 40, 9),
             (2, 30, 13), (3, 50, 5), (3, 20, 8), (3, 30, 14), (3, 10, 15), (4, 30, 4), (4, 50, 6)]
Q = 5  # Pad id of the hand-built fixture.
COLD_ITEMS_L3 = {
    'train': {'user_id': [2, 0, 0, 3], 'position': [3, 1, 4, 1],
              'history': [[Q, Q, 2], [Q, Q, 2], [Q, Q, 4], [Q, Q, 2]], 'target': [0, 0, 0, 4]},
    'val': {'user_id': [2, 0], 'position': [1, 2], 'history': [[Q, Q, 4], [Q, 2, 0]],
            'target': [1, 3]},
    'test': {'user_id': [1], 'position': [1], 'history': [[Q, Q, 0]], 'target': [3]},
}


def hand_raw():
  rows = [HAND_ROWS[i] for i in (5, 0, 13, 7, 2, 9, 11, 1, 4, 3, 12, 6, 8, 10)]  # Scrambled.
  users, items, times = (np.asarray(c) for c in zip(*rows))
  return sources.RawInteractions(users.astype(np.int64), items.astype(np.int64),
                                 times.astype(np.float64), {}, [], 'hand-built')


def cold_items(raw, **overrides):
  kwargs = dict(max_len=3, split_seed=0, val_fraction=0.5, new_item_fraction=0.4)
  return protocols.cold_start_items(raw, **{**kwargs, **overrides})


def assert_no_new_item_in_train(ds):
  train = ds.splits['train']
  new = np.append(ds.new_items, False)  # The pad is not an item.
  assert not new[train['target']].any() and not new[train['history']].any()
  assert (train['history'] != ds.num_items).any(axis=1).all()  # No empty history.
  for split in ('val', 'test'):
    assert ds.new_items[ds.splits[split]['target']].all()
  assert ds.train_item_counts[ds.new_items].sum() == 0


def test_cold_start_items_hand_built_row_by_row():
  ds = cold_items(hand_raw())
  assert ds.item_keys == [10, 20, 30, 40, 50]
  np.testing.assert_array_equal(ds.new_items, [False, True, False, True, False])
  assert_splits_equal(ds.splits, COLD_ITEMS_L3)
  # Seen by training: 0 as 3 targets; 2 in three histories; 4 as one target and one history.
  np.testing.assert_array_equal(ds.train_item_counts, [3, 0, 3, 0, 2])
  assert_no_new_item_in_train(ds)


def test_cold_start_items_first_interaction_ties_follow_file_order(fixture_raw):
  # GroupLens fixture: first interactions 10 (t1, row 10), 60 (t1, row 19), 30 (t1, row 21),
  # 20 (t2), 40 (t4), 50 (t5). The newest 4 of 6 split the t1 tie: 60 is older than 30 because
  # its row comes first (by item key, 30 would be the older).
  ds = protocols.cold_start_items(fixture_raw, max_len=3, split_seed=0, val_fraction=0.2,
                                  new_item_fraction=0.67)
  np.testing.assert_array_equal(ds.new_items, [False, True, True, True, True, False])
  assert_no_new_item_in_train(ds)


def test_cold_start_items_bad_settings_are_errors(fixture_raw):
  with pytest.raises(data.DataError, match='new_item_fraction'):
    cold_items(hand_raw(), new_item_fraction=0.1)  # int(0.5) = 0 new items.
  with pytest.raises(data.DataError, match='new_item_fraction'):
    cold_items(hand_raw(), new_item_fraction=1.0)
  with pytest.raises(data.DataError, match='val split is empty'):
    cold_items(hand_raw(), val_fraction=0.0)


def test_new_item_rank_counts_against_a_loop():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, size=(6, 9)).astype(np.float64)  # Many ties.
  new = np.array([0, 1, 1, 0, 1, 1, 0, 1, 0], bool)
  targets = np.array([1, 2, 4, 5, 7, 1])
  above, ties = protocols.new_item_rank_counts(scores, targets, new)
  for row, target in enumerate(targets):
    others = [j for j in range(9) if new[j] and j != target]
    assert above[row] == sum(scores[row, j] > scores[row, target] for j in others)
    assert ties[row] == sum(scores[row, j] == scores[row, target] for j in others)
  with pytest.raises(ValueError, match='old items'):
    protocols.new_item_rank_counts(scores, np.array([0, 1, 2, 4, 5, 7]), new)


def test_cold_start_items_new_items_survive_the_cache(tmp_path):
  from alphafuse_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  ds = cold_items(hand_raw())
  back = tfds_builder.read(tfds_builder.prepare(ds, tmp_path, 'hand.cold_start_items'))
  np.testing.assert_array_equal(back.new_items, ds.new_items)
  assert back.new_items.dtype == bool
  assert_splits_equal(back.splits, COLD_ITEMS_L3)


# ML-100K, newest 10% of items: 168 items, only 748 positions target them (late releases).
ML100K_COLD_ITEMS_STATS = {'num_items': 1682, 'splits': {
    'train': {'users': 943, 'examples': 97715}, 'val': {'users': 25, 'examples': 47},
    'test': {'users': 213, 'examples': 701}}}


def test_ml100k_cold_start_items_counts(ml100k, ml100k_frame):
  ds = protocols.cold_start_items(ml100k, max_len=10, split_seed=0, val_fraction=0.1,
                                  new_item_fraction=0.1)
  assert ds.stats() == ML100K_COLD_ITEMS_STATS
  assert ds.new_items.sum() == 168
  assert_no_new_item_in_train(ds)
  # Independent oracle: plain Python over the pandas rows.
  frame = ml100k_frame.reset_index(drop=True)
  chrono = frame.sort_values('timestamp', kind='stable')
  age = list(dict.fromkeys(chrono.item_id.tolist()))  # Items by first interaction.
  new = set(age[len(age) - 168:])
  assert {ds.item_keys[i] for i in np.flatnonzero(ds.new_items)} == new
  users = sorted(frame.user_id.unique())
  val_users = {users[u] for u in np.random.default_rng(0).permutation(len(users))[:94]}
  counts = {'train': 0, 'val': 0, 'test': 0}
  per_user = frame.sort_values(['user_id', 'timestamp'], kind='stable').groupby('user_id')
  for user, items in per_user.item_id:
    items = items.tolist()
    for t in range(1, len(items)):
      if items[t] in new:
        counts['val' if user in val_users else 'test'] += 1
      elif items[t - 1] not in new:  # Truncation leaves a history unless a new item is last.
        counts['train'] += 1
  assert counts == {s: ML100K_COLD_ITEMS_STATS['splits'][s]['examples'] for s in counts}
