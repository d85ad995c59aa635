"""Benchmark: fit_semantic_space + project against numpy float64 (np.cov-style covariance + SVD).

Command:
  python -m alphafuse_jax.benchmarks.decomposition                 # N = 100,000, d = 3,072
  python -m alphafuse_jax.benchmarks.decomposition --n=2000 --d=256  # quick

Random float32 vectors with a decaying spectrum (low rank plus noise, like sentence embeddings)
are decomposed by numpy in float64 (the reference's method) and by the JAX path in float32 and
float64 (x64 switched on only around that run). Prints a Markdown table: method, dtype, device,
seconds for fit + project (steady state, after a first compiling call), the first call's seconds,
and the eigenvalue error against numpy: max relative over all eigenvalues, over the top k, and
max absolute divided by lambda_max (float32 resolves eigenvalues to ~eps * lambda_max, so the
smallest ones carry large relative errors; see alphafuse_jax/decomposition.py).
"""

from __future__ import annotations

import time
from typing import Callable

from absl import app
from absl import flags
import jax
import numpy as np

from alphafuse_jax import decomposition

_N = flags.DEFINE_integer('n', 100_000, 'Items N.')
_D = flags.DEFINE_integer('d', 3072, 'Embedding dimension d.')
_DIM = flags.DEFINE_integer('dim', 128, 'Projected (kept) directions k.')
_RANK = flags.DEFINE_integer('rank', 0, 'Signal rank of the synthetic data (0: d // 2).')
_SEED = flags.DEFINE_integer('seed', 0, 'Data seed.')


def synthetic(n: int, d: int, rank: int, seed: int) -> np.ndarray:
  """float32 [n, d]: a rank-`rank` signal with a power-law spectrum plus isotropic noise."""
  rng = np.random.default_rng(seed)
  basis = rng.standard_normal((rank, d), dtype=np.float32) / np.sqrt(d)
  scores = rng.standard_normal((n, rank), dtype=np.float32)
  scores *= (np.arange(1, rank + 1, dtype=np.float32) ** -0.75) * 40
  return scores @ basis + 0.05 * rng.standard_normal((n, d), dtype=np.float32)


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
  print(f'\nN = {n:,}, d = {d:,}, k = {dim}, signal rank {rank}; jax {jax.__version__} on '
        f'{jax.devices()[0].platform}\n')
  print('| method | dtype | device | seconds | first call (s) | max rel eig diff (all) | '
        'max rel eig diff (top k) | max eig diff / lambda_max |')
  print('|---|---|---|---|---|---|---|---|')
  for method, dtype, dev, sec, first, rel, rel_k, abs_rel in rows:
    print(f'| {method} | {dtype} | {dev} | {sec:.3f} | {first:.3f} | {rel:.2e} | {rel_k:.2e} '
          f'| {abs_rel:.2e} |')


if __name__ == '__main__':
  app.run(main)
