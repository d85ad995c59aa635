"""The experiment suite: aggregation and the tie rule, deciles, the cell runner, missing runs.

Everything runs on fabricated results directories and a fake cell command: nothing trains.
"""

import dataclasses
import functools
import io
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np
import pytest

from alphafuse_jax import experiments
from alphafuse_jax.experiments import archive

# A 10-item catalogue: items 0 and 1 are the head (20% most interacted), 2..9 the tail.
COUNTS = np.array([50, 40, 9, 8, 7, 6, 5, 4, 3, 2])
# Four test examples per cell: two head targets, two tail targets; positions 3 and 2 are short
# users (< 10 items before the target), 12 and 15 long.
TARGETS = np.array([0, 1, 5, 6])
POSITIONS = np.array([3, 12, 2, 15])
# Ranks per (variant, seed); NDCG@20 of rank 1 is 1, of rank 3 is 1/log2(4) = 0.5, of 100 is 0.
RANKS = {
    ('alphafuse', 22): [1, 1, 100, 100], ('alphafuse', 23): [1, 3, 100, 100],
    ('alphafuse', 24): [3, 1, 100, 100],
    ('id', 22): [1, 1, 1, 100], ('id', 23): [3, 1, 3, 100], ('id', 24): [1, 3, 1, 100],
}


def write_cell(run_dir: pathlib.Path, ranks, *, sampled=None, curve=(0.1, 0.2, 0.3), **extra):
  """A finished cell: results.json (with `extra` results), metrics.jsonl and test_ranks.npz."""
  run_dir.mkdir(parents=True)
  arrays = {'rank': np.asarray(ranks, np.int32), 'target': TARGETS.astype(np.int32),
            'position': POSITIONS.astype(np.int32)}
  results = {'test': {'NDCG@20': -1.0}, 'wall_seconds': 12.0,  # The report recomputes.
             'best_epoch': int(np.argmax(curve)) + 1, 'epochs': len(curve), **extra}
  if sampled is not None:
    arrays['sampled_rank'] = np.asarray(sampled, np.int32)
    results['sampled_negatives'] = 100
  np.savez(run_dir / 'test_ranks.npz', **arrays)
  (run_dir / 'results.json').write_text(json.dumps(results))
  (run_dir / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': e, 'epoch': e, 'train_loss': 1.0, 'val/NDCG@20': v}) + '\n'
      for e, v in enumerate(curve, 1)))


@pytest.fixture(name='report')
def fixture_report(tmp_path):
  """The smoke suite over seeds 22-25: seeds 22-24 finished, alphafuse_s25 missing, id_s25 cut."""
  suite = experiments.make_suite('smoke', seeds=[22, 23, 24, 25])
  runs = tmp_path / 'results' / 'smoke' / 'runs'
  for (variant, seed), ranks in RANKS.items():
    write_cell(runs / f'{variant}_s{seed}', ranks,
               sampled=[1, 1, 2, 5] if variant == 'id' else None)
  (runs / 'id_s25').mkdir()  # Interrupted: a workdir without results.json.
  (runs / 'id_s25' / 'metrics.jsonl').write_text('{"step": 1, "epoch": 1, "val/NDCG@20": 0.5}\n')
  summary = experiments.build_report(suite, str(tmp_path / 'results'), train_item_counts=COUNTS)
  return suite, summary, tmp_path / 'results' / 'smoke'


def ndcg20(rank):
  return 1.0 / math.log2(rank + 1) if rank <= 20 else 0.0


def test_means_and_stds_match_hand_computed(report):
  _, summary, _ = report
  overall = summary['tables']['overall']['alphafuse']['NDCG@20']
  # Per seed: (1 + 1 + 0 + 0) / 4 = 0.5, (1 + 0.5) / 4 = 0.375, (0.5 + 1) / 4 = 0.375.
  assert overall['values'] == pytest.approx([0.5, 0.375, 0.375], abs=1e-12)
  assert overall['mean'] == pytest.approx(1.25 / 3, abs=1e-12)
  # Sample std: deviations 1/12, -1/24, -1/24 -> sqrt((1/144 + 2/576) / 2) = sqrt(1/192).
  assert overall['std'] == pytest.approx(math.sqrt(1 / 192), abs=1e-12)
  assert overall['n'] == 3 and overall['seeds'] == [22, 23, 24]
  # Tail items of id: NDCG@20 (1 + 0) / 2 = 0.5, (0.5 + 0) / 2 = 0.25, 0.5; HR@10 1/2 each seed.
  tail = summary['tables']['tail_items']['id']
  assert tail['NDCG@20']['values'] == pytest.approx([0.5, 0.25, 0.5], abs=1e-12)
  assert tail['NDCG@20']['std'] == pytest.approx(statistics.stdev([0.5, 0.25, 0.5]), abs=1e-12)
  assert tail['HR@10']['mean'] == pytest.approx(0.5) and tail['HR@10']['std'] == 0.0
  # Short users (examples 0 and 2) of alphafuse seed 23: ranks 1 and 100 -> NDCG@10 0.5.
  assert summary['cells']['alphafuse_s23']['groups']['short_users']['NDCG@10'] == pytest.approx(0.5)
  assert summary['cells']['alphafuse_s23']['groups']['long_users']['count'] == 2
  assert summary['num_head_items'] == 2


