"""Reading a cell's outputs, and the pure statistics of the report (no plotting, no writing).

  read_results(path)            results.json, checked for the test NDCG@20 the runner prints
  read_test_ranks(path, N)      test_ranks.npz: rank, target, position [n] (+ ties, sampled_rank)
  read_curve(path)              epoch -> val NDCG@20 from metrics.jsonl
  popularity_deciles(counts)    int [N] train-popularity bin of every item
  decile_metric(ranks, ...)     float [10] a metric per popularity bin of the target
  mean_std, paired_comparison   mean +- sample std over seeds; the paired tie rule
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Iterable, Mapping

import numpy as np

from alphafuse_jax import metrics as metrics_lib
from alphafuse_jax.experiments.suites import SuiteError

NUM_DECILES = 10


# ---- reading a cell's outputs ---------------------------------------------------------------
def read_results(path: pathlib.Path) -> dict[str, Any]:
  """results.json as a dict; SuiteError (delete it, rerun) if unreadable or without test NDCG@20."""
  try:
    with open(path) as f:
      results = json.load(f)
  except json.JSONDecodeError as e:
    raise SuiteError(f'{path}: not valid JSON ({e}); delete it to rerun the cell.') from e
  if 'test' not in results or 'NDCG@20' not in results['test']:
    raise SuiteError(f'{path}: no test NDCG@20 (field "test"); delete it to rerun the cell.')
  return results


def read_test_ranks(path: pathlib.Path, num_items: int | None = None) -> dict[str, np.ndarray]:
  """`rank`, `target`, `position` (and `ties`, `sampled_rank` when present) from test_ranks.npz.

  Every array is [n]; ranks are 1-based and targets lie in 0..num_items-1 (when given). `ties`
  (the items tied with the target; absent in files written before ties were counted, read as 0)
  makes the run's metrics `metrics.summarize_ranks(rank, ties=ties)`.
  """
  with np.load(path, allow_pickle=False) as npz:
    arrays = {k: np.asarray(npz[k]) for k in npz.files}
  for key in ('rank', 'target', 'position'):
    if key not in arrays:
      raise SuiteError(f'{path}: array {key!r} missing (has {sorted(arrays)}); rerun the cell.')
  # Every array is one entry per test example, like `rank`.
  n = arrays['rank'].shape
  for key, value in arrays.items():
    if value.shape != n or value.ndim != 1:
      raise SuiteError(f'{path}: array {key!r} has shape {value.shape}, expected {n} like rank.')
  if n[0] and arrays['rank'].min() < 1:
    raise SuiteError(f'{path}: ranks must be 1-based (min {arrays["rank"].min()}).')
  # Targets beyond the suite's catalogue mean the run trained on another dataset.
  if num_items is not None and n[0] and not (
      0 <= arrays['target'].min() <= arrays['target'].max() < num_items):
    raise SuiteError(f'{path}: targets outside 0..{num_items - 1}: the run used another dataset '
                     'than the suite config; rerun the cell.')
  return arrays


def read_curve(path: pathlib.Path) -> dict[int, float]:
  """epoch -> val NDCG@20 from metrics.jsonl (epochs without evaluation are left out)."""
  curve = {}
  if not path.is_file():
    return curve
  # Read line by line (not files.read_jsonl) so that a bad line is named by its number.
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise SuiteError(f'{path}:{number}: not JSON ({e}).') from e
      if 'val/NDCG@20' in record:
        curve[int(record['epoch'])] = float(record['val/NDCG@20'])
  return curve


# ---- decile metrics (pure) ------------------------------------------------------------------
def popularity_deciles(train_item_counts: np.ndarray, num_bins: int = NUM_DECILES) -> np.ndarray:
  """int [N] in 1..num_bins: the item's popularity bin in train, 1 = least popular.

  Items are ordered from most to least interacted (ties: the lower id counts as more popular, as
  in `metrics.item_groups`); the item at popularity rank r (0 = most popular) lies in bin
  num_bins - floor(r * num_bins / N), so every bin holds N / num_bins items (+-1).
  """
  counts = np.asarray(train_item_counts)
  if counts.ndim != 1 or counts.size == 0:
    raise SuiteError(f'train_item_counts must be a non-empty [N] array, got shape {counts.shape}.')
  # rank[i]: item i's position in the stable most-to-least popular order.
  order = np.argsort(-counts, kind='stable')
  rank = np.empty(counts.size, np.int64)
  rank[order] = np.arange(counts.size)
  return num_bins - (rank * num_bins) // counts.size


def decile_metric(ranks: np.ndarray, targets: np.ndarray, deciles: np.ndarray,
                  metric: str = 'NDCG@20', num_bins: int = NUM_DECILES,
                  ties: np.ndarray | None = None) -> np.ndarray:
  """float [num_bins]: the metric over test examples whose target lies in each bin (NaN if none).

  `ranks`, `targets` (and `ties`, counted as in results.json) are [n]; `deciles` is int [N] from
  `popularity_deciles`.
  """
  ties = np.zeros(np.shape(ranks)) if ties is None else np.asarray(ties)
  k = int(metric.split('@')[1])
  target_bins = deciles[np.asarray(targets)]
  out = np.full(num_bins, np.nan)
  for b in range(1, num_bins + 1):
    selected = target_bins == b
    if selected.any():  # An empty bin stays NaN.
      out[b - 1] = metrics_lib.summarize_ranks(np.asarray(ranks)[selected], ks=(k,),
                                               ties=ties[selected])[metric]
  return out


# ---- aggregation over seeds (pure) ----------------------------------------------------------
def mean_std(values: Iterable[float]) -> dict[str, Any]:
  """Mean and sample std (ddof=1; NaN for fewer than 2 values) of finite values, with n."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  mean = float(v.mean()) if v.size else float('nan')
  std = float(v.std(ddof=1)) if v.size > 1 else float('nan')
  return {'mean': mean, 'std': std, 'n': int(v.size), 'values': [float(x) for x in v]}


