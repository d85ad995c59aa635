"""The AlphaFuse authors' release (reference-spec section 1): its files and one split's reader.

The release is already split, so `protocols.from_authors` turns these arrays into a
`PreparedDataset` directly.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

from alphafuse_jax.data import sources

AUTHORS_FILES = ('data_statis.df', 'train_data.df', 'val_data.df', 'test_data.df')


def authors_files(directory: str | os.PathLike[str]) -> list[pathlib.Path]:
  directory = pathlib.Path(directory)
  return [sources.require_file(directory / name,
                        'Set config.data.path to the directory of the AlphaFuse release '
                        '(data_statis.df, train_data.df, val_data.df, test_data.df).')
          for name in AUTHORS_FILES]


def _integral(values: np.ndarray, path: pathlib.Path, field: str) -> np.ndarray:
  """Float ids such as 3403.0 (DreamRec lineage) -> int64; 3403.5 is an error."""
  values = np.asarray(values)
  if values.dtype.kind == 'f':
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
      row = int(np.argwhere(bad)[0][0])
      raise sources.DataError(f'{path}, row {row}: field {field!r} holds a non-integer item id '
                      f'{values[bad][0]!r}. Item ids must be whole numbers 0..N.')
  elif values.dtype.kind not in 'iu':
    raise sources.DataError(f'{path}: field {field!r} must hold numbers, got dtype {values.dtype}.')
  return values.astype(np.int64)


def read_authors_split(path: pathlib.Path, num_items: int, seq_size: int,
                       allow_right_padded: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """One split of the release -> (history [n, seq_size] int64 left-padded with N, target [n]).

  The reference reads the sequence state at the LAST position, which is only right for
  left-padded data (reference-spec §1.2), so right padding is an error unless
  `allow_right_padded`, in which case rows are re-padded on the left.
  """
  import pandas as pd  # Local: pandas is only needed for this source.
  frame = pd.read_pickle(path)
  for column in ('seq', 'next'):
    if column not in frame.columns:
      raise sources.DataError(f'{path}: no column {column!r} (found {list(frame.columns)}); the release '
                      'stores seq (list of L ids), len_seq and next per row.')
  if len(frame) == 0:
    raise sources.DataError(f'{path}: the split is empty. Re-export the release with examples in it.')
  seqs = list(frame['seq'])
  lengths = {len(s) for s in seqs}
  if lengths != {seq_size}:
    raise sources.DataError(f'{path}: field "seq" must have seq_size={seq_size} ids per row (from '
                    f'data_statis.df), found lengths {sorted(lengths)[:5]}.')
  history = _integral(np.asarray([np.asarray(s) for s in seqs]).reshape(len(seqs), seq_size),
                      path, 'seq')
  target = _integral(frame['next'].to_numpy(), path, 'next')
  for name, values, high in (('seq', history, num_items), ('next', target, num_items - 1)):
    bad = (values < 0) | (values > high)
    if bad.any():
      row = int(np.argwhere(bad)[0][0])
      raise sources.DataError(f'{path}, row {row}: field {name!r} holds id {values[bad][0]} outside '
                      f'0..{high} (item_num N={num_items} from data_statis.df; pad id = N).')
  is_pad = history == num_items
  # Left padding: once a real item appears, no pad follows it.
  real_seen = np.maximum.accumulate(~is_pad, axis=1)
  misplaced = is_pad & real_seen
  if misplaced.any():
    row = int(np.argwhere(misplaced.any(axis=1))[0][0])
    right = bool((~is_pad[row]).any() and is_pad[row, -1])
    if not (right and allow_right_padded):
      raise sources.DataError(
          f'{path}, row {row}: field "seq" is {"right" if right else "not left"}-padded '
          f'({history[row].tolist()}); pad id {num_items} must only precede the items, because '
          'the model reads the sequence state at the last position (reference-spec §1.2). '
          'Re-export the split left-padded (or pass allow_right_padded=True to re-pad it).')
    logging.warning('%s is right-padded; moving pads to the left.', path)
    order = np.argsort(~is_pad, axis=1, kind='stable')  # Pads first, items keep their order.
    history = np.take_along_axis(history, order, axis=1)
  return history, target