def test_paired_comparison_and_tie_rule(report):
  _, summary, out_dir = report
  comp = summary['comparisons']['NDCG@20']
  # Head items: id - alphafuse = 0, 0, 0 per seed -> a tie (spread stdev(1, .75, .75) > 0).
  head = comp['head_items']['id']
  assert head['mean_diff'] == pytest.approx(0.0) and head['verdict'] == 'tie'
  assert head['spread'] == pytest.approx(statistics.stdev([1.0, 0.75, 0.75]))
  # Overall: differences .25, .125, .25 (mean 5/24) beat the spread stdev(.75, .5, .625) = .125.
  overall = comp['overall']['id']
  assert overall['mean_diff'] == pytest.approx(5 / 24)
  assert overall['std_diff'] == pytest.approx(statistics.stdev([0.25, 0.125, 0.25]))
  assert overall['spread'] == pytest.approx(0.125) and overall['verdict'] == 'better'
  assert overall['seeds'] == [22, 23, 24]
  readme = (out_dir / 'README.md').read_text()
  assert '+0.2083 ± 0.0722 **better**' in readme and '**tie**' in readme


@pytest.mark.parametrize('variant, baseline, verdict', [
    ({1: 0.10, 2: 0.12, 3: 0.14}, {1: 0.20, 2: 0.22, 3: 0.24}, 'worse'),
    # |mean diff| 0.25 equals the spread 0.25 (exact in binary): not smaller, so not a tie.
    ({1: 0.5, 2: 0.75, 3: 1.0}, {1: 0.25, 2: 0.5, 3: 0.75}, 'better'),
    ({1: 0.12, 2: 0.10, 3: 0.14}, {1: 0.10, 2: 0.12, 3: 0.13}, 'tie'),
    ({1: 0.30}, {1: 0.10, 2: 0.12}, 'n/a'),  # One paired seed: no spread to judge by.
])
def test_tie_rule_cases(variant, baseline, verdict):
  assert experiments.paired_comparison(variant, baseline)['verdict'] == verdict


def test_missing_and_unfinished_runs_are_listed(report):
  _, summary, out_dir = report
  assert {(m['cell'], m['status']) for m in summary['not_finished']} == {
      ('alphafuse_s25', 'missing'), ('id_s25', 'unfinished')}
  readme = (out_dir / 'README.md').read_text()
  assert '`alphafuse_s25`: missing' in readme and '`id_s25`: unfinished' in readme
  assert 'Every test user is a cold-start user' in readme
  # The unfinished seed does not enter the means.
  assert summary['tables']['overall']['id']['NDCG@20']['seeds'] == [22, 23, 24]
  assert json.loads((out_dir / 'summary.json').read_text()) == summary


def test_cell_without_ranks_reads_results_json_groups_by_name(tmp_path):
  suite = experiments.make_suite('smoke', seeds=[22], variants=['alphafuse'])
  run_dir = tmp_path / 'results' / 'smoke' / 'runs' / 'alphafuse_s22'
  run_dir.mkdir(parents=True)
  metrics = lambda v: {'HR@10': v, 'HR@20': v, 'NDCG@10': v, 'NDCG@20': v, 'count': 2.0}
  # results.json's groups carry evaluation.GROUPS names; other keys are not report groups.
  (run_dir / 'results.json').write_text(json.dumps({
      'test': metrics(0.5), 'wall_seconds': 1.0,
      'test_groups': {'tail_items': metrics(0.25), 'short_users': metrics(0.75),
                      'short_history(<10)': metrics(0.0)}}))
  summary = experiments.build_report(suite, str(tmp_path / 'results'), train_item_counts=COUNTS)
  cell = summary['cells']['alphafuse_s22']
  assert set(cell['groups']) == {'overall', 'tail_items', 'short_users'}
  assert cell['note'].startswith('no test_ranks.npz') and cell['ndcg20_by_decile'] is None
  tables = summary['tables']
  assert tables['tail_items']['alphafuse']['NDCG@20']['values'] == [0.25]
  assert tables['short_users']['alphafuse']['HR@10']['values'] == [0.75]
  assert tables['overall']['alphafuse']['NDCG@20']['values'] == [0.5]
  assert not tables['head_items'] and not tables['long_users']


