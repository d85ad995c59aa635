r"""The experiment suite: every pipeline x seed in one command, then tables and plots.

  python -m alphafuse_jax.experiments --suite=ml1m_sasrec [--seeds=22,23,24] \
      [--pipelines=alphafuse,id] [--report_only] [--publish_dir=docs/experiments]

Each cell (one variant, one seed) trains in its own subprocess of `alphafuse_jax.main` with the
workdir `<results_dir>/<suite>/runs/<cell>` and its log beside it as `<cell>.log`. A cell whose
`results.json` exists is skipped, an interrupted one resumes (main auto-resumes from its workdir),
a failed one is reported with its log and the suite goes on, exiting nonzero at the end.

The report (`<results_dir>/<suite>/README.md`, `summary.json` and PNG plots) gives mean +- sample
std (ddof=1) over seeds of HR@10/20 and NDCG@10/20, overall and for tail/head target items and
short/long users, computed from each cell's `test_ranks.npz` so the group definitions are the
report's own; a paired comparison of every variant against the suite's baseline calls a difference
a tie when it is smaller than the seeds' spread.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

import numpy as np

from alphafuse_jax import metrics as metrics_lib

# The repository root: config files are resolved against it, so the command runs from any cwd.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The eight SASRec pipelines, in the order of the tables (LLM-ESR last: its backbone lands last).
ML1M_PIPELINES = ('alphafuse', 'id', 'llminit', 'morec', 'whitenrec', 'unisrec', 'rlmrec',
                  'llmesr')
NULL_DIMS = (16, 32, 64, 96)
# The metrics of the tables, and the ones the paired comparison shows in the README.
TABLE_METRICS = ('HR@10', 'HR@20', 'NDCG@10', 'NDCG@20')
COMPARISON_METRICS = ('NDCG@20', 'HR@20')
# LLM-ESR's `--ts_user` default (main.py): a user is short when fewer items precede the target.
DEFAULT_SHORT_HISTORY = 10
DEFAULT_HEAD_FRACTION = 0.2
NUM_DECILES = 10
GROUPS = ('overall', 'tail_items', 'head_items', 'short_users', 'long_users')


class SuiteError(ValueError):
  """A suite, cell or results file is not what the report needs (the message says the fix)."""


# ---- suites ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run: a variant (a table row) at one seed.

  `config` is `<file>[:arg]` relative to the repository root; `overrides` are extra
  `--config.x=y` flags. `workdir` is set only when the cell reuses another suite's run. `env` holds
  environment defaults for the cell's process; a variable the caller has set wins.
  """
  name: str
  variant: str
  seed: int
  config: str
  overrides: tuple[str, ...] = ()
  workdir: str | None = None
  env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Suite:
  """A grid of cells plus what the report needs to know about them."""
  name: str
  description: str
  config: str  # The config whose `data` section every cell shares (item counts, spectrum).
  variants: tuple[str, ...]
  seeds: tuple[int, ...]
  cells: tuple[Cell, ...]
  baseline: str
  # Sweep suites: variant -> x value of the sweep plot, and the x axis label.
  sweep_values: Mapping[str, int] | None = None
  sweep_label: str = ''


def _parse_config_arg(config: str) -> tuple[pathlib.Path, str | None]:
  path, _, arg = config.partition(':')
  return REPO_ROOT / path, (arg or None)


