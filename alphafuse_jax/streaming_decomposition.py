"""Streaming semantic-space decomposition: language tables larger than memory, over local devices.

`decomposition.fit_semantic_space` hands chunked sources to `fit_semantic_space_streaming`: a
`.npy` path or an np.memmap [N, d] (an ndarray too), read block by block, or an iterator of
[n_i, d] chunks (any sizes, empty ones too); `project_to_file` writes the projected table.

Accumulation, in float64 whatever jax_enable_x64 says outside: rows are re-cut into blocks of
`block_rows` (the last one padded with zero-weight rows), so one compiled step serves the whole
stream. The step splits a block over the local devices (`jax.shard_map` on a 1-D 'data' mesh, as
parallel.py does); each device forms, about the running mean m (replicated),
    W_i = sum w,   s_i = sum w (x - m),   Q_i = sum w (x - m)(x - m)^T,
and one psum gives the block's W_b, s_b, Q_b: its mean m + s_b / W_b and its scatter
M2_b = Q_b - s_b s_b^T / W_b. Chan, Golub & LeVeque's parallel update then merges the block into
the running (W, m, M2):
    delta = s_b / W_b,   W' = W + W_b,   m' = m + delta W_b / W',
    M2' = M2 + M2_b + delta delta^T W W_b / W'.
Centring on the running mean keeps s_b at the size of the sampling noise, so forming M2_b from Q_b
loses nothing to cancellation (the first block is centred on its own host mean). Unweighted rows
have w = 1 and C = M2 / (N - 1); weighted, C = M2 / W ('weighted'); 'authors' also sums
sqrt(w) (x - m0) and sqrt(w) about the first block's mean m0, which gives np.cov of the
sqrt(p)-scaled rows exactly. Memory: the d x d accumulators and a few blocks; nothing grows
with N except the optional [N] weights. On data that fits, the result equals the in-memory
`fit_semantic_space` to ~1e-13 relative in float64 (the tests ask 1e-10). With `checkpoint=PATH`
the fit saves (W, m, M2, rows, seconds, a fingerprint of the request) atomically at block
boundaries; a later call continues there, bit for bit the uninterrupted run (same blocks, same
order). `project_to_file(resume=True)` continues its `.partial` file likewise.
"""

from __future__ import annotations

import collections.abc
import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alphafuse_jax import decomposition
from alphafuse_jax import errors
from alphafuse_jax import files

DEFAULT_BLOCK_ROWS = 8192
DEFAULT_CHECKPOINT_EVERY_ROWS = 1 << 18  # Minutes at d = 3,072 on 2 cores; a save is 8 d^2 bytes.
_AXIS = 'data'


def is_chunked_source(source: Any) -> bool:
  """True for the sources this module streams: a path, an np.memmap, an iterator of chunks."""
  return isinstance(source, (str, os.PathLike, np.memmap, collections.abc.Iterator))


def _npy_chunks(path: pathlib.Path, block_rows: int) -> tuple[Callable[[int], Iterator], int]:
  """(skip -> chunks of a C-order [N, d] `.npy` from row `skip` on, by plain reads), N.

  Not a memmap: pages read through a map count in this process's resident memory until it
  exits, while read() leaves them in the kernel's page cache only.
  """
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = header(f)
    offset = f.tell()
  if len(shape) != 2 or fortran_order:
    raise ValueError(f'{path} holds a {"Fortran-order " if fortran_order else ""}array of shape '
                     f'{shape}; embeddings must be a C-order matrix [N, d].')

  def chunks(skip):
    with open(path, 'rb') as f:
      f.seek(offset + skip * shape[1] * dtype.itemsize)  # Resuming reads nothing before `skip`.
      for start in range(skip, shape[0], block_rows):
        rows = min(block_rows, shape[0] - start)
        chunk = np.fromfile(f, dtype=dtype, count=rows * shape[1])
        if chunk.size != rows * shape[1]:
          raise ValueError(f'{path} is truncated: row {start + chunk.size // shape[1]} of '
                           f'{shape[0]} is missing.')
        yield chunk.reshape(rows, shape[1])

  return chunks, shape[0]


