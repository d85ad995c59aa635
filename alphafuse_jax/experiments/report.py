"""The suite's report: per-cell metrics by group, mean +- std over seeds, paired comparisons.

Groups are `evaluation.GROUPS` with `evaluation.group_masks`, the definition training uses, applied
to each cell's test_ranks.npz; a cell without it falls back on results.json's `test` and
`test_groups`, which use the same names. `build_report` writes README.md (rendered by
`readme.render_readme`), summary.json and the plots into `<results_dir>/<suite>/`; `publish`
copies README.md and the PNGs elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from alphafuse_jax import evaluation
from alphafuse_jax import files
from alphafuse_jax import metrics as metrics_lib
from alphafuse_jax.experiments import archive
from alphafuse_jax.experiments import cold_items
from alphafuse_jax.experiments import plots
from alphafuse_jax.experiments import stats
from alphafuse_jax.experiments import thinning
from alphafuse_jax.experiments.runner import cell_workdir
from alphafuse_jax.experiments.runner import now_utc
from alphafuse_jax.experiments.suites import Cell
from alphafuse_jax.experiments.suites import load_config
from alphafuse_jax.experiments.suites import make_suite
from alphafuse_jax.experiments.suites import Suite

# The groups and metrics of the tables, and the default thresholds (defined with the README).
from alphafuse_jax.experiments.readme import DEFAULT_HEAD_FRACTION  # pylint: disable=g-bad-import-order
from alphafuse_jax.experiments.readme import DEFAULT_SHORT_HISTORY
from alphafuse_jax.experiments.readme import render_readme
from alphafuse_jax.experiments.readme import REPORT_GROUPS
from alphafuse_jax.experiments.readme import TABLE_METRICS


# ---- per cell -------------------------------------------------------------------------------
@dataclasses.dataclass
class CellReport:
  """What the report reads from one cell: {group: metrics}, deciles [10], val curve, wall time."""
  cell: Cell
  status: str  # 'finished', 'unfinished' (workdir without results.json) or 'missing'.
  workdir: pathlib.Path
  groups: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  sampled_groups: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  deciles: np.ndarray | None = None
  curve: dict[int, float] = dataclasses.field(default_factory=dict)
  wall_seconds: float = float('nan')
  sampled_negatives: int | None = None
  note: str = ''
  results: dict[str, Any] = dataclasses.field(default_factory=dict)  # results.json.
  source: str = 'workdir'  # 'workdir', or 'archive' (the committed record; no workdir here).


def collect_cell(suite: Suite, cell: Cell, results_dir: str, *, train_item_counts: np.ndarray,
                 deciles: np.ndarray, short_history: int, head_fraction: float,
                 record: pathlib.Path | None = None) -> CellReport:
  """Everything the report needs from one cell's workdir (`train_item_counts` [N] per item).

  A cell without results.json whose archive `record` exists is read from the record.
  """
  workdir = cell_workdir(suite, cell, results_dir)
  results_path = workdir / 'results.json'
  curve = stats.read_curve(workdir / 'metrics.jsonl')
  if not results_path.is_file() and record is not None and record.is_file():
    stored = archive.read_record(record, cell=cell, num_items=len(train_item_counts))
    groups, cell_deciles, note = archive.groups_at(stored, short_history, head_fraction)
    sampled, _, _ = archive.groups_at(stored, short_history, head_fraction, 'sampled_groups')
    return CellReport(cell, 'finished', workdir, groups=groups, sampled_groups=sampled,
                      deciles=cell_deciles,
                      curve={int(e): float(v) for e, v in stored['curve'].items()},
                      wall_seconds=stats.run_seconds(stored['results']),
                      sampled_negatives=stored['results'].get('sampled_negatives'), note=note,
                      results=stored['results'], source='archive')
  if not results_path.is_file():
    status = 'unfinished' if workdir.is_dir() else 'missing'
    return CellReport(cell, status, workdir, curve=curve)
  results = stats.read_results(results_path)
  report = CellReport(cell, 'finished', workdir, curve=curve, results=results,
                      wall_seconds=stats.run_seconds(results))
  ranks_path = workdir / 'test_ranks.npz'
  if ranks_path.is_file():
    # Per-example ranks: the groups and deciles at the report's own thresholds.
    arrays = stats.read_test_ranks(ranks_path, num_items=len(train_item_counts))
    masks = evaluation.group_masks(train_item_counts, arrays['target'], arrays['position'],
                                   head_fraction=head_fraction, short_history=short_history)
    # Tied items count as training counted them (the expected rank under random tie-breaking).
    report.groups = evaluation.group_metrics(arrays['rank'], masks, ks=(10, 20),
                                             ties=arrays.get('ties'))
    report.deciles = stats.decile_metric(arrays['rank'], arrays['target'], deciles,
                                         ties=arrays.get('ties'))
    new_items = cold_items.new_item_group(arrays)
    if new_items is not None:  # cold_start_items: every example, ranked among new items only.
      report.groups[evaluation.NEW_ITEMS] = new_items
    if 'sampled_rank' in arrays:
      report.sampled_groups = evaluation.group_metrics(arrays['sampled_rank'], masks, ks=(10, 20),
                                                       ties=arrays.get('sampled_ties'))
  else:
    # results.json's groups carry the same names (at training's thresholds).
    stored = results.get('test_groups', {})
    report.groups = {'overall': results['test'],
                     **{g: stored[g] for g in REPORT_GROUPS if g != 'overall' and g in stored}}
    report.note = 'no test_ranks.npz: groups from results.json, no decile curve'
    if 'test_sampled' in results:
      report.sampled_groups = {'overall': results['test_sampled']}
  negatives = results.get('sampled_negatives', results.get('test_sampled', {}).get('num_negatives'))
  report.sampled_negatives = int(negatives) if negatives is not None else None
  return report


# ---- over seeds -----------------------------------------------------------------------------
def aggregate(suite: Suite, cells: Sequence[CellReport], field: str = 'groups'
              ) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
  """group -> variant -> metric -> mean_std over the seeds of finished cells (with per-seed values)."""
  table = {}
  for group in REPORT_GROUPS:
    table[group] = {}
    for variant in suite.variants:
      by_seed = {c.cell.seed: getattr(c, field)[group] for c in cells
                 if c.cell.variant == variant and group in getattr(c, field)}
      if not by_seed:  # No finished seed has this group: the row shows '-'.
        continue
      table[group][variant] = {
          m: {**stats.mean_std(by_seed[s][m] for s in sorted(by_seed)), 'seeds': sorted(by_seed)}
          for m in TABLE_METRICS}
      # seed -> test examples in the group, for the table's last column.
      table[group][variant]['count'] = {s: by_seed[s].get('count') for s in by_seed}
  return table


def comparisons(suite: Suite, cells: Sequence[CellReport]) -> dict[str, dict[str, dict]]:
  """metric -> group -> variant -> paired_comparison against the suite's baseline."""
  def by_seed(variant, group, metric):
    return {c.cell.seed: c.groups[group][metric] for c in cells
            if c.cell.variant == variant and group in c.groups}
  out = {}
  for metric in TABLE_METRICS:
    out[metric] = {}
    for group in REPORT_GROUPS:
      base = by_seed(suite.baseline, group, metric)
      out[metric][group] = {v: stats.paired_comparison(by_seed(v, group, metric), base)
                            for v in suite.variants if v != suite.baseline}
  return out


