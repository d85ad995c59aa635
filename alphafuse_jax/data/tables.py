"""Delimited tables on the stdlib `csv` parser, with the file and line in every error.

The readers of `sources.py` share these: `read_table` (RFC-4180 quoting where a format uses it,
CRLF, a UTF-8 byte-order mark, any Python text encoding), conversions of a column to numbers or
original ids (`numeric`, `keys`: '02' and '2' in one column are an error), and the policy for
exact duplicate interaction rows (`drop_duplicates`). Errors are `errors.DataError`s whose message
names the file, the line and the fix.
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import pathlib

import numpy as np

from alphafuse_jax.errors import DataError
from alphafuse_jax.errors import DataFileNotFoundError


def require_file(path: pathlib.Path, fix: str) -> pathlib.Path:
  if not path.is_file():
    raise DataFileNotFoundError(f'Missing source file {path}. {fix}')
  return path


def _decode(path: pathlib.Path, encoding: str) -> str:
  """The file's text; a UTF-8 byte-order mark is dropped (it would glue onto the first column)."""
  try:
    codec = codecs.lookup(encoding).name
  except LookupError:
    raise DataError(f'{path}: unknown text encoding {encoding!r}; set '
                    'config.data.delimited.encoding to e.g. utf-8 or latin-1.') from None
  try:
    return path.read_bytes().decode('utf-8-sig' if codec == 'utf-8' else codec)
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: cannot decode as {encoding} at byte {e.start}; re-save the file '
                    f'as {encoding} or set config.data.delimited.encoding (e.g. latin-1).') from e


def read_table(path: pathlib.Path, sep: str, num_fields: int | None, *, encoding: str = 'utf-8',
               header: bool = False, quoted: bool = False
               ) -> tuple[list[str] | None, list[list[str]], list[int]]:
  """Splits a delimited text file into rows, checking the field count of every row.

  A one-character `sep` goes through the stdlib `csv` parser: with `quoted`, RFC-4180 quoting
  (a field in double quotes may hold the separator, line breaks and "" for a quote); without it,
  fields are split on `sep` only (MovieLens titles hold bare quotes and commas). A longer `sep`
  ('::' in GroupLens ml-1m) splits each line, unquoted. CRLF line ends and a UTF-8 byte-order
  mark are accepted; rows whose fields are all blank are skipped.

  Returns:
    (header fields or None, rows, 1-based line number of each row).
  """
  text = _decode(path, encoding)
  if len(sep) == 1:
    reader = csv.reader(io.StringIO(text, newline=''), delimiter=sep, strict=quoted,
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    records = ((reader.line_num, row) for row in reader)
  else:
    records = ((n, line.rstrip('\r').split(sep)) for n, line in enumerate(text.split('\n'), 1))
  head = None
  rows, line_numbers = [], []
  try:
    for number, fields in records:
      if not any(f.strip() for f in fields):
        continue
      if head is None and header:
        head = [f.strip() for f in fields]
        num_fields = len(head) if num_fields is None else num_fields
        continue
      if num_fields is not None and len(fields) != num_fields:
        raise DataError(
            f'{path}, line {number}: malformed row, expected {num_fields} fields separated by '
            f'{sep!r} but found {len(fields)}: {sep.join(fields)[:120]!r}. Fix or delete that '
            'line (quote a field that holds the separator: "a, b").')
      rows.append(fields)
      line_numbers.append(number)
  except csv.Error as e:
    raise DataError(f'{path}, line {reader.line_num}: {e}; close the quoted field or double the '
                    'quote inside it ("").') from e
  if header and head is None:
    raise DataError(f'{path}: the file is empty; it needs a header row and data rows.')
  if not rows:
    raise DataError(f'{path}: no data rows. Point the config at a file with interactions.')
  return head, rows, line_numbers


def column(rows: list[list[str]], index: int) -> list[str]:
  return [row[index].strip() for row in rows]


def numeric(values: list[str], path: pathlib.Path, lines: list[int], field: str,
             dtype=np.float64) -> np.ndarray:
  """Converts a column to numbers; a bad value raises a DataError naming its line."""
  try:
    array = np.asarray(values, dtype=np.str_).astype(dtype)
  except ValueError:
    array = None
  if array is not None and not (dtype == np.float64 and not np.isfinite(array).all()):
    return array
  for value, line in zip(values, lines):
    try:
      number = dtype(value) if dtype != np.float64 else float(value)
    except ValueError:
      number = None
    if number is None or (dtype == np.float64 and not np.isfinite(number)):
      kind = 'an integer id' if dtype == np.int64 else 'numeric'
      raise DataError(f'{path}, line {line}: field {field!r} must be {kind}, got {value!r}. '
                      'Fix that value (timestamps are seconds or any sortable number).')
  raise DataError(f'{path}: field {field!r} is not numeric.')  # Unreachable in practice.


def keys(values: list[str], path: pathlib.Path, lines: list[int], column: str) -> np.ndarray:
  """Original ids: int64 when every value is an integer, else an object array of str.

  Two spellings of one integer ('02' and '2') are an error: the file may mean two ids or one.
  """
  text = np.asarray(values, dtype=np.str_)
  try:
    keys = text.astype(np.int64)
  except ValueError:
    return np.asarray(values, dtype=object)
  spellings, first = np.unique(text, return_index=True)
  numbers = spellings.astype(np.int64)
  if len(np.unique(numbers)) < len(numbers):
    order = np.argsort(numbers, kind='stable')
    clash = int(np.flatnonzero(np.diff(numbers[order]) == 0)[0])
    a, b = sorted(order[clash:clash + 2], key=lambda i: first[i])
    raise DataError(
        f'{path}, line {lines[first[b]]}: id {str(spellings[b])!r} in column {column!r} reads as '
        f'the same number as {str(spellings[a])!r} (line {lines[first[a]]}); write each id one '
        'way (no leading zeros or signs) so that it is clear whether they are one id or two.')
  return keys



def drop_duplicates(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                path: pathlib.Path, lines: list[int], policy: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Drops exact duplicate rows (same user, item and time; the first is kept) when `policy` is
  'drop', with a warning that counts them; 'keep' keeps every row."""
  if policy not in ('drop', 'keep'):
    raise DataError(f'config.data.delimited.duplicates={policy!r} is not one of drop, keep.')
  import pandas as pd  # pylint: disable=g-import-not-at-top
  repeated = pd.DataFrame({'u': users, 'i': items, 't': timestamps}).duplicated().to_numpy()
  if policy == 'keep' or not repeated.any():
    return users, items, timestamps
  logging.warning('%s: dropped %d exact duplicate interaction row(s) (same user, item and time; '
                  'the first at line %d); set config.data.delimited.duplicates=keep to keep '
                  'them.', path, int(repeated.sum()), lines[int(np.argmax(repeated))])
  keep = ~repeated
  return users[keep], items[keep], timestamps[keep]