def test_sampled_metrics_get_their_own_labelled_table(report):
  _, summary, out_dir = report
  readme = (out_dir / 'README.md').read_text()
  assert '## Sampled: 100 negatives, not comparable to full ranking' in readme
  sampled = summary['sampled_tables']['overall']
  assert set(sampled) == {'id'}
  # Sampled ranks 1, 1, 2, 5: HR@10 = 1 and NDCG@10 = (1 + 1 + 1/log2(3) + 1/log2(6)) / 4.
  assert sampled['id']['HR@10']['mean'] == pytest.approx(1.0)
  assert sampled['id']['NDCG@10']['mean'] == pytest.approx(
      (2 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)


def test_plots_written(report):
  _, summary, out_dir = report
  assert set(summary['plots']) == {'learning_curves.png', 'ndcg_by_popularity_decile.png'}
  for name in summary['plots']:
    assert (out_dir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert not list(out_dir.glob('.*.tmp'))


def test_popularity_deciles_by_hand():
  # Item i interacted i times: items 0, 1 are the least popular (decile 1), 18, 19 the most.
  deciles = experiments.popularity_deciles(np.arange(20))
  np.testing.assert_array_equal(deciles, np.repeat(np.arange(1, 11), 2))
  # Ties: the lower id counts as more popular (as metrics.item_groups does).
  np.testing.assert_array_equal(experiments.popularity_deciles(np.array([5, 5, 5, 5, 5]), 5),
                                [5, 4, 3, 2, 1])


def test_decile_ndcg_by_hand():
  deciles = experiments.popularity_deciles(np.arange(20))
  # Two examples in decile 1 (ranks 1 and 3 -> (1 + 0.5) / 2), one in decile 10 (rank 7 ->
  # 1/log2(8) = 1/3), one in decile 5 (rank 30 -> 0); the other deciles have no example.
  targets = np.array([0, 1, 19, 9])
  ranks = np.array([1, 3, 7, 30])
  got = experiments.decile_metric(ranks, targets, deciles, 'NDCG@20')
  want = np.full(10, np.nan)
  want[0], want[9], want[4] = 0.75, 1 / 3, 0.0
  np.testing.assert_allclose(got, want, atol=1e-12)
  # The per-rank oracle agrees on decile 1.
  assert got[0] == pytest.approx((ndcg20(1) + ndcg20(3)) / 2)


FAKE_CELL = r'''
import json, os, sys
workdir, name = sys.argv[1], sys.argv[2]
print('training', name)
if name == 'id_s23':
  sys.exit(3)
os.makedirs(workdir, exist_ok=True)
if name != 'id_s22':  # id_s22 exits 0 but writes nothing.
  json.dump({'test': {'NDCG@20': 0.125}, 'wall_seconds': 1.0},
            open(os.path.join(workdir, 'results.json'), 'w'))
'''


def fake_runner(calls: list[str]):
  """A cell runner that runs FAKE_CELL instead of training, recording the cells it ran."""
  def fake_command(cell, workdir):
    calls.append(cell.name)
    return [sys.executable, '-c', FAKE_CELL, str(workdir), cell.name]
  return functools.partial(experiments.run_cell_subprocess, command=fake_command)


def test_runner_skips_finished_and_reports_failed_cells(tmp_path):
  suite = experiments.make_suite('smoke', seeds=[22, 23])
  results_dir = tmp_path / 'results'
  finished = results_dir / 'smoke' / 'runs' / 'alphafuse_s22'
  finished.mkdir(parents=True)
  (finished / 'results.json').write_text(json.dumps({'test': {'NDCG@20': 0.25},
                                                     'wall_seconds': 99.0}))
  calls = []
  out = io.StringIO()
  outcomes = experiments.run_suite(suite, str(results_dir), out=out, runner=fake_runner(calls))
  assert calls == ['alphafuse_s23', 'id_s22', 'id_s23']  # The finished cell never runs.
  status = {o.cell.name: o.status for o in outcomes}
  assert status == {'alphafuse_s22': 'skipped', 'alphafuse_s23': 'done', 'id_s22': 'failed',
                    'id_s23': 'failed'}
  text = out.getvalue()
  assert '[1/4] alphafuse_s22: skipped  test NDCG@20 0.2500  wall 99 s' in text
  assert 'alphafuse_s23: done  test NDCG@20 0.1250' in text
  log = results_dir / 'smoke' / 'runs' / 'id_s23.log'
  assert f'id_s23: failed  (exit status 3; see {log})' in text
  assert 'exited 0 without' in text
  assert text.rstrip().endswith('4 cells: 1 done, 1 skipped, 2 failed')
  assert 'training id_s23' in log.read_text()  # The cell's output went to its log.
  # Each start is logged in the workdir with the checkout's commit, for the archive's record.
  attempts = experiments.archive.read_attempts(results_dir / 'smoke' / 'runs' / 'id_s23')
  assert len(attempts) == 1 and set(attempts[0]) == {'started', 'commit'}
  assert attempts[0]['commit'] is None or len(attempts[0]['commit'].split('+')[0]) == 40
  # Rerun: the cells that now have results.json are skipped, the failed ones run again.
  calls.clear()
  experiments.run_suite(suite, str(results_dir), out=io.StringIO(), runner=fake_runner(calls))
  assert calls == ['id_s22', 'id_s23']
  assert len(experiments.archive.read_attempts(results_dir / 'smoke' / 'runs' / 'id_s23')) == 2


def test_cell_commands_and_layout():
  suite = experiments.make_suite('ml1m_sasrec')
  assert [c.variant for c in suite.cells[::3]] == list(experiments.ML1M_PIPELINES)
  assert suite.cells[-1].name == 'llmesr_s24'
  cell = suite.cells[1]
  assert experiments.cell_workdir(suite, cell, 'results') == pathlib.Path(
      'results/ml1m_sasrec/runs/alphafuse_s23')
  assert experiments.cell_log(suite, cell, 'results') == pathlib.Path(
      'results/ml1m_sasrec/runs/alphafuse_s23.log')
  argv = experiments.cell_command(cell, pathlib.Path('w'))
  assert argv[1:3] == ['-m', 'alphafuse_jax.main'] and argv[3].endswith('configs/suite.py:alphafuse')
  assert argv[4:] == ['--workdir=w', '--config.train.seed=23', '--config.progress_bar=false']
  sweep = experiments.make_suite('null_dim_sweep')
  by_name = {c.name: c for c in sweep.cells}
  assert list(by_name) == ['alphafuse_null16_s22', 'alphafuse_null32_s22', 'alphafuse_null64_s22',
                           'alphafuse_null96_s22']
  assert by_name['alphafuse_null16_s22'].overrides == ('--config.embedding.null_dim=16',)
  # null_dim 64 is configs/suite.py:alphafuse's own: the sweep reuses ml1m_sasrec's run.
  assert experiments.cell_workdir(sweep, by_name['alphafuse_null64_s22'], 'results') == \
      pathlib.Path('results/ml1m_sasrec/runs/alphafuse_s22')
  with pytest.raises(experiments.SuiteError, match='not in suite'):
    experiments.make_suite('ml1m_sasrec', variants=['dreamrec'])


def test_training_budget_table(tmp_path):
  suite = experiments.make_suite('smoke', seeds=[22, 23])
  runs = tmp_path / 'results' / 'smoke' / 'runs'
  # alphafuse: best at epochs 2 and 4 of 3 and 5 run; id: one seed, best at 1 of 2.
  write_cell(runs / 'alphafuse_s22', RANKS['alphafuse', 22], curve=(0.1, 0.3, 0.2))
  # alphafuse_s23 resumed from a checkpoint older than the count (run_seconds None): its last
  # process's 12 s; id_s22 ran in two processes, 120 s in all.
  write_cell(runs / 'alphafuse_s23', RANKS['alphafuse', 23], curve=(0.1, 0.2, 0.3, 0.4, 0.3),
             run_seconds=None)
  write_cell(runs / 'id_s22', RANKS['id', 22], curve=(0.5, 0.4), run_seconds=120.0)
  summary = experiments.build_report(suite, str(tmp_path / 'results'), train_item_counts=COUNTS)
  row = summary['budget']['alphafuse']
  assert row['best_epoch']['values'] == [2.0, 4.0] and row['epochs']['values'] == [3.0, 5.0]
  assert row['best_epoch']['std'] == pytest.approx(math.sqrt(2.0))
  assert row['wall_minutes']['mean'] == pytest.approx(0.2)  # 12 s.
  readme = (tmp_path / 'results' / 'smoke' / 'README.md').read_text()
  assert '| alphafuse | 3.0 ± 1.4 (2) | 4.0 ± 1.4 (2) | 0.2 ± 0.0 (2) |' in readme
  assert '| id | 1.0 (1) | 2.0 (1) | 2.0 (1) |' in readme


def test_convergence_and_sparse_suites():
  conv = experiments.make_suite('ml1m_convergence')
  assert [c.name for c in conv.cells[:3]] == ['alphafuse_s22', 'alphafuse_s23', 'id_s22']
  assert conv.cells[0].config == 'configs/convergence.py:alphafuse'
  config = experiments.load_config(conv.cells[2].config)
  assert (config.embedding.pipeline, config.train.patience, config.train.num_epochs,
          config.eval.every_epochs, config.data.train_user_fraction) == ('id', 10, 200, 1, 1.0)
  sparse = experiments.make_suite('ml1m_sparse10')
  assert sparse.variants == ('alphafuse', 'id', 'llminit')
  assert sparse.cells[-1].config == 'configs/convergence.py:llminit,0.1'
  config = experiments.load_config(sparse.cells[-1].config)
  # A validation every 10 epochs (about one full-data epoch of steps), the cap 200 of them.
  assert (config.data.train_user_fraction, config.eval.every_epochs,
          config.train.num_epochs) == (0.1, 10, 2000)
  assert experiments.load_config('configs/convergence.py:id,0.25').eval.every_epochs == 4
  dream = experiments.make_suite('ml1m_dreamrec')
  assert [c.name for c in dream.cells[::3]] == ['alphafuse_s22', 'id_s22', 'idreamrec_s22']
  argv = experiments.cell_command(dream.cells[4], pathlib.Path('w'))
  assert argv[3].endswith('configs/dreamrec.py:id') and '--config.train.seed=23' in argv
  assert '--config.train.learning_rate=1e-4' in argv and '--config.embedding.hidden_dim=384' in argv
  for bad in ('id,ten', 'id,0', 'id,1.5', 'dreamrec'):
    with pytest.raises(ValueError, match='convergence.py'):
      experiments.load_config(f'configs/convergence.py:{bad}')


def test_anchor_variant_suite_reuses_the_convergence_runs():
  suite = experiments.make_suite('ml1m_anchor', results_dir='res')
  assert suite.variants == ('alphafuse', 'id', 'alphafuse_anchor_w1', 'alphafuse_anchor_w10',
                            'alphafuse_anchor_w100') and suite.baseline == 'alphafuse'
  by_name = {c.name: c for c in suite.cells}
  assert by_name['id_s23'].workdir == os.path.join('res', 'ml1m_convergence', 'runs', 'id_s23')
  cell = by_name['alphafuse_anchor_w10_s22']
  assert cell.workdir is None and cell.overrides == ('--config.embedding.anchor_weight=10',)
  argv = experiments.cell_command(cell, pathlib.Path('w'))
  assert argv[3].endswith('configs/convergence.py:alphafuse_anchor')
  config = experiments.load_config(cell.config)
  assert (config.embedding.pipeline, config.embedding.id_init, config.train.patience) == (
      'alphafuse_anchor', 'zeros', 10)


def test_leave_one_out_suite_and_its_report_text(tmp_path):
  loo = experiments.make_suite('ml1m_loo')
  assert loo.variants == ('alphafuse', 'id', 'llminit') and loo.seeds == (22, 23)
  assert loo.cells[2].config == 'configs/leave_one_out.py:id' and loo.cells[2].seed == 22
  for cell in loo.cells[::2]:
    config = experiments.load_config(cell.config)
    assert (config.embedding.pipeline, config.data.protocol, config.eval.exclude_seen,
            config.eval.short_history) == (cell.variant, 'leave_one_out', True, 40)
    # The language rows are scaled to the ID table's N(0, 0.02); the ID row has none to scale.
    assert config.embedding.language_scale == (1.0 if cell.variant == 'id' else 0.02)
  # The README says what was ranked and which ts_user: leave-one-out, seen items excluded, 40.
  suite = experiments.make_suite('smoke', seeds=[22])
  for (variant, seed), ranks in RANKS.items():
    if seed == 22:
      write_cell(tmp_path / 'smoke' / 'runs' / f'{variant}_s{seed}', ranks)
  summary = experiments.build_report(suite, str(tmp_path), train_item_counts=COUNTS,
                                     short_history=13, protocol='leave_one_out',
                                     exclude_seen=True)
  readme = (tmp_path / 'smoke' / 'README.md').read_text()
  assert "already-seen items excluded" in readme and 'Leave-one-out' in readme
  assert '`ts_user=13`' in readme and 'cold-start user' not in readme
  assert 'no history masking' not in readme
  # Positions 3, 12, 2 of 15 are short at 13: alphafuse s22's ranks 1, 1, 100 -> NDCG@10 2/3.
  assert summary['cells']['alphafuse_s22']['groups']['short_users']['count'] == 3
  assert summary['cells']['alphafuse_s22']['groups']['short_users']['NDCG@10'] == pytest.approx(
      2 / 3)
  assert 'Published figures' not in readme  # The smoke suite lists none.
  # ml1m_loo's README puts the literature's figures, with sources, under its overall table.
  experiments.build_report(dataclasses.replace(suite, published=loo.published), str(tmp_path),
                           train_item_counts=COUNTS)
  loo_readme = (tmp_path / 'smoke' / 'README.md').read_text()
  overall = loo_readme[loo_readme.index('## Overall'):loo_readme.index('## Tail items')]
  assert ('| SASRec+ (full CE) | 0.3152 | - | 0.1821 | - | Klenitskiy & Vasilev, RecSys 2023, '
          "arXiv:2309.07602 (h = 64); BERT4Rec's ML-1M, 3,416 items as ours |") in overall


def test_cell_environment_defaults(tmp_path, monkeypatch):
  suite = experiments.make_suite('ml1m_sasrec', seeds=[22], variants=['alphafuse', 'unisrec'])
  by_name = {c.name: c for c in suite.cells}
  assert by_name['unisrec_s22'].env == (('ALPHAFUSE_CPU_DEVICES', '1'),)
  assert by_name['alphafuse_s22'].env == ()

  def print_env(cell, workdir):
    return [sys.executable, '-c',
            'import os; print("devices=" + os.environ.get("ALPHAFUSE_CPU_DEVICES", "unset"))']

  def run(cell):
    log = tmp_path / f'{cell.name}_{len(list(tmp_path.iterdir()))}.log'
    assert experiments.run_cell_subprocess(cell, tmp_path, log, command=print_env) == 0
    return log.read_text()

  monkeypatch.delenv('ALPHAFUSE_CPU_DEVICES', raising=False)
  text = run(by_name['unisrec_s22'])
  assert 'devices=1' in text and text.startswith('# ') and ' ALPHAFUSE_CPU_DEVICES=1 ' in text
  assert 'devices=unset' in run(by_name['alphafuse_s22'])
  monkeypatch.setenv('ALPHAFUSE_CPU_DEVICES', '4')  # The caller's setting wins.
  text = run(by_name['unisrec_s22'])
  assert 'devices=4' in text and 'ALPHAFUSE_CPU_DEVICES=1' not in text


def test_report_states_cell_environment(report):
  suite, summary, _ = report
  assert 'environment defaults' not in experiments.render_readme(suite, summary)
  cells = tuple(dataclasses.replace(c, env=(('ALPHAFUSE_CPU_DEVICES', '1'),))
                if c.variant == 'id' else c for c in suite.cells)
  text = experiments.render_readme(dataclasses.replace(suite, cells=cells), summary)
  assert '`ALPHAFUSE_CPU_DEVICES=1` for id (see `CELL_ENV`' in text


def test_bad_ranks_file_names_the_problem(tmp_path):
  path = tmp_path / 'test_ranks.npz'
  np.savez(path, rank=np.array([1, 2]), target=np.array([0, 12]), position=np.array([1, 2]))
  with pytest.raises(experiments.SuiteError, match='targets outside 0..9'):
    experiments.read_test_ranks(path, num_items=10)
  np.savez(path, rank=np.array([1, 2]), target=np.array([0, 1]))
  with pytest.raises(experiments.SuiteError, match="'position' missing"):
    experiments.read_test_ranks(path)


def test_spectrum_figure_marks_the_cuts(tmp_path):
  config = experiments.load_config('configs/tiny.py')  # hidden 32, null_dim 16.
  vectors = np.random.default_rng(0).normal(size=(80, 40)) * np.geomspace(1, 0.01, 40)
  info = experiments.spectrum_figure(config, tmp_path / 'spectrum.png', embeddings=vectors)
  assert info['kept_dim'] == 32 and info['id_dims'] == [16, 32]
  assert (tmp_path / 'spectrum.png').read_bytes()[:4] == b'\x89PNG'


def test_cli_rejects_an_unknown_suite():
  result = subprocess.run([sys.executable, '-m', 'alphafuse_jax.experiments', '--suite=nope'],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0 and "unknown suite 'nope'" in result.stderr


def test_cli_status_lists_the_cells_and_writes_no_report(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'alphafuse_jax.experiments', '--suite=smoke',
                           '--seeds=22', '--status', f'--results_dir={tmp_path}',
                           '--archive_dir='], capture_output=True, text=True, timeout=120,
                          check=False, cwd=experiments.REPO_ROOT)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == ['[1/2] alphafuse_s22: not started',
                                        '[2/2] id_s22: not started', '2 cells: 2 not started']
  assert not any(tmp_path.iterdir())  # No report, no workdir.


# ---- the committed archive of finished cells --------------------------------------------------
def test_archive_records_cells_and_reports_them_without_their_workdirs(tmp_path):
  """A report over workdirs records each cell; with the workdirs gone it gives the same tables."""
  suite = experiments.make_suite('smoke', seeds=[22, 23, 24])
  results_dir, archive_dir = tmp_path / 'results', tmp_path / 'archive'
  runs = results_dir / 'smoke' / 'runs'
  for (variant, seed), ranks in RANKS.items():
    write_cell(runs / f'{variant}_s{seed}', ranks, curve=(0.1, 0.3, 0.2 + seed / 1000))
  first = experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS,
                                   archive_dir=str(archive_dir))
  record = json.loads((archive_dir / 'smoke' / 'id_s23.json').read_text())
  assert (record['variant'], record['seed'], record['num_items']) == ('id', 23, len(COUNTS))
  # The hand-computed group metric of id seed 23 (tail targets at ranks 3 and 100).
  assert record['groups']['tail_items']['NDCG@20'] == pytest.approx((0.5 + 0.0) / 2)
  assert record['curve'] == {'1': 0.1, '2': 0.3, '3': pytest.approx(0.223)}
  assert record['attempts'] == []  # Written by hand here, not started by the runner.
  # The workdirs are gone (a new machine): every cell comes from the archive.
  for path in runs.iterdir():
    path.rename(tmp_path / path.name)
  second = experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS,
                                    archive_dir=str(archive_dir))
  assert not second['not_finished']
  assert {c['source'] for c in second['cells'].values()} == {'archive'}
  assert second['tables'] == first['tables'] and second['comparisons'] == first['comparisons']
  assert second['deciles'] == first['deciles'] and second['budget'] == first['budget']
  assert 'from the archive' in (results_dir / 'smoke' / 'README.md').read_text()
  # Without the archive the same report has nothing.
  third = experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS)
  assert len(third['not_finished']) == 6


