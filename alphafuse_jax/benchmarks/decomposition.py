"""Benchmark: fit_semantic_space + project against numpy float64 (np.cov-style covariance + SVD).

Command:
  python -m alphafuse_jax.benchmarks.decomposition                 # N = 100,000, d = 3,072
  python -m alphafuse_jax.benchmarks.decomposition --n=2000 --d=256  # quick
  # Streamed (bounded memory, float64 accumulation over the local devices):
  python -m alphafuse_jax.benchmarks.decomposition --mode=streamed --source=generator \
      --n=1000000 --d=3072
  python -m alphafuse_jax.benchmarks.decomposition --mode=streamed --source=memmap \
      --n=1000000 --d=3072 --file=/tmp/vectors_1e6x3072.npy   # writes the file first if missing
  # Runs of hours: add --checkpoint=PATH; rerunning the same command after an interruption
  # continues the fit from its last save (and a file source's projection from its last block).

Streamed mode reads rows from a chunk generator (rank `--rank`, default 64 there, so generating
costs little beside the d x d accumulation) or from a `.npy` file on disk, fits the space with
`streaming_decomposition.fit_semantic_space_streaming` and writes the projected table with
`project_to_file`; it prints wall time, rows/s, the time spent producing chunks, and the peak RSS
of the process. With `--checkpoint=PATH` the fit saves its accumulators every
`--checkpoint_every_rows` rows; a rerun resumes (the generator starts at the saved row, the file
is read from it) and the table also gives the rows resumed from and the fit's seconds summed over
all runs. `--check_rows=M` also compares the streamed space with the in-memory float64 fit
of the first M rows (M rows must fit in memory).

Random float32 vectors with a decaying spectrum (low rank plus noise, like sentence embeddings)
are decomposed by numpy in float64 (the reference's method) and by the JAX path in float32 and
float64 (x64 switched on only around that run). Prints a Markdown table: method, dtype, device,
seconds for fit + project (steady state, after a first compiling call), the first call's seconds,
and the eigenvalue error against numpy: max relative over all eigenvalues, over the top k, and
max absolute divided by lambda_max (float32 resolves eigenvalues to ~eps * lambda_max, so the
smallest ones carry large relative errors; see alphafuse_jax/decomposition.py).
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from typing import Callable, Iterator

from absl import app
from absl import flags
import jax
import numpy as np

from alphafuse_jax import decomposition
from alphafuse_jax import files
from alphafuse_jax import parallel
from alphafuse_jax import streaming_decomposition

_N = flags.DEFINE_integer('n', 100_000, 'Items N.')
_D = flags.DEFINE_integer('d', 3072, 'Embedding dimension d.')
_DIM = flags.DEFINE_integer('dim', 128, 'Projected (kept) directions k.')
_RANK = flags.DEFINE_integer('rank', 0, 'Signal rank of the synthetic data (0: d // 2).')
_SEED = flags.DEFINE_integer('seed', 0, 'Data seed.')
_MODE = flags.DEFINE_enum('mode', 'in_memory', ['in_memory', 'streamed'],
                          'in_memory: numpy vs JAX on one array; streamed: chunked fit + projection.')
_SOURCE = flags.DEFINE_enum('source', 'generator', ['generator', 'memmap'],
                            'streamed: rows from a chunk generator or from a .npy file on disk.')
_FILE = flags.DEFINE_string('file', '', 'streamed, memmap: the .npy [N, d] to read (written from '
                            'the generator first when missing; default: a temporary file).')
_CHUNK_ROWS = flags.DEFINE_integer('chunk_rows', 8192, 'streamed: rows per chunk and per block.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', '', 'streamed: the fit checkpoint (.npz); rerun '
                                  'the same command to resume (empty: none).')
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    'checkpoint_every_rows', streaming_decomposition.DEFAULT_CHECKPOINT_EVERY_ROWS,
    'streamed: rows between checkpoint saves (rounded up to whole blocks).')
_CHECK_ROWS = flags.DEFINE_integer('check_rows', 0, 'streamed: compare with the in-memory float64 '
                                   'fit of the first this many rows (0: skip).')


def synthetic(n: int, d: int, rank: int, seed: int) -> np.ndarray:
  """float32 [n, d]: a rank-`rank` signal with a power-law spectrum plus isotropic noise."""
  rng = np.random.default_rng(seed)
  basis = rng.standard_normal((rank, d), dtype=np.float32) / np.sqrt(d)
  scores = rng.standard_normal((n, rank), dtype=np.float32)
  scores *= (np.arange(1, rank + 1, dtype=np.float32) ** -0.75) * 40
  return scores @ basis + 0.05 * rng.standard_normal((n, d), dtype=np.float32)


def synthetic_chunks(n: int, d: int, rank: int, seed: int, chunk_rows: int,
                     timer: list[float] | None = None, first_row: int = 0) -> Iterator[np.ndarray]:
  """`synthetic`'s model, chunk by chunk (chunk k from the stream [seed, k]), from row
  `first_row` on (a resumed run; chunks before it are not generated); `timer[0]` sums the
  seconds spent generating."""
  basis = np.random.default_rng([seed, 1 << 30]).standard_normal((rank, d), dtype=np.float32)
  basis /= np.sqrt(d)
  decay = (np.arange(1, rank + 1, dtype=np.float32) ** -0.75) * 40
  for k, start in enumerate(range(0, n, chunk_rows)):
    if start + chunk_rows <= first_row:
      continue
    began = time.perf_counter()
    rng = np.random.default_rng([seed, k])
    rows = min(chunk_rows, n - start)
    chunk = (rng.standard_normal((rows, rank), dtype=np.float32) * decay) @ basis
    chunk += 0.05 * rng.standard_normal((rows, d), dtype=np.float32)
    if timer is not None:
      timer[0] += time.perf_counter() - began
    yield chunk[max(first_row - start, 0):]


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux.


def streamed(n: int, d: int, dim: int, rank: int) -> None:
  """Streamed fit + projection from a generator or a file; prints one Markdown table row."""
  chunk_rows, seed = _CHUNK_ROWS.value, _SEED.value
  timer = [0.0]
  path = None
  if _SOURCE.value == 'memmap':
    path = _FILE.value or os.path.join(tempfile.gettempdir(), f'decomposition_{n}x{d}.npy')
    if not os.path.exists(path):
      began = time.perf_counter()

      def write(f):  # Atomically: an interrupted write leaves no file that looks complete.
        np.lib.format.write_array_header_1_0(f, {'descr': '<f4', 'fortran_order': False,
                                                 'shape': (n, d)})
        for chunk in synthetic_chunks(n, d, rank, seed, chunk_rows):
          f.write(chunk.tobytes())

      files.atomic_write(path, write, 'wb')
      print(f'wrote {path} ({os.path.getsize(path) / 1e9:.1f} GB) in '
            f'{time.perf_counter() - began:.1f} s')
    source = lambda first_row=0: path
  else:
    source = lambda first_row=0: synthetic_chunks(n, d, rank, seed, chunk_rows, timer, first_row)
  checkpoint = _CHECKPOINT.value or None
  resumed, before = (streaming_decomposition.checkpoint_progress(checkpoint) if checkpoint
                     else (0, 0.0))  # Rows and seconds of the earlier runs.
  resumable = dict(checkpoint_every_rows=_CHECKPOINT_EVERY.value, block_rows=chunk_rows)
  with jax.enable_x64(True):
    began = time.perf_counter()
    space = streaming_decomposition.fit_semantic_space_streaming(
        source(resumed), checkpoint=checkpoint, iterator_start='checkpoint', **resumable)
    jax.block_until_ready(space)
    fit_seconds = time.perf_counter() - began
    fit_generating, timer[0] = timer[0], 0.0
    out = os.path.join(tempfile.gettempdir(), f'decomposition_table_{n}x{dim}.npy')
    began = time.perf_counter()
    streaming_decomposition.project_to_file(source(), space, dim, out, num_rows=n,
                                            dtype=np.float32, resume=bool(checkpoint),
                                            **resumable)
    project_seconds = time.perf_counter() - began
    os.remove(out)
    if _CHECK_ROWS.value:
      m = _CHECK_ROWS.value
      head = np.concatenate(list(synthetic_chunks(m, d, rank, seed, chunk_rows)))
      want = decomposition.fit_semantic_space(head)
      got = streaming_decomposition.fit_semantic_space_streaming(iter([head[: m // 3],
                                                                       head[m // 3:]]))
      lam = np.asarray(want.eigenvalues)
      print(f'check on the first {m:,} rows: max |eigenvalue diff| / lambda_max = '
            f'{np.max(np.abs(np.asarray(got.eigenvalues) - lam)) / lam[0]:.2e}, max |mean diff| '
            f'= {np.max(np.abs(np.asarray(got.mean) - np.asarray(want.mean))):.2e}')
  where = parallel.describe_devices()
  print(f'\nN = {n:,}, d = {d:,}, k = {dim}, signal rank {rank}, {chunk_rows} rows a block, '
        f'{where["device_count"]} x {where["device_kind"]} ({where["backend"]}); '
        f'jax {jax.__version__}\n')
  print('| source | resumed at row | fit (s) | fit rows/s | of which generating (s) | '
        'fit, all runs (s) | project_to_file (s) | project rows/s | peak RSS (GB) |')
  print('|---|---|---|---|---|---|---|---|---|')
  print(f'| {_SOURCE.value if path is None else path} | {resumed:,} | {fit_seconds:.1f} | '
        f'{(n - resumed) / fit_seconds:,.0f} | {fit_generating:.1f} | {before + fit_seconds:.1f} | '
        f'{project_seconds:.1f} | {n / project_seconds:,.0f} | {peak_rss_gb():.2f} |')


def numpy_reference(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """The authors' path: float64 mean, np.cov-style covariance, np.linalg.svd, projection."""
  x = x.astype(np.float64)
  mean = x.mean(axis=0)
  centred = x - mean
  cov = centred.T @ centred / (x.shape[0] - 1)
  u, s, _ = np.linalg.svd(cov)
  return s, centred @ (u[:, :dim] / np.sqrt(s[:dim]))