def load_config(config: str):
  """The ConfigDict of `<file>[:arg]` (relative to the repository root), without flags."""
  path, arg = _parse_config_arg(config)
  if not path.is_file():
    raise FileNotFoundError(f'config file {path} not found (suite config {config!r}).')
  spec = importlib.util.spec_from_file_location(f'_suite_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


# UniSRec adapts the whole catalogue through its MoE in every step, and with data parallelism every
# device repeats that (its draws are device-split invariant): one host device trains a UniSRec cell
# 1.35x faster on a 2-core CPU (0.186 vs 0.250 s a step, 2026-11-29). Every other row, and on
# GPU/TPU every row (the variable only sets the forced CPU device count), is unaffected.
CELL_ENV = {'unisrec': (('ALPHAFUSE_CPU_DEVICES', '1'),)}


def _ml1m_cell(pipeline: str, seed: int) -> Cell:
  return Cell(f'{pipeline}_s{seed}', pipeline, seed, f'configs/suite.py:{pipeline}',
              env=CELL_ENV.get(pipeline, ()))


def _sweep_reuses_main_run(null_dim: int) -> bool:
  """Whether configs/suite.py:alphafuse already trains with this null_dim (so its run is reused)."""
  return int(load_config('configs/suite.py:alphafuse').embedding.null_dim) == null_dim


def make_suite(name: str, seeds: Sequence[int] | None = None,
               variants: Sequence[str] | None = None, results_dir: str = 'results') -> Suite:
  """The named suite, optionally restricted to some seeds and variants (table rows)."""
  if name == 'ml1m_sasrec':
    all_variants, default_seeds = ML1M_PIPELINES, (22, 23, 24)
  elif name == 'null_dim_sweep':
    all_variants, default_seeds = tuple(f'alphafuse_null{d}' for d in NULL_DIMS), (22,)
  elif name == 'smoke':
    all_variants, default_seeds = ('alphafuse', 'id'), (22, 23)
  else:
    raise SuiteError(f'unknown suite {name!r}; use one of ml1m_sasrec, null_dim_sweep, smoke.')
  seeds = tuple(int(s) for s in (seeds or default_seeds))
  if variants:
    unknown = [v for v in variants if v not in all_variants]
    if unknown:
      raise SuiteError(f'--pipelines: {unknown} not in suite {name!r}; its rows are '
                       f'{list(all_variants)}.')
    variants = tuple(v for v in all_variants if v in variants)  # The suite's order.
  else:
    variants = all_variants
  cells = []
  for variant in variants:
    for seed in seeds:
      if name == 'ml1m_sasrec':
        cells.append(_ml1m_cell(variant, seed))
      elif name == 'null_dim_sweep':
        null_dim = int(variant.removeprefix('alphafuse_null'))
        if _sweep_reuses_main_run(null_dim):
          # Identical settings: the sweep's point is ml1m_sasrec's alphafuse run at this seed.
          main_cell = _ml1m_cell('alphafuse', seed)
          cells.append(dataclasses.replace(
              main_cell, name=f'{variant}_s{seed}', variant=variant,
              workdir=os.path.join(results_dir, 'ml1m_sasrec', 'runs', main_cell.name)))
        else:
          cells.append(Cell(f'{variant}_s{seed}', variant, seed, 'configs/suite.py:alphafuse',
                            (f'--config.embedding.null_dim={null_dim}',)))
      else:
        overrides = (f'--config.embedding.pipeline={variant}',)
        if variant != 'alphafuse':
          overrides += ('--config.embedding.id_init=normal',)  # A zero ID table does not learn.
        cells.append(Cell(f'{variant}_s{seed}', variant, seed, 'configs/tiny.py', overrides))
  if name == 'ml1m_sasrec':
    return Suite(name, '8 SASRec item pipelines on MovieLens-1M cold-start users, '
                 '`configs/suite.py:<pipeline>` (3 epochs each, equal budget)',
                 'configs/suite.py:alphafuse', variants, seeds, tuple(cells), 'alphafuse')
  if name == 'null_dim_sweep':
    return Suite(name, 'AlphaFuse-SASRec on MovieLens-1M cold-start users with '
                 '`--config.embedding.null_dim` in ' + ', '.join(map(str, NULL_DIMS)),
                 'configs/suite.py:alphafuse', variants, seeds, tuple(cells), 'alphafuse_null64',
                 sweep_values={v: int(v.removeprefix('alphafuse_null')) for v in variants},
                 sweep_label='null_dim (ID dimensions)')
  return Suite(name, 'smoke test: AlphaFuse and SASRec-ID on MovieLens-100K (`configs/tiny.py`)',
               'configs/tiny.py', variants, seeds, tuple(cells), 'alphafuse')


def cell_workdir(suite: Suite, cell: Cell, results_dir: str) -> pathlib.Path:
  if cell.workdir is not None:
    return pathlib.Path(cell.workdir)
  return pathlib.Path(results_dir) / suite.name / 'runs' / cell.name


def cell_log(suite: Suite, cell: Cell, results_dir: str) -> pathlib.Path:
  """`<cell>.log` beside the workdir (a reused run keeps its own suite's log)."""
  workdir = cell_workdir(suite, cell, results_dir)
  return workdir.parent / f'{workdir.name}.log'


# ---- running cells --------------------------------------------------------------------------
def cell_command(cell: Cell, workdir: pathlib.Path) -> list[str]:
  """argv of one cell: `alphafuse_jax.main` with the cell's config, seed and overrides."""
  path, arg = _parse_config_arg(cell.config)
  config = str(path) + (f':{arg}' if arg else '')
  return [sys.executable, '-m', 'alphafuse_jax.main', f'--config={config}',
          f'--workdir={workdir}', f'--config.train.seed={cell.seed}',
          '--config.progress_bar=false', *cell.overrides]


# A runner trains one cell (workdir, log path) and returns its exit status.
CellRunner = Callable[[Cell, pathlib.Path, pathlib.Path], int]


def run_cell_subprocess(cell: Cell, workdir: pathlib.Path, log_path: pathlib.Path, *,
                        command: Callable[[Cell, pathlib.Path], list[str]] = cell_command) -> int:
  """Runs the cell's command as a subprocess (env passed through), appending to its log."""
  argv = command(cell, workdir)
  defaults = {k: v for k, v in cell.env if k not in os.environ}
  env = {**os.environ, **defaults}
  log_path.parent.mkdir(parents=True, exist_ok=True)
  with open(log_path, 'a') as log:
    log.write(f'# {_now()} {" ".join([f"{k}={v}" for k, v in defaults.items()] + argv)}\n')
    log.flush()
    return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                          cwd=REPO_ROOT, check=False).returncode


