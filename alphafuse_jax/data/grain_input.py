"""Training batches through Grain: a random-access source, the run's batch order, prefetch.

`config.data.input` picks how the loop gets its training batches:

- 'numpy': `pipeline.batches` over the split's in-memory arrays, one epoch at a time.
- 'grain': a `grain.MapDataset` over the run's global steps. Step s (epoch s // steps_per_epoch)
  maps to this process's rows through `pipeline.train_order` and `pipeline.process_rows` (the one
  definition of the order, so the batches equal the numpy path's bit for bit), then to the rows'
  fields read from a random-access source, then to device arrays in a prefetch thread. The
  iterator's state (the next global step) is saved with every checkpoint
  (`checkpointing.Checkpoints`), so a resumed run continues where the checkpoint was taken.

Sources (grain's `RandomAccessDataSource` protocol: `__len__`, `__getitem__`, plus `read(rows)`
for a whole batch): `TfdsSplitSource` reads the prepared TFDS split's ArrayRecord chunks through
`builder.as_data_source()` and keeps at most `cache_mb` of decoded chunks (least recently used
go first), so the split need not fit in host memory; what it holds per example is its
(user_id, position) keys for the order (8 bytes). `ArraySource` serves in-memory arrays (a
PreparedDataset built in memory, tests). With the Grain input the loop loads its dataset with
`data.load(config.data, train_arrays=False)`: val, test and the metadata in memory, the train
split left on disk (`tfds_builder.LazySplit`), so `train_input` opens a TfdsSplitSource on
its directory and the train split's arrays are never read into host memory.

Grain's own shuffle and its process sharding (`ShardByJaxProcess`) would give another order than
numpy's permutation, so the order is pipeline.py's and process p keeps its slice of each global
batch, as on the numpy path.
"""

from __future__ import annotations

import logging
import pathlib
import threading
from typing import Any, Callable, Iterator, Mapping
import weakref

import grain
import numpy as np
import tensorflow_datasets as tfds

from alphafuse_jax import errors
from alphafuse_jax.data import pipeline
from alphafuse_jax.data import protocols
from alphafuse_jax.data import tfds_builder

INPUTS = ('numpy', 'grain')
# Batches prepared ahead of the step, already on the devices (a thread fills the buffer).
PREFETCH = 2
_KEYS = ('user_id', 'position')  # The fields the shuffled order is a function of.


