"""config.data.train_user_fraction: cold-start with only a fraction of the train users (issue 20).

Oracles: the split permutation is `default_rng(split_seed).permutation(U)` with user_id = the
sorted user key (here the keys are 0..U-1, so user_id = key), n_train = int(train_fraction * U);
the kept train users are the first round(f * n_train) of it. Item counts are recounted from the
raw rows with collections.Counter.
"""

import collections
import pathlib
import shutil

import numpy as np
import pytest

from alphafuse_jax import checkpointing
from alphafuse_jax import config_checks
from alphafuse_jax import data
from alphafuse_jax.data import protocols
from alphafuse_jax.data import sources
from alphafuse_jax.data import tfds_builder
from alphafuse_jax.errors import ConfigError
from configs import default

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'grouplens'
NUM_USERS, NUM_ITEMS, SEED = 200, 40, 3
N_TRAIN = int(0.8 * NUM_USERS)  # 160.


def _raw(lengths):
  """Users 0..U-1 with the given sequence lengths, rows shuffled in file order."""
  rng = np.random.default_rng(7)
  users = np.repeat(np.arange(len(lengths)), lengths)
  items = rng.integers(0, NUM_ITEMS, users.size) * 10 + 5  # Item keys 5, 15, ..., 395.
  items[:NUM_ITEMS] = np.arange(NUM_ITEMS) * 10 + 5  # Every item occurs at least once.
  timestamps = rng.integers(0, 50, users.size).astype(np.float64)
  order = rng.permutation(users.size)
  return sources.RawInteractions(users=users[order], items=items[order],
                                 timestamps=timestamps[order], item_fields={}, files=[],
                                 description='synthetic test rows')


@pytest.fixture(scope='module')
def raw():
  # Lengths 1..8: some users (length 1) have no example at all.
  return _raw(np.random.default_rng(1).integers(1, 9, NUM_USERS))


def _split(raw, *fraction):
  """The cold-start split; `fraction` given = train_user_fraction, absent = its default."""
  kwargs = {'train_user_fraction': fraction[0]} if fraction else {}
  return protocols.cold_start_users(raw, max_len=4, split_seed=SEED, train_fraction=0.8,
                                    val_fraction=0.1, **kwargs)


def _assert_split_equal(a, b):
  assert a.keys() == b.keys()
  for field in a:
    assert a[field].dtype == b[field].dtype, field
    np.testing.assert_array_equal(a[field], b[field], err_msg=field)


@pytest.fixture(scope='module')
def full(raw):
  return _split(raw)


def test_fraction_one_is_identical(raw, full):
  one = _split(raw, 1.0)
  for name in protocols.SPLITS:
    _assert_split_equal(one.splits[name], full.splits[name])
  np.testing.assert_array_equal(one.train_item_counts, full.train_item_counts)
  for a, b in zip(one.user_sequences, full.user_sequences):
    np.testing.assert_array_equal(a, b)
  assert one.description == full.description and 'train_user_fraction' not in one.description
  assert (one.item_keys, one.user_keys, one.num_items) == (full.item_keys, full.user_keys,
                                                           full.num_items)


@pytest.mark.parametrize('fraction', [0.1, 0.25, 0.5])
def test_val_test_unchanged_and_train_is_a_permutation_prefix(raw, full, fraction):
  ds = _split(raw, fraction)
  for name in ('val', 'test'):
    _assert_split_equal(ds.splits[name], full.splits[name])
  assert (ds.num_items, ds.item_keys, ds.user_keys) == (full.num_items, full.item_keys,
                                                        full.user_keys)
  for a, b in zip(ds.user_sequences, full.user_sequences):
    np.testing.assert_array_equal(a, b)
  permuted = np.random.default_rng(SEED).permutation(NUM_USERS)
  kept = permuted[:round(fraction * N_TRAIN)]
  lengths = np.bincount(raw.users, minlength=NUM_USERS)
  train = ds.splits['train']
  # Users in row order (grouped): the kept users that have an example, in permutation order.
  first_rows = np.flatnonzero(np.diff(train['user_id'], prepend=-1) != 0)
  np.testing.assert_array_equal(train['user_id'][first_rows], kept[lengths[kept] >= 2])
  assert train['target'].size == np.sum(lengths[kept] - 1)
  # The rows are the full split's rows of those users, which come first there.
  _assert_split_equal(train, {k: v[:train['target'].size] for k, v in full.splits['train'].items()})
  counts = collections.Counter(ds.item_keys.index(i) for u, i in zip(raw.users, raw.items)
                               if u in set(kept.tolist()))
  np.testing.assert_array_equal(ds.train_item_counts,
                                [counts.get(i, 0) for i in range(NUM_ITEMS)])
  assert ds.train_item_counts.dtype == np.int64
  assert f'train_user_fraction={fraction} ({kept.size} of {N_TRAIN} train users' in ds.description


def test_smaller_fractions_are_subsets(raw, full):
  users = {f: set(_split(raw, f).splits['train']['user_id'].tolist()) for f in (0.1, 0.25)}
  users[1.0] = set(full.splits['train']['user_id'].tolist())
  assert users[0.1] < users[0.25] < users[1.0]
  stats = _split(raw, 0.25).stats()['splits']
  assert stats['val'] == full.stats()['splits']['val']
  assert stats['train']['users'] == len(users[0.25])