def archived_id_cell(tmp_path):
  """The smoke suite's id seed 22, finished and reported with an archive: (suite, results, archive)."""
  suite = experiments.make_suite('smoke', seeds=[22], variants=['id'])
  results_dir, archive_dir = tmp_path / 'results', tmp_path / 'archive'
  write_cell(results_dir / 'smoke' / 'runs' / 'id_s22', RANKS['id', 22])
  experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS,
                           archive_dir=str(archive_dir))
  return suite, results_dir, archive_dir


def test_archive_at_other_thresholds_keeps_only_overall(tmp_path):
  suite, results_dir, archive_dir = archived_id_cell(tmp_path)
  record = (archive_dir / 'smoke' / 'id_s22.json').read_text()
  # A report at other thresholds that may not record leaves the record as it was.
  experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS, short_history=5,
                           archive_dir=str(archive_dir), record_cells=False)
  assert (archive_dir / 'smoke' / 'id_s22.json').read_text() == record
  (results_dir / 'smoke' / 'runs' / 'id_s22' / 'results.json').unlink()
  summary = experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS,
                                     short_history=5, archive_dir=str(archive_dir))
  cell = summary['cells']['id_s22']
  assert set(cell['groups']) == {'overall'} and 'overall only here' in cell['note']
  assert cell['groups']['overall']['NDCG@20'] == pytest.approx(3 / 4)  # Ranks 1, 1, 1, 100.