def _decile_table(suite: Suite, cells: Sequence[CellReport]) -> dict[str, dict[str, Any]]:
  """variant -> mean and std [10] over seeds of the NDCG@20 decile curves, and their count n."""
  table = {}
  for variant in suite.variants:
    curves = [c.deciles for c in cells if c.cell.variant == variant and c.deciles is not None]
    if curves:
      stacked = np.stack(curves)
      with warnings.catch_warnings():  # Deciles without any test target stay NaN.
        warnings.simplefilter('ignore', RuntimeWarning)
        table[variant] = {
            'mean': np.nanmean(stacked, axis=0), 'n': len(curves),
            'std': np.nanstd(stacked, axis=0, ddof=1) if len(curves) > 1 else
                   np.full(stats.NUM_DECILES, np.nan)}
  return table


def _sweep_summary(sweep_suite: Suite, sweep_cells: Sequence[CellReport]) -> dict[str, Any]:
  """The sweep's x values and per-x NDCG@20 mean/std/n, overall and on tail items."""
  sweep_table = aggregate(sweep_suite, sweep_cells)
  xs = [v for v in sweep_suite.variants if v in sweep_table['overall']]
  sweep = {'x': [sweep_suite.sweep_values[v] for v in xs], 'variants': xs}
  for group in ('overall', 'tail_items'):
    rows = [sweep_table[group].get(v, {}).get('NDCG@20', stats.mean_std([])) for v in xs]
    sweep[group] = {'mean': [r['mean'] for r in rows], 'std': [r['std'] for r in rows],
                    'n': [r['n'] for r in rows]}
  return sweep