def _running_elsewhere(workdir: pathlib.Path) -> int | None:
  """The pid of another live `alphafuse_jax.main` process training in `workdir`, if any (Linux).

  Guards against resuming a cell that someone started by hand and that is still running.
  """
  target = os.path.realpath(workdir)
  proc = pathlib.Path('/proc')
  if not proc.is_dir():
    return None
  for entry in proc.iterdir():
    if not entry.name.isdigit() or int(entry.name) == os.getpid():
      continue
    try:
      args = (entry / 'cmdline').read_bytes().split(b'\0')
      cwd = os.readlink(entry / 'cwd')
    except OSError:
      continue
    args = [a.decode(errors='replace') for a in args]
    if 'alphafuse_jax.main' not in args:
      continue
    for a in args:
      if a.startswith('--workdir='):
        path = a.removeprefix('--workdir=')
        if os.path.realpath(os.path.join(cwd, path)) == target:
          return int(entry.name)
  return None


@dataclasses.dataclass
class CellOutcome:
  cell: Cell
  status: str  # 'done', 'skipped', 'failed' or 'busy' (running in another process).
  workdir: pathlib.Path
  log: pathlib.Path
  seconds: float = float('nan')
  ndcg20: float = float('nan')
  detail: str = ''


def run_suite(suite: Suite, results_dir: str = 'results', *,
              runner: CellRunner = run_cell_subprocess,
              out: TextIO = sys.stdout) -> list[CellOutcome]:
  """Runs every unfinished cell in order; one progress line per cell and a total at the end."""
  outcomes = []
  total = len(suite.cells)
  for i, cell in enumerate(suite.cells, 1):
    workdir = cell_workdir(suite, cell, results_dir)
    log_path = cell_log(suite, cell, results_dir)
    results_path = workdir / 'results.json'
    outcome = CellOutcome(cell, 'skipped', workdir, log_path)
    if results_path.is_file():
      results = _read_results(results_path)
      outcome.seconds = float(results.get('wall_seconds', float('nan')))
      outcome.ndcg20 = float(results['test']['NDCG@20'])
    elif (pid := _running_elsewhere(workdir)) is not None:
      outcome.status, outcome.detail = 'busy', f'running in process {pid}; rerun when it ends'
    else:
      print(f'[{i}/{total}] {cell.name}: running (log {log_path})', file=out, flush=True)
      workdir.parent.mkdir(parents=True, exist_ok=True)
      start = time.perf_counter()
      code = runner(cell, workdir, log_path)
      outcome.seconds = time.perf_counter() - start
      if code != 0:
        outcome.status, outcome.detail = 'failed', f'exit status {code}; see {log_path}'
      elif not results_path.is_file():
        outcome.status, outcome.detail = 'failed', f'exited 0 without {results_path}; see {log_path}'
      else:
        outcome.status = 'done'
        outcome.ndcg20 = float(_read_results(results_path)['test']['NDCG@20'])
    outcomes.append(outcome)
    line = f'[{i}/{total}] {cell.name}: {outcome.status}'
    if outcome.status in ('done', 'skipped'):
      line += f'  test NDCG@20 {outcome.ndcg20:.4f}  wall {outcome.seconds:.0f} s'
    else:
      line += f'  ({outcome.detail})'
    print(line, file=out, flush=True)
  counts = {s: sum(o.status == s for o in outcomes) for s in ('done', 'skipped', 'failed', 'busy')}
  print(f'{total} cells: ' + ', '.join(f'{n} {s}' for s, n in counts.items() if n or s != 'busy'),
        file=out, flush=True)
  return outcomes


# ---- reading results ------------------------------------------------------------------------
def _read_results(path: pathlib.Path) -> dict[str, Any]:
  try:
    with open(path) as f:
      results = json.load(f)
  except json.JSONDecodeError as e:
    raise SuiteError(f'{path}: not valid JSON ({e}); delete it to rerun the cell.') from e
  if 'test' not in results or 'NDCG@20' not in results['test']:
    raise SuiteError(f'{path}: no test NDCG@20 (field "test"); delete it to rerun the cell.')
  return results


def read_test_ranks(path: pathlib.Path, num_items: int | None = None) -> dict[str, np.ndarray]:
  """`rank`, `target`, `position` (and `sampled_rank` when present) from test_ranks.npz, checked."""
  with np.load(path, allow_pickle=False) as npz:
    arrays = {k: np.asarray(npz[k]) for k in npz.files}
  for key in ('rank', 'target', 'position'):
    if key not in arrays:
      raise SuiteError(f'{path}: array {key!r} missing (has {sorted(arrays)}); rerun the cell.')
  n = arrays['rank'].shape
  for key, value in arrays.items():
    if value.shape != n or value.ndim != 1:
      raise SuiteError(f'{path}: array {key!r} has shape {value.shape}, expected {n} like rank.')
  if n[0] and arrays['rank'].min() < 1:
    raise SuiteError(f'{path}: ranks must be 1-based (min {arrays["rank"].min()}).')
  if num_items is not None and n[0] and not 0 <= arrays['target'].min() <= arrays['target'].max() < num_items:
    raise SuiteError(f'{path}: targets outside 0..{num_items - 1}: the run used another dataset '
                     'than the suite config; rerun the cell.')
  return arrays


