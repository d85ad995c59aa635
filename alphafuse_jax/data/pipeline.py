"""Batching: per-epoch shuffling, padded last batch with a mask, device and host sharding.

A global batch of `batch_size` rows is cut from a permutation of the examples that depends only on
(seed, epoch), so every process computes the same global batches (a split's examples are permuted
from their (user_id, position) order, so the shuffle does not depend on how the split is stored;
unshuffled epochs keep the stored order, the authors' training order); process p keeps rows
[p * B/P, (p+1) * B/P) of each, reshaped to [num_devices, B / (num_devices * P)]. The last batch is
padded with copies of a real row and `mask` marks the real rows, so every example is counted
exactly once per epoch. `start_step` skips whole batches, for resuming inside an epoch.

`check_layout`, `train_order` and `process_rows` are the one definition of which rows a process
gets at each step: `batches` (numpy) and `grain_input` (Grain) both build on them.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from alphafuse_jax.data import protocols


def num_batches(num_examples: int, batch_size: int) -> int:
  """Batches per epoch: the last one is padded, none is dropped."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  return -(-int(num_examples) // batch_size)


def epoch_order(num_examples: int, *, seed: int, epoch: int, shuffle: bool,
                base: np.ndarray | None = None) -> np.ndarray:
  """Example order of one epoch: `base` (default 0..n-1) permuted by (seed, epoch), or 0..n-1."""
  if not shuffle:
    return np.arange(num_examples)
  permutation = np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)
  return permutation if base is None else base[permutation]


def canonical_order(arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
  """Row indices sorted by (user_id, position), or None when the fields are absent."""
  if 'user_id' not in arrays or 'position' not in arrays:
    return None
  return np.lexsort((arrays['position'], arrays['user_id']))


def check_layout(n: int, batch_size: int, *, num_devices: int = 1, process_index: int = 0,
                 process_count: int = 1) -> int:
  """Checks the batch layout and returns the batches per epoch."""
  shards = num_devices * process_count
  if num_devices < 1 or process_count < 1 or batch_size % shards:
    raise ValueError(f'batch_size={batch_size} must be divisible by num_devices * process_count '
                     f'= {num_devices} * {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in 0..{process_count - 1}.')
  return num_batches(n, batch_size)


def train_order(keys: Mapping[str, np.ndarray], num_examples: int, *, seed: int, epoch: int,
                shuffle: bool) -> np.ndarray:
  """The epoch's example order; `keys` needs only 'user_id' and 'position' (when shuffled)."""
  return epoch_order(num_examples, seed=seed, epoch=epoch, shuffle=shuffle,
                     base=canonical_order(keys) if shuffle else None)


def process_rows(order: np.ndarray, batch_size: int, step: int, *, process_index: int = 0,
                 process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """This process's rows of global batch `step` of an epoch `order`, and their mask.

  Returns:
    (rows int [B / process_count], mask bool [same]); the last batch is padded with the epoch's
    first row (a valid id, masked out).
  """
  rows = order[step * batch_size:(step + 1) * batch_size]
  mask = np.zeros(batch_size, bool)
  mask[:rows.size] = True
  rows = np.concatenate([rows, np.full(batch_size - rows.size, order[0], rows.dtype)])
  per_process = batch_size // process_count
  local = slice(process_index * per_process, (process_index + 1) * per_process)
  return rows[local], mask[local]


def device_layout(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
  """[rows, ...] -> [num_devices, rows / num_devices, ...] for every field."""
  return {k: v.reshape((num_devices, v.shape[0] // num_devices) + v.shape[1:])
          for k, v in batch.items()}


def batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int, epoch: int,
            shuffle: bool, num_devices: int = 1, process_index: int = 0,
            process_count: int = 1, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's part of every global batch of one epoch.

  Args:
    arrays: fields with a common leading dimension n (e.g. a split of a PreparedDataset).
    batch_size: global batch size B, divisible by num_devices * process_count.
    seed, epoch: the shuffle key; the same pair always gives the same order.
    shuffle: False keeps the stored order; True permutes the (user_id, position) order when the
      arrays have those fields (a PreparedDataset split), else the stored order.
    num_devices: local devices of this process.
    process_index, process_count: this host's contiguous shard of each global batch.
    start_step: the first batch to yield (0 .. num_batches), for resuming mid-epoch.
  Yields:
    {field: [num_devices, B // (num_devices * process_count), ...], 'mask': bool [same 2 dims]}.
  """
  if not arrays:
    raise ValueError('arrays is empty; pass a dict of equally long numpy arrays.')
  sizes = {k: np.shape(v)[0] for k, v in arrays.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f'arrays must share their leading dimension, got {sizes}.')
  n = next(iter(sizes.values()))
  steps = check_layout(n, batch_size, num_devices=num_devices, process_index=process_index,
                       process_count=process_count)
  if not 0 <= start_step <= steps:
    raise ValueError(f'start_step={start_step} must lie in 0..{steps} (batches per epoch).')
  order = train_order(arrays, n, seed=seed, epoch=epoch, shuffle=shuffle)
  for step in range(start_step, steps):
    rows, mask = process_rows(order, batch_size, step, process_index=process_index,
                              process_count=process_count)
    batch = {k: np.asarray(v)[rows] for k, v in arrays.items()}
    batch['mask'] = mask
    yield device_layout(batch, num_devices)


def seen_items(ds: protocols.PreparedDataset, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Items a split's examples have already seen, sequence[:position], as CSR per example row.

  Returns:
    (indptr int64 [n+1], items int32 [nnz]); row r's items are items[indptr[r]:indptr[r+1]].
  """
  examples = ds.splits[split]
  seq_indptr, seq_items = ds.user_sequences
  lengths = examples['position'].astype(np.int64)
  indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  starts = np.repeat(seq_indptr[examples['user_id']], lengths)
  offsets = np.arange(indptr[-1]) - np.repeat(indptr[:-1], lengths)
  return indptr, seq_items[starts + offsets].astype(np.int32)
