"""The report's figures (matplotlib, Agg backend): learning curves, deciles, sweep, spectrum.

Each plot function writes one PNG atomically and returns whether it drew anything (False: no data,
no file). matplotlib is imported on the first plot, not with the package.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence, TYPE_CHECKING

import numpy as np

from alphafuse_jax import files
from alphafuse_jax.experiments.stats import NUM_DECILES
from alphafuse_jax.experiments.suites import Suite

if TYPE_CHECKING:
  from alphafuse_jax.experiments.report import CellReport

# Short group names for legends and table headers.
GROUP_SHORT = {'overall': 'overall', 'tail_items': 'tail items', 'head_items': 'head items',
               'short_users': 'short users', 'long_users': 'long users',
               'new_items': 'new items only'}
# Line styles cycle with the colours so that rows with equal numbers (RLMRec and SASRec-ID) both show.
_LINESTYLES = ('-', '--', ':', '-.')


def _pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _finish(fig, ax, path: pathlib.Path) -> bool:
  """Legend, layout, save: the common end of every plot here (True: a figure was written)."""
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save_figure(fig, path)
  return True


def _save_figure(fig, path: pathlib.Path) -> None:
  """The figure as a PNG at `path` (atomically), then closed."""
  plt = _pyplot()
  files.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120), mode='wb')
  plt.close(fig)


def plot_learning_curves(suite: Suite, cells: Sequence[CellReport], path: pathlib.Path) -> bool:
  """Val NDCG@20 by epoch, mean over finished seeds, one line per variant."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  drawn = False
  for i, variant in enumerate(suite.variants):
    curves = [c.curve for c in cells if c.cell.variant == variant and c.status == 'finished'
              and c.curve]
    if not curves:
      continue
    # Each epoch's mean over the seeds that evaluated at it.
    epochs = sorted(set().union(*curves))
    means = [np.mean([c[e] for c in curves if e in c]) for e in epochs]
    ax.plot(epochs, means, marker='o', ms=3, color=f'C{i % 10}', linestyle=_LINESTYLES[i % 4],
            label=f'{variant} ({len(curves)} seed{"s" if len(curves) > 1 else ""})')
    drawn = True
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xlabel('epoch')
  ax.xaxis.get_major_locator().set_params(integer=True)  # Epochs are whole numbers.
  ax.set_ylabel('val NDCG@20 (mean over seeds)')
  ax.set_title(f'{suite.name}: learning curves')
  return _finish(fig, ax, path)


def plot_deciles(suite: Suite, decile_table: Mapping[str, Any], path: pathlib.Path) -> bool:
  """Test NDCG@20 by popularity decile of the target, mean over seeds, one line per variant.

  `decile_table[variant]['mean']` is [NUM_DECILES] (None or NaN where a decile has no target).
  """
  if not decile_table:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  x = np.arange(1, NUM_DECILES + 1)
  for i, variant in enumerate(suite.variants):
    if variant in decile_table:
      mean = np.asarray([np.nan if v is None else v for v in decile_table[variant]['mean']])
      ax.plot(x, mean, marker='o', ms=3, color=f'C{i % 10}', linestyle=_LINESTYLES[i % 4],
              label=f'{variant} ({decile_table[variant]["n"]} seeds)')
  ax.set_xticks(x)
  ax.set_xlabel('item-popularity decile of the target in train (1 = least popular)')
  ax.set_ylabel('test NDCG@20 (mean over seeds)')
  # symlog: the tail deciles are orders of magnitude below the head ones, and may be 0.
  ax.set_yscale('symlog', linthresh=1e-3)
  ax.set_title(f'{suite.name}: NDCG@20 by target popularity')
  return _finish(fig, ax, path)



def _mean_std(means, stds) -> tuple[np.ndarray, np.ndarray]:
  """Arrays for error bars from JSON-safe lists: None stands for NaN (no mean) and for a std of 0
  (one seed: none)."""
  mean = np.asarray([np.nan if v is None else v for v in means], float)
  std = np.asarray([0.0 if v is None or not np.isfinite(v) else v for v in stds], float)
  return mean, std

def plot_sweep(sweep: Mapping[str, Any], label: str, path: pathlib.Path) -> bool:
  """Test NDCG@20 (overall and tail items) against the sweep's x (e.g. null_dim), mean +- std."""
  if not sweep['x']:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, group in enumerate(('overall', 'tail_items')):
    mean, std = _mean_std(sweep[group]['mean'], sweep[group]['std'])
    ax.errorbar(sweep['x'], mean, yerr=std, marker='o', capsize=3, color=f'C{i}',
                label=GROUP_SHORT[group])
  ax.set_xticks(sweep['x'])
  ax.set_xlabel(label)
  ax.set_ylabel('test NDCG@20')
  ax.set_title('null_dim sweep (error bars: std over seeds where > 1)')
  return _finish(fig, ax, path)


