"""Readers for precomputed item language embeddings (config.text.encoder = 'file').

Formats: the AlphaFuse release's `<name>_emb.pickle` (a pickled list or array of N vectors, row i
= item i), `.npy`, and `.npz` (its single array, or the one named by `key`). Every reader returns
float32 [N, d] after checking shape, dtype and finiteness, so a bad file fails here, not as NaN
losses an hour later.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
from typing import Any

import numpy as np

from alphafuse_jax import errors

SUPPORTED_SUFFIXES = ('.pickle', '.pkl', '.npy', '.npz')
# More duplicate item vectors than this share of the rows is an error (`check_distinct`).
MAX_DUPLICATE_SHARE = 0.5


class EmbeddingFileError(errors.DataError):
  """A precomputed embedding file is malformed or does not fit the dataset."""


class EmbeddingFileNotFoundError(EmbeddingFileError, FileNotFoundError):
  """config.text.embeddings_file names no file."""


# What a pickle of vectors may reference: numpy/pandas containers and plain Python values.
_PICKLE_MODULES = ('numpy', 'pandas')
_PICKLE_BUILTINS = {'list', 'tuple', 'dict', 'set', 'frozenset', 'int', 'float', 'complex', 'bool',
                    'str', 'bytes', 'bytearray', 'slice', 'range', 'object'}


class _VectorUnpickler(pickle.Unpickler):
  """Refuses classes outside numpy/pandas/builtins, so loading never imports torch or runs code."""

  def find_class(self, module: str, name: str) -> Any:
    allowed = (module.split('.')[0] in _PICKLE_MODULES
               or (module == 'builtins' and name in _PICKLE_BUILTINS)
               or (module == 'collections' and name == 'OrderedDict'))
    if not allowed:
      raise EmbeddingFileError(
          f'{self.source}: the pickle references {module}.{name} (e.g. torch tensors); only '
          'numpy/pandas arrays and lists are read. Convert it with numpy: '
          'np.save("emb.npy", np.stack([np.asarray(v) for v in vectors])).')
    return super().find_class(module, name)


def _stack_vectors(obj: Any, path: pathlib.Path) -> np.ndarray:
  """A pickled list of vectors (or an array) as one array; ragged rows name the first bad item."""
  if hasattr(obj, 'to_numpy'):  # A pandas Series of vectors, or a DataFrame of rows.
    obj = obj.to_numpy()
  if isinstance(obj, np.ndarray) and obj.dtype != object:
    return obj
  if isinstance(obj, (dict, str, bytes)) or not hasattr(obj, '__len__'):
    raise EmbeddingFileError(f'{path}: expected a pickled list or array of N vectors, got '
                             f'{type(obj).__name__}.')
  rows = []
  for i, row in enumerate(obj):
    try:
      row = np.asarray(row)
    except (TypeError, ValueError) as e:
      raise EmbeddingFileError(f'{path}: item {i} is not a vector ({type(row).__name__}: {e}).')
    if row.ndim != 1:
      raise EmbeddingFileError(f'{path}: item {i} has shape {row.shape}; every item must be a '
                               '1-D vector.')
    if rows and row.shape != rows[0].shape:
      raise EmbeddingFileError(f'{path}: item {i} has {row.shape[0]} dims but item 0 has '
                               f'{rows[0].shape[0]}; all vectors must have the same length.')
    rows.append(row)
  if not rows:
    raise EmbeddingFileError(f'{path}: the pickle holds no vectors.')
  return np.stack(rows)


def _read(path: pathlib.Path, key: str | None) -> np.ndarray:
  suffix = path.suffix.lower()
  if suffix in ('.pickle', '.pkl'):
    # Only numpy/pandas/builtin classes are resolved (see _VectorUnpickler).
    try:
      with open(path, 'rb') as f:
        unpickler = _VectorUnpickler(f)
        unpickler.source = str(path)
        obj = unpickler.load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
      raise EmbeddingFileError(f'{path}: not a readable pickle ({e}); re-export it, or save '
                               'the vectors with np.save as .npy.') from e
    return _stack_vectors(obj, path)
  if suffix == '.npy':
    try:
      return np.load(path, allow_pickle=False)
    except ValueError as e:
      raise EmbeddingFileError(f'{path}: not a plain numeric .npy array ({e}); re-save the '
                               'vectors with np.save(path, vectors.astype(np.float32)).') from e
  # .npz: one array, or the one named by key.
  try:
    with np.load(path, allow_pickle=False) as archive:
      names = list(archive.files)
      if key is None:
        if len(names) != 1:
          raise EmbeddingFileError(f'{path}: the .npz holds {len(names)} arrays {names}; keep '
                                   'one (np.savez(path, emb=vectors)) or pass key= to choose.')
        key = names[0]
      if key not in names:
        raise EmbeddingFileError(f'{path}: the .npz has no array {key!r}; it has {names}.')
      return archive[key]
  except (ValueError, OSError) as e:
    if isinstance(e, EmbeddingFileError):
      raise
    raise EmbeddingFileError(f'{path}: not a readable .npz archive ({e}); re-save the vectors '
                             'with np.savez(path, emb=vectors).') from e


def validate_embeddings(array: np.ndarray, source: str = 'embeddings',
                        num_items: int | None = None) -> np.ndarray:
  """Checks a [N, d] numeric, finite matrix (N == num_items when given); returns it as float32."""
  if array.ndim != 2:
    raise EmbeddingFileError(f'{source}: expected a 2-D [num_items, dim] array, got shape '
                             f'{array.shape}; save one row per item.')
  if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                 or np.issubdtype(array.dtype, np.floating)):
    raise EmbeddingFileError(f'{source}: dtype {array.dtype} is not a real numeric type; save '
                             'the vectors as float32.')
  if num_items is not None and array.shape[0] != num_items:
    raise EmbeddingFileError(f'{source}: {array.shape[0]} vectors, but the dataset has '
                             f'{num_items} items; row i must be item i for every item.')
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise EmbeddingFileError(f'{source}: the array is empty (shape {array.shape}); save one '
                             'vector per item.')
  with np.errstate(over='ignore'):  # Values beyond float32 become inf and are reported below.
    array = np.asarray(array, dtype=np.float32)
  finite = np.isfinite(array)
  if not finite.all():
    item = int(np.flatnonzero(~finite.all(axis=1))[0])
    kind = 'NaN' if np.isnan(array[item]).any() else 'inf'
    dim = int(np.flatnonzero(~finite[item])[0])
    raise EmbeddingFileError(f'{source}: item {item} has {kind} (first at dim {dim}); '
                             f'{int((~finite.all(axis=1)).sum())} item(s) are not finite. '
                             'Recompute the vectors of those items.')
  return array


def check_distinct(vectors: np.ndarray, source: str) -> None:
  """Refuses item vectors [N, d] that are all identical or mostly duplicates; warns on a few.

  Items with equal vectors can only tie in every score a text pipeline gives them, so a table of
  duplicates cannot rank items (an empty item-text column, a constant file). The share counted
  is of rows equal to an earlier row.
  """
  num_items = vectors.shape[0]
  duplicates = num_items - len(np.unique(vectors, axis=0))
  if not duplicates:
    return
  share = duplicates / num_items
  what = (f'all {num_items} item vectors are identical' if duplicates == num_items - 1 else
          f'{duplicates} of {num_items} item vectors ({share:.1%}) repeat another item\'s')
  if duplicates == num_items - 1 or share > MAX_DUPLICATE_SHARE:
    raise EmbeddingFileError(f'{source}: {what}, so items cannot be told apart by their text; '
                             'check the item texts (data.delimited.item_text_file, '
                             'text.template) or the embeddings file, or use '
                             '--config.embedding.pipeline=id.')
  logging.warning('%s: %s (identical texts?); those items tie in every text score.', source, what)


def load_embeddings(path: str | os.PathLike[str], num_items: int | None = None,
                    key: str | None = None) -> np.ndarray:
  """Precomputed item vectors as float32 [N, d]; row i is item i.

  Args:
    path: `<name>_emb.pickle` (or .pkl), `.npy` or `.npz`.
    num_items: when given, N must equal it.
    key: for an .npz with several arrays, the one to read.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() not in SUPPORTED_SUFFIXES:
    raise EmbeddingFileError(f'{path}: unknown embedding file type {path.suffix!r}; supported: '
                             f'{", ".join(SUPPORTED_SUFFIXES)}.')
  if not path.is_file():
    raise EmbeddingFileNotFoundError(f'{path}: embedding file not found; fix '
                                     'config.text.embeddings_file.')
  if key is not None and path.suffix.lower() != '.npz':
    raise EmbeddingFileError(f'{path}: key={key!r} only applies to .npz files.')
  array = _read(path, key)
  return validate_embeddings(array, str(path), num_items)
