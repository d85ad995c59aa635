"""Running a suite's cells: each one `alphafuse_jax.main` in its own subprocess, resumable.

A cell's workdir is `<results_dir>/<suite>/runs/<cell>` with its log beside it as `<cell>.log`.
A cell whose results.json exists is skipped, one that another process is training is left alone,
a failed one is reported and the suite goes on.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Callable, TextIO

from alphafuse_jax.experiments import archive
from alphafuse_jax.experiments import stats
from alphafuse_jax.experiments.suites import Cell
from alphafuse_jax.experiments.suites import parse_config_arg
from alphafuse_jax.experiments.suites import REPO_ROOT
from alphafuse_jax.experiments.suites import Suite
from alphafuse_jax.experiments.suites import SuiteError
from alphafuse_jax.experiments.suites import TRAIN_MODULE


def now_utc() -> str:
  """The current time for logs and reports, e.g. '2026-11-29 23:39 UTC'."""
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


def cell_workdir(suite: Suite, cell: Cell, results_dir: str) -> pathlib.Path:
  """`<results_dir>/<suite>/runs/<cell>`, or the other suite's run the cell reuses."""
  if cell.workdir is not None:
    return pathlib.Path(cell.workdir)
  return pathlib.Path(results_dir) / suite.name / 'runs' / cell.name


def cell_log(suite: Suite, cell: Cell, results_dir: str) -> pathlib.Path:
  """`<cell>.log` beside the workdir (a reused run keeps its own suite's log)."""
  workdir = cell_workdir(suite, cell, results_dir)
  return workdir.parent / f'{workdir.name}.log'


def cell_command(cell: Cell, workdir: pathlib.Path) -> list[str]:
  """argv of one cell: its module (`alphafuse_jax.main`) with its config, seed and overrides."""
  path, arg = parse_config_arg(cell.config)
  config = str(path) + (f':{arg}' if arg else '')
  return [sys.executable, '-m', cell.module, f'--config={config}',
          f'--workdir={workdir}', f'--config.train.seed={cell.seed}',
          '--config.progress_bar=false', *cell.overrides]


# A runner trains one cell (workdir, log path) and returns its exit status.
CellRunner = Callable[[Cell, pathlib.Path, pathlib.Path], int]


def run_cell_subprocess(cell: Cell, workdir: pathlib.Path, log_path: pathlib.Path, *,
                        command: Callable[[Cell, pathlib.Path], list[str]] = cell_command) -> int:
  """Runs the cell's command as a subprocess (env passed through), appending to its log."""
  argv = command(cell, workdir)
  # The cell's environment defaults apply only where the caller has not set the variable.
  defaults = {k: v for k, v in cell.env if k not in os.environ}
  env = {**os.environ, **defaults}
  log_path.parent.mkdir(parents=True, exist_ok=True)
  started = now_utc()
  archive.log_attempt(workdir, started)  # When and at which commit, for the archive's record.
  with open(log_path, 'a') as log:
    # The first line of each attempt: when, and the exact command with its env defaults.
    log.write(f'# {started} {" ".join([f"{k}={v}" for k, v in defaults.items()] + argv)}\n')
    log.flush()
    return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                          cwd=REPO_ROOT, check=False).returncode


def _running_elsewhere(workdir: pathlib.Path, module: str = TRAIN_MODULE) -> int | None:
  """The pid of another live `module` process (training) in `workdir`, if any (Linux).

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
    except OSError:  # The process ended, or is not ours to read.
      continue
    args = [a.decode(errors='replace') for a in args]
    if module not in args:
      continue
    # A relative --workdir is resolved against that process's cwd.
    for a in args:
      if a.startswith('--workdir='):
        path = a.removeprefix('--workdir=')
        if os.path.realpath(os.path.join(cwd, path)) == target:
          return int(entry.name)
  return None


@dataclasses.dataclass
class CellOutcome:
  """What `run_suite` did with one cell, with its test NDCG@20 and wall time when it has them."""
  cell: Cell
  status: str  # 'done', 'skipped', 'failed' or 'busy' (running in another process).
  workdir: pathlib.Path
  log: pathlib.Path
  seconds: float = float('nan')
  ndcg20: float = float('nan')
  detail: str = ''


def _summary(results: dict, processes: int) -> dict:
  """What the runner and `--status` show of a finished cell's results (run in `processes`)."""
  return {'wall_seconds': stats.run_seconds(results),
          'NDCG@20': float(results['test']['NDCG@20']),
          'best_epoch': results.get('best_epoch'), 'epochs': results.get('epochs'),
          # False: a run resumed before run_seconds was kept; its time is its last process's.
          'whole_run': results.get('run_seconds') is not None, 'processes': processes}


def _archived_results(suite: Suite, cell: Cell, results_dir: str,
                      archive_dir: str | None) -> dict | None:
  """The results of the cell's archive record (`archive.py`), or None when it has none."""
  if archive_dir is None:
    return None
  path = archive.record_path(suite, cell, results_dir, archive_dir)
  if path is None or not path.is_file():
    return None
  try:
    record = json.loads(path.read_text())
    return _summary(record['results'], len(record.get('attempts') or []))
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise SuiteError(f'{path}: not a readable archive record ({e!r}); restore it with git or '
                     'delete it to rerun the cell.') from e