def test_archive_rejects_a_record_of_another_catalogue_or_a_broken_one(tmp_path):
  suite, results_dir, archive_dir = archived_id_cell(tmp_path)
  (results_dir / 'smoke' / 'runs' / 'id_s22' / 'results.json').unlink()
  with pytest.raises(experiments.SuiteError, match='catalogue of 10 items.*has 11'):
    experiments.build_report(suite, str(results_dir), train_item_counts=np.append(COUNTS, 1),
                             archive_dir=str(archive_dir))
  path = archive_dir / 'smoke' / 'id_s22.json'
  path.write_text('{"format": 1, "results": ')
  with pytest.raises(experiments.SuiteError, match=f'{path}: not valid JSON'):
    experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS,
                             archive_dir=str(archive_dir))


def test_cells_without_ranks_are_not_archived(tmp_path):
  suite = experiments.make_suite('smoke', seeds=[22], variants=['alphafuse'])
  run_dir = tmp_path / 'results' / 'smoke' / 'runs' / 'alphafuse_s22'
  run_dir.mkdir(parents=True)
  (run_dir / 'results.json').write_text(json.dumps(
      {'test': {'HR@10': 0.5, 'HR@20': 0.5, 'NDCG@10': 0.5, 'NDCG@20': 0.5}}))
  experiments.build_report(suite, str(tmp_path / 'results'), train_item_counts=COUNTS,
                           archive_dir=str(tmp_path / 'archive'))
  assert not (tmp_path / 'archive').exists()