class ArraySource:
  """Rows of in-memory arrays with a common leading dimension."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {k: v.shape[0] for k, v in self._arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
      raise ValueError(f'arrays must be non-empty and share their leading dimension: {sizes}.')
    self._n = next(iter(sizes.values()))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    return {k: v[row] for k, v in self._arrays.items()}

  def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in self._arrays.items()}

  def keys(self) -> dict[str, np.ndarray]:
    """The (user_id, position) fields that `pipeline.train_order` sorts by, when present."""
    return {k: self._arrays[k] for k in _KEYS if k in self._arrays}

  def __repr__(self) -> str:
    return f'ArraySource(n={self._n}, fields={sorted(self._arrays)})'


class TfdsSplitSource:
  """Rows of a prepared split (`tfds_builder` layout: chunks of rows, one ArrayRecord record each).

  Opening reads every record once (streaming) for its chunk index, row count and (user_id,
  position). Decoded chunks live in a pool of `cache_mb` (one int32 matrix of chunk slots, least
  recently used chunk evicted first), so a batch is one vectorised gather once its chunks are in;
  a split larger than the pool decodes chunks again as batches need them.
  """

  def __init__(self, directory: pathlib.Path | str, split: str, *, cache_mb: float = 1024.0):
    self.directory = pathlib.Path(directory)
    self.split = split
    self._records = tfds.builder_from_directory(str(self.directory)).as_data_source(split)
    self._lock = threading.Lock()
    record_of, sizes, keys, first = {}, {}, {k: {} for k in _KEYS}, None
    for start in range(0, len(self._records), 64):
      batch = range(start, min(start + 64, len(self._records)))
      for record, example in zip(batch, self._records.__getitems__(list(batch))):
        chunk = int(example['chunk'])
        record_of[chunk], sizes[chunk] = record, len(example['target'])
        for k in _KEYS:
          keys[k][chunk] = np.asarray(example[k], np.int32)
        first = self._matrix(example) if first is None else first
    num_chunks = len(record_of)
    if sorted(record_of) != list(range(num_chunks)):
      raise errors.DataError(f'split {split!r} of {self.directory} lacks some of its chunks; '
                             'delete that directory to prepare the data again.')
    self._record_of = np.asarray([record_of[c] for c in range(num_chunks)], np.int64)
    self._starts = np.concatenate([[0], np.cumsum([sizes[c] for c in range(num_chunks)])])
    self._keys = {k: np.concatenate([keys[k][c] for c in range(num_chunks)] +
                                    [np.zeros(0, np.int32)]) for k in _KEYS}
    # The pool: `slots` chunk matrices of `slot_rows` rows; slot_of[chunk] is -1 when absent.
    self._width = first.shape[1] if first is not None else 3
    self._slot_rows = max(sizes.values(), default=1)
    slot_bytes = self._slot_rows * self._width * 4
    self._slots = int(min(num_chunks, max(1, cache_mb * 2**20 // slot_bytes)))
    self._pool = np.zeros((0, self._width), np.int32)  # Allocated on first read.
    self._slot_of = np.full(num_chunks, -1, np.int64)
    self._chunk_in = np.full(self._slots, -1, np.int64)  # The chunk each slot holds.
    self._last_used = np.zeros(self._slots, np.int64)
    self._tick = 0

  @staticmethod
  def _matrix(example: Mapping[str, Any]) -> np.ndarray:
    """A decoded chunk as one int32 matrix [rows, L + 3]: history, then target, user, position."""
    history = np.asarray(example['history'], np.int32)
    history = history.reshape(len(example['target']), -1)
    columns = [np.asarray(example[k], np.int32)[:, None] for k in ('target',) + _KEYS]
    return np.concatenate([history] + columns, axis=1)

  def _load(self, chunks: np.ndarray) -> None:
    """Decodes the absent `chunks` (unique, at most `slots`) into free or least recent slots."""
    missing = chunks[self._slot_of[chunks] < 0]
    if not missing.size:
      return
    if not self._pool.size:
      self._pool = np.zeros((self._slots * self._slot_rows, self._width), np.int32)
    keep = np.zeros(self._slots, bool)
    keep[self._slot_of[chunks][self._slot_of[chunks] >= 0]] = True
    candidates = np.flatnonzero(~keep)
    free = candidates[np.argsort(self._last_used[candidates], kind='stable')][:missing.size]
    examples = self._records.__getitems__(self._record_of[missing].tolist())
    for slot, chunk, example in zip(free, missing, examples):
      if self._chunk_in[slot] >= 0:
        self._slot_of[self._chunk_in[slot]] = -1
      matrix = self._matrix(example)
      self._pool[slot * self._slot_rows:slot * self._slot_rows + len(matrix)] = matrix
      self._chunk_in[slot], self._slot_of[chunk] = chunk, slot

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.read(np.asarray([row])).items()}

  def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The fields of `rows` (any order, repeats allowed), as `PreparedDataset.splits` holds them."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
      raise IndexError(f'rows outside 0..{len(self) - 1} of split {self.split!r}')
    chunks = np.searchsorted(self._starts, rows, side='right') - 1
    needed = np.unique(chunks)
    out = np.empty((rows.size, self._width), np.int32)
    with self._lock:
      # Batches needing more chunks than the pool holds go through it in pieces.
      for part in np.array_split(needed, max(1, -(-needed.size // self._slots))):
        if not part.size:
          continue
        self._load(part)
        self._tick += 1
        self._last_used[self._slot_of[part]] = self._tick
        these = np.isin(chunks, part) if part.size < needed.size else slice(None)
        offsets = self._slot_of[chunks[these]] * self._slot_rows + rows[these] - self._starts[
            chunks[these]]
        out[these] = self._pool[offsets]
    length = self._width - 3
    return {'user_id': out[:, length + 1], 'position': out[:, length + 2],
            'history': out[:, :length], 'target': out[:, length]}

  def keys(self) -> dict[str, np.ndarray]:
    return dict(self._keys)

  def __repr__(self) -> str:
    return f'TfdsSplitSource({self.directory}, {self.split!r}, n={len(self)})'


class _StepRows:
  """Global step -> this process's (rows, mask), epoch by epoch from `pipeline.train_order`."""

  def __init__(self, keys: Mapping[str, np.ndarray], n: int, batch_size: int, steps: int, *,
               seed: int, shuffle: bool, process_index: int, process_count: int):
    self._keys, self._n, self._batch_size, self._steps = keys, n, batch_size, steps
    self._seed, self._shuffle = seed, shuffle
    self._process_index, self._process_count = process_index, process_count
    self._lock = threading.Lock()
    self._epoch, self._order = None, None  # The order of the last epoch asked for.

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    epoch, within = divmod(int(step), self._steps)
    with self._lock:
      if self._epoch != epoch:
        self._order = pipeline.train_order(self._keys, self._n, seed=self._seed, epoch=epoch,
                                           shuffle=self._shuffle)
        self._epoch = epoch
      order = self._order
    return pipeline.process_rows(order, self._batch_size, within,
                                 process_index=self._process_index,
                                 process_count=self._process_count)


