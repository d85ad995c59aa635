"""A trained model in use: top-K items for histories, from a finished workdir.

  rec = serving.Recommender.from_workdir('workdirs/default')
  rec.recommend(['Toy Story (1995)', 'Heat (1995)'], k=10)       # [Recommendation(key, title, ...)]
  rec = rec.with_new_items(serving.read_new_items('new.csv', rec.artifacts))
  ids, scores = rec.top_k(histories, k=10, exclude_seen=True)   # batched, jit-compiled

The model is rebuilt with `builders.build_model(..., for_training=False)` from the workdir's
`inference/` metadata and the params of `best/` (restored onto one device, whatever the run was
trained on). Scores are the model's: `ranking_states` against `item_table`, top-K by a chunked
`lax.top_k`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from alphafuse_jax import builders
from alphafuse_jax import checkpointing
from alphafuse_jax import errors
from alphafuse_jax import inference_artifacts
from alphafuse_jax import parallel
from alphafuse_jax import train
from alphafuse_jax.serving import new_items as new_items_lib
from alphafuse_jax.serving.catalogue import Catalogue
from alphafuse_jax.serving.catalogue import ServingError
from alphafuse_jax.serving.topk import chunk_table
from alphafuse_jax.serving.topk import top_k_of_chunks

# Items scored per top-K step: [batch, chunk] scores are alive at once.
DEFAULT_CHUNK_SIZE = 65536
# Errors of bad input (a command line prints them as one line): not bugs. The project's own
# (ServingError, ArtifactsError, DataError, CheckpointError, ...) and a missing file.
USER_ERRORS = (errors.AlphafuseError, FileNotFoundError)
# Exit code of a command line on a USER_ERROR, as main.py's.
EXIT_INPUT_ERROR = 2


def exit_on_input_error(error: BaseException) -> None:
  """Prints a USER_ERROR as one line on stderr and exits with EXIT_INPUT_ERROR; with
  ALPHAFUSE_DEBUG=1 it is raised with its traceback instead."""
  if os.environ.get('ALPHAFUSE_DEBUG'):
    raise error
  print(f'error: {errors.one_line(error)}', file=sys.stderr, flush=True)
  sys.exit(EXIT_INPUT_ERROR)


@dataclasses.dataclass(frozen=True)
class Recommendation:
  """One recommended item: its original key, display title, score, index, and whether it was
  added after training (`new`)."""
  key: Any
  title: str
  score: float
  index: int
  new: bool


def restore_params(workdir: str, model) -> Any:
  """The params of `<workdir>/best/`, onto this process's first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = jax.eval_shape(lambda: train.init_params(model, jax.random.key(0)))
  template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          shapes)
  ckpt = checkpointing.Checkpoints(os.path.abspath(workdir))
  try:
    return ckpt.restore_best(template)
  finally:
    ckpt.close()


def unpad_item_tables(model, params) -> tuple[Any, Any]:
  """The model and params with ID tables of N + 1 rows.

  A run whose item tables were sharded over M devices (`config.model_shards`) padded their rows
  to a multiple of M with zero rows past the pad row N; serving runs on one device, so it keeps
  the real rows (and new items append after them as for any run).
  """
  embedding = model.item_embedding
  if getattr(embedding, 'row_multiple', 1) == 1:
    return model, params
  rows = embedding.num_items + 1
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x[:rows] if parallel.is_item_table(path) else x, params)
  return model.clone(item_embedding=embedding.clone(row_multiple=1)), params


def ranked(model, params, chunks, starts, history, exclude, *, k: int):
  """Top-k ids and scores [B, k] of histories [B, L] (pad id = the model's N) against the
  chunked item table (`topk.chunk_table`)."""
  index = jnp.arange(history.shape[0], dtype=jnp.int32)  # Seeds DreamRec's sampling per row.
  states = model.apply({'params': params}, history, index, method='ranking_states')
  scores, ids = top_k_of_chunks(states, chunks, starts, model.num_items, k, exclude)
  return ids, scores


