"""The suite's report: per-cell metrics by group, mean +- std over seeds, paired comparisons.

Groups are `evaluation.GROUPS` with `evaluation.group_masks`, the definition training uses, applied
to each cell's test_ranks.npz; a cell without it falls back on results.json's `test` and
`test_groups`, which use the same names. `build_report` writes README.md, summary.json and the
plots into `<results_dir>/<suite>/`; `publish` copies README.md and the PNGs elsewhere.
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
from alphafuse_jax.experiments import cold_items
from alphafuse_jax.experiments import plots
from alphafuse_jax.experiments import stats
from alphafuse_jax.experiments.runner import cell_workdir
from alphafuse_jax.experiments.runner import now_utc
from alphafuse_jax.experiments.suites import Cell
from alphafuse_jax.experiments.suites import load_config
from alphafuse_jax.experiments.suites import make_suite
from alphafuse_jax.experiments.suites import Suite

GROUPS = evaluation.GROUPS
# The groups of the tables: GROUPS, and on cold_start_items the rank among the new items only.
REPORT_GROUPS = GROUPS + (evaluation.NEW_ITEMS,)
# The metrics of the tables, and the ones the paired comparison shows in the README.
TABLE_METRICS = ('HR@10', 'HR@20', 'NDCG@10', 'NDCG@20')
COMPARISON_METRICS = ('NDCG@20', 'HR@20')
# LLM-ESR's `--ts_user` default (main.py): a user is short when fewer items precede the target.
DEFAULT_SHORT_HISTORY = 10
DEFAULT_HEAD_FRACTION = 0.2


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


def collect_cell(suite: Suite, cell: Cell, results_dir: str, *, train_item_counts: np.ndarray,
                 deciles: np.ndarray, short_history: int, head_fraction: float) -> CellReport:
  """Everything the report needs from one cell's workdir (`train_item_counts` [N] per item)."""
  workdir = cell_workdir(suite, cell, results_dir)
  results_path = workdir / 'results.json'
  curve = stats.read_curve(workdir / 'metrics.jsonl')
  if not results_path.is_file():
    status = 'unfinished' if workdir.is_dir() else 'missing'
    return CellReport(cell, status, workdir, curve=curve)
  results = stats.read_results(results_path)
  report = CellReport(cell, 'finished', workdir, curve=curve, results=results,
                      wall_seconds=float(results.get('wall_seconds', float('nan'))))
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


# ---- building the report --------------------------------------------------------------------
def build_report(suite: Suite, results_dir: str = 'results', *, train_item_counts: np.ndarray,
                 short_history: int = DEFAULT_SHORT_HISTORY,
                 head_fraction: float = DEFAULT_HEAD_FRACTION,
                 spectrum: Callable[[pathlib.Path], dict[str, Any]] | None = None,
                 sweep_suite: Suite | None = None, command: str = '',
                 sampled_negatives: int | None = None,
                 random_levels: Mapping[str, Any] | None = None,
                 protocol: str = 'cold_start_users', exclude_seen: bool = False
                 ) -> dict[str, Any]:
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
  """
  out_dir = pathlib.Path(results_dir) / suite.name
  out_dir.mkdir(parents=True, exist_ok=True)
  is_head = metrics_lib.item_groups(train_item_counts, head_fraction)  # For the README's counts.
  deciles = stats.popularity_deciles(train_item_counts)
  collect = lambda s: [collect_cell(s, c, results_dir, train_item_counts=train_item_counts,
                                    deciles=deciles, short_history=short_history,
                                    head_fraction=head_fraction) for c in s.cells]
  cells = collect(suite)
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
                              'note': c.note, 'groups': c.groups,
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
                       head_fraction: float | None, with_spectrum: bool, command: str
                       ) -> dict[str, Any]:
  """`build_report` with the item counts (and spectrum) of the suite's dataset.

  `short_history` and `head_fraction` default (None) to the suite config's `config.eval` values,
  the thresholds its runs' own results.json groups used.
  """
  from alphafuse_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = load_config(suite.config)
  if short_history is None:
    short_history = int(config.eval.short_history)
  if head_fraction is None:
    head_fraction = float(config.eval.head_fraction)
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
                      protocol=config.data.protocol, exclude_seen=bool(config.eval.exclude_seen))



# ---- the README -----------------------------------------------------------------------------
def _fmt(stat: Mapping[str, Any]) -> str:
  """'mean ± std', 'mean (1 seed)' or '-' (no seed)."""
  if stat['n'] <= 1:
    return f'{stat["mean"]:.4f} (1 seed)' if stat['n'] else '-'
  return f'{stat["mean"]:.4f} ± {stat["std"]:.4f}'


def _protocol_line(summary: Mapping[str, Any]) -> str:
  """The README line that says which users and targets the test split holds."""
  if summary.get('cold_items'):
    return ('- Every test target is a new item by the protocol (`cold_start_items`): the newest '
            'items by first interaction never appear in training, as target or in a history.')
  if summary.get('protocol') == 'leave_one_out':
    return ("- Leave-one-out (`leave_one_out`): each user's last item is the test target and the "
            'one before it the validation target; every user also trains on the items before.')
  return ('- Every test user is a cold-start user by the protocol: train, validation and test '
          'users are disjoint (`cold_start_users`), so no test user appears in training.')


def _short_history_note(summary: Mapping[str, Any]) -> str:
  """Which `ts_user` the report's short-user threshold is, and why."""
  sh = summary['short_history']
  if sh == DEFAULT_SHORT_HISTORY:
    return (f'at its default `--ts_user={sh}` (main.py; its per-dataset scripts use 12, 3 and '
            '9).' + (' 10 is also our history window `max_len` of the cold-start suites, so '
                     'counting the items before the target or the non-pad items of the model '
                     'input gives the same split.'
                     if summary.get('protocol') != 'leave_one_out' else ''))
  return (f'with `ts_user={sh}` set for this dataset by the suite config '
          f'(`config.eval.short_history`; LLM-ESR\'s default is {DEFAULT_SHORT_HISTORY}, and its '
          'scripts set a threshold per dataset).')