def paired_comparison(variant: Mapping[int, float], baseline: Mapping[int, float]
                      ) -> dict[str, Any]:
  """variant - baseline on the seeds both have: mean +- std of the differences, and a verdict.

  The verdict is 'tie' when |mean difference| is smaller than the seed spread (the larger of the
  two variants' stds over the paired seeds), else 'better' (the variant beats the baseline) or
  'worse'; 'n/a' with fewer than 2 paired seeds (no spread to compare with).
  """
  # Only seeds where both sides have a finite value are paired.
  seeds = sorted(s for s in variant if s in baseline
                 and math.isfinite(variant[s]) and math.isfinite(baseline[s]))
  diffs = mean_std(variant[s] - baseline[s] for s in seeds)
  spread = max(mean_std(variant[s] for s in seeds)['std'],
               mean_std(baseline[s] for s in seeds)['std']) if len(seeds) > 1 else float('nan')
  if len(seeds) < 2:
    verdict = 'n/a'
  elif abs(diffs['mean']) < spread:
    verdict = 'tie'
  else:
    verdict = 'better' if diffs['mean'] > 0 else 'worse'
  return {'mean_diff': diffs['mean'], 'std_diff': diffs['std'], 'spread': spread,
          'seeds': seeds, 'verdict': verdict}


# ---- the training budget of each row --------------------------------------------------------
BUDGET_FIELDS = ('best_epoch', 'epochs', 'wall_minutes')


def run_seconds(results: Mapping[str, Any]) -> float:
  """A run's wall seconds over all of its processes (`run_seconds`); where that is unknown (runs
  recorded before it was kept, or resumed from a checkpoint that predates it), its last
  process's (`wall_seconds`), which leaves out the time of earlier, interrupted processes."""
  seconds = results.get('run_seconds')
  return float(results.get('wall_seconds', float('nan')) if seconds is None else seconds)


def budget(variants: Iterable[str], runs: Iterable[tuple[str, Mapping[str, Any]]]
           ) -> dict[str, dict[str, Any]]:
  """variant -> BUDGET_FIELDS -> mean_std over its finished runs (`runs`: (variant, results))."""
  runs = list(runs)
  table = {}
  for variant in variants:
    mine = [r for v, r in runs if v == variant]
    if mine:
      table[variant] = {
          'best_epoch': mean_std(r.get('best_epoch', float('nan')) for r in mine),
          'epochs': mean_std(r.get('epochs', float('nan')) for r in mine),
          'wall_minutes': mean_std(run_seconds(r) / 60 for r in mine)}
  return table


def render_budget(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """Markdown: per row, the epoch of the best validation, the epochs run and the wall time."""
  fmt = lambda s, p: ('-' if not s['n'] else f'{s["mean"]:.{p}f}' +
                      ('' if s['n'] < 2 else f' ± {s["std"]:.{p}f}') + f' ({s["n"]})')
  lines = ['## Training budget', '',
           'Per row: the epoch of the best val NDCG@20 (the test metrics are that epoch\'s), the '
           'epochs run (early stopping included) and the wall time of the whole run (training '
           'and evaluation, over every process of a resumed run; a run recorded before that was '
           'kept counts its last process alone), mean ± std (runs).', '',
           '| pipeline | best epoch | epochs run | wall (min) |', '|---|---|---|---|']
  for variant, row in table.items():
    lines.append(f'| {variant} | {fmt(row["best_epoch"], 1)} | {fmt(row["epochs"], 1)} | '
                 f'{fmt(row["wall_minutes"], 1)} |')
  return lines + ['']