def _open(source: Any, block_rows: int) -> tuple[Callable[[int], Iterator], int | None]:
  """(skip -> iterator of [n_i, d] chunks from row `skip`, N when known) for a path, an array or
  an iterator (which is returned as it is, whatever `skip`: the caller places it)."""
  if isinstance(source, (str, os.PathLike)):
    path = pathlib.Path(source)
    if path.suffix != '.npy' or not path.is_file():
      raise ValueError(f'{path}: not an existing .npy file; a streamed source is a .npy path, '
                       'an np.memmap, an array or an iterator of [n, d] chunks.')
    return _npy_chunks(path, block_rows)
  if isinstance(source, np.ndarray):
    if source.ndim != 2:
      raise ValueError(f'embeddings must be a matrix [N, d], got shape {source.shape}.')
    return (lambda skip: (source[i:i + block_rows]
                          for i in range(skip, source.shape[0], block_rows))), source.shape[0]
  if isinstance(source, collections.abc.Iterator):
    return lambda skip: source, None
  raise ValueError(f'{type(source).__name__} is not a streamed source (a .npy path, an '
                   'np.memmap, an array or an iterator of [n, d] chunks).')


def _blocks(chunks: Iterable[Any], block_rows: int, first_row: int = 0,
            drop: int = 0) -> Iterator[tuple[np.ndarray, int, int]]:
  """Re-cuts chunks, less their first `drop` rows, into (block [block_rows, d], valid rows, index
  of its first row, counted from `first_row`); the last block is zero-padded. Each block is a
  fresh array (the device may still read the previous one)."""
  block, filled, start, d = None, 0, first_row, None
  for chunk in chunks:
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or (d is not None and chunk.shape[1] != d) or chunk.dtype.kind not in 'fiu':
      raise ValueError(f'chunk at row {start + filled} has shape {chunk.shape} and dtype '
                       f'{chunk.dtype}; every chunk must be a numeric [n, {d or "d"}] matrix.')
    d = chunk.shape[1]
    taken = min(drop, chunk.shape[0])
    drop -= taken
    while taken < chunk.shape[0]:
      if block is None:
        dtype = chunk.dtype if chunk.dtype in (np.float32, np.float64) else np.float64
        block = np.zeros((block_rows, d), dtype)
      n = min(block_rows - filled, chunk.shape[0] - taken)
      block[filled:filled + n] = chunk[taken:taken + n]
      filled, taken = filled + n, taken + n
      if filled == block_rows:
        yield block, filled, start
        block, start, filled = None, start + filled, 0
  if filled:
    yield block, filled, start


def _check_finite(block: np.ndarray, valid: int, start: int) -> None:
  finite = np.isfinite(block[:valid]).all(axis=1)
  if not finite.all():
    raise ValueError('embeddings contain NaN or inf; fix the language vectors (row '
                     f'{start + int(np.argmin(finite))} is the first bad one).')


def _mesh() -> Mesh:
  return Mesh(np.asarray(jax.local_devices()), (_AXIS,))


@functools.lru_cache(maxsize=8)
def _step(mesh: Mesh, authors: bool):
  """The jitted block update: sums on every device, one psum, then Chan's merge."""

  def local_sums(x, w, valid, mean, shift):
    x = x.astype(jnp.float64)
    centred = x - mean
    weighted = centred * w[:, None]
    sums = [jnp.sum(w), jnp.sum(weighted, axis=0),
            jnp.matmul(weighted.T, centred, precision=jax.lax.Precision.HIGHEST), jnp.sum(valid)]
    if authors:
      root = jnp.sqrt(w)
      sums += [jnp.sum((x - shift) * root[:, None], axis=0), jnp.sum(root)]
    return jax.lax.psum(tuple(sums), _AXIS)

  sharded_sums = jax.shard_map(local_sums, mesh=mesh, in_specs=(P(_AXIS),) * 3 + (P(), P()),
                               out_specs=P(), check_vma=False)

  def step(state, x, w, valid):
    sums = sharded_sums(x, w, valid, state['mean'], state['shift'])
    block_weight, s, q = sums[:3]
    safe = jnp.where(block_weight > 0, block_weight, 1.0)
    delta = s / safe
    total = state['weight'] + block_weight
    share = block_weight / jnp.where(total > 0, total, 1.0)
    new = dict(state, weight=total, count=state['count'] + sums[3],
               mean=state['mean'] + delta * share,
               scatter=(state['scatter'] + (q - jnp.outer(s, s) / safe)
                        + jnp.outer(delta, delta) * state['weight'] * share))
    if authors:
      new.update(root_sum=state['root_sum'] + sums[4], root_weight=state['root_weight'] + sums[5])
    return new

  return jax.jit(step, donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames=('weighted', 'authors'))