def test_a_run_of_some_cells_reports_the_whole_suite(tmp_path):
  """A one-cell run's report covers every finished cell of the suite, not that cell only."""
  one = experiments.make_suite('smoke', seeds=[23], variants=['id'])
  whole = experiments.whole_suite(one, str(tmp_path))
  assert (whole.variants, whole.seeds) == (('alphafuse', 'id'), (22, 23))
  assert [c.name for c in whole.cells] == ['alphafuse_s22', 'alphafuse_s23', 'id_s22', 'id_s23']
  # A seed beyond the suite's own is kept beside them.
  extra = experiments.whole_suite(experiments.make_suite('smoke', seeds=[24]), str(tmp_path))
  assert extra.seeds == (22, 23, 24)
  runs = tmp_path / 'smoke' / 'runs'
  for (variant, seed), ranks in RANKS.items():
    if seed in (22, 23):
      write_cell(runs / f'{variant}_s{seed}', ranks)
  summary = experiments.build_report(whole, str(tmp_path), train_item_counts=COUNTS)
  assert sorted(summary['cells']) == ['alphafuse_s22', 'alphafuse_s23', 'id_s22', 'id_s23']
  assert summary['comparisons']['NDCG@20']['overall']['id']['seeds'] == [22, 23]


def test_runner_skips_archived_cells(tmp_path):
  suite = experiments.make_suite('smoke', seeds=[22, 23], variants=['alphafuse'])
  results_dir, archive_dir = tmp_path / 'results', tmp_path / 'archive'
  (archive_dir / 'smoke').mkdir(parents=True)
  (archive_dir / 'smoke' / 'alphafuse_s22.json').write_text(json.dumps(
      {'format': 1, 'results': {'test': {'NDCG@20': 0.375}, 'wall_seconds': 60.0}}))
  calls = []
  out = io.StringIO()
  outcomes = experiments.run_suite(suite, str(results_dir), out=out, archive_dir=str(archive_dir),
                                   runner=fake_runner(calls))
  assert calls == ['alphafuse_s23']
  assert [o.status for o in outcomes] == ['skipped', 'done']
  assert '[1/2] alphafuse_s22: skipped  test NDCG@20 0.3750  wall 60 s (archived)' in out.getvalue()
  # A reused run (ml1m_anchor's id row) maps to the record of the suite that ran it.
  anchor = experiments.make_suite('ml1m_anchor', results_dir=str(results_dir))
  cell = next(c for c in anchor.cells if c.name == 'id_s23')
  assert archive.record_path(anchor, cell, str(results_dir), archive_dir) == (
      archive_dir / 'ml1m_convergence' / 'id_s23.json')
  # ...and only ml1m_convergence's report writes it: ml1m_anchor's reads it.
  write_cell(results_dir / 'ml1m_convergence' / 'runs' / 'id_s23', RANKS['id', 23])
  experiments.build_report(dataclasses.replace(anchor, cells=(cell,)), str(results_dir),
                           train_item_counts=COUNTS, archive_dir=str(archive_dir))
  assert not (archive_dir / 'ml1m_convergence').exists()