@pytest.mark.parametrize('bad', [0, 0.0, -0.1, 1.5, float('nan'), float('inf'), '0.5', True,
                                 None])
def test_bad_values_raise_config_error(raw, bad):
  with pytest.raises(ConfigError, match=r'train_user_fraction=.* must be a number in \(0, 1\]'):
    _split(raw, bad)
  config = default.get_config()
  # The field is typed float: set a bad value past ConfigDict's own type check.
  config.data._fields['train_user_fraction'] = bad  # pylint: disable=protected-access
  with pytest.raises(ConfigError, match='train_user_fraction'):
    config_checks.validate_config(config, 1)


def test_no_train_user_left_is_a_clear_error(raw):
  # round(0.003 * 160) = 0.
  with pytest.raises(ConfigError, match=r'keeps no train user: .* 160 train users'):
    _split(raw, 0.003)
  # round(0.004 * 160) = 1: the first user of the permutation only (3 items: 2 examples).
  first = np.random.default_rng(SEED).permutation(NUM_USERS)[0]
  ds = _split(_raw(np.full(NUM_USERS, 3)), 0.004)
  np.testing.assert_array_equal(ds.splits['train']['user_id'], [first, first])
  np.testing.assert_array_equal(ds.splits['train']['position'], [1, 2])
  assert '(1 of 160 train users kept)' in ds.description


def test_kept_users_without_examples_is_a_data_error():
  permuted = np.random.default_rng(SEED).permutation(NUM_USERS)
  lengths = np.full(NUM_USERS, 3)
  lengths[permuted[0]] = 1  # The one kept train user has no position with a history.
  with pytest.raises(data.DataError, match=r'train_user_fraction \(1 of 160 train users kept\)'):
    _split(_raw(lengths), 1 / N_TRAIN)


@pytest.mark.parametrize('protocol', ['leave_one_out', 'cold_start_items'])
def test_other_protocols_refuse_a_fraction(protocol):
  config = default.get_config()
  config.data.protocol, config.data.train_user_fraction = protocol, 0.25
  message = r"train_user_fraction=0.25 .* only config.data.protocol='cold_start_users'"
  with pytest.raises(ConfigError, match=message):
    config_checks.validate_config(config, 1)
  with pytest.raises(ConfigError, match=message):
    tfds_builder.settings(config.data)
  with pytest.raises(ConfigError, match=message):
    data.build(config.data)  # Before any file is read.
  config.data.train_user_fraction = 1.0
  tfds_builder.settings(config.data)


def test_authors_source_refuses_a_fraction():
  config = default.get_config().data
  config.source, config.path, config.train_user_fraction = 'authors', '/nonexistent', 0.5
  with pytest.raises(ConfigError, match="'authors' does not split users"):
    tfds_builder.settings(config)
  with pytest.raises(ConfigError, match='train_user_fraction=1'):
    data.build(config)


def test_cache_key_and_config_record():
  config = default.get_config().data
  full_settings = tfds_builder.settings(config)
  assert 'train_user_fraction' not in full_settings  # 1.0 keeps every existing cache key.
  config.train_user_fraction = 0.25
  sparse = tfds_builder.settings(config)
  assert sparse == dict(full_settings, train_user_fraction=0.25)
  assert tfds_builder.config_name(sparse, 'ab' * 32) == (
      'ml-1m.cold_start_users.L10.seed0.tr0.8.va0.1.tu0.25.' + 'ab' * 8)
  assert (tfds_builder.fingerprint([], sparse) != tfds_builder.fingerprint([], full_settings))
  # A workdir trained with 1.0 refuses to resume with 0.25 (and the other way round).
  recorded = default.get_config()
  current = default.get_config()
  current.data.train_user_fraction = 0.25
  changes = checkpointing.config_changes(checkpointing.config_dict(recorded),
                                         checkpointing.config_dict(current))
  assert changes == ['config.data.train_user_fraction: 1.0 -> 0.25']


def test_load_keeps_full_and_sparse_caches_apart(tmp_path):
  source = tmp_path / 'source'
  shutil.copytree(FIXTURES / 'ml-1m', source)
  config = default.get_config().data
  config.update(data_dir=str(tmp_path / 'cache'), source='grouplens', path=str(source), max_len=3)
  full = data.load(config)
  config.train_user_fraction = 0.5
  half = data.load(config)
  names = sorted(p.name for p in (tmp_path / 'cache' / tfds_builder.DATASET_NAME).iterdir())
  assert len(names) == 2 and sum('.tu0.5.' in n for n in names) == 1
  # Fixture (tests/test_data_protocols.py): train users in permutation order 4 6 2 7 3 5 9 0; half
  # keeps 4 6 2 7, whose rows come first in the full split.
  assert list(dict.fromkeys(half.splits['train']['user_id'].tolist())) == [4, 6, 2, 7]
  n = half.splits['train']['target'].size
  _assert_split_equal(half.splits['train'],
                      {k: v[:n] for k, v in full.splits['train'].items()})
  for name in ('val', 'test'):
    _assert_split_equal(half.splits[name], full.splits[name])
  assert 'train_user_fraction=0.5 (4 of 8 train users kept)' in half.description
  built = data.build(config)
  np.testing.assert_array_equal(half.train_item_counts, built.train_item_counts)
  _assert_split_equal(half.splits['train'], built.splits['train'])