def _covariance(state, weighted: bool, authors: bool):
  """C from the accumulated state: M2 / (N - 1), M2 / W, or np.cov of the sqrt(p)-scaled rows."""
  if authors:
    count, weight = state['count'], state['weight']
    # sum_i sqrt(p_i) (x_i - mu), from the sums about the first block's mean m0.
    scaled_sum = (state['root_sum'] - state['root_weight'] * (state['mean'] - state['shift'])
                  ) / jnp.sqrt(weight)
    scaled_mean = scaled_sum / count
    return (state['scatter'] / weight - count * jnp.outer(scaled_mean, scaled_mean)) / (count - 1)
  return state['scatter'] / (state['weight'] if weighted else state['count'] - 1)


def _load(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
  """A fit checkpoint's state, rows, seconds and fingerprint (None when there is none)."""
  if path is None or not os.path.exists(path):
    return None
  try:
    with np.load(path) as saved:
      out = {key: saved[key] for key in saved.files}
    out['fingerprint'] = json.loads(str(out['fingerprint']))
    out['rows'], out['seconds'] = int(out['rows']), float(out['seconds'])
  except Exception as e:  # Not ours, or damaged outside this module (its writes are atomic).
    raise errors.CheckpointError(f'{path} is not a streaming-fit checkpoint ({e!r}); remove it to '
                                 'start the fit over.') from e
  return out


def checkpoint_progress(checkpoint: str | os.PathLike[str]) -> tuple[int, float]:
  """(rows a fit checkpoint has consumed, seconds its runs spent), (0, 0.0) when there is none:
  an iterator resumed with iterator_start='checkpoint' must yield the rows from that row on."""
  saved = _load(checkpoint)
  return (0, 0.0) if saved is None else (saved['rows'], saved['seconds'])


def _same_request(path: Any, saved: dict[str, Any], now: dict[str, Any]) -> None:
  """Refuses to resume a checkpoint written for another source, weighting or block size."""
  for key, value in now.items():
    if saved.get(key) != value and not (key == 'num_rows' and None in (saved.get(key), value)):
      raise errors.CheckpointError(
          f'{path} was written with {key}={saved.get(key)}, this call has {key}={value}: resuming '
          'would mix two fits. Pass the interrupted run\'s source, item_weights, weighting and '
          f'block_rows, or remove {path} to start over.')


def fit_semantic_space_streaming(source: Any, item_weights: Any = None, *,
                                 weighting: str = 'weighted',
                                 block_rows: int = DEFAULT_BLOCK_ROWS,
                                 checkpoint: str | os.PathLike[str] | None = None,
                                 checkpoint_every_rows: int = DEFAULT_CHECKPOINT_EVERY_ROWS,
                                 iterator_start: str | None = None
                                 ) -> decomposition.SemanticSpace:
  """`decomposition.fit_semantic_space` for a chunked source, in bounded memory, resumable.

  Args:
    source: a `.npy` path, an np.memmap or array [N, d], or an iterator of [n_i, d] chunks.
    item_weights: optional [N] non-negative weights, row-aligned with the source (chunks are
      matched to their slice of it); see `fit_semantic_space`.
    weighting: 'weighted' or 'authors', as in `fit_semantic_space`.
    block_rows: rows per device step (rounded up to a multiple of the local device count); it
      sets the transient memory (a few block_rows x d float64 arrays), not the result.
    checkpoint: None, or an .npz the accumulators are saved to atomically every
      `checkpoint_every_rows` rows (rounded up to whole blocks) and at the end (kept: a rerun
      only decomposes). If it exists the fit resumes from it (a path, memmap or array is read
      from the first row not consumed) to the blocks, sums and result of an uninterrupted fit;
      another request (d, dtype, N, weights, weighting, block size, first block) is refused.
    iterator_start: how an iterator source resumes (required then): 'checkpoint', it yields the
      rows from `checkpoint_progress(checkpoint)[0]` on, or 'beginning', it yields them all.

  Returns:
    A SemanticSpace, accumulated and decomposed in float64 and returned in the compute dtype
    (float32 unless jax_enable_x64 is on).
  """
  if item_weights is not None and weighting not in decomposition.WEIGHTINGS:
    raise ValueError(f'weighting={weighting!r}: use one of {decomposition.WEIGHTINGS}.')
  began = time.perf_counter()
  mesh = _mesh()
  block_rows = -(-max(int(block_rows), 1) // mesh.devices.size) * mesh.devices.size
  every = -(-max(int(checkpoint_every_rows), 1) // block_rows) * block_rows
  chunks_from, known = _open(source, block_rows)
  weights = None if item_weights is None else np.asarray(item_weights, np.float64).reshape(-1)
  if weights is not None:
    if known is not None and weights.shape[0] != known:
      raise ValueError(f'item_weights has shape {weights.shape}; expected ({known},), one '
                       'weight per embedding row.')
    if not np.isfinite(weights).all() or (weights < 0).any():
      raise ValueError('item_weights must be finite and non-negative (popularity counts).')
    if not weights.sum() > 0:
      raise ValueError('item_weights sum to 0: no item has any weight (check the item counts).')
  num_rows = known if weights is None else weights.shape[0]
  authors = weights is not None and weighting == 'authors'
  request = {'block_rows': block_rows, 'num_rows': num_rows,
             'weighting': 'unweighted' if weights is None else weighting, 'item_weights': None
             if weights is None else hashlib.sha256(np.ascontiguousarray(weights)).hexdigest()}
  saved, state, first_row, drop, d, data_dtype = _load(checkpoint), None, 0, 0, None, None
  if saved is not None:
    fingerprint, first_row = saved.pop('fingerprint'), saved.pop('rows')
    _same_request(checkpoint, fingerprint, request)
    d, data_dtype = fingerprint['d'], fingerprint['dtype']
    if known is None and iterator_start not in ('checkpoint', 'beginning'):
      raise errors.CheckpointError(
          f'{checkpoint} holds {first_row} rows; pass iterator_start=\'checkpoint\' with an '
          f'iterator that starts at row {first_row}, or \'beginning\' with one from row 0.')
    drop = first_row if known is None and iterator_start == 'beginning' else 0
    if known is not None and first_row < known:  # Re-read: the same first block?
      block, valid, _ = next(_blocks(chunks_from(0), block_rows))
      _same_request(checkpoint, fingerprint, {'d': block.shape[1], 'dtype': str(block.dtype)})
      if not np.array_equal(np.mean(block[:valid], axis=0, dtype=np.float64), saved['shift']):
        raise errors.CheckpointError(f'{checkpoint} was written for other data (the first block '
                                     f'differs); pass that source or remove {checkpoint}.')
    logging.info('resuming the streamed fit from %s at row %d (%.0f s spent before)', checkpoint,
                 first_row, saved['seconds'])
  rows, replicated = NamedSharding(mesh, P(_AXIS)), NamedSharding(mesh, P())
  seen = last_save = first_row

  def report():  # Logs progress; saves rows, seconds over all runs, the request, the state.
    if checkpoint is not None:
      spent = (saved['seconds'] if saved else 0.0) + time.perf_counter() - began
      meta, host = json.dumps(dict(request, d=d, dtype=data_dtype)), jax.device_get(state)
      files.atomic_write(checkpoint, lambda f: np.savez(f, rows=seen, seconds=spent,
                                                        fingerprint=meta, **host), 'wb')
    rate = (seen - first_row) / (time.perf_counter() - began)
    eta = f', ETA {(num_rows - seen) / rate:,.0f} s' if num_rows and rate else ''
    logging.info('streamed %d%s rows into the moments, %.0f rows/s%s; checkpoint: %s', seen,
                 f' of {num_rows}' if num_rows else '', rate, eta, checkpoint)

  with jax.enable_x64(True):
    step = _step(mesh, authors)
    if saved is not None:
      state = jax.device_put({k: saved.pop(k) for k in list(saved) if k != 'seconds'}, replicated)
    for block, valid, start in _blocks(chunks_from(first_row), block_rows, first_row, drop):
      _check_finite(block, valid, start)
      if saved is not None and start == first_row:
        _same_request(checkpoint, fingerprint, {'d': block.shape[1], 'dtype': str(block.dtype)})
      mask = (np.arange(block_rows) < valid).astype(np.float64)
      if weights is not None and start + valid > weights.shape[0]:
        raise ValueError(f'item_weights has {weights.shape[0]} entries but the source has more '
                         'rows; pass one weight per embedding row.')
      w = mask if weights is None else np.pad(weights[start:start + valid],
                                              (0, block_rows - valid))
      if state is None:  # Centre the first block on its own mean (any shift is exact).
        d, data_dtype = block.shape[1], str(block.dtype)
        shift = np.mean(block[:valid], axis=0, dtype=np.float64)
        state = {'weight': 0.0, 'count': 0.0, 'mean': shift, 'shift': shift,
                 'scatter': np.zeros((d, d))}
        if authors:
          state.update(root_sum=np.zeros(d), root_weight=0.0)
        state = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float64), state),
                               replicated)
      # One step in flight: this block was prepared while the last one ran. (A host far ahead
      # would queue blocks in memory, and XLA's CPU runtime can deadlock on ~32 queued psums.)
      jax.block_until_ready(state)
      state = step(state, jax.device_put(block, rows), jax.device_put(w, rows),
                   jax.device_put(mask, rows))
      seen = start + valid
      if seen - last_save >= every:
        report()
        last_save = seen
    if seen < 2 or d is None or d < 1:
      raise ValueError(f'the source gave {seen} rows: need at least 2 items and 1 dimension to '
                       'estimate a covariance.')
    if weights is not None and seen != weights.shape[0]:
      raise ValueError(f'item_weights has {weights.shape[0]} entries but the source gave {seen} '
                       'rows; pass one weight per embedding row.')
    if checkpoint is not None and seen > last_save:
      report()
    covariance = _covariance(state, weighted=weights is not None, authors=authors)
    space = jax.jit(decomposition.eigendecompose)(state['mean'], covariance)
    space = jax.tree.map(np.asarray, space)
  dtype = decomposition.compute_dtype()
  return decomposition.SemanticSpace(*(jnp.asarray(a, dtype) for a in space))