def test_data_thinning_section_pairs_alphafuse_and_id_per_fraction(tmp_path):
  """ml1m_convergence's report gains a row per thinning suite that has a summary."""
  results_dir = tmp_path / 'results'
  swapped = {'alphafuse': 'id', 'id': 'alphafuse'}
  for name, ranks_of in (('ml1m_sparse25', lambda v, s: RANKS[swapped[v], s]),
                         ('ml1m_convergence', lambda v, s: RANKS[v, s])):
    suite = experiments.make_suite(name, seeds=[22, 23], variants=['alphafuse', 'id'])
    for cell in suite.cells:
      write_cell(results_dir / name / 'runs' / cell.name, ranks_of(cell.variant, cell.seed))
    summary = experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS)
  rows = {r['fraction']: r for r in summary['thinning']['rows']}
  assert sorted(rows) == [0.25, 1.0]  # No ml1m_sparse10 summary: no row.
  # Full data, by hand: AlphaFuse NDCG@20 0.5 and 0.375, ID 0.75 and 0.5; differences -0.25 and
  # -0.125, larger than the spread (ID's std 0.177): worse. On 25% the ranks are swapped: better.
  full = rows[1.0]
  assert full['metrics']['overall']['alphafuse']['mean'] == pytest.approx(0.4375)
  assert full['language_minus_id']['overall']['mean_diff'] == pytest.approx(-0.1875)
  assert full['language_minus_id']['overall']['verdict'] == 'worse'
  assert full['language_minus_id']['tail_items']['mean_diff'] == pytest.approx(-0.375)
  assert rows[0.25]['language_minus_id']['overall']['verdict'] == 'better'
  readme = (results_dir / 'ml1m_convergence' / 'README.md').read_text()
  assert '## Data thinning' in readme and '| 25% (`ml1m_sparse25`) |' in readme
  assert '-0.1875 ± 0.0884 **worse**' in readme
  assert (results_dir / 'ml1m_convergence' / 'data_thinning.png').is_file()
  # A broken summary of another thinning suite is named, not skipped.
  (results_dir / 'ml1m_sparse25' / 'summary.json').write_text('{')
  with pytest.raises(experiments.SuiteError, match='ml1m_sparse25/summary.json: not valid JSON'):
    experiments.build_report(suite, str(results_dir), train_item_counts=COUNTS)


