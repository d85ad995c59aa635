"""The suites as data: each suite's rows, seeds, config and cell builder, and the config loader.

`SUITES` maps a suite name to its `_SuiteSpec`; `make_suite` turns one into the `Suite` grid of
`Cell`s (one training run each), optionally restricted to some seeds and rows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
from typing import Callable, Mapping, Sequence

from alphafuse_jax.embeddings import registry

# The repository root: config files are resolved against it, so the command runs from any cwd.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The SASRec pipelines in table order, from the registry (LLM-ESR last: its backbone lands last).
ML1M_PIPELINES = registry.pipelines_for('sasrec')
NULL_DIMS = (16, 32, 64, 96)
# ml1m_cold_items' rows (configs/cold_items.py ROWS; 'text_only' trains nothing).
COLD_ITEMS_ROWS = ('alphafuse', 'morec', 'whitenrec', 'unisrec', 'llmesr', 'llminit', 'text_only',
                   'id')
# ml1m_convergence's rows (AlphaFuse, the ID baseline, and the two language-initialised pipelines
# that beat AlphaFuse at ml1m_sasrec's 3-epoch budget), and the sparse-data suites' rows and
# train-user fractions in percent (configs/convergence.py).
CONVERGENCE_ROWS = ('alphafuse', 'id', 'llminit', 'whitenrec')
SPARSE_ROWS = ('alphafuse', 'id', 'llminit')
SPARSE_PERCENTS = (10, 25)
# ml1m_dreamrec (issue 20 item 5): AlphaFuse-DreamRec against DreamRec-ID and iDreamRec at the
# language width, trained to early stopping at a small learning rate within a CPU budget (the
# authors train up to 1,000 epochs at 1e-5): at 1e-3 the ID table collapses through its own
# diffusion target (BENCHMARKS.md), at 1e-4 it does not within an epoch. Up to 20 epochs of about
# 3 minutes (h = 384, 2-core CPU) plus a 75 s validation each: at most about 80 minutes a cell.
DREAMREC_ROWS = ('alphafuse', 'id', 'idreamrec')
DREAMREC_OVERRIDES = ('--config.embedding.hidden_dim=384', '--config.train.learning_rate=1e-4',
                      '--config.train.num_epochs=20', '--config.train.patience=3')
# ml1m_anchor (issue 20 item 6): the variant AlphaFuse-Anchor at convergence, one row per anchor
# weight (chosen on validation), beside ml1m_convergence's AlphaFuse and ID runs (reused).
ANCHOR_WEIGHTS = (1, 10, 100)
ANCHOR_REUSED_ROWS = ('alphafuse', 'id')
# ml1m_loo (issue 20 item 2): the literature's leave-one-out protocol (configs/leave_one_out.py:
# Kang & McAuley's blocks at one width for every row, full-softmax CE, seen items excluded;
# SASRec-ID's dropout tuned on validation, the text pipelines' not).
LOO_ROWS = ('alphafuse', 'id', 'llminit')
# The module a cell runs: training, or the text-only ranker (no training).
TRAIN_MODULE = 'alphafuse_jax.main'
TEXT_RANKER_MODULE = 'alphafuse_jax.experiments.text_ranker'

# UniSRec adapts the whole catalogue through its MoE in every step, and with data parallelism every
# device repeats that (its draws are device-split invariant): one host device trains a UniSRec cell
# 1.35x faster on a 2-core CPU (0.186 vs 0.250 s a step, 2026-11-29). Every other row, and on
# GPU/TPU every row (the variable only sets the forced CPU device count), is unaffected.
CELL_ENV = {'unisrec': (('ALPHAFUSE_CPU_DEVICES', '1'),)}


class SuiteError(ValueError):
  """A suite, cell or results file is not what the report needs (the message says the fix)."""


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run: a variant (a table row) at one seed.

  `config` is `<file>[:arg]` relative to the repository root; `overrides` are extra
  `--config.x=y` flags. `workdir` is set only when the cell reuses another suite's run. `env` holds
  environment defaults for the cell's process; a variable the caller has set wins. `module` is
  the entry point the cell runs with `python -m` (it takes --config and --workdir).
  """
  name: str
  variant: str
  seed: int
  config: str
  overrides: tuple[str, ...] = ()
  workdir: str | None = None
  env: tuple[tuple[str, str], ...] = ()
  module: str = TRAIN_MODULE