def _json_safe(obj: Any) -> Any:
  """NaN -> None and numpy -> Python, so summary.json is strict JSON."""
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _json_safe(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return str(obj) if isinstance(obj, pathlib.Path) else obj


def _archive_cells(suite: Suite, cells: Sequence[CellReport],
                   record: Callable[[Suite, Cell], pathlib.Path | None], *, num_items: int,
                   short_history: int, head_fraction: float) -> None:
  """Records every finished cell read from its workdir with per-example ranks (not a fallback).

  A reused run (another suite's cell) is left to its own suite's report, which records it.
  """
  for c in cells:
    path = record(suite, c.cell)
    if (c.status != 'finished' or c.source != 'workdir' or c.note or path is None
        or c.cell.workdir is not None):
      continue
    archive.write_record(path, _json_safe(archive.make_record(
        suite, c.cell, results=c.results, curve=c.curve, groups=c.groups,
        sampled_groups=c.sampled_groups, deciles=c.deciles, short_history=short_history,
        head_fraction=head_fraction, num_items=num_items, archived=now_utc(),
        attempts=archive.read_attempts(c.workdir))))


# ---- building the report --------------------------------------------------------------------
def build_report(suite: Suite, results_dir: str = 'results', *, train_item_counts: np.ndarray,
                 short_history: int = DEFAULT_SHORT_HISTORY,
                 head_fraction: float = DEFAULT_HEAD_FRACTION,
                 spectrum: Callable[[pathlib.Path], dict[str, Any]] | None = None,
                 sweep_suite: Suite | None = None, command: str = '',
                 sampled_negatives: int | None = None,
                 random_levels: Mapping[str, Any] | None = None,
                 protocol: str = 'cold_start_users', exclude_seen: bool = False,
                 archive_dir: str | None = None, record_cells: bool = True) -> dict[str, Any]:
  """Writes README.md, summary.json and the plots into `<results_dir>/<suite>/`; returns the summary.

  Args:
    train_item_counts: [N] train interactions per item (head/tail groups and deciles).
    spectrum: called with the PNG path to draw the eigen-spectrum (None: no spectrum plot).
    sweep_suite: a sweep suite whose finished runs add the sweep plot (the suite itself if it is
      a sweep).
    sampled_negatives: the config's count of sampled negatives, for runs whose results.json
      does not record it.
    random_levels: a cold_start_items suite's `cold_items.random_levels`: adds the headline
      table of new items and its plot.
    protocol, exclude_seen: the suite config's `data.protocol` and `eval.exclude_seen`, for the
      README's description of what was ranked.
    archive_dir: the committed archive (`archive.py`): cells without a workdir are read from it,
      and every finished cell read from its workdir (with test_ranks.npz) is recorded in it
      unless `record_cells` is False (a report at other thresholds than the suite config's).
      None: no archive.
  """
  out_dir = pathlib.Path(results_dir) / suite.name
  out_dir.mkdir(parents=True, exist_ok=True)
  is_head = metrics_lib.item_groups(train_item_counts, head_fraction)  # For the README's counts.
  deciles = stats.popularity_deciles(train_item_counts)
  record = lambda s, c: (None if archive_dir is None else
                         archive.record_path(s, c, results_dir, archive_dir))
  collect = lambda s: [collect_cell(s, c, results_dir, train_item_counts=train_item_counts,
                                    deciles=deciles, short_history=short_history,
                                    head_fraction=head_fraction, record=record(s, c))
                       for c in s.cells]
  cells = collect(suite)
  if archive_dir is not None and record_cells:
    _archive_cells(suite, cells, record, num_items=len(train_item_counts),
                   short_history=short_history, head_fraction=head_fraction)
  table = aggregate(suite, cells)
  sampled = aggregate(suite, cells, 'sampled_groups')
  comp = comparisons(suite, cells)
  decile_table = _decile_table(suite, cells)
  not_finished = [c for c in cells if c.status != 'finished']
  # Plots: file name -> caption, in the README's order.
  plot_captions = {}
  if plots.plot_learning_curves(suite, cells, out_dir / 'learning_curves.png'):
    plot_captions['learning_curves.png'] = 'Validation NDCG@20 by epoch (mean over seeds)'
  if plots.plot_deciles(suite, decile_table, out_dir / 'ndcg_by_popularity_decile.png'):
    plot_captions['ndcg_by_popularity_decile.png'] = (
        'Test NDCG@20 by train-popularity decile of the target (1 = least popular; symlog axis)')
  if random_levels is not None and plots.plot_cold_items(suite.variants, _json_safe(table),
                                                        random_levels, out_dir / 'cold_items.png'):
    plot_captions['cold_items.png'] = ('Test NDCG@20 on new-item targets, ranked among all '
                                       'items and among the new items only (dashed: random)')
  spectrum_info = None
  if spectrum is not None:
    spectrum_info = spectrum(out_dir / 'spectrum.png')
    plot_captions['spectrum.png'] = ('Eigen-spectrum of the MiniLM item embeddings (log scale) '
                                     'with the kept and null cuts')
  sweep = None
  if sweep_suite is not None and sweep_suite.sweep_values:
    sweep = _sweep_summary(sweep_suite, cells if sweep_suite is suite else collect(sweep_suite))
    if plots.plot_sweep(_json_safe(sweep), sweep_suite.sweep_label,
                        out_dir / 'null_dim_sweep.png'):
      plot_captions['null_dim_sweep.png'] = (
          f'Test NDCG@20 overall and on tail items against {sweep_suite.sweep_label} '
          f'(suite {sweep_suite.name})')
  # The negatives' counts of the sampled tables (the config's where a run did not record it).
  negatives = sorted({c.sampled_negatives if c.sampled_negatives is not None else sampled_negatives
                      for c in cells if c.sampled_groups} - {None})
  summary = {
      'suite': suite.name, 'description': suite.description, 'generated': now_utc(),
      'command': command, 'seeds': list(suite.seeds), 'variants': list(suite.variants),
      'baseline': suite.baseline, 'protocol': protocol, 'exclude_seen': bool(exclude_seen),
      'short_history': short_history,
      'head_fraction': head_fraction, 'num_items': int(len(is_head)),
      'num_head_items': int(is_head.sum()), 'std': 'sample std over seeds (ddof=1)',
      'cells': {c.cell.name: {'variant': c.cell.variant, 'seed': c.cell.seed, 'status': c.status,
                              'workdir': c.workdir, 'wall_seconds': c.wall_seconds,
                              'note': c.note, 'source': c.source, 'groups': c.groups,
                              'sampled_groups': c.sampled_groups,
                              'ndcg20_by_decile': c.deciles} for c in cells},
      'tables': table, 'comparisons': comp, 'sampled_tables': sampled,
      'sampled_negatives': negatives, 'deciles': decile_table, 'sweep': sweep,
      'spectrum': spectrum_info, 'plots': plot_captions, 'cold_items': random_levels,
      'budget': stats.budget(suite.variants, [(c.cell.variant, c.results) for c in cells
                                              if c.status == 'finished']),
      'not_finished': [{'cell': c.cell.name, 'status': c.status, 'workdir': c.workdir}
                       for c in not_finished],
  }
  summary = _json_safe(summary)
  if suite.name in thinning.SUITES:  # The data-thinning section, from the three suites' summaries.
    summary['thinning'] = thinning.thinning_table(results_dir, current=summary)
    if plots.plot_thinning(summary['thinning'], thinning.SPARSE_ROWS, thinning.GROUPS,
                           out_dir / 'data_thinning.png'):
      summary['plots']['data_thinning.png'] = (
          'Test NDCG@20 against the fraction of train users kept (solid: overall; dashed: tail '
          'items)')
  files.write_text(out_dir / 'summary.json', json.dumps(summary, indent=1) + '\n')
  files.write_text(out_dir / 'README.md', render_readme(suite, summary))
  return summary


def publish(suite: Suite, results_dir: str, publish_dir: str) -> list[pathlib.Path]:
  """Copies README.md and the PNGs (small, no data) into `publish_dir`."""
  src = pathlib.Path(results_dir) / suite.name
  dst = pathlib.Path(publish_dir)
  dst.mkdir(parents=True, exist_ok=True)
  copied = []
  for path in [src / 'README.md', *sorted(src.glob('*.png'))]:
    if path.is_file():
      files.atomic_write(dst / path.name, lambda f, p=path: f.write(p.read_bytes()), mode='wb')
      copied.append(dst / path.name)
  return copied


def report_from_config(suite: Suite, results_dir: str, *, short_history: int | None,
                       head_fraction: float | None, with_spectrum: bool, command: str,
                       archive_dir: str | None = None) -> dict[str, Any]:
  """`build_report` with the item counts (and spectrum) of the suite's dataset.

  `short_history` and `head_fraction` default (None) to the suite config's `config.eval` values,
  the thresholds its runs' own results.json groups used.
  """
  from alphafuse_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = load_config(suite.config)
  defaults = (int(config.eval.short_history), float(config.eval.head_fraction))
  short_history = defaults[0] if short_history is None else short_history
  head_fraction = defaults[1] if head_fraction is None else head_fraction
  dataset = data_lib.load(config.data)
  spectrum = None
  # The ID row has no language vectors; a suite may turn the spectrum off.
  if with_spectrum and suite.spectrum and config.embedding.pipeline != 'id':
    spectrum = lambda path: plots.spectrum_figure(config, path, dataset=dataset)
  # ml1m_sasrec's report shows the null_dim sweep's finished points; a sweep shows its own.
  sweep_suite = suite if suite.sweep_values else (
      make_suite('null_dim_sweep', results_dir=results_dir) if suite.name == 'ml1m_sasrec'
      else None)
  return build_report(suite, results_dir, train_item_counts=dataset.train_item_counts,
                      short_history=short_history, head_fraction=head_fraction,
                      spectrum=spectrum, sweep_suite=sweep_suite, command=command,
                      sampled_negatives=config.eval.sampled_negatives or None,
                      random_levels=(None if dataset.new_items is None else
                                     cold_items.random_levels(dataset)),
                      protocol=config.data.protocol, exclude_seen=bool(config.eval.exclude_seen),
                      archive_dir=archive_dir,
                      # The archive keeps the groups at the config's thresholds only.
                      record_cells=(short_history, head_fraction) == defaults)