def _group_title(group: str, short_history: int, head_fraction: float) -> str:
  return {'overall': 'Overall',
          'tail_items': f'Tail items (target outside the {head_fraction:.0%} most interacted in train)',
          'head_items': f'Head items (target among the {head_fraction:.0%} most interacted in train)',
          'short_users': f'Short users (fewer than {short_history} items before the target)',
          'long_users': f'Long users ({short_history} or more items before the target)',
          'new_items': 'New items only (every example, the target ranked among the new items)'
          }[group]


def _metric_table(suite: Suite, table: Mapping[str, Any]) -> list[str]:
  """Markdown rows: one per variant (suite order), its seeds, TABLE_METRICS and test examples."""
  lines = ['| pipeline | seeds | ' + ' | '.join(TABLE_METRICS) + ' | test examples |',
           '|---' * (len(TABLE_METRICS) + 3) + '|']
  for variant in suite.variants:
    if variant not in table:
      lines.append(f'| {variant} | 0 | ' + ' | '.join('-' for _ in TABLE_METRICS) + ' | - |')
      continue
    row = table[variant]
    # Seeds of one variant normally share the count; differing ones are all shown.
    counts = sorted({int(c) for c in row['count'].values() if c is not None})
    count = '/'.join(str(c) for c in counts) or '?'
    seeds = ','.join(str(s) for s in row[TABLE_METRICS[0]]['seeds'])
    lines.append(f'| {variant} | {seeds} | ' + ' | '.join(_fmt(row[m]) for m in TABLE_METRICS) +
                 f' | {count} |')
  return lines


def _comparison_table(suite: Suite, comp: Mapping[str, Any], metric: str) -> list[str]:
  """Markdown rows: one per non-baseline variant, its paired difference in every group."""
  groups = [g for g in REPORT_GROUPS if any(c['seeds'] for c in comp[metric][g].values())]
  lines = ['| pipeline | ' + ' | '.join(plots.GROUP_SHORT[g] for g in groups) + ' |',
           '|---' * (len(groups) + 1) + '|']
  for variant in suite.variants:
    if variant == suite.baseline:
      continue
    cells = []
    for group in groups:
      c = comp[metric][group][variant]
      if not c['seeds']:
        cells.append('-')
      elif c['verdict'] == 'n/a':
        cells.append(f'{c["mean_diff"]:+.4f} (1 seed, n/a)')
      else:
        cells.append(f'{c["mean_diff"]:+.4f} ± {c["std_diff"]:.4f} **{c["verdict"]}**')
    lines.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
  return lines