def _read_curve(path: pathlib.Path) -> dict[int, float]:
  """epoch -> val NDCG@20 from metrics.jsonl (epochs without evaluation are left out)."""
  curve = {}
  if not path.is_file():
    return curve
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


# ---- group and decile metrics (pure) --------------------------------------------------------
def popularity_deciles(train_item_counts: np.ndarray, num_bins: int = NUM_DECILES) -> np.ndarray:
  """int [N] in 1..num_bins: the item's popularity bin in train, 1 = least popular.

  Items are ordered from most to least interacted (ties: the lower id counts as more popular, as
  in `metrics.item_groups`); the item at popularity rank r (0 = most popular) lies in bin
  num_bins - floor(r * num_bins / N), so every bin holds N / num_bins items (+-1).
  """
  counts = np.asarray(train_item_counts)
  if counts.ndim != 1 or counts.size == 0:
    raise SuiteError(f'train_item_counts must be a non-empty [N] array, got shape {counts.shape}.')
  order = np.argsort(-counts, kind='stable')
  rank = np.empty(counts.size, np.int64)
  rank[order] = np.arange(counts.size)
  return num_bins - (rank * num_bins) // counts.size


def decile_metric(ranks: np.ndarray, targets: np.ndarray, deciles: np.ndarray,
                  metric: str = 'NDCG@20', num_bins: int = NUM_DECILES) -> np.ndarray:
  """float [num_bins]: the metric over test examples whose target lies in each bin (NaN if none)."""
  k = int(metric.split('@')[1])
  target_bins = deciles[np.asarray(targets)]
  out = np.full(num_bins, np.nan)
  for b in range(1, num_bins + 1):
    selected = np.asarray(ranks)[target_bins == b]
    if selected.size:
      out[b - 1] = metrics_lib.summarize_ranks(selected, ks=(k,))[metric]
  return out


def group_masks(targets: np.ndarray, positions: np.ndarray, is_head: np.ndarray,
                short_history: int) -> dict[str, np.ndarray]:
  """Boolean [n] masks of the report's groups: every example, tail/head targets, short/long users.

  A user is short at an example when fewer than `short_history` items precede the target
  (LLM-ESR's `seq_len < ts_user`).
  """
  head = np.asarray(is_head)[np.asarray(targets)]
  short = np.asarray(positions) < short_history
  return {'overall': np.ones(head.shape, bool), 'tail_items': ~head, 'head_items': head,
          'short_users': short, 'long_users': ~short}


def group_metrics_from_ranks(ranks: np.ndarray, masks: Mapping[str, np.ndarray],
                             ks: Sequence[int] = (10, 20)) -> dict[str, dict[str, float]]:
  return {g: metrics_lib.summarize_ranks(np.asarray(ranks)[m], ks=ks) for g, m in masks.items()}


def _fallback_groups(results: Mapping[str, Any], short_history: int) -> dict[str, dict]:
  """Groups from results.json when test_ranks.npz is absent (only those it defines the same way)."""
  groups = {'overall': results['test']}
  stored = results.get('test_groups', {})
  names = {'tail_items': 'tail_items', 'head_items': 'head_items',
           'short_users': f'short_history(<{short_history})',
           'long_users': f'long_history(>={short_history})'}
  for group, key in names.items():
    if key in stored:
      groups[group] = stored[key]
  return groups


# ---- aggregation (pure) ---------------------------------------------------------------------
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


# ---- the report -----------------------------------------------------------------------------
@dataclasses.dataclass
class CellReport:
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


def collect_cell(suite: Suite, cell: Cell, results_dir: str, *, is_head: np.ndarray,
                 deciles: np.ndarray, short_history: int) -> CellReport:
  """Everything the report needs from one cell's workdir."""
  workdir = cell_workdir(suite, cell, results_dir)
  results_path = workdir / 'results.json'
  if not results_path.is_file():
    status = 'unfinished' if workdir.is_dir() else 'missing'
    return CellReport(cell, status, workdir, curve=_read_curve(workdir / 'metrics.jsonl'))
  results = _read_results(results_path)
  report = CellReport(cell, 'finished', workdir, curve=_read_curve(workdir / 'metrics.jsonl'),
                      wall_seconds=float(results.get('wall_seconds', float('nan'))))
  ranks_path = workdir / 'test_ranks.npz'
  if ranks_path.is_file():
    arrays = read_test_ranks(ranks_path, num_items=len(is_head))
    masks = group_masks(arrays['target'], arrays['position'], is_head, short_history)
    report.groups = group_metrics_from_ranks(arrays['rank'], masks)
    report.deciles = decile_metric(arrays['rank'], arrays['target'], deciles)
    if 'sampled_rank' in arrays:
      report.sampled_groups = group_metrics_from_ranks(arrays['sampled_rank'], masks)
  else:
    report.groups = _fallback_groups(results, short_history)
    report.note = 'no test_ranks.npz: groups from results.json, no decile curve'
    if 'test_sampled' in results:
      report.sampled_groups = {'overall': results['test_sampled']}
  negatives = results.get('sampled_negatives', results.get('test_sampled', {}).get('num_negatives'))
  report.sampled_negatives = int(negatives) if negatives is not None else None
  return report