class Recommender:
  """A trained model, its catalogue (plus any new items) and jit-compiled top-K.

  Attributes:
    artifacts: the workdir's `inference_artifacts.Artifacts`.
    catalogue: names <-> indices of every rankable item (trained ones first, then new ones).
    model, params: the backbone over all of them, and its params.
    max_len: L, the history window (longer histories keep their last L items).
  """

  def __init__(self, artifacts: inference_artifacts.Artifacts, model, params, catalogue: Catalogue,
               *, workdir: str = '', chunk_size: int = DEFAULT_CHUNK_SIZE):
    self.artifacts, self.model, self.params = artifacts, model, params
    self.catalogue, self.workdir, self.chunk_size = catalogue, workdir, int(chunk_size)
    self.max_len = artifacts.max_len
    self._chunks = None
    self._ranked = jax.jit(functools.partial(ranked, model), static_argnames='k')
    self._states = jax.jit(lambda p, h: model.apply(
        {'params': p}, h, jnp.arange(h.shape[0], dtype=jnp.int32), method='ranking_states'))

  @classmethod
  def from_workdir(cls, workdir: str, *, new_items: str | None = None, initial_rows: bool = False,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> 'Recommender':
    """Loads a finished run (its `inference/` metadata and `best/` params), plus the items of a
    `new_items` file (see `new_items.read`) when given."""
    artifacts = inference_artifacts.load(workdir)
    if new_items:  # Checked before the model is built: a refusal costs nothing.
      new_items_lib.text_map_for(artifacts, initial_rows=initial_rows)
    model = builders.build_model(artifacts.config, artifacts, artifacts.language,
                                 for_training=False)
    model, params = unpad_item_tables(model, restore_params(workdir, model))
    catalogue = Catalogue(artifacts.item_keys, artifacts.item_fields)
    recommender = cls(artifacts, model, params, catalogue, workdir=workdir,
                      chunk_size=chunk_size)
    if new_items:
      items = new_items_lib.read(new_items, artifacts)
      recommender = recommender.with_new_items(items, initial_rows=initial_rows)
    return recommender

  # ---- new items ------------------------------------------------------------------------------
  def with_new_items(self, items: new_items_lib.NewItems, *,
                     initial_rows: bool = False) -> 'Recommender':
    """A recommender that also ranks `items` (placed from their text; see `new_items`)."""
    text_map = new_items_lib.text_map_for(self.artifacts, initial_rows=initial_rows)
    catalogue = self.catalogue.extended(items.keys, items.fields)
    model, params = new_items_lib.extend_model(self.model, self.params, text_map, items.vectors)
    return Recommender(self.artifacts, model, params, catalogue, workdir=self.workdir,
                       chunk_size=self.chunk_size)

  def add_items_from_text(self, keys: Sequence[Any], fields: Sequence[dict[str, Any]],
                          **kwargs) -> 'Recommender':
    """`with_new_items` of items given by their fields ({'title', 'year', 'genres'})."""
    return self.with_new_items(new_items_lib.from_fields(keys, fields, self.artifacts), **kwargs)

  def add_items_from_vectors(self, keys: Sequence[Any], vectors: np.ndarray,
                             **kwargs) -> 'Recommender':
    """`with_new_items` of items given by their (unscaled) language vectors [M, d_l]."""
    return self.with_new_items(new_items_lib.from_vectors(keys, vectors, self.artifacts),
                               **kwargs)

  # ---- scoring --------------------------------------------------------------------------------
  @property
  def num_items(self) -> int:
    return len(self.catalogue)

  def scoring_table(self) -> tuple[jax.Array, jax.Array]:
    """The item table cut into chunks (`topk.chunk_table`), computed once and kept."""
    if self._chunks is None:
      self._chunks = jax.jit(lambda p: chunk_table(
          self.model.apply({'params': p}, method='item_table'), self.chunk_size))(self.params)
    return self._chunks

  def item_table(self) -> jax.Array:
    """[num_items, d] the vectors every state is scored against."""
    chunks, _ = self.scoring_table()
    return chunks.reshape(-1, chunks.shape[-1])[:self.num_items]

  def pad_histories(self, histories: Sequence[Sequence[int]], *, exclude_seen: bool,
                    exclude_width: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Index lists -> (history int32 [B, L] left-padded with the pad id, exclude [B, S] or None).

    The model sees each history's last L items; `exclude_seen` masks every item of it.
    """
    pad = self.num_items
    history = np.full((len(histories), self.max_len), pad, np.int32)
    for row, items in enumerate(histories):
      items = list(items)[-self.max_len:]
      if items:
        history[row, self.max_len - len(items):] = items
    if not exclude_seen:
      return history, None
    width = exclude_width or max(1, max((len(h) for h in histories), default=1))
    exclude = np.full((len(histories), width), pad, np.int32)
    for row, items in enumerate(histories):
      exclude[row, :len(items)] = list(items)[:width]
    return history, exclude

  def check_k(self, k: int) -> int:
    """`k` as an int, or the error that says which values fit."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_items:
      raise ServingError(f'k={k!r} must be an int in 1..{self.num_items} (the items ranked).')
    return int(k)

  def top_k_arrays(self, history: np.ndarray, exclude: np.ndarray | None,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 [B, k] and scores float32 [B, k] of padded histories (see `pad_histories`)."""
    ids, scores = self._ranked(self.params, *self.scoring_table(), jnp.asarray(history),
                               None if exclude is None else jnp.asarray(exclude),
                               k=self.check_k(k))
    return np.asarray(ids), np.asarray(scores)

  def user_states(self, history: np.ndarray) -> np.ndarray:
    """[B, d] ranking states of padded histories [B, L]."""
    return np.asarray(self._states(self.params, jnp.asarray(history)))

  def top_k(self, histories: Sequence[Sequence[int]], k: int = 10, *, exclude_seen: bool = False,
            batch_size: int = 256, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of many histories (index lists), in batches of one compiled shape.

    Returns ids int32 [U, k] and scores float32 [U, k]; slots that no eligible item fills
    (exclude_seen on a tiny catalogue) hold -inf and the id num_items.
    """
    k = self.check_k(k)
    if batch_size < 1:
      raise ServingError(f'batch_size={batch_size} must be >= 1.')
    for row, items in enumerate(histories):
      if not len(items):
        raise ServingError(f'History {row} is empty: every user needs at least one item.')
      if min(items) < 0 or max(items) >= self.num_items:
        raise ServingError(f'History {row} has item indices outside 0..{self.num_items - 1}; '
                           'name items by key with catalogue.indices().')
    # One exclusion width for every batch (a power of two): one compile.
    longest = max((len(h) for h in histories), default=1)
    width = 1 << max(0, (longest - 1).bit_length())
    all_ids = np.zeros((len(histories), k), np.int32)
    all_scores = np.zeros((len(histories), k), np.float32)
    starts = range(0, len(histories), batch_size)
    for start in tqdm.tqdm(starts, desc='recommend', unit='batch', disable=not progress):
      rows = list(histories[start:start + batch_size])
      real = len(rows)
      rows += [rows[0]] * (batch_size - real)  # Pad the last batch: one shape, one compile.
      history, exclude = self.pad_histories(rows, exclude_seen=exclude_seen, exclude_width=width)
      ids, scores = self.top_k_arrays(history, exclude, k)
      all_ids[start:start + real], all_scores[start:start + real] = ids[:real], scores[:real]
    return all_ids, all_scores

  def recommend(self, history: Iterable[Any] | str, k: int = 10, *,
                exclude_seen: bool = False) -> list[Recommendation]:
    """The top-k items after `history` (item keys or titles, oldest first; or one
    comma-separated string)."""
    if isinstance(history, str):
      indices = self.catalogue.parse_history(history)
    else:
      indices = self.catalogue.indices(history)
    history_ids, exclude = self.pad_histories([indices], exclude_seen=exclude_seen)
    ids, scores = self.top_k_arrays(history_ids, exclude, k)
    return [self.describe(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if np.isfinite(s)]

  def describe(self, index: int, score: float) -> Recommendation:
    return Recommendation(key=self.catalogue.keys[index], title=self.catalogue.titles[index],
                          score=score, index=index, new=self.catalogue.is_new(index))
