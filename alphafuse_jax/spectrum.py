r"""Eigen-spectrum of a dataset's language embeddings: a log-scale plot and its numbers.

Shows where AlphaFuse cuts the spectrum: the kept directions (hidden_dim), the null directions that
receive the ID embedding (the last `nullity` of the kept ones) and, for full whitening, how many
eigenvalues are numerically zero.

  python -m alphafuse_jax.spectrum --embeddings=path.npy --out_dir=DIR \
      [--hidden_dim=128 --null_dim=64 | --null_threshold=0.25] [--scale=40]

Writes DIR/spectrum.png and DIR/spectrum.json (atomically: temp file, then rename).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from alphafuse_jax import decomposition
from alphafuse_jax import files

def load_vectors(path: str) -> np.ndarray:
  """[N, d] float vectors via the project's reader when present, else np.load."""
  try:
    from alphafuse_jax.text.readers import load_embeddings  # pylint: disable=g-import-not-at-top
  except ImportError:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: embedding file not found (--embeddings).') from None
    return np.load(path, allow_pickle=False)
  return load_embeddings(path)


def spectrum_report(embeddings: np.ndarray, *, hidden_dim: int, null_dim: int | None = None,
                    null_threshold: float | None = None, item_weights: np.ndarray | None = None,
                    weighting: str = 'weighted') -> dict[str, Any]:
  """The spectrum (float64) and AlphaFuse's cuts for already-scaled embeddings [N, d]."""
  x = np.asarray(embeddings, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f'Embeddings must be a matrix [N, d], got shape {x.shape}.')
  kept = min(int(hidden_dim), x.shape[1])
  if kept < 1:
    raise ValueError(f'--hidden_dim={hidden_dim} must be >= 1.')
  with jax.enable_x64(True):
    space = decomposition.fit_semantic_space(x, item_weights, weighting=weighting)
    values = np.asarray(space.eigenvalues, dtype=np.float64)
  nullity = decomposition.null_space_dim(values, null_dim=null_dim, null_threshold=null_threshold,
                                         kept_dim=kept)
  largest = float(values[0])
  floor = decomposition.relative_floor(np.float64) * largest
  return {
      'num_items': int(x.shape[0]),
      'dim': int(x.shape[1]),
      'weighting': 'uniform' if item_weights is None else weighting,
      'kept_dim': kept,
      'null_dim': null_dim if null_threshold is None else None,
      'null_threshold': null_threshold,
      'nullity': nullity,
      # AlphaFuse puts the ID into kept dimensions [kept - nullity, kept).
      'id_dims': [kept - nullity, kept],
      'explained_variance_kept': decomposition.explained_variance(values, kept),
      'explained_variance_semantic': decomposition.explained_variance(values, kept - nullity),
      'largest_eigenvalue': largest,
      'smallest_eigenvalue': float(values[-1]),
      'num_nonpositive': int(np.sum(values <= 0)),
      # Eigenvalues full-dimension whitening refuses in float64 without eigenvalue_floor.
      'whitening_floor': floor,
      'num_below_whitening_floor': int(np.sum(values < floor)),
      'eigenvalues': [float(v) for v in values],
  }


def plot_spectrum(report: dict[str, Any], f) -> None:
  """Log-scale eigenvalues with the kept cut, the null cut and the ID dims shaded; PNG to f."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  values = np.asarray(report['eigenvalues'])
  positive = values[values > 0]
  tiny = positive.min() * 0.1 if positive.size else 1e-30
  index = np.arange(1, values.size + 1)
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
  ax.semilogy(index, np.where(values > 0, values, tiny), lw=1.5, color='C0', label='eigenvalue')
  start, kept = report['id_dims']
  ax.axvspan(start + 0.5, kept + 0.5, color='C1', alpha=0.15,
             label=f'ID dims ({report["nullity"]})')
  ax.axvline(kept + 0.5, color='C3', ls='--', label=f'kept cut (k={kept})')
  ax.axvline(start + 0.5, color='C1', ls='--', label=f'null cut (k-n={start})')
  if report['null_threshold'] is not None:
    ax.axhline(report['null_threshold'], color='C2', ls=':',
               label=f'null threshold {report["null_threshold"]:g}')
  if report['num_below_whitening_floor']:
    ax.axhline(report['whitening_floor'], color='0.5', ls=':',
               label=f'whitening floor ({report["num_below_whitening_floor"]} below)')
  ax.set_xlabel('direction (descending eigenvalue)')
  ax.set_ylabel('eigenvalue (log)')
  ax.set_title(f'Language-embedding spectrum: N={report["num_items"]}, d={report["dim"]}, '
               f'{report["explained_variance_kept"]:.1%} variance kept')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(f, format='png')
  plt.close(fig)


def run(embeddings_path: str, out_dir: str, *, hidden_dim: int = 128, null_dim: int | None = 64,
        null_threshold: float | None = None, scale: float = 40.0,
        item_counts_path: str | None = None, weighting: str = 'weighted') -> dict[str, Any]:
  """Loads, scales, analyses and writes spectrum.json and spectrum.png; returns the report."""
  vectors = np.asarray(load_vectors(embeddings_path), dtype=np.float64) * scale
  weights = None
  if item_counts_path:
    weights = np.load(item_counts_path, allow_pickle=False)
  report = spectrum_report(vectors, hidden_dim=hidden_dim, null_dim=null_dim,
                           null_threshold=null_threshold, item_weights=weights,
                           weighting=weighting)
  report = {'embeddings': str(embeddings_path), 'scale': scale, **report}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  files.atomic_write(out / 'spectrum.json', lambda f: f.write(json.dumps(report, indent=1) + '\n'))
  files.atomic_write(out / 'spectrum.png', lambda f: plot_spectrum(report, f), mode='wb')
  return report


def _define_flags() -> None:
  """The command's flags, registered only when run as a command (importing defines none)."""
  flags.DEFINE_string('embeddings', None, 'Item vectors: .npy, .npz or <name>_emb.pickle.')
  flags.DEFINE_string('out_dir', None, 'Directory for spectrum.png and spectrum.json.')
  flags.DEFINE_integer('hidden_dim', 128, 'Kept directions k (capped at d).')
  flags.DEFINE_integer('null_dim', 64, 'Nullity n (ignored when --null_threshold is set).')
  flags.DEFINE_float('null_threshold', None,
                     'Nullity = #eigenvalues <= this (wins over --null_dim).')
  flags.DEFINE_float('scale', 40.0, 'Multiply the vectors by this first (reference: 40).')
  flags.DEFINE_string('item_counts', None,
                      'Optional .npy of item popularity for weighted moments.')
  flags.DEFINE_enum('weighting', 'weighted', list(decomposition.WEIGHTINGS),
                    "With --item_counts: 'weighted' or the authors' variant.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS.embeddings or not flags.FLAGS.out_dir:
    raise app.UsageError('--embeddings and --out_dir are required.')
  f = flags.FLAGS
  report = run(f.embeddings, f.out_dir, hidden_dim=f.hidden_dim, null_dim=f.null_dim,
               null_threshold=f.null_threshold, scale=f.scale, item_counts_path=f.item_counts,
               weighting=f.weighting)
  print(f'N={report["num_items"]} d={report["dim"]} kept={report["kept_dim"]} '
        f'nullity={report["nullity"]} '
        f'explained variance kept={report["explained_variance_kept"]:.4f} '
        f'below whitening floor={report["num_below_whitening_floor"]} -> {flags.FLAGS.out_dir}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
