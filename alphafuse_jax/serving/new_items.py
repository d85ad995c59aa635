"""New items from their text alone: read, encode, map through the run's text map, extend a model.

A new item's language vector (the run's encoder and template, times the run's text scale) goes
through the saved `registry.TextMap` exactly as the catalogue's did, and the trained model is
rebuilt on a frozen table with those rows appended (ids N..N+M-1, pad id N+M):

  AlphaFuse         projected, whitened row; its ID part is zero (cover: zeros in the ID dims)
  WhitenRec         fully whitened row, through the trained adapter
  MoRec, UniSRec    the scaled vector, through the trained adapter / MoE adaptor
  LLM-ESR           the text view of the scaled vector; its ID view is zero
  iDreamRec         the fully whitened row itself
  LLMInit           only with `initial_rows`: the row its ID table started from
  ID, RLMRec        refused: their rows are free parameters
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from alphafuse_jax import inference_artifacts
from alphafuse_jax.data import sources
from alphafuse_jax.embeddings import registry
from alphafuse_jax.embeddings.base import FrozenTable
from alphafuse_jax.serving.catalogue import ServingError

# Columns that may name the new items' keys (besides the run's item-text item column).
KEY_COLUMNS = ('item_id', 'item', 'key')


@dataclasses.dataclass
class NewItems:
  """Items to rank beside the catalogue.

  Attributes:
    keys: their keys (distinct from the catalogue's).
    fields: {'title', 'year', 'genres'} per item (for display).
    vectors: float64 [M, d_l] language vectors ALREADY multiplied by the run's text scale.
  """
  keys: list[Any]
  fields: list[dict[str, Any]]
  vectors: np.ndarray


def text_map_for(artifacts: inference_artifacts.Artifacts, *,
                 initial_rows: bool = False) -> registry.TextMap:
  """The run's text map, or the error that says why its pipeline cannot place new items."""
  try:
    registry.check_text_map(artifacts.config.embedding.pipeline, initial_rows=initial_rows)
  except ValueError as e:
    raise ServingError(str(e)) from None
  return artifacts.text_map


def from_vectors(keys: Sequence[Any], vectors: np.ndarray,
                 artifacts: inference_artifacts.Artifacts,
                 fields: Sequence[Mapping[str, Any]] | None = None) -> NewItems:
  """New items from precomputed language vectors [M, d_l] (unscaled, the run's encoder)."""
  from alphafuse_jax.text import readers  # pylint: disable=g-import-not-at-top
  if artifacts.language is None:
    raise ServingError('This run has no language vectors (the ID pipeline): new items cannot be '
                       'placed from text.')
  try:
    vectors = readers.validate_embeddings(np.asarray(vectors), 'new item vectors')
  except ValueError as e:
    raise ServingError(str(e)) from None
  d_l = artifacts.language.shape[1]
  if vectors.shape != (len(keys), d_l):
    raise ServingError(f'new item vectors have shape {vectors.shape}; expected [{len(keys)} keys, '
                       f'd_l={d_l}] from the run\'s encoder ({artifacts.text["model"]}).')
  if fields is None:
    fields = [{'title': str(k)} for k in keys]
  # As training: float32 vectors to float64, times the run's scale.
  scaled = vectors.astype(np.float64) * float(artifacts.text['scale'])
  return NewItems(list(keys), [dict(f) for f in fields], scaled)


def from_fields(keys: Sequence[Any], fields: Sequence[Mapping[str, Any]],
                artifacts: inference_artifacts.Artifacts, *,
                texts: Sequence[str] | None = None) -> NewItems:
  """New items from their fields ({'title', 'year', 'genres'}), formatted by the run's template
  and encoded by its encoder; `texts` gives the encoder's input verbatim instead."""
  from alphafuse_jax import text as text_lib  # pylint: disable=g-import-not-at-top
  settings = artifacts.text
  if settings['encoder'] != 'minilm':
    raise ServingError(
        f'This run read its item vectors from a file ({settings["embeddings_file"]!r}), so the '
        'encoder is unknown here: give the new items as vectors from that encoder (an .npz with '
        "arrays 'keys' and 'vectors').")
  if len(keys) != len(fields):
    raise ServingError(f'{len(keys)} keys but {len(fields)} field sets; one per new item.')
  if texts is None:
    try:
      texts = text_lib.format_item_texts(fields, settings['template'])
    except (ValueError, TypeError) as e:
      raise ServingError(f'new item texts: {e}') from None
  vectors = text_lib.encode_texts(list(texts), encoder=minilm(), show_progress=False)
  return from_vectors(keys, vectors, artifacts, fields)


@functools.lru_cache(maxsize=1)
def minilm():
  """The MiniLM encoder, loaded once per process (adding items again reuses it)."""
  from alphafuse_jax import text as text_lib  # pylint: disable=g-import-not-at-top
  return text_lib.MiniLMEncoder()


def _read_npz(path: pathlib.Path, artifacts) -> NewItems:
  with np.load(path, allow_pickle=False) as archive:
    if 'keys' not in archive.files or 'vectors' not in archive.files:
      raise ServingError(f"{path}: an .npz of new items needs arrays 'keys' [M] and 'vectors' "
                         f"[M, d_l] (and optionally 'titles'); it has {archive.files}.")
    keys = [k.item() for k in archive['keys']]
    titles = list(archive['titles']) if 'titles' in archive.files else [str(k) for k in keys]
    vectors = archive['vectors']
  return from_vectors(keys, vectors, artifacts, [{'title': str(t)} for t in titles])


def _read_table(path: pathlib.Path, artifacts) -> NewItems:
  """A header row, then one item a row: its key and text fields (or a verbatim 'text')."""
  sep = '\t' if path.suffix.lower() in ('.tsv', '.tab') else ','
  try:
    head, rows, _ = sources.read_table(path, sep, None, header=True)
  except ValueError as e:
    raise ServingError(str(e)) from None
  key_names = KEY_COLUMNS + (artifacts.config.data.delimited.item_text_item_column,)
  key_column = next((i for i, name in enumerate(head) if name in key_names), None)
  if key_column is None:
    raise ServingError(f'{path}, line 1: no key column (one of {sorted(set(key_names))}) in the '
                       f'header {head}; name the new items\' key column item_id.')
  keys = [row[key_column].strip() for row in rows]
  if 'text' in head:
    texts = [row[head.index('text')].strip() for row in rows]
    return from_fields(keys, [{'title': t} for t in texts], artifacts, texts=texts)
  fields = []
  for row in rows:
    entry, title = {'title': '', 'year': '', 'genres': []}, []
    for c, name in enumerate(head):
      if c == key_column:
        continue
      if name == 'year':
        entry['year'] = row[c].strip()
      elif name == 'genres':
        entry['genres'] = [g for g in row[c].strip().split('|') if g]
      else:
        title.append(row[c].strip())
    entry['title'] = ' '.join(t for t in title if t)
    fields.append(entry)
  return from_fields(keys, fields, artifacts)


def read(path: str | os.PathLike[str], artifacts: inference_artifacts.Artifacts) -> NewItems:
  """New items from a file: a CSV/TSV of keys and text fields (title, year, genres joined by '|',
  or one verbatim 'text' column), or an .npz of precomputed vectors ('keys', 'vectors')."""
  path = pathlib.Path(os.path.expanduser(str(path)))
  if not path.is_file():
    raise ServingError(f'New items file {path} does not exist.')
  suffix = path.suffix.lower()
  if suffix == '.npy':
    raise ServingError(f'{path}: an .npy cannot carry the items\' keys; save an .npz instead: '
                       "np.savez(path, keys=np.array([...]), vectors=vectors).")
  return _read_npz(path, artifacts) if suffix == '.npz' else _read_table(path, artifacts)


def _with_rows(table: FrozenTable, rows: np.ndarray) -> FrozenTable:
  return FrozenTable(np.concatenate([table.values, np.asarray(rows, np.float32)], axis=0))


def extend_model(model, params: Any, text_map: registry.TextMap,
                 vectors: np.ndarray) -> tuple[Any, Any]:
  """The model and params with M new items appended (ids N..N+M-1; the pad id becomes N+M).

  Args:
    model: a `models.base.Recommender` whose `item_embedding` holds N items.
    params: its params.
    text_map: the run's text map.
    vectors: float64 [M, d_l] scaled language vectors of the new items.
  Returns:
    (model, params) of the same backbone over N + M items: the new items' frozen rows come from
    `text_map.rows(vectors)`; their ID rows (AlphaFuse, LLM-ESR) are zero, or with LLMInit's
    initial rows the text map's rows.
  """
  embedding = model.item_embedding
  num_items, num_new = embedding.num_items, len(vectors)
  rows = text_map.rows(vectors)
  initial = text_map.pipeline in registry.INITIAL_ROW_PIPELINES
  # LLMInit's ID rows start at language_scale x its initial table (its frozen rows stay unscaled,
  # as the scaled text-map pipelines scale theirs inside the module).
  scale = getattr(embedding, 'language_scale', 1.0)
  initial_rows = rows if scale == 1.0 else rows * np.float32(scale)
  updates: dict[str, Any] = {'num_items': num_items + num_new}
  for field in dataclasses.fields(embedding):
    table = getattr(embedding, field.name)
    if isinstance(table, FrozenTable):
      # The text map feeds `language_table` (LLMInit: its initial table); other frozen tables
      # (LLM-ESR's initial ID rows, used only at init) get zero rows like the ID rows.
      fed = field.name == ('initial_table' if initial else 'language_table')
      updates[field.name] = _with_rows(table, rows if fed else
                                       np.zeros((num_new, table.dim), np.float32))

  def extend_id_rows(path, leaf):
    if getattr(path[-1], 'key', None) != 'id_table' or leaf.shape[0] != num_items + 1:
      return leaf
    new_rows = initial_rows if initial else np.zeros((num_new,) + leaf.shape[1:], np.float32)
    # Real rows, the new rows, then the padding row last (pad id N + M).
    return np.concatenate([np.asarray(leaf[:num_items]), np.asarray(new_rows, leaf.dtype),
                           np.asarray(leaf[num_items:])], axis=0)

  params = jax.tree_util.tree_map_with_path(extend_id_rows, params)
  return model.clone(item_embedding=embedding.clone(**updates)), params