def run_suite(suite: Suite, results_dir: str = 'results', *,
              runner: CellRunner = run_cell_subprocess,
              out: TextIO = sys.stdout, archive_dir: str | None = None) -> list[CellOutcome]:
  """Runs every unfinished cell in order; one progress line per cell and a total at the end.

  A cell is finished when its workdir has results.json or, with `archive_dir`, when the committed
  archive has its record (the workdir may be gone: another machine ran it).
  """
  outcomes = []
  total = len(suite.cells)
  for i, cell in enumerate(suite.cells, 1):
    workdir = cell_workdir(suite, cell, results_dir)
    log_path = cell_log(suite, cell, results_dir)
    results_path = workdir / 'results.json'
    outcome = CellOutcome(cell, 'skipped', workdir, log_path)
    if results_path.is_file():  # Finished earlier: report its numbers, do not rerun.
      results = stats.read_results(results_path)
      outcome.seconds = stats.run_seconds(results)
      outcome.ndcg20 = float(results['test']['NDCG@20'])
    elif (archived := _archived_results(suite, cell, results_dir, archive_dir)) is not None:
      outcome.seconds, outcome.ndcg20 = float(archived['wall_seconds']), archived['NDCG@20']
      outcome.detail = 'archived'
    elif (pid := _running_elsewhere(workdir, cell.module)) is not None:
      outcome.status, outcome.detail = 'busy', f'running in process {pid}; rerun when it ends'
    else:
      print(f'[{i}/{total}] {cell.name}: running (log {log_path})', file=out, flush=True)
      workdir.parent.mkdir(parents=True, exist_ok=True)
      start = time.perf_counter()
      code = runner(cell, workdir, log_path)
      outcome.seconds = time.perf_counter() - start
      # A cell succeeded only if it exited 0 and left its results.json.
      if code != 0:
        outcome.status, outcome.detail = 'failed', f'exit status {code}; see {log_path}'
      elif not results_path.is_file():
        outcome.status, outcome.detail = 'failed', f'exited 0 without {results_path}; see {log_path}'
      else:
        outcome.status = 'done'
        outcome.ndcg20 = float(stats.read_results(results_path)['test']['NDCG@20'])
    outcomes.append(outcome)
    line = f'[{i}/{total}] {cell.name}: {outcome.status}'
    if outcome.status in ('done', 'skipped'):
      line += f'  test NDCG@20 {outcome.ndcg20:.4f}  wall {outcome.seconds:.0f} s'
      if outcome.detail:
        line += f' ({outcome.detail})'
    else:
      line += f'  ({outcome.detail})'
    print(line, file=out, flush=True)
  # The total names 'busy' only when some cell was.
  counts = {s: sum(o.status == s for o in outcomes) for s in ('done', 'skipped', 'failed', 'busy')}
  print(f'{total} cells: ' + ', '.join(f'{n} {s}' for s, n in counts.items() if n or s != 'busy'),
        file=out, flush=True)
  return outcomes


def cell_status(suite: Suite, cell: Cell, results_dir: str,
                archive_dir: str | None) -> tuple[str, str]:
  """(state, details) of one cell, read from its workdir, the archive and /proc; nothing is run
  or changed.

  'finished' or 'archived' with the test NDCG@20, 'running' (with the pid), 'interrupted' (a
  workdir without results: the next suite command resumes it) or 'not started'; the last two
  with the epochs logged so far and the best validation.
  """
  workdir = cell_workdir(suite, cell, results_dir)
  results_path = workdir / 'results.json'
  if results_path.is_file():
    state, found = 'finished', _summary(stats.read_results(results_path),
                                        len(archive.read_attempts(workdir)))
  elif (found := _archived_results(suite, cell, results_dir, archive_dir)) is not None:
    state = 'archived'
  if found is not None:
    part = ('' if found['whole_run'] or found['processes'] < 2
            else f' (the last of its {found["processes"]} processes)')
    return state, (f'test NDCG@20 {found["NDCG@20"]:.4f}  best epoch {found["best_epoch"]} of '
                   f'{found["epochs"]}  wall {found["wall_seconds"] / 60:.0f} min{part}')
  pid = _running_elsewhere(workdir, cell.module)
  if pid is None and not workdir.is_dir():
    return 'not started', ''
  try:
    curve = stats.read_curve(workdir / 'metrics.jsonl')
  except SuiteError:  # A line being written as we read: say so rather than fail the listing.
    curve = None
  if curve is None:
    progress = 'metrics.jsonl not readable now'
  elif not curve:
    progress = 'no validation yet'
  else:
    best = max(curve, key=lambda e: (curve[e], -e))  # The first epoch with the best value.
    progress = f'epoch {max(curve)}, best val NDCG@20 {curve[best]:.4f} at epoch {best}'
  if pid is not None:
    return 'running', f'(pid {pid})  {progress}'
  return 'interrupted', f'{progress}; the suite command resumes it from its checkpoint'


def print_status(suite: Suite, results_dir: str, archive_dir: str | None,
                 out: TextIO = sys.stdout) -> dict[str, int]:
  """`cell_status` of every cell, one line each, and the count of each state."""
  counts: dict[str, int] = {}
  for i, cell in enumerate(suite.cells, 1):
    state, details = cell_status(suite, cell, results_dir, archive_dir)
    counts[state] = counts.get(state, 0) + 1
    sep = ' ' if details.startswith('(') else '  '
    print(f'[{i}/{len(suite.cells)}] {cell.name}: {state}{sep if details else ""}{details}',
          file=out, flush=True)
  print(f'{len(suite.cells)} cells: ' + ', '.join(f'{n} {s}' for s, n in counts.items()),
        file=out, flush=True)
  return counts