def render_readme(suite: Suite, summary: Mapping[str, Any]) -> str:
  """The Markdown report from summary.json's numbers."""
  sh, hf = summary['short_history'], summary['head_fraction']
  # The protocol and group definitions.
  lines = [f'# Experiment suite `{suite.name}`', '',
           f'{suite.description}. Seeds: {", ".join(map(str, suite.seeds))}. '
           f'Generated {summary["generated"]}' +
           (f' by `{summary["command"]}`.' if summary['command'] else '.'), '',
           '- Full-ranking test metrics (the target ranked among all '
           f'{summary["num_items"]} items, ' +
           ("each user's already-seen items excluded" if summary.get('exclude_seen') else
            'no history masking') +
           '), mean ± sample std (ddof=1) over seeds; "(1 seed)" has no std.',
           _protocol_line(summary),
           f'- Head items: the {hf:.0%} most interacted in train ({summary["num_head_items"]} of '
           f'{summary["num_items"]}); tail items: the rest.',
           f'- Short users: fewer than {sh} items before the target; long users: {sh} or more. '
           f"This is LLM-ESR's user split (`seq_len < ts_user`, liuqidong07/LLM-ESR "
           '`utils/utils.py:metric_len_report`), ' + _short_history_note(summary)]
  env = sorted({f'`{k}={v}`' for c in suite.cells for k, v in c.env})
  if env:
    rows = sorted({c.variant for c in suite.cells if c.env})
    lines.append(f'- Cell environment defaults (a variable set by the caller wins): {", ".join(env)} '
                 f'for {", ".join(rows)} (see `CELL_ENV` in alphafuse_jax/experiments/suites.py).')
  lines.append('')
  # Missing runs first, so that a partial table is read as partial.
  missing = summary['not_finished']
  lines += ['## Missing or unfinished runs', '']
  if missing:
    lines += [f'- `{m["cell"]}`: {m["status"]} (`{m["workdir"]}`)' for m in missing]
  else:
    lines.append('None: every cell finished.')
  lines.append('')
  if summary.get('cold_items'):  # The question of a cold_start_items suite comes first.
    lines += cold_items.render_section(summary, suite.variants)
  notes = [(name, c['note']) for name, c in summary['cells'].items() if c['note']]
  if notes:
    lines += ['Notes on finished runs:', '', *[f'- `{name}`: {note}' for name, note in notes], '']
  # One full-ranking table per group, then the paired comparisons.
  tables = summary['tables']
  for group in REPORT_GROUPS:
    if group in GROUPS or tables.get(group):  # The new-items group only where runs have it.
      lines += [f'## {_group_title(group, sh, hf)}', '', *_metric_table(suite, tables[group]), '']
  lines += [f'## Each pipeline minus {suite.baseline}, paired by seed', '',
            'Mean ± std of the per-seed differences (pipeline − baseline). **tie**: |mean '
            'difference| is smaller than the seed spread (the larger of the two pipelines\' '
            'stds); otherwise **better** / **worse** says how the pipeline does against '
            f'{suite.baseline}.', '']
  for metric in COMPARISON_METRICS:
    lines += [f'### {metric}', '', *_comparison_table(suite, summary['comparisons'], metric), '']
  lines += stats.render_budget(summary.get('budget') or {})
  # Sampled metrics, only when some run has them, under a heading that says they differ.
  if any(summary['sampled_tables'][g] for g in GROUPS):
    negatives = summary['sampled_negatives']
    count = f'{negatives[0]} negatives' if len(negatives) == 1 else (
        f'{"/".join(map(str, negatives))} negatives' if negatives else
        'number of negatives not recorded')
    lines += [f'## Sampled: {count}, not comparable to full ranking', '',
              'The target ranked among itself and sampled negatives (LLM-ESR style), for '
              'comparison with papers that report it.', '']
    for group in GROUPS:
      if summary['sampled_tables'][group]:
        lines += [f'### Sampled: {count}, not comparable to full ranking: '
                  f'{_group_title(group, sh, hf)}', '',
                  *_metric_table(suite, summary['sampled_tables'][group]), '']
  if summary['sweep'] and summary['sweep']['x']:
    sweep = summary['sweep']
    lines += ['## null_dim sweep', '', '| null_dim | seeds | NDCG@20 overall | NDCG@20 tail items |',
              '|---|---|---|---|']
    for i, x in enumerate(sweep['x']):
      fmt = lambda g: _fmt({'mean': sweep[g]['mean'][i], 'std': sweep[g]['std'][i],
                            'n': sweep[g]['n'][i]})
      lines.append(f'| {x} | {sweep["overall"]["n"][i]} | {fmt("overall")} | '
                   f'{fmt("tail_items")} |')
    lines.append('')
  if summary['spectrum']:
    s = summary['spectrum']
    lines += ['## Spectrum', '',
              f'{s["num_items"]} items, d={s["dim"]}: kept k={s["kept_dim"]} directions '
              f'({s["explained_variance_kept"]:.1%} of the variance), null cut at '
              f'k-n={s["id_dims"][0]} (the ID fills the last {s["nullity"]} kept dims).', '']
  if summary['plots']:
    lines += ['## Plots', '']
    for name, caption in summary['plots'].items():
      lines += [f'{caption}:', '', f'![{caption}]({name})', '']
  return '\n'.join(lines)