@dataclasses.dataclass(frozen=True)
class Published:
  """A published figure the report shows beside the suite's overall table (not rerun here)."""
  label: str
  metrics: Mapping[str, float]  # Overall test metrics, e.g. {'HR@10': 0.3152, 'NDCG@10': 0.1821}.
  source: str  # Where it comes from, and how its setting differs from the suite's.


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
  # Whether the report draws the language-embedding spectrum.
  spectrum: bool = True
  # Published figures on the suite's protocol (other code), shown beside its overall table.
  published: tuple[Published, ...] = ()


def parse_config_arg(config: str) -> tuple[pathlib.Path, str | None]:
  """`<file>[:arg]` -> (absolute path under the repository root, arg or None)."""
  path, _, arg = config.partition(':')
  return REPO_ROOT / path, (arg or None)


def load_config(config: str):
  """The ConfigDict of `<file>[:arg]` (relative to the repository root), without flags."""
  path, arg = parse_config_arg(config)
  if not path.is_file():
    raise FileNotFoundError(f'config file {path} not found (suite config {config!r}).')
  # Load by path (configs/ is not a package), under a private module name.
  spec = importlib.util.spec_from_file_location(f'_suite_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


# ---- cell builders: (variant, seed, results_dir) -> Cell ---------------------------------------
def _ml1m_cell(variant: str, seed: int, results_dir: str = '') -> Cell:
  del results_dir  # Every ml1m_sasrec cell has its own workdir.
  return Cell(f'{variant}_s{seed}', variant, seed, f'configs/suite.py:{variant}',
              env=CELL_ENV.get(variant, ()))


def _null_dim(variant: str) -> int:
  return int(variant.removeprefix('alphafuse_null'))


def _sweep_reuses_main_run(null_dim: int) -> bool:
  """Whether configs/suite.py:alphafuse already trains with this null_dim (so its run is reused)."""
  return int(load_config('configs/suite.py:alphafuse').embedding.null_dim) == null_dim


def _sweep_cell(variant: str, seed: int, results_dir: str) -> Cell:
  null_dim = _null_dim(variant)
  if _sweep_reuses_main_run(null_dim):
    # Identical settings: the sweep's point is ml1m_sasrec's alphafuse run at this seed.
    main_cell = _ml1m_cell('alphafuse', seed)
    return dataclasses.replace(
        main_cell, name=f'{variant}_s{seed}', variant=variant,
        workdir=os.path.join(results_dir, 'ml1m_sasrec', 'runs', main_cell.name))
  return Cell(f'{variant}_s{seed}', variant, seed, 'configs/suite.py:alphafuse',
              (f'--config.embedding.null_dim={null_dim}',))


def _cold_items_cell(variant: str, seed: int, results_dir: str = '') -> Cell:
  del results_dir  # Every cell has its own workdir.
  module = TEXT_RANKER_MODULE if variant == 'text_only' else TRAIN_MODULE
  return Cell(f'{variant}_s{seed}', variant, seed, f'configs/cold_items.py:{variant}',
              env=CELL_ENV.get(variant, ()), module=module)


def _convergence_cell(percent: int | None) -> Callable[[str, int, str], Cell]:
  """The cell builder of configs/convergence.py at a train-user fraction (None: all users)."""
  arg = '' if percent is None else f',{percent / 100:g}'

  def cell(variant: str, seed: int, results_dir: str = '') -> Cell:
    del results_dir  # Every cell has its own workdir.
    return Cell(f'{variant}_s{seed}', variant, seed, f'configs/convergence.py:{variant}{arg}',
                env=CELL_ENV.get(variant, ()))
  return cell


def _anchor_weight(variant: str) -> int:
  return int(variant.removeprefix('alphafuse_anchor_w'))


def _anchor_cell(variant: str, seed: int, results_dir: str) -> Cell:
  if variant in ANCHOR_REUSED_ROWS:  # ml1m_convergence's run of this row and seed.
    cell = _convergence_cell(None)(variant, seed)
    return dataclasses.replace(cell, workdir=os.path.join(results_dir, 'ml1m_convergence',
                                                          'runs', cell.name))
  return Cell(f'{variant}_s{seed}', variant, seed, 'configs/convergence.py:alphafuse_anchor',
              (f'--config.embedding.anchor_weight={_anchor_weight(variant)}',))


def _dreamrec_cell(variant: str, seed: int, results_dir: str = '') -> Cell:
  del results_dir  # Every cell has its own workdir.
  return Cell(f'{variant}_s{seed}', variant, seed, f'configs/dreamrec.py:{variant}',
              DREAMREC_OVERRIDES)


def _loo_cell(variant: str, seed: int, results_dir: str = '') -> Cell:
  del results_dir  # Every cell has its own workdir.
  return Cell(f'{variant}_s{seed}', variant, seed, f'configs/leave_one_out.py:{variant}')


def _smoke_cell(variant: str, seed: int, results_dir: str) -> Cell:
  del results_dir
  overrides = (f'--config.embedding.pipeline={variant}',)
  if variant != 'alphafuse':
    overrides += ('--config.embedding.id_init=normal',)  # A zero ID table does not learn.
  return Cell(f'{variant}_s{seed}', variant, seed, 'configs/tiny.py', overrides)


@dataclasses.dataclass(frozen=True)
class _SuiteSpec:
  """A suite before seed/row selection: its rows and default seeds, and how to build a cell."""
  description: str
  config: str
  variants: tuple[str, ...]
  seeds: tuple[int, ...]
  baseline: str
  cell: Callable[[str, int, str], Cell]
  sweep_x: Callable[[str], int] | None = None  # Sweep suites: variant -> x of the sweep plot.
  sweep_label: str = ''
  spectrum: bool = True  # Draw the spectrum of the suite config's language vectors.
  published: tuple[Published, ...] = ()


# ml1m_loo's rows beside the literature's SASRec on ML-1M leave-one-out, full ranking. blondered/
# transformer_benchmark (RecSys 2025) lists SASRec+ at HR@10 0.3152 reported (0.3144 reproduced on
# the same 3,416-item 5-core data as ours) and recalculated the others on all 3,706 items.
LOO_PUBLISHED = (
    Published('SASRec+ (full CE)', {'HR@10': 0.3152, 'NDCG@10': 0.1821},
              'Klenitskiy & Vasilev, RecSys 2023, arXiv:2309.07602 (h = 64); BERT4Rec\'s ML-1M, '
              '3,416 items as ours'),
    Published('SASRec + sampled softmax', {'HR@10': 0.2929, 'NDCG@10': 0.1684},
              'transformer_benchmark README (RecSys 2025, arXiv:2508.06450); all 3,706 items'),
    Published('eSASRec', {'HR@10': 0.3133, 'NDCG@10': 0.1772},
              'transformer_benchmark README; all 3,706 items'),
    Published('FuXi-alpha (recalculated)', {'HR@10': 0.3164, 'NDCG@10': 0.1813},
              'transformer_benchmark README; all 3,706 items'),
)


# Every suite, in the order the error message lists them.
SUITES = {
    'ml1m_sasrec': _SuiteSpec(
        f'{len(ML1M_PIPELINES)} SASRec item pipelines on MovieLens-1M cold-start users, '
        '`configs/suite.py:<pipeline>` (3 epochs each, equal budget)',
        'configs/suite.py:alphafuse', ML1M_PIPELINES, (22, 23, 24), 'alphafuse', _ml1m_cell),
    'ml1m_cold_items': _SuiteSpec(
        'New items from their text alone: SASRec item pipelines, the text-only ranker and '
        'SASRec-ID on MovieLens-1M `cold_start_items` (the newest 10% of the items never seen in '
        'training), `configs/cold_items.py:<row>`, equal epoch budget',
        'configs/cold_items.py:alphafuse', COLD_ITEMS_ROWS, (22, 23, 24), 'alphafuse',
        _cold_items_cell, spectrum=False),
    'null_dim_sweep': _SuiteSpec(
        'AlphaFuse-SASRec on MovieLens-1M cold-start users with '
        '`--config.embedding.null_dim` in ' + ', '.join(map(str, NULL_DIMS)),
        'configs/suite.py:alphafuse', tuple(f'alphafuse_null{d}' for d in NULL_DIMS), (22,),
        'alphafuse_null64', _sweep_cell, sweep_x=_null_dim,
        sweep_label='null_dim (ID dimensions)'),
    'ml1m_convergence': _SuiteSpec(
        'SASRec pipelines on MovieLens-1M cold-start users trained to early stopping (patience '
        '10 validations on val NDCG@20, at most 200 epochs), `configs/convergence.py:<pipeline>`',
        'configs/convergence.py:alphafuse', CONVERGENCE_ROWS, (22, 23), 'alphafuse',
        _convergence_cell(None)),
    **{f'ml1m_sparse{p}': _SuiteSpec(
        f'Sparse data: ml1m_convergence with only the first {p}% of the permuted train users '
        '(validation and test users unchanged; a validation every '
        f'{round(100 / p)} epochs, about one full-data epoch of steps), '
        f'`configs/convergence.py:<pipeline>,{p / 100:g}`',
        f'configs/convergence.py:alphafuse,{p / 100:g}', SPARSE_ROWS, (22, 23), 'alphafuse',
        _convergence_cell(p)) for p in SPARSE_PERCENTS},
    'ml1m_dreamrec': _SuiteSpec(
        'DreamRec on MovieLens-1M cold-start users: AlphaFuse, ID and iDreamRec item embeddings '
        'at h = 384, lr 1e-4, to early stopping (patience 3 validations, at most 20 epochs), '
        '`configs/dreamrec.py:<pipeline>` with ' + ' '.join(f'`{o}`' for o in DREAMREC_OVERRIDES),
        'configs/dreamrec.py:alphafuse', DREAMREC_ROWS, (22, 23, 24), 'alphafuse',
        _dreamrec_cell),
    'ml1m_anchor': _SuiteSpec(
        "The variant AlphaFuse-Anchor (not the paper's AlphaFuse: its semantic dims get a "
        'trainable offset pulled to zero by `config.embedding.anchor_weight` x the mean squared '
        'offset norm; rows `alphafuse_anchor_w<weight>`) on MovieLens-1M cold-start users to '
        'early stopping, `configs/convergence.py:alphafuse_anchor`, beside ml1m_convergence\'s '
        'AlphaFuse and SASRec-ID runs (reused, not rerun)',
        'configs/convergence.py:alphafuse',
        ANCHOR_REUSED_ROWS + tuple(f'alphafuse_anchor_w{w}' for w in ANCHOR_WEIGHTS), (22, 23),
        'alphafuse', _anchor_cell),
    'ml1m_loo': _SuiteSpec(
        'SASRec pipelines on MovieLens-1M leave-one-out (5-core, full ranking with seen items '
        "excluded, Kang & McAuley's blocks at h = 128, full-softmax CE at every position; dropout "
        '0.2 for SASRec-ID, chosen on its validation, 0.1 for the text pipelines, not tuned) '
        'trained to early stopping (patience 20 validations on val NDCG@20, at most 200 epochs), '
        '`configs/leave_one_out.py:<pipeline>`',
        'configs/leave_one_out.py:alphafuse', LOO_ROWS, (22, 23), 'alphafuse', _loo_cell,
        published=LOO_PUBLISHED),
    'smoke': _SuiteSpec(
        'smoke test: AlphaFuse and SASRec-ID on MovieLens-100K (`configs/tiny.py`)',
        'configs/tiny.py', ('alphafuse', 'id'), (22, 23), 'alphafuse', _smoke_cell),
}


def make_suite(name: str, seeds: Sequence[int] | None = None,
               variants: Sequence[str] | None = None, results_dir: str = 'results') -> Suite:
  """The named suite, optionally restricted to some seeds and variants (table rows)."""
  if name not in SUITES:
    raise SuiteError(f'unknown suite {name!r}; use one of {", ".join(SUITES)}.')
  spec = SUITES[name]
  seeds = tuple(int(s) for s in (seeds or spec.seeds))
  if variants:
    unknown = [v for v in variants if v not in spec.variants]
    if unknown:
      raise SuiteError(f'--pipelines: {unknown} not in suite {name!r}; its rows are '
                       f'{list(spec.variants)}.')
    variants = tuple(v for v in spec.variants if v in variants)  # The suite's order.
  else:
    variants = spec.variants
  # Row-major: every seed of a variant, then the next variant.
  cells = tuple(spec.cell(v, s, results_dir) for v in variants for s in seeds)
  sweep_values = {v: spec.sweep_x(v) for v in variants} if spec.sweep_x else None
  return Suite(name, spec.description, spec.config, variants, seeds, cells, spec.baseline,
               sweep_values=sweep_values, sweep_label=spec.sweep_label, spectrum=spec.spectrum,
               published=spec.published)


def whole_suite(suite: Suite, results_dir: str = 'results') -> Suite:
  """`suite` widened to every row of its spec and its default seeds (plus any extra it has).

  What a run of some cells reports: the suite's report then covers every finished cell, so a
  one-cell run never shrinks `README.md` and `summary.json` (which other suites' reports read)
  to that one cell.
  """
  seeds = sorted(set(SUITES[suite.name].seeds) | set(suite.seeds))
  return make_suite(suite.name, seeds=seeds, results_dir=results_dir)
