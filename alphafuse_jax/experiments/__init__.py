"""The experiment suite: every pipeline x seed as its own training run, then tables and plots.

  python -m alphafuse_jax.experiments --suite=ml1m_sasrec   # see __main__.py for the flags

  suites.py    `Cell`, `Suite`, the suites as data (`SUITES`, `make_suite`, `whole_suite`),
               `load_config`
  runner.py    cell workdir/log/command, `run_cell_subprocess`, `run_suite` (resumable),
               `print_status` (each cell's state, nothing run)
  stats.py     reading results/ranks/curves, popularity deciles, mean +- std, the paired tie rule
  report.py    per-cell group metrics (`evaluation.group_masks`), tables, summary.json
  readme.py    the report's README.md, and the tables' groups and metrics
  archive.py   the committed metrics record of finished cells (docs/runs/), read when a workdir is gone
  thinning.py  the data-thinning section: the same rows at 100%, 25% and 10% of the train users
  plots.py     the matplotlib figures: learning curves, deciles, null_dim sweep, spectrum
  __main__.py  the command's flags and main
"""

from alphafuse_jax.experiments import archive
from alphafuse_jax.experiments.plots import plot_deciles
from alphafuse_jax.experiments.plots import plot_learning_curves
from alphafuse_jax.experiments.plots import plot_sweep
from alphafuse_jax.experiments.plots import spectrum_figure
from alphafuse_jax.experiments.readme import COMPARISON_METRICS
from alphafuse_jax.experiments.readme import DEFAULT_HEAD_FRACTION
from alphafuse_jax.experiments.readme import DEFAULT_SHORT_HISTORY
from alphafuse_jax.experiments.readme import render_readme
from alphafuse_jax.experiments.readme import TABLE_METRICS
from alphafuse_jax.experiments.report import aggregate
from alphafuse_jax.experiments.report import build_report
from alphafuse_jax.experiments.report import CellReport
from alphafuse_jax.experiments.report import collect_cell
from alphafuse_jax.experiments.report import comparisons
from alphafuse_jax.experiments.report import publish
from alphafuse_jax.experiments.report import report_from_config
from alphafuse_jax.experiments.runner import cell_command
from alphafuse_jax.experiments.runner import cell_log
from alphafuse_jax.experiments.runner import cell_workdir
from alphafuse_jax.experiments.runner import CellOutcome
from alphafuse_jax.experiments.runner import CellRunner
from alphafuse_jax.experiments.runner import print_status
from alphafuse_jax.experiments.runner import run_cell_subprocess
from alphafuse_jax.experiments.runner import run_suite
from alphafuse_jax.experiments.stats import decile_metric
from alphafuse_jax.experiments.stats import mean_std
from alphafuse_jax.experiments.stats import NUM_DECILES
from alphafuse_jax.experiments.stats import paired_comparison
from alphafuse_jax.experiments.stats import popularity_deciles
from alphafuse_jax.experiments.stats import read_test_ranks
from alphafuse_jax.experiments.suites import Cell
from alphafuse_jax.experiments.suites import CELL_ENV
from alphafuse_jax.experiments.suites import load_config
from alphafuse_jax.experiments.suites import make_suite
from alphafuse_jax.experiments.suites import ML1M_PIPELINES
from alphafuse_jax.experiments.suites import NULL_DIMS
from alphafuse_jax.experiments.suites import REPO_ROOT
from alphafuse_jax.experiments.suites import Suite
from alphafuse_jax.experiments.suites import SuiteError
from alphafuse_jax.experiments.suites import SUITES
from alphafuse_jax.experiments.suites import whole_suite

__all__ = ['aggregate', 'archive', 'build_report', 'Cell', 'CELL_ENV', 'cell_command', 'cell_log',
           'cell_workdir', 'CellOutcome', 'CellReport', 'CellRunner', 'collect_cell',
           'COMPARISON_METRICS', 'comparisons', 'decile_metric', 'DEFAULT_HEAD_FRACTION',
           'DEFAULT_SHORT_HISTORY', 'load_config', 'make_suite', 'mean_std', 'ML1M_PIPELINES',
           'NULL_DIMS', 'NUM_DECILES', 'paired_comparison', 'plot_deciles',
           'plot_learning_curves', 'plot_sweep', 'popularity_deciles', 'print_status', 'publish',
           'read_test_ranks', 'render_readme', 'report_from_config', 'REPO_ROOT',
           'run_cell_subprocess', 'run_suite', 'spectrum_figure', 'Suite', 'SuiteError', 'SUITES',
           'TABLE_METRICS', 'whole_suite']