def project_to_file(source: Any, space: decomposition.SemanticSpace, dim: int,
                    path: str | os.PathLike[str], standardize: bool = True, *,
                    eigenvalue_floor: float | None = None,
                    min_relative_eigenvalue: float | None = None,
                    num_rows: int | None = None, block_rows: int = DEFAULT_BLOCK_ROWS,
                    dtype: Any = None, resume: bool = False,
                    checkpoint_every_rows: int = DEFAULT_CHECKPOINT_EVERY_ROWS) -> pathlib.Path:
  """`decomposition.project` of a chunked source, written block by block to a `.npy` file.

  Each block is placed row-sharded over the local devices and projected by `project` (jit
  partitions it); blocks are appended to the file, so memory stays at a few blocks for any N.
  The file appears only complete (`.NAME.partial` beside it is renamed); bad input leaves none.

  Args:
    source, block_rows: as in `fit_semantic_space_streaming`.
    space, dim, standardize, eigenvalue_floor, min_relative_eigenvalue: as in `project` (the
      maths, the refusal of numerically-zero eigenvalues and its message are the same).
    path: the output `.npy`, [N, dim].
    num_rows: N; needed for an iterator source (the file header comes first), checked always.
    dtype: of the file; default the space's dtype (float64 under jax_enable_x64).
    resume: keep the partial file when interrupted, made durable every `checkpoint_every_rows`
      rows (fsync, then a `.json` sidecar: rows, a hash of the request and first block); a call
      with the same request continues there. Path and array sources (an iterator starts over).

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  mesh = _mesh()
  block_rows = -(-max(int(block_rows), 1) // mesh.devices.size) * mesh.devices.size
  every = -(-max(int(checkpoint_every_rows), 1) // block_rows) * block_rows
  chunks_from, known = _open(source, block_rows)
  if known is not None and num_rows is not None and known != num_rows:
    raise ValueError(f'num_rows={num_rows} but the source has {known} rows.')
  total = known if known is not None else num_rows
  if total is None:
    raise ValueError('project_to_file needs num_rows for an iterator source (the .npy header '
                     'holds the shape and is written first).')
  out_dtype = np.dtype(dtype if dtype is not None else np.asarray(space.mean).dtype)
  rows, in_x64 = NamedSharding(mesh, P(_AXIS)), np.asarray(space.mean).dtype == np.float64
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {
      'descr': np.lib.format.dtype_to_descr(out_dtype), 'fortran_order': False,
      'shape': (int(total), int(dim))})
  row_bytes = int(dim) * out_dtype.itemsize
  partial, sidecar = (path.with_name(f'.{path.name}.partial{end}') for end in ('', '.json'))
  done, request = 0, None
  if resume and known is not None:  # What the rows already written depend on.
    digest = hashlib.sha256(header.getvalue())
    for array in (*space, next(_blocks(chunks_from(0), block_rows), [0])[0]):
      digest.update(np.ascontiguousarray(array).tobytes())
    request = [digest.hexdigest(), block_rows, bool(standardize), eigenvalue_floor,
               min_relative_eigenvalue]
    if sidecar.exists() and partial.exists():
      progress = json.loads(sidecar.read_text())
      durable = partial.stat().st_size >= len(header.getvalue()) + progress['rows'] * row_bytes
      done = progress['rows'] if progress['request'] == request and durable else 0
      logging.info('%s: resuming at row %d of %d', partial, done, total)
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    with open(partial, 'r+b' if done else 'wb') as f:
      f.write(header.getvalue())  # The same bytes when resuming (they are in the request).
      f.truncate(f.tell() + done * row_bytes)  # Rows not made durable go.
      f.seek(0, os.SEEK_END)
      written = last_sync = done
      with jax.enable_x64(in_x64):
        for block, valid, start in _blocks(chunks_from(done), block_rows, done):
          _check_finite(block, valid, start)
          if start + valid > total:
            raise ValueError(f'the source has more than num_rows={total} rows.')
          table = decomposition.project(jax.device_put(block, rows), space, dim, standardize,
                                        eigenvalue_floor=eigenvalue_floor,
                                        min_relative_eigenvalue=min_relative_eigenvalue)
          f.write(np.ascontiguousarray(np.asarray(table)[:valid], out_dtype).tobytes())
          written = start + valid
          if request is not None and written - last_sync >= every:
            f.flush()
            os.fsync(f.fileno())
            files.write_json(sidecar, {'request': request, 'rows': written})
            last_sync = written
      if written != total:
        raise ValueError(f'the source gave {written} rows, not num_rows={total}.')
      f.flush()
      os.fsync(f.fileno())
    os.replace(partial, path)
  except BaseException as e:
    if request is None or isinstance(e, ValueError):  # Bad input: nothing to resume.
      partial.unlink(missing_ok=True)
      sidecar.unlink(missing_ok=True)
    raise
  sidecar.unlink(missing_ok=True)
  return path