def aggregate(suite: Suite, cells: Sequence[CellReport], field: str = 'groups'
              ) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
  """group -> variant -> metric -> mean_std over the seeds of finished cells (with per-seed values)."""
  table = {}
  for group in GROUPS:
    table[group] = {}
    for variant in suite.variants:
      by_seed = {c.cell.seed: getattr(c, field)[group] for c in cells
                 if c.cell.variant == variant and group in getattr(c, field)}
      if not by_seed:
        continue
      table[group][variant] = {
          m: {**mean_std(by_seed[s][m] for s in sorted(by_seed)), 'seeds': sorted(by_seed)}
          for m in TABLE_METRICS}
      counts = {s: by_seed[s].get('count') for s in by_seed}
      table[group][variant]['count'] = counts
  return table


def comparisons(suite: Suite, cells: Sequence[CellReport]) -> dict[str, dict[str, dict]]:
  """metric -> group -> variant -> paired_comparison against the suite's baseline."""
  def by_seed(variant, group, metric):
    return {c.cell.seed: c.groups[group][metric] for c in cells
            if c.cell.variant == variant and group in c.groups}
  out = {}
  for metric in TABLE_METRICS:
    out[metric] = {}
    for group in GROUPS:
      base = by_seed(suite.baseline, group, metric)
      out[metric][group] = {v: paired_comparison(by_seed(v, group, metric), base)
                            for v in suite.variants if v != suite.baseline}
  return out


def _fmt(stat: Mapping[str, Any]) -> str:
  if stat['n'] == 0:
    return '-'
  if stat['n'] == 1:
    return f'{stat["mean"]:.4f} (1 seed)'
  return f'{stat["mean"]:.4f} ± {stat["std"]:.4f}'


def _group_title(group: str, short_history: int, head_fraction: float) -> str:
  return {'overall': 'Overall',
          'tail_items': f'Tail items (target outside the {head_fraction:.0%} most interacted in train)',
          'head_items': f'Head items (target among the {head_fraction:.0%} most interacted in train)',
          'short_users': f'Short users (fewer than {short_history} items before the target)',
          'long_users': f'Long users ({short_history} or more items before the target)'}[group]


def _metric_table(suite: Suite, table: Mapping[str, Any]) -> list[str]:
  lines = ['| pipeline | seeds | ' + ' | '.join(TABLE_METRICS) + ' | test examples |',
           '|---' * (len(TABLE_METRICS) + 3) + '|']
  for variant in suite.variants:
    if variant not in table:
      lines.append(f'| {variant} | 0 | ' + ' | '.join('-' for _ in TABLE_METRICS) + ' | - |')
      continue
    row = table[variant]
    counts = sorted({int(c) for c in row['count'].values() if c is not None})
    count = '/'.join(str(c) for c in counts) or '?'
    seeds = ','.join(str(s) for s in row[TABLE_METRICS[0]]['seeds'])
    lines.append(f'| {variant} | {seeds} | ' + ' | '.join(_fmt(row[m]) for m in TABLE_METRICS) +
                 f' | {count} |')
  return lines


def _comparison_table(suite: Suite, comp: Mapping[str, Any], metric: str) -> list[str]:
  lines = ['| pipeline | ' + ' | '.join(GROUP_SHORT[g] for g in GROUPS) + ' |',
           '|---' * (len(GROUPS) + 1) + '|']
  for variant in suite.variants:
    if variant == suite.baseline:
      continue
    cells = []
    for group in GROUPS:
      c = comp[metric][group][variant]
      if not c['seeds']:
        cells.append('-')
      elif c['verdict'] == 'n/a':
        cells.append(f'{c["mean_diff"]:+.4f} (1 seed, n/a)')
      else:
        cells.append(f'{c["mean_diff"]:+.4f} ± {c["std_diff"]:.4f} **{c["verdict"]}**')
    lines.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
  return lines


GROUP_SHORT = {'overall': 'overall', 'tail_items': 'tail items', 'head_items': 'head items',
               'short_users': 'short users', 'long_users': 'long users'}