def test_paper_claims_queue_covers_every_cell_of_issue_20s_suites_once():
  """launch/paper_claims.sh --dry_run lists each cell of the six suites exactly once."""
  root = experiments.REPO_ROOT
  out = subprocess.run(['bash', str(root / 'launch' / 'paper_claims.sh'), '--dry_run'],
                       capture_output=True, text=True, check=True, cwd=root).stdout
  queued = [tuple(line.split()) for line in out.splitlines() if line.strip()]
  assert len(queued) == len(set(queued))
  expected = set()
  for name in ('ml1m_convergence', 'ml1m_sparse25', 'ml1m_sparse10', 'ml1m_loo', 'ml1m_anchor',
               'ml1m_dreamrec'):
    suite = experiments.make_suite(name)
    # ml1m_anchor's alphafuse and id rows are ml1m_convergence's runs, not cells of its own.
    expected |= {(name, c.variant, str(c.seed)) for c in suite.cells if c.workdir is None}
  assert set(queued) == expected
  # The conclusions' first rows come first: AlphaFuse and ID at convergence.
  assert queued[:2] == [('ml1m_convergence', 'alphafuse', '22'), ('ml1m_convergence', 'id', '22')]


def test_status_lists_each_cell_without_running_or_writing_anything(tmp_path):
  suite = experiments.make_suite('smoke', seeds=[22, 23, 24])
  results_dir, archive_dir = tmp_path / 'results', tmp_path / 'archive'
  runs = results_dir / 'smoke' / 'runs'
  # alphafuse_s22 finished here (resumed: 600 s over its processes); alphafuse_s23 archived, run
  # in two processes before their time was added up; alphafuse_s24 interrupted after 3
  # validations, best at epoch 2; id_s22 being trained by another process; id_s23 started but
  # with no validation yet; id_s24 never started.
  write_cell(runs / 'alphafuse_s22', RANKS['alphafuse', 22], run_seconds=600.0,
             test={'NDCG@20': 0.625})
  (archive_dir / 'smoke').mkdir(parents=True)
  (archive_dir / 'smoke' / 'alphafuse_s23.json').write_text(json.dumps(
      {'format': 1, 'results': {'test': {'NDCG@20': 0.375}, 'wall_seconds': 120.0,
                                'best_epoch': 4, 'epochs': 9},
       'attempts': [{'started': '2026-12-01 23:22 UTC'}, {'started': '2026-12-02 00:32 UTC'}]}))
  (runs / 'alphafuse_s24').mkdir(parents=True)
  (runs / 'alphafuse_s24' / 'metrics.jsonl').write_text(''.join(
      json.dumps({'epoch': e, 'val/NDCG@20': v}) + '\n' for e, v in [(1, 0.1), (2, 0.3), (3, 0.2)]))
  (runs / 'id_s23').mkdir()
  trainer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)',
                              'alphafuse_jax.main', f'--workdir={runs / "id_s22"}'])
  try:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*'))
    out = io.StringIO()
    counts = experiments.print_status(suite, str(results_dir), str(archive_dir), out=out)
  finally:
    trainer.kill()
    trainer.wait()
  lines = out.getvalue().splitlines()
  assert lines == [
      '[1/6] alphafuse_s22: finished  test NDCG@20 0.6250  best epoch 3 of 3  wall 10 min',
      '[2/6] alphafuse_s23: archived  test NDCG@20 0.3750  best epoch 4 of 9  wall 2 min (the '
      'last of its 2 processes)',
      '[3/6] alphafuse_s24: interrupted  epoch 3, best val NDCG@20 0.3000 at epoch 2; the suite '
      'command resumes it from its checkpoint',
      f'[4/6] id_s22: running (pid {trainer.pid})  no validation yet',
      '[5/6] id_s23: interrupted  no validation yet; the suite command resumes it from its '
      'checkpoint',
      '[6/6] id_s24: not started',
      '6 cells: 1 finished, 1 archived, 2 interrupted, 1 running, 1 not started']
  assert counts == {'finished': 1, 'archived': 1, 'interrupted': 2, 'running': 1,
                    'not started': 1}
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*')) == before
