"""Data thinning (issue 20 item 3): the same rows at 100%, 25% and 10% of the train users.

`ml1m_convergence`, `ml1m_sparse25` and `ml1m_sparse10` run the same pipelines to early stopping on
ever fewer train users (validation and test unchanged). Each suite's report adds this section,
built from the three suites' summary.json files (the suite being reported: its fresh summary),
so it shows whatever has finished: per fraction and row, test NDCG@20 overall and on tail items,
and AlphaFuse minus SASRec-ID paired by seed with the suites' tie rule. That answers where the
advantage of frozen language directions grows or vanishes as data thins.

The tail items of each fraction are those outside the 20% most interacted in *its* train split,
so the tail group changes a little with the fraction.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

from alphafuse_jax.experiments import stats
from alphafuse_jax.experiments.suites import SPARSE_PERCENTS
from alphafuse_jax.experiments.suites import SPARSE_ROWS
from alphafuse_jax.experiments.suites import SuiteError

# suite -> fraction of the train users it keeps, from the most data to the least.
SUITES = {'ml1m_convergence': 1.0,
          **{f'ml1m_sparse{p}': p / 100 for p in sorted(SPARSE_PERCENTS, reverse=True)}}
GROUPS = ('overall', 'tail_items')
METRIC = 'NDCG@20'
# The comparison the section is about: the frozen language directions against the ID model.
LANGUAGE, ID = 'alphafuse', 'id'


def _read_summary(path: pathlib.Path) -> dict[str, Any] | None:
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise SuiteError(f'{path}: not valid JSON ({e}); rerun that suite with --report_only.') from e


def _pair(summary: Mapping[str, Any], group: str) -> dict[str, Any]:
  """AlphaFuse minus SASRec-ID on `group`, paired by seed, from the summary's per-cell groups."""
  by_seed = lambda variant: {c['seed']: c['groups'][group][METRIC]
                             for c in summary['cells'].values()
                             if c['variant'] == variant and c['status'] == 'finished'
                             and group in (c.get('groups') or {})}
  return stats.paired_comparison(by_seed(LANGUAGE), by_seed(ID))


def thinning_table(results_dir: str, current: Mapping[str, Any] | None = None
                   ) -> dict[str, Any] | None:
  """fraction rows: per row and group the mean/std/n of test NDCG@20, and AlphaFuse - ID.

  `current` is the summary of the suite being reported (used instead of its file on disk).
  None when no thinning suite has a summary yet.
  """
  rows = []
  for name, fraction in SUITES.items():
    summary = (current if current is not None and current.get('suite') == name else
               _read_summary(pathlib.Path(results_dir) / name / 'summary.json'))
    if summary is None:
      continue
    row = {'suite': name, 'fraction': fraction, 'generated': summary.get('generated'),
           'metrics': {}, 'language_minus_id': {}}
    for group in GROUPS:
      table = summary['tables'].get(group, {})
      row['metrics'][group] = {v: table[v][METRIC] for v in SPARSE_ROWS if v in table}
      row['language_minus_id'][group] = _pair(summary, group)
    rows.append(row)
  return {'rows': rows, 'metric': METRIC} if rows else None


def _fmt(stat: Mapping[str, Any] | None) -> str:
  if not stat or not stat['n']:
    return '-'
  if stat['n'] == 1:
    return f'{stat["mean"]:.4f} (1 seed)'
  return f'{stat["mean"]:.4f} ± {stat["std"]:.4f}'


def _fmt_pair(pair: Mapping[str, Any]) -> str:
  if not pair['seeds']:
    return '-'
  if pair['verdict'] == 'n/a':
    return f'{pair["mean_diff"]:+.4f} (1 seed, n/a)'
  return f'{pair["mean_diff"]:+.4f} ± {pair["std_diff"]:.4f} **{pair["verdict"]}**'


def render_section(table: Mapping[str, Any]) -> list[str]:
  """The README section: one table row per fraction (the plot is among the report's plots)."""
  lines = ['## Data thinning: 100%, 25% and 10% of the train users', '',
           f'Test {METRIC}, mean ± std over seeds, from each suite\'s summary.json (generated at '
           'the time shown). "AlphaFuse − ID" is paired by seed; **better** means AlphaFuse is '
           "ahead by more than the seeds' spread, **tie** that it is not. Tail items are "
           "counted in each fraction's own train split.", '',
           '| train users | ' + ' | '.join(f'{v} {g}' for g in ('overall', 'tail')
                                           for v in SPARSE_ROWS) +
           ' | AlphaFuse − ID overall | AlphaFuse − ID tail | summary generated |',
           '|---' * (2 * len(SPARSE_ROWS) + 4) + '|']
  for row in table['rows']:
    cells = [_fmt(row['metrics'][g].get(v)) for g in GROUPS for v in SPARSE_ROWS]
    cells += [_fmt_pair(row['language_minus_id'][g]) for g in GROUPS]
    lines.append(f'| {row["fraction"]:.0%} (`{row["suite"]}`) | ' + ' | '.join(cells) +
                 f' | {row["generated"]} |')
  return lines + ['']