def _atomic_write(path: pathlib.Path, write: Callable[[Any], None], mode: str = 'w') -> None:
  """Writes through a temp file in the same directory, then renames: never a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


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
  if isinstance(obj, pathlib.Path):
    return str(obj)
  return obj


# ---- plots ----------------------------------------------------------------------------------
def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save_figure(fig, path: pathlib.Path) -> None:
  plt = _pyplot()
  _atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=120), mode='wb')
  plt.close(fig)


# Line styles cycle with the colours so that rows with equal numbers (RLMRec and SASRec-ID) both show.
_LINESTYLES = ('-', '--', ':', '-.')


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
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save_figure(fig, path)
  return True


def plot_deciles(suite: Suite, decile_table: Mapping[str, Any], path: pathlib.Path) -> bool:
  """Test NDCG@20 by popularity decile of the target, mean over seeds, one line per variant."""
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
  ax.set_yscale('symlog', linthresh=1e-3)
  ax.set_title(f'{suite.name}: NDCG@20 by target popularity')
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save_figure(fig, path)
  return True


def plot_sweep(sweep: Mapping[str, Any], label: str, path: pathlib.Path) -> bool:
  """Test NDCG@20 (overall and tail items) against the sweep's x (e.g. null_dim), mean +- std."""
  if not sweep['x']:
    return False
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, group in enumerate(('overall', 'tail_items')):
    mean = np.asarray([np.nan if v is None else v for v in sweep[group]['mean']], float)
    std = np.asarray([0.0 if v is None else v for v in sweep[group]['std']], float)
    ax.errorbar(sweep['x'], mean, yerr=std, marker='o', capsize=3, color=f'C{i}',
                label=GROUP_SHORT[group])
  ax.set_xticks(sweep['x'])
  ax.set_xlabel(label)
  ax.set_ylabel('test NDCG@20')
  ax.set_title('null_dim sweep (error bars: std over seeds where > 1)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save_figure(fig, path)
  return True


def spectrum_figure(config, path: pathlib.Path, *, embeddings: np.ndarray | None = None,
                    item_counts: np.ndarray | None = None, dataset=None) -> dict[str, Any]:
  """The language-embedding spectrum with the kept and null cuts (spectrum.py's plot), PNG + dict.

  `embeddings` [N, d] are the already-scaled vectors; None computes them as training does from
  `dataset` (the MiniLM cache of the config's dataset, times config.text.scale).
  """
  from alphafuse_jax import spectrum as spectrum_lib  # pylint: disable=g-import-not-at-top
  if embeddings is None:
    from alphafuse_jax import train  # pylint: disable=g-import-not-at-top
    embeddings = train.load_language_embeddings(config, dataset)
    item_counts = dataset.train_item_counts
  weights = item_counts if config.embedding.item_frequency_weighting else None
  report = spectrum_lib.spectrum_report(
      embeddings, hidden_dim=config.embedding.hidden_dim, null_dim=config.embedding.null_dim,
      null_threshold=config.embedding.null_threshold, item_weights=weights,
      weighting=config.embedding.frequency_weighting)
  _atomic_write(path, lambda f: spectrum_lib.plot_spectrum(report, f), mode='wb')
  return {k: v for k, v in report.items() if k != 'eigenvalues'} | {
      'eigenvalues_top10': report['eigenvalues'][:10]}


# ---- building the report --------------------------------------------------------------------
def build_report(suite: Suite, results_dir: str = 'results', *, train_item_counts: np.ndarray,
                 short_history: int = DEFAULT_SHORT_HISTORY,
                 head_fraction: float = DEFAULT_HEAD_FRACTION,
                 spectrum: Callable[[pathlib.Path], dict[str, Any]] | None = None,
                 sweep_suite: Suite | None = None, command: str = '',
                 sampled_negatives: int | None = None) -> dict[str, Any]:
  """Writes README.md, summary.json and the plots into `<results_dir>/<suite>/`; returns the summary.

  Args:
    train_item_counts: [N] train interactions per item (head/tail groups and deciles).
    spectrum: called with the PNG path to draw the eigen-spectrum (None: no spectrum plot).
    sweep_suite: a sweep suite whose finished runs add the sweep plot (the suite itself if it is
      a sweep).
    sampled_negatives: the config's count of sampled negatives, for runs whose results.json
      does not record it.
  """
  out_dir = pathlib.Path(results_dir) / suite.name
  out_dir.mkdir(parents=True, exist_ok=True)
  is_head = metrics_lib.item_groups(train_item_counts, head_fraction)
  deciles = popularity_deciles(train_item_counts)
  collect = lambda s: [collect_cell(s, c, results_dir, is_head=is_head, deciles=deciles,
                                    short_history=short_history) for c in s.cells]
  cells = collect(suite)
  table = aggregate(suite, cells)
  sampled = aggregate(suite, cells, 'sampled_groups')
  comp = comparisons(suite, cells)
  decile_table = {}
  for variant in suite.variants:
    curves = [c.deciles for c in cells if c.cell.variant == variant and c.deciles is not None]
    if curves:
      stacked = np.stack(curves)
      with warnings.catch_warnings():  # Deciles without any test target stay NaN.
        warnings.simplefilter('ignore', RuntimeWarning)
        decile_table[variant] = {
            'mean': np.nanmean(stacked, axis=0), 'n': len(curves),
            'std': np.nanstd(stacked, axis=0, ddof=1) if len(curves) > 1 else
                   np.full(NUM_DECILES, np.nan)}
  not_finished = [c for c in cells if c.status != 'finished']
  plots = {}
  if plot_learning_curves(suite, cells, out_dir / 'learning_curves.png'):
    plots['learning_curves.png'] = 'Validation NDCG@20 by epoch (mean over seeds)'
  if plot_deciles(suite, decile_table, out_dir / 'ndcg_by_popularity_decile.png'):
    plots['ndcg_by_popularity_decile.png'] = ('Test NDCG@20 by train-popularity decile of the '
                                              'target (1 = least popular; symlog axis)')
  spectrum_info = None
  if spectrum is not None:
    spectrum_info = spectrum(out_dir / 'spectrum.png')
    plots['spectrum.png'] = ('Eigen-spectrum of the MiniLM item embeddings (log scale) with the '
                             'kept and null cuts')
  sweep = None
  if sweep_suite is not None and sweep_suite.sweep_values:
    sweep_cells = cells if sweep_suite is suite else collect(sweep_suite)
    sweep_table = aggregate(sweep_suite, sweep_cells)
    xs = [v for v in sweep_suite.variants if v in sweep_table['overall']]
    sweep = {'x': [sweep_suite.sweep_values[v] for v in xs], 'variants': xs}
    for group in ('overall', 'tail_items'):
      rows = [sweep_table[group].get(v, {}).get('NDCG@20', mean_std([])) for v in xs]
      sweep[group] = {'mean': [r['mean'] for r in rows], 'std': [r['std'] for r in rows],
                      'n': [r['n'] for r in rows]}
    if plot_sweep(_json_safe(sweep), sweep_suite.sweep_label, out_dir / 'null_dim_sweep.png'):
      plots['null_dim_sweep.png'] = (f'Test NDCG@20 overall and on tail items against '
                                     f'{sweep_suite.sweep_label} (suite {sweep_suite.name})')
  negatives = sorted({c.sampled_negatives if c.sampled_negatives is not None else sampled_negatives
                      for c in cells if c.sampled_groups} - {None})
  summary = {
      'suite': suite.name, 'description': suite.description, 'generated': _now(),
      'command': command, 'seeds': list(suite.seeds), 'variants': list(suite.variants),
      'baseline': suite.baseline, 'short_history': short_history,
      'head_fraction': head_fraction, 'num_items': int(len(is_head)),
      'num_head_items': int(is_head.sum()), 'std': 'sample std over seeds (ddof=1)',
      'cells': {c.cell.name: {'variant': c.cell.variant, 'seed': c.cell.seed, 'status': c.status,
                              'workdir': c.workdir, 'wall_seconds': c.wall_seconds,
                              'note': c.note, 'groups': c.groups,
                              'sampled_groups': c.sampled_groups,
                              'ndcg20_by_decile': c.deciles} for c in cells},
      'tables': table, 'comparisons': comp, 'sampled_tables': sampled,
      'sampled_negatives': negatives, 'deciles': decile_table, 'sweep': sweep,
      'spectrum': spectrum_info, 'plots': plots,
      'not_finished': [{'cell': c.cell.name, 'status': c.status, 'workdir': c.workdir}
                       for c in not_finished],
  }
  summary = _json_safe(summary)
  _atomic_write(out_dir / 'summary.json', lambda f: f.write(json.dumps(summary, indent=1) + '\n'))
  readme = render_readme(suite, summary)
  _atomic_write(out_dir / 'README.md', lambda f: f.write(readme))
  return summary


def render_readme(suite: Suite, summary: Mapping[str, Any]) -> str:
  """The Markdown report from summary.json's numbers."""
  sh, hf = summary['short_history'], summary['head_fraction']
  lines = [f'# Experiment suite `{suite.name}`', '',
           f'{suite.description}. Seeds: {", ".join(map(str, suite.seeds))}. '
           f'Generated {summary["generated"]}' +
           (f' by `{summary["command"]}`.' if summary['command'] else '.'), '',
           '- Full-ranking test metrics (the target ranked among all '
           f'{summary["num_items"]} items, no history masking), mean ± sample std (ddof=1) over '
           'seeds; "(1 seed)" has no std.',
           f'- Every test user is a cold-start user by the protocol: train, validation and test '
           'users are disjoint (`cold_start_users`), so no test user appears in training.',
           f'- Head items: the {hf:.0%} most interacted in train ({summary["num_head_items"]} of '
           f'{summary["num_items"]}); tail items: the rest.',
           f'- Short users: fewer than {sh} items before the target; long users: {sh} or more. '
           f"This is LLM-ESR's user split (`seq_len < ts_user`, liuqidong07/LLM-ESR "
           '`utils/utils.py:metric_len_report`) at its default `--ts_user=10` (main.py; its '
           'per-dataset scripts use 12, 3 and 9). 10 is also our history window `max_len`, so '
           'counting the items before the target or the non-pad items of the model input gives '
           'the same split.']
  env = sorted({f'`{k}={v}`' for c in suite.cells for k, v in c.env})
  if env:
    rows = sorted({c.variant for c in suite.cells if c.env})
    lines.append(f'- Cell environment defaults (a variable set by the caller wins): {", ".join(env)} '
                 f'for {", ".join(rows)} (see `CELL_ENV` in alphafuse_jax/experiments.py).')
  lines.append('')
  missing = summary['not_finished']
  lines += ['## Missing or unfinished runs', '']
  if missing:
    lines += [f'- `{m["cell"]}`: {m["status"]} (`{m["workdir"]}`)' for m in missing]
  else:
    lines.append('None: every cell finished.')
  lines.append('')
  notes = [(name, c['note']) for name, c in summary['cells'].items() if c['note']]
  if notes:
    lines += ['Notes on finished runs:', '', *[f'- `{name}`: {note}' for name, note in notes], '']
  tables = summary['tables']
  for group in GROUPS:
    lines += [f'## {_group_title(group, sh, hf)}', '', *_metric_table(suite, tables[group]), '']
  lines += [f'## Each pipeline minus {suite.baseline}, paired by seed', '',
            'Mean ± std of the per-seed differences (pipeline − baseline). **tie**: |mean '
            'difference| is smaller than the seed spread (the larger of the two pipelines\' '
            'stds); otherwise **better** / **worse** says how the pipeline does against '
            f'{suite.baseline}.', '']
  for metric in COMPARISON_METRICS:
    lines += [f'### {metric}', '', *_comparison_table(suite, summary['comparisons'], metric), '']
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


def publish(suite: Suite, results_dir: str, publish_dir: str) -> list[pathlib.Path]:
  """Copies README.md and the PNGs (small, no data) into `publish_dir`."""
  src = pathlib.Path(results_dir) / suite.name
  dst = pathlib.Path(publish_dir)
  dst.mkdir(parents=True, exist_ok=True)
  copied = []
  for path in [src / 'README.md', *sorted(src.glob('*.png'))]:
    if path.is_file():
      _atomic_write(dst / path.name, lambda f, p=path: f.write(p.read_bytes()), mode='wb')
      copied.append(dst / path.name)
  return copied


def report_from_config(suite: Suite, results_dir: str, *, short_history: int,
                       head_fraction: float, with_spectrum: bool, command: str) -> dict[str, Any]:
  """`build_report` with the item counts (and spectrum) of the suite's dataset."""
  from alphafuse_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = load_config(suite.config)
  dataset = data_lib.load(config.data)
  spectrum = None
  if with_spectrum and config.embedding.pipeline != 'id':
    spectrum = lambda path: spectrum_figure(config, path, dataset=dataset)
  sweep_suite = suite if suite.sweep_values else (
      make_suite('null_dim_sweep', results_dir=results_dir) if suite.name == 'ml1m_sasrec'
      else None)
  return build_report(suite, results_dir, train_item_counts=dataset.train_item_counts,
                      short_history=short_history, head_fraction=head_fraction,
                      spectrum=spectrum, sweep_suite=sweep_suite, command=command,
                      sampled_negatives=config.eval.get('sampled_negatives') or None)


# ---- command --------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SuiteError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:  # Keep the console for progress lines, as main.py does.
    logging.set_verbosity(logging.WARNING)
  suite = make_suite(f.suite, seeds=[int(s) for s in f.seeds] if f.seeds else None,
                     variants=f.pipelines or None, results_dir=f.results_dir)
  command = 'python -m alphafuse_jax.experiments ' + ' '.join(a for a in sys.argv[1:])
  failed = 0
  if not f.report_only:
    outcomes = run_suite(suite, f.results_dir)
    failed = sum(o.status != 'done' and o.status != 'skipped' for o in outcomes)
    for o in outcomes:
      if o.status in ('failed', 'busy'):
        print(f'  {o.cell.name} {o.status}: {o.detail}', file=sys.stderr)
  summary = report_from_config(suite, f.results_dir, short_history=f.short_history,
                               head_fraction=f.head_fraction, with_spectrum=f.spectrum,
                               command=command.strip())
  out_dir = pathlib.Path(f.results_dir) / suite.name
  print(f'report: {out_dir / "README.md"} ({len(summary["not_finished"])} cells not finished)')
  if f.publish_dir:
    copied = publish(suite, f.results_dir, f.publish_dir)
    print(f'published {len(copied)} files to {f.publish_dir}')
  return 1 if failed else 0


def _define_flags() -> None:
  """The command's flags, registered only when run as a command (importing defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('suite', None, 'ml1m_sasrec, null_dim_sweep or smoke.', required=True)
  flags.DEFINE_list('seeds', None, 'Seeds (default: the suite\'s).')
  flags.DEFINE_list('pipelines', None, 'Rows to run/report (default: all of the suite\'s).')
  flags.DEFINE_bool('report_only', False, 'Only (re)write the report from existing runs.')
  flags.DEFINE_string('results_dir', 'results', 'Root of results/<suite>/.')
  flags.DEFINE_string('publish_dir', '', 'Also copy README.md and the PNGs here.')
  flags.DEFINE_integer('short_history', DEFAULT_SHORT_HISTORY,
                       'Short users: fewer than this many items before the target.')
  flags.DEFINE_float('head_fraction', DEFAULT_HEAD_FRACTION,
                     'Head items: this fraction of the most interacted in train.')
  flags.DEFINE_bool('spectrum', True, 'Draw the language-embedding spectrum plot.')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