def jax_path(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  space = decomposition.fit_semantic_space(x)
  table = decomposition.project(x, space, dim)
  jax.block_until_ready(table)
  return np.asarray(space.eigenvalues, np.float64), np.asarray(table)


def timed(fn: Callable[[], tuple[np.ndarray, np.ndarray]]):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main(argv):
  del argv
  n, d, dim = _N.value, _D.value, _DIM.value
  if _MODE.value == 'streamed':
    parallel.force_host_devices()  # On CPU: one device per core, each a share of every block.
    streamed(n, d, dim, _RANK.value or 64)
    return
  rank = _RANK.value or max(1, d // 2)
  x = synthetic(n, d, rank, _SEED.value)
  device = jax.devices()[0].device_kind
  rows = []
  seconds, (reference, _) = timed(lambda: numpy_reference(x, dim))
  rows.append(('numpy cov + svd', 'float64', 'host CPU', seconds, seconds, 0.0, 0.0, 0.0))
  for dtype in ('float32', 'float64'):
    with jax.enable_x64(dtype == 'float64'):
      x_device = jax.device_put(x)
      try:
        first, _ = timed(lambda: jax_path(x_device, dim))  # Includes compilation.
        seconds, (values, _) = timed(lambda: jax_path(x_device, dim))
      except ValueError as e:  # project refused near-zero eigenvalues at this precision.
        print(f'{dtype}: {e}')
        rows.append(('jax fit_semantic_space + project', dtype, device) + (float('nan'),) * 5)
        continue
    rel = np.abs(values - reference) / np.abs(reference)
    abs_rel = float(np.max(np.abs(values - reference)) / reference[0])
    rows.append(('jax fit_semantic_space + project', dtype, device, seconds, first,
                 float(rel.max()), float(rel[:dim].max()), abs_rel))
  where = parallel.describe_devices()  # The JAX rows ran on one of these.
  print(f'\nN = {n:,}, d = {d:,}, k = {dim}, signal rank {rank}; jax {jax.__version__} on '
        f'{where["backend"]} ({where["device_count"]} x {where["device_kind"]})\n')
  print('| method | dtype | device | seconds | first call (s) | max rel eig diff (all) | '
        'max rel eig diff (top k) | max eig diff / lambda_max |')
  print('|---|---|---|---|---|---|---|---|')
  for method, dtype, dev, sec, first, rel, rel_k, abs_rel in rows:
    print(f'| {method} | {dtype} | {dev} | {sec:.3f} | {first:.3f} | {rel:.2e} | {rel_k:.2e} '
          f'| {abs_rel:.2e} |')


if __name__ == '__main__':
  app.run(main)
