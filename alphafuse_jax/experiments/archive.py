"""The committed record of finished cells: their metrics only, so that a suite outlives a machine.

A suite's runs live under `results/` (ignored by git: checkpoints and per-example ranks are derived
from the dataset). A rebuilt machine or a fresh clone starts without them, and a suite whose cells
take an hour each on a CPU cannot finish in one sitting. The archive keeps one small JSON file per
finished cell in the repository, `<archive_dir>/<suite>/<cell>.json`, with:

  results     the cell's results.json (test/val metrics, groups at the config's thresholds,
              best epoch, wall time, devices)
  curve       epoch -> validation NDCG@20 (the learning-curve plot)
  groups      the report's group metrics, and `deciles` (NDCG@20 by popularity decile), computed
              from test_ranks.npz at `short_history` / `head_fraction`
  provenance  the cell's config and overrides, its training attempts (when each started and at
              which commit: the runner's attempts.jsonl in the workdir), the date archived

No data, no weights, no per-example output. `run_suite` skips an archived cell as it skips one with
results.json, and the report reads the record when the cell's workdir is gone (its note says so).
A record is written (or refreshed) whenever the report reads a finished workdir.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
from typing import Any

import numpy as np

from alphafuse_jax import files
from alphafuse_jax.experiments.suites import Cell
from alphafuse_jax.experiments.suites import REPO_ROOT
from alphafuse_jax.experiments.suites import Suite
from alphafuse_jax.experiments.suites import SuiteError

FORMAT = 1
# The default archive, relative to the repository root (the command's --archive_dir).
DEFAULT_DIR = 'docs/runs'


def record_path(suite: Suite, cell: Cell, results_dir: str, archive_dir: str | os.PathLike[str]
                ) -> pathlib.Path | None:
  """`<archive_dir>/<suite>/<cell>.json`; a reused run keeps its own suite's record.

  A cell that reuses another suite's run (`Cell.workdir` = `<results_dir>/<other>/runs/<name>`)
  maps to `<archive_dir>/<other>/<name>.json`; a workdir outside that layout has no record (None).
  """
  if cell.workdir is None:
    return pathlib.Path(archive_dir) / suite.name / f'{cell.name}.json'
  rel = pathlib.Path(os.path.relpath(cell.workdir, results_dir)).parts
  if len(rel) == 3 and rel[1] == 'runs' and '..' not in rel:
    return pathlib.Path(archive_dir) / rel[0] / f'{rel[2]}.json'
  return None


def current_commit() -> str | None:
  """The checkout's HEAD commit (with '+dirty' for uncommitted changes), or None without git."""
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ('+dirty' if dirty.strip() else '')


def make_record(suite: Suite, cell: Cell, *, results: dict[str, Any], curve: dict[int, float],
                groups: dict[str, dict[str, float]], sampled_groups: dict[str, dict[str, float]],
                deciles: np.ndarray | None, short_history: int, head_fraction: float,
                num_items: int, archived: str, attempts: list[dict[str, Any]]) -> dict[str, Any]:
  """The record of one finished cell (plain JSON types); `attempts` from `read_attempts`."""
  return {
      'format': FORMAT, 'suite': suite.name, 'cell': cell.name, 'variant': cell.variant,
      'seed': cell.seed, 'config': cell.config, 'overrides': list(cell.overrides),
      'module': cell.module, 'archived': archived, 'attempts': attempts,
      'num_items': int(num_items), 'short_history': int(short_history),
      'head_fraction': float(head_fraction),
      'results': results, 'curve': {str(e): float(v) for e, v in sorted(curve.items())},
      'groups': groups, 'sampled_groups': sampled_groups,
      'deciles': None if deciles is None else [None if not np.isfinite(v) else float(v)
                                               for v in np.asarray(deciles, float)],
  }


ATTEMPTS = 'attempts.jsonl'  # In a cell's workdir: one line per (re)start by the runner.


def log_attempt(workdir: pathlib.Path, started: str) -> None:
  """Appends this (re)start of the cell, with the checkout's commit, to its attempts.jsonl."""
  workdir.mkdir(parents=True, exist_ok=True)
  files.append_jsonl(workdir / ATTEMPTS, {'started': started, 'commit': current_commit()})


def read_attempts(workdir: pathlib.Path) -> list[dict[str, Any]]:
  """The cell's attempts.jsonl as a list ([] when the runner did not start it)."""
  path = workdir / ATTEMPTS
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_record(path: pathlib.Path, record: dict[str, Any]) -> None:
  """Writes the record atomically; an unchanged record (but for its date) is left as it is."""
  if path.is_file():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError:
      old = None
    same = lambda r: {k: v for k, v in r.items() if k != 'archived'}
    if isinstance(old, dict) and same(old) == same(json.loads(json.dumps(record))):
      return
  files.write_json(path, record)


def read_record(path: pathlib.Path, *, cell: Cell, num_items: int) -> dict[str, Any]:
  """A record, checked against the cell and the suite's catalogue; SuiteError names the problem."""
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise SuiteError(f'{path}: not valid JSON ({e}); restore it with git or delete it to rerun '
                     'the cell.') from e
  if not isinstance(record, dict) or record.get('format') != FORMAT:
    raise SuiteError(f'{path}: not an archive record of format {FORMAT}; delete it to rerun the '
                     'cell.')
  for key in ('results', 'curve', 'groups', 'variant', 'seed', 'num_items'):
    if key not in record:
      raise SuiteError(f'{path}: field {key!r} missing; delete it to rerun the cell.')
  if 'test' not in record['results'] or 'NDCG@20' not in record['results']['test']:
    raise SuiteError(f'{path}: no test NDCG@20 in its results; delete it to rerun the cell.')
  if (record['variant'], record['seed']) != (cell.variant, cell.seed):
    raise SuiteError(f'{path}: holds {record["variant"]} seed {record["seed"]}, not the cell '
                     f'{cell.name} ({cell.variant}, seed {cell.seed}); delete it.')
  if record['num_items'] != num_items:
    raise SuiteError(f'{path}: archived on a catalogue of {record["num_items"]} items, the suite '
                     f"config's has {num_items}: another dataset; delete it to rerun the cell.")
  return record


def groups_at(record: dict[str, Any], short_history: int, head_fraction: float,
              key: str = 'groups') -> tuple[dict[str, dict[str, float]], np.ndarray | None, str]:
  """The record's `key` groups ('groups' or 'sampled_groups') and deciles, if archived at these
  thresholds, else the overall group only.

  Returns (groups, deciles, note). The head/tail and short/long groups depend on the thresholds,
  so a report at other thresholds shows only the overall metrics of an archived cell (and says
  so); the deciles depend on neither.
  """
  deciles = (None if record.get('deciles') is None else
             np.array([np.nan if v is None else v for v in record['deciles']], float))
  commits = [a.get('commit') for a in record.get('attempts') or []]
  trained = (f'trained at commit {", ".join(dict.fromkeys(str(c) for c in commits))}' if commits
             else 'training commit not recorded')
  note = f'from the archive (archived {record.get("archived")}, {trained})'
  stored = record.get(key) or {}
  if (record['short_history'], record['head_fraction']) == (short_history, head_fraction):
    return stored, deciles, note
  overall = {'overall': stored['overall']} if 'overall' in stored else {}
  return overall, deciles, (note + f'; its groups used short_history {record["short_history"]} '
                            f'and head_fraction {record["head_fraction"]:g}: overall only here')
