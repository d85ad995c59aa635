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
