"""Batch recommendation: users' histories from an interactions file, top-K to CSV or JSONL.

The file is read by the training data's reader (`data.sources.read_delimited`: a header row, then
user, item, timestamp columns); each user's items are ordered by timestamp (stable: ties keep file
order), as the protocols order them. Users come out in sorted key order.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import ml_collections
import numpy as np

from alphafuse_jax import files
from alphafuse_jax.data import sources
from alphafuse_jax.serving.catalogue import ServingError
from alphafuse_jax.serving.recommender import Recommender

OUTPUT_SUFFIXES = ('.csv', '.jsonl')


def read_histories(path: str, recommender: Recommender, *, sep: str | None = None,
                   columns: tuple[str, str, str] | None = None
                   ) -> tuple[list[Any], list[list[int]]]:
  """(user keys, item index lists oldest first) of every user in an interactions file.

  Args:
    path: CSV/TSV with a header row.
    recommender: names the items (an unknown key is an error naming the user and the closest
      keys).
    sep: field separator; default the run's `config.data.delimited.sep`.
    columns: (user, item, timestamp) header names; default the run's delimited column names.
  """
  delimited = recommender.artifacts.config.data.delimited
  options = ml_collections.ConfigDict(dict(delimited.to_dict(), interactions_file=os.path.abspath(
      os.path.expanduser(path)), item_text_file=''))
  if sep is not None:
    options.sep = sep
  if columns is not None:
    options.user_column, options.item_column, options.time_column = columns
  try:
    raw = sources.read_delimited(options)
  except ValueError as e:
    raise ServingError(f'{e} (the columns default to the run\'s data.delimited names; set them '
                       'with --histories_columns=user,item,timestamp)') from None
  except FileNotFoundError as e:
    raise ServingError(str(e)) from None
  users, inverse = np.unique(raw.users, return_inverse=True)
  # Per user, by timestamp; ties keep file order (stable sorts, as the protocols).
  order = np.lexsort((np.arange(len(inverse)), raw.timestamps, inverse))
  histories: list[list[int]] = [[] for _ in users]
  catalogue = recommender.catalogue
  for row in order:
    try:
      histories[inverse[row]].append(catalogue.index(raw.items[row]))
    except ServingError as e:
      raise ServingError(f'{path}: user {users[inverse[row]]!r}: {e}') from None
  return [u.item() if isinstance(u, np.generic) else u for u in users], histories


def write_recommendations(path: str, recommender: Recommender, users: list[Any],
                          ids: np.ndarray, scores: np.ndarray) -> None:
  """Writes every user's top-K (rank, key, title, score, new) to .csv or .jsonl, atomically."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in OUTPUT_SUFFIXES:
    raise ServingError(f'--out={path}: the output must end in {" or ".join(OUTPUT_SUFFIXES)}.')
  buffer = io.StringIO()
  if suffix == '.csv':
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(['user', 'rank', 'item', 'title', 'score', 'new'])
  for user, row_ids, row_scores in zip(users, ids, scores):
    items = [recommender.describe(int(i), float(s))
             for i, s in zip(row_ids, row_scores) if np.isfinite(s)]
    if suffix == '.csv':
      for rank, item in enumerate(items, start=1):
        writer.writerow([user, rank, item.key, item.title, f'{item.score:.6g}', int(item.new)])
    else:
      record = {'user': user, 'items': [{'item': r.key, 'title': r.title, 'score': r.score,
                                         'new': r.new} for r in items]}
      buffer.write(json.dumps(record) + '\n')
  files.write_text(path, buffer.getvalue())