def plot_cold_items(variants: Sequence[str], tables: Mapping[str, Any],
                    levels: Mapping[str, Any], path: pathlib.Path) -> bool:
  """Bars of test NDCG@20 per row on a cold_start_items split: the target ranked among all items
  and among the new items only (mean over seeds, std error bars), each with its random level
  (`levels[group]['NDCG@20']`, experiments/cold_items.py) as a dashed line."""
  rows = [v for v in variants if v in tables.get('overall', {})]
  if not rows:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.2))
  x = np.arange(len(rows))
  for i, (group, label) in enumerate((('overall', 'all items'), ('new_items', 'new items only'))):
    stat = [tables.get(group, {}).get(v, {}).get('NDCG@20') for v in rows]
    mean, std = _mean_std([s['mean'] if s else None for s in stat],
                          [s['std'] if s else None for s in stat])
    ax.bar(x + (i - 0.5) * 0.38, mean, 0.38, yerr=std, capsize=3, color=f'C{i}', label=label)
    ax.axhline(levels[group]['NDCG@20'], color=f'C{i}', linestyle='--', linewidth=1,
               label=f'random, {label}')
  ax.set_xticks(x)
  seeds = [tables['overall'][v]['NDCG@20']['n'] for v in rows]
  ax.set_xticklabels([f'{v}\n({n} seed{"s" if n > 1 else ""})' for v, n in zip(rows, seeds)])
  ax.set_ylabel('test NDCG@20 (new-item targets)')
  ax.set_title('New items from their text: mean over seeds (error bars: std)')
  return _finish(fig, ax, path)


def plot_thinning(table: Mapping[str, Any], variants: Sequence[str], groups: Sequence[str],
                  path: pathlib.Path) -> bool:
  """Test NDCG@20 against the fraction of train users (log x), a line per variant and group
  (`thinning.thinning_table`'s rows; solid the first group, dashed the second)."""
  rows = table['rows']
  if not rows:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  drawn = False
  for i, variant in enumerate(variants):
    for group, style in zip(groups, ('-', '--')):
      points = [(r['fraction'], r['metrics'][group].get(variant)) for r in rows]
      points = [(x, s) for x, s in points if s and s['n']]
      if not points:
        continue
      xs = [x for x, _ in points]
      mean, std = _mean_std([s['mean'] for _, s in points], [s['std'] for _, s in points])
      ax.errorbar(xs, mean, yerr=std, marker='o', capsize=3, color=f'C{i}', linestyle=style,
                  label=f'{variant}, {GROUP_SHORT[group]}')
      drawn = True
  if not drawn:
    plt.close(fig)
    return False
  ax.set_xscale('log')
  ax.minorticks_off()
  ax.invert_xaxis()  # Read left to right as the data thins.
  ax.set_xticks([r['fraction'] for r in rows])
  ax.set_xticklabels([f'{r["fraction"]:.0%}' for r in rows])
  ax.set_xlabel('train users kept')
  ax.set_ylabel(f'test {table["metric"]} (mean over seeds)')
  ax.set_title('Data thinning: ' + ', '.join(f'{style} {GROUP_SHORT[g]}' for g, style in
                                            zip(groups, ('solid', 'dashed'))))
  return _finish(fig, ax, path)


def spectrum_figure(config, path: pathlib.Path, *, embeddings: np.ndarray | None = None,
                    item_counts: np.ndarray | None = None, dataset=None) -> dict[str, Any]:
  """The language-embedding spectrum with the kept and null cuts (spectrum.py's plot), PNG + dict.

  `embeddings` [N, d] are the already-scaled vectors; None computes them as training does from
  `dataset` (the MiniLM cache of the config's dataset, times config.text.scale).
  """
  from alphafuse_jax import spectrum as spectrum_lib  # pylint: disable=g-import-not-at-top
  if embeddings is None:
    from alphafuse_jax import builders  # pylint: disable=g-import-not-at-top
    embeddings = builders.load_language_embeddings(config, dataset)
    item_counts = dataset.train_item_counts
  # Popularity weights only where the config weights the moments by them.
  weights = item_counts if config.embedding.item_frequency_weighting else None
  report = spectrum_lib.spectrum_report(
      embeddings, hidden_dim=config.embedding.hidden_dim, null_dim=config.embedding.null_dim,
      null_threshold=config.embedding.null_threshold, item_weights=weights,
      weighting=config.embedding.frequency_weighting)
  files.atomic_write(path, lambda f: spectrum_lib.plot_spectrum(report, f), mode='wb')
  # The summary keeps the top 10 eigenvalues, not all d.
  return {k: v for k, v in report.items() if k != 'eigenvalues'} | {
      'eigenvalues_top10': report['eigenvalues'][:10]}
