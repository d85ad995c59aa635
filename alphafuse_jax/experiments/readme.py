"""The suite's README.md, rendered from summary.json's numbers (`report.build_report` writes it).

Also the tables' groups and metrics and the default group thresholds, which the report shares.
"""

from __future__ import annotations

from typing import Any, Mapping

from alphafuse_jax import evaluation
from alphafuse_jax.experiments import cold_items
from alphafuse_jax.experiments import plots
from alphafuse_jax.experiments import stats
from alphafuse_jax.experiments import thinning
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


def _published_table(suite: Suite) -> list[str]:
  """Markdown rows of the suite's published figures (other code, not rerun here)."""
  lines = ['Published figures on this protocol (other code and tuning, not rerun here; "-": not '
           'given):', '', '| published | ' + ' | '.join(TABLE_METRICS) + ' | source |',
           '|---' * (len(TABLE_METRICS) + 2) + '|']
  for p in suite.published:
    values = [f'{p.metrics[m]:.4f}' if m in p.metrics else '-' for m in TABLE_METRICS]
    lines.append(f'| {p.label} | ' + ' | '.join(values) + f' | {p.source} |')
  return lines + ['']


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
      if group == 'overall' and suite.published:
        lines += _published_table(suite)
  lines += [f'## Each pipeline minus {suite.baseline}, paired by seed', '',
            'Mean ± std of the per-seed differences (pipeline − baseline). **tie**: |mean '
            'difference| is smaller than the seed spread (the larger of the two pipelines\' '
            'stds); otherwise **better** / **worse** says how the pipeline does against '
            f'{suite.baseline}.', '']
  for metric in COMPARISON_METRICS:
    lines += [f'### {metric}', '', *_comparison_table(suite, summary['comparisons'], metric), '']
  lines += stats.render_budget(summary.get('budget') or {})
  if summary.get('thinning'):
    lines += thinning.render_section(summary['thinning'])
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
