"""The cold-start-items part of a suite's report: random levels, the headline table and its plot.

On a `cold_start_items` split every test target is a new item, and each run also ranks the target
among the new items only (`evaluation.NEW_ITEMS`). The headline table puts, per row, the
full-catalogue and the new-items-only NDCG@20 / HR@20 side by side, above the level of a ranker
that orders items at random, computed by hand:

  uniform over m items: HR@K = min(K, m) / m,  NDCG@K = sum_{r=1..min(K, m)} 1 / log2(r + 1) / m

with m = N (full catalogue) or M (new items). An untrained ID row (SASRec-ID's new items) is
random, but not uniform: new items already in the history shape the user state, so they tend to
score above the others, and the target (never in its own history on ML-1M) lands among the rest.
`history_on_top` is that extreme: per example, the h new items of its history first and the
target uniform over the M - h others; an untrained row should lie between the two levels.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from alphafuse_jax import evaluation
from alphafuse_jax import metrics as metrics_lib

NEW_ITEMS = evaluation.NEW_ITEMS
# (group, metric, column title) of the headline table, in order.
HEADLINE = (('overall', 'NDCG@20', 'NDCG@20 all items'), ('overall', 'HR@20', 'HR@20 all items'),
            (NEW_ITEMS, 'NDCG@20', 'NDCG@20 new items only'),
            (NEW_ITEMS, 'HR@20', 'HR@20 new items only'))
# What the table says about a row beside its numbers.
ROW_NOTES = {
    'llminit': 'flagged: new rows are its initial (text-derived) rows, never trained',
    'text_only': 'no training: cosine of mean history text vector and item text vector',
    'id': 'sanity check: new rows are untrained random rows (expect the random level)',
}


def new_item_group(arrays: Mapping[str, np.ndarray], ks: Sequence[int] = (10, 20)
                   ) -> dict[str, float] | None:
  """Metrics of the rank among new items from test_ranks.npz arrays, or None without one."""
  if 'new_rank' not in arrays:
    return None
  return metrics_lib.summarize_ranks(arrays['new_rank'], ks=ks, ties=arrays.get('new_ties'))


def uniform_level(m: int, k: int) -> dict[str, float]:
  """HR@k and NDCG@k of a target ranked uniformly at random among m items."""
  top = min(k, m)
  gains = 1.0 / np.log2(np.arange(1, top + 1, dtype=np.float64) + 1.0)
  return {f'HR@{k}': top / m, f'NDCG@{k}': float(gains.sum()) / m}


def history_on_top_level(history: np.ndarray, target: np.ndarray, new_items: np.ndarray,
                         k: int) -> dict[str, float]:
  """HR@k, NDCG@k when each example's h history new items (not the target) rank first and the
  target is uniform over the other M - h new items; history int [n, L] (pad = N), target [n]."""
  new = np.append(np.asarray(new_items, bool), False)  # The pad id N is not new.
  num_new = int(new[:-1].sum())
  hr, ndcg = np.zeros(len(target)), np.zeros(len(target))
  for i, (row, t) in enumerate(zip(np.asarray(history), np.asarray(target))):
    h = np.unique(row[new[row] & (row != t)]).size
    ranks = np.arange(h + 1, num_new + 1, dtype=np.float64)  # Equally likely ranks.
    hit = ranks <= k
    hr[i] = hit.mean()
    ndcg[i] = np.mean(hit / np.log2(ranks + 1.0))
  return {f'HR@{k}': float(hr.mean()), f'NDCG@{k}': float(ndcg.mean())}


def random_levels(dataset, split: str = 'test', k: int = 20) -> dict[str, Any]:
  """The random levels of the module docstring on `dataset`'s split (a cold_start_items one)."""
  new_items = np.asarray(dataset.new_items, bool)
  examples = dataset.splits[split]
  return {'num_items': int(dataset.num_items), 'num_new_items': int(new_items.sum()),
          'overall': uniform_level(int(dataset.num_items), k),
          NEW_ITEMS: uniform_level(int(new_items.sum()), k),
          'history_on_top': history_on_top_level(examples['history'], examples['target'],
                                                  new_items, k)}


def _fmt(stat: Mapping[str, Any] | None) -> str:
  if not stat or stat['n'] == 0:
    return '-'
  if stat['n'] == 1:
    return f'{stat["mean"]:.4f} (1 seed)'
  return f'{stat["mean"]:.4f} ± {stat["std"]:.4f}'


def headline_rows(variants: Sequence[str], tables: Mapping[str, Any]) -> list[str]:
  """Markdown rows: per variant its seeds, the HEADLINE columns (mean ± std) and its note."""
  lines = ['| row | seeds | ' + ' | '.join(t for _, _, t in HEADLINE) + ' | note |',
           '|---' * (len(HEADLINE) + 3) + '|']
  for variant in variants:
    row = tables.get('overall', {}).get(variant)
    seeds = ','.join(map(str, row['NDCG@20']['seeds'])) if row else '0'
    cells = [_fmt(tables.get(g, {}).get(variant, {}).get(m)) for g, m, _ in HEADLINE]
    lines.append(f'| {variant} | {seeds} | ' + ' | '.join(cells) +
                 f' | {ROW_NOTES.get(variant, "")} |')
  return lines


def render_section(summary: Mapping[str, Any], variants: Sequence[str]) -> list[str]:
  """The README section: the headline table and the random levels."""
  levels = summary['cold_items']
  n, m = levels['num_items'], levels['num_new_items']
  on_top = levels['history_on_top']
  lines = ['## New items (cold_start_items): the headline', '',
           f'Every test example\'s target is a new item ({m} of the {n} items, never seen in '
           'training). "all items": the target ranked among all items; "new items only": among '
           f'the {m} new items. Mean ± sample std over seeds.', '',
           *headline_rows(variants, summary['tables']),
           f'| random ranker (by hand) | - | {levels["overall"]["NDCG@20"]:.4f} | '
           f'{levels["overall"]["HR@20"]:.4f} | {levels[NEW_ITEMS]["NDCG@20"]:.4f} | '
           f'{levels[NEW_ITEMS]["HR@20"]:.4f} | uniform over {n} / {m} items |', '',
           f'Random level among the new items: NDCG@20 = (sum of 1/log2(r+1), r = 1..20) / {m} '
           f'= {levels[NEW_ITEMS]["NDCG@20"]:.4f}, HR@20 = min(20, {m})/{m} = '
           f'{levels[NEW_ITEMS]["HR@20"]:.4f}. '
           'With the history\'s new items ranked first and the target uniform over the rest '
           f'(an untrained row\'s other extreme): NDCG@20 {on_top["NDCG@20"]:.4f}, HR@20 '
           f'{on_top["HR@20"]:.4f}. The plot (cold_items.png) is under Plots below.', '']
  return lines