def grain_batches(source: Any, batch_size: int, *, seed: int, shuffle: bool, num_epochs: int,
                  num_devices: int = 1, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Element s = `pipeline.batches`' batch s % steps of epoch s // steps, for s < epochs*steps.

  `source` is an ArraySource or TfdsSplitSource; the elements are host numpy, with 'mask'.
  """
  n = len(source)
  steps = pipeline.check_layout(n, batch_size, num_devices=num_devices,
                                process_index=process_index, process_count=process_count)
  rows = _StepRows(source.keys(), n, batch_size, steps, seed=seed, shuffle=shuffle,
                   process_index=process_index, process_count=process_count)

  def read(rows_and_mask):
    local, mask = rows_and_mask
    return pipeline.device_layout(dict(source.read(local), mask=mask), num_devices)

  return grain.MapDataset.range(num_epochs * steps).map(rows).map(read)


def _close(iterator) -> None:
  iterator.close()
  # grain 0.2.18's ThreadPrefetchDatasetIterator.close is not idempotent: its __del__ calls it
  # again, which prints an AttributeError when that happens while Python shuts down.
  iterator.close = lambda: None


class TrainInput:
  """The loop's training batches, `(device batch, real rows over all processes)` per step.

  `epoch(e, start_step)` yields the steps start_step.. of epoch e; `iterator` is the Grain
  iterator to checkpoint (None on the numpy path); `place` puts a host batch on the devices
  (`parallel.DataParallel.put_batch`).
  """

  def __init__(self, kind: str, source: Any, batch_size: int, *, seed: int, shuffle: bool,
               num_epochs: int, num_devices: int, process_index: int, process_count: int,
               place: Callable[[dict[str, np.ndarray]], Any], arrays=None):
    self.kind, self.source, self._arrays = kind, source, arrays
    self._layout = dict(num_devices=num_devices, process_index=process_index,
                        process_count=process_count)
    self._batch_size, self._seed, self._shuffle = batch_size, seed, shuffle
    self.steps_per_epoch = pipeline.check_layout(len(source), batch_size, **self._layout)
    local_rows = batch_size // process_count
    index = (process_index * local_rows + np.arange(local_rows, dtype=np.int32)).reshape(
        num_devices, -1)  # The row's place in the global batch: it seeds its randomness.
    self._finish = lambda b: (place(dict(b, index=index)), int(b['mask'].sum()) * process_count)
    self.iterator = None
    if kind == 'grain':
      batches = grain_batches(source, batch_size, seed=seed, shuffle=shuffle,
                              num_epochs=num_epochs, **self._layout)
      ds = batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      ds = grain.experimental.ThreadPrefetchIterDataset(ds.map(self._finish),
                                                        prefetch_buffer_size=PREFETCH)
      self.iterator = iter(ds)
      self._finalizer = weakref.finalize(self, _close, self.iterator)  # Also at exit.

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[Any, int]]:
    if self.kind == 'numpy':
      for batch in pipeline.batches(self._arrays, self._batch_size, seed=self._seed, epoch=epoch,
                                    shuffle=self._shuffle, start_step=start_step,
                                    **self._layout):
        yield self._finish(batch)
      return
    expected = epoch * self.steps_per_epoch + start_step
    at = grain.experimental.get_next_index(self.iterator)
    if at != expected:
      if at:  # 0: a checkpoint without the iterator (numpy input, older runs): start there.
        raise errors.CheckpointError(
            f'the data iterator restored with the checkpoint is at step {at}, the train state '
            f'at step {expected}; remove the workdir to start over.')
      grain.experimental.set_next_index(self.iterator, expected)
    for _ in range(start_step, self.steps_per_epoch):
      yield next(self.iterator)

  def close(self) -> None:
    """Stops the prefetch thread and drops the iterator (no batch is read after this)."""
    if self.iterator is not None:
      self._finalizer()
      self.iterator = None


def train_input(config: Any, dataset: protocols.PreparedDataset, *, num_devices: int,
                process_index: int, process_count: int,
                place: Callable[[dict[str, np.ndarray]], Any]) -> TrainInput:
  """The TrainInput `config.data.input` names, over the train split of `dataset`."""
  kind = config.data.input
  if kind not in INPUTS:
    raise errors.ConfigError(f'config.data.input={kind!r} is unknown; use one of '
                             f'{", ".join(INPUTS)}.')
  arrays = dataset.splits['train']
  lazy = isinstance(arrays, tfds_builder.LazySplit)  # load(..., train_arrays=False): on disk.
  if lazy and kind == 'numpy':
    arrays = arrays.arrays()  # The numpy input batches from memory (read with a warning).
  if lazy and kind == 'grain':  # The arrays stay on disk; only the order keys are held.
    source = TfdsSplitSource(arrays.directory, 'train', cache_mb=config.data.grain_cache_mb)
  elif kind == 'grain' and (directory := tfds_builder.prepared_directory(config.data)).is_dir():
    source = TfdsSplitSource(directory, 'train', cache_mb=config.data.grain_cache_mb)
    if len(source) != len(arrays['target']):
      raise errors.DataError(f'{directory} holds {len(source)} train examples, the loaded '
                             f'dataset {len(arrays["target"])}; delete that directory.')
  else:  # The numpy input, or a dataset built in memory: Grain reads the same rows from it.
    if kind == 'grain':
      logging.info('no prepared TFDS split in %s; Grain reads the in-memory arrays', directory)
    source = ArraySource(arrays)
  t = config.train
  return TrainInput(kind, source, t.batch_size, seed=t.seed, shuffle=t.shuffle,
                    num_epochs=t.num_epochs, num_devices=num_devices,
                    process_index=process_index, process_count=process_count, place=place,
                    arrays=arrays)
