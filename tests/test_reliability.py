"""Reliability (issue 19): no silent wrong result, no stale result, nothing lost, one clear line.

One test (or more) per finding of the issue, each failing before its fix:
  1 ties never reward a model; identical item vectors are refused
  2 a rerun with a config that changes the trained state is refused; num_epochs may change
  3 text pipelines without item texts fail at start, naming item_text_file
  4 checkpoints: the newest damaged -> the previous one, same final metrics; none intact -> one line
  5 a second run on a locked workdir fails at once naming the holder's pid
  6 readers: RFC-4180 quoting, BOM, encodings, duplicate rows, duplicate texts, '02' vs '2'
  7 config validated before any work; patience=0 is off; eval.ks needs 20; no empty workdir
  9 main prints the project's errors as one line, exit code 2; a resumed epoch logs the same loss
(8, the damaged data cache, is in test_data_tfds.py.) The kill -9 soak is the slow test at the end.
"""

import json
import math
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alphafuse_jax import builders
from alphafuse_jax import checkpointing
from alphafuse_jax import errors
from alphafuse_jax import evaluation
from alphafuse_jax import main as main_lib
from alphafuse_jax import metrics
from alphafuse_jax import parallel
from alphafuse_jax import train as train_lib
from alphafuse_jax.data import sources
from tests.cpu_env import cpu_env
from tests.test_train import make_config
from tests.test_train import make_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('reliability'))


# Checkpoints every 3 steps, so a run has mid-epoch states to resume from (14 steps an epoch);
# patience 0 (no early stopping) once stopped such a run after its first epoch.
RUN = {'train.checkpoint_every_steps': 3, 'train.num_epochs': 2, 'train.patience': 0,
       'progress_bar': False}


@pytest.fixture(scope='module')
def straight(synthetic, tmp_path_factory):
  """An uninterrupted run: its results and metrics.jsonl are what every resumed run must give."""
  workdir = tmp_path_factory.mktemp('straight')
  results = train_lib.train_and_evaluate(make_config(dict(synthetic, **RUN)), str(workdir))
  return results, (workdir / 'metrics.jsonl').read_text(), workdir


def _same_metrics(got, expected):
  for key in ('val', 'test', 'test_groups', 'best_epoch', 'epochs'):
    assert got[key] == expected[key], key


# ---- 1: ties ------------------------------------------------------------------------------------
def test_tied_ranks_count_their_exact_expectation():
  """Hand-computed: a target tied with t others ranks uniformly in rank .. rank + t."""
  ranks, ties = np.array([1, 5, 1]), np.array([1, 1, 4])
  # Row 0: rank 1 or 2. Row 1: rank 5 or 6 (straddles K = 5). Row 2: all five items tie.
  got = metrics.summarize_ranks(ranks, ks=(1, 5), ties=ties)
  assert got['HR@1'] == pytest.approx((0.5 + 0 + 0.2) / 3, rel=1e-12)
  assert got['HR@5'] == pytest.approx((1 + 0.5 + 1) / 3, rel=1e-12)
  ndcg5 = [(1 + 1 / math.log2(3)) / 2, (1 / math.log2(6)) / 2,
           sum(1 / math.log2(r + 1) for r in range(1, 6)) / 5]
  assert got['NDCG@5'] == pytest.approx(sum(ndcg5) / 3, rel=1e-12)
  mrr5 = [0.75, 0.1, (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5]
  assert got['MRR@5'] == pytest.approx(sum(mrr5) / 3, rel=1e-12)
  worst = metrics.summarize_ranks(ranks, ks=(5,), ties=ties, rule='pessimistic')
  assert worst['HR@5'] == pytest.approx(2 / 3, rel=1e-12)  # Ranks 2, 6, 5.
  best = metrics.summarize_ranks(ranks, ks=(5,), ties=ties, rule='optimistic')
  assert best == metrics.summarize_ranks(ranks, ks=(5,))
  with pytest.raises(ValueError, match='config.eval.ties'):
    metrics.summarize_ranks(ranks, ties=ties, rule='random')


def test_without_ties_every_rule_gives_the_old_numbers_bit_for_bit():
  ranks = np.array([1, 3, 12, 60, 7])
  old = {'count': 5.0}
  for k in (1, 5, 10, 20, 50):  # The formula before ties were counted.
    hit = (ranks <= k).astype(np.float64)
    old.update({f'HR@{k}': float(np.sum(hit) / 5),
                f'NDCG@{k}': float(np.sum(hit / np.log2(ranks + 1.0)) / 5),
                f'MRR@{k}': float(np.sum(hit / ranks) / 5)})
  for rule in metrics.METRIC_TIE_RULES:
    assert metrics.summarize_ranks(ranks, ties=np.zeros(5, int), rule=rule) == old


def test_chunked_counts_items_above_and_tied():
  states = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  table = np.array([[2, 0], [1, 1], [2, 5], [3, 1], [2, 1]], np.float32)
  # Row 0 scores 2 1 2 3 2, target 0: one above (item 3), two tied (items 2, 4).
  # Row 1 scores 0 1 5 1 1, target 1: one above (item 2), two tied (items 3, 4).
  above, tied = metrics.target_rank_counts_chunked(states, table, np.array([0, 1]), chunk_size=2)
  np.testing.assert_array_equal(above, [1, 1])
  np.testing.assert_array_equal(tied, [2, 2])


def test_identical_item_vectors_score_the_random_baseline_not_perfect(synthetic):
  """Finding 1: an all-zero ID table ties every item; HR@K was 1.0, now K/N (expected rank)."""
  config = make_config(dict(synthetic, **{'embedding.pipeline': 'id',
                                          'embedding.id_init': 'zeros'}))
  dataset = sources_dataset(config)
  model = builders.build_model(config, dataset, None)
  params = train_lib.init_params(model, jax.random.key(0))
  dp = parallel.DataParallel(config.parallelism)
  val = evaluation.Evaluator(dp, model, config, dataset, 'val').evaluate(dp.replicate(params))
  n = dataset.num_items
  assert val['HR@10'] == pytest.approx(10 / n, rel=1e-12)
  assert val['MRR@1'] == pytest.approx(1 / n, rel=1e-12)


def sources_dataset(config):
  from alphafuse_jax import data  # pylint: disable=g-import-not-at-top
  return data.load(config.data)


@pytest.mark.parametrize('rows, message', [
    (lambda n: np.ones((n, 8)), 'all {n} item vectors are identical'),
    (lambda n: np.repeat(np.eye(8)[:3], -(-n // 3), axis=0)[:n], 'repeat another item'),
])
def test_identical_or_mostly_duplicate_vectors_are_refused(synthetic, tmp_path, rows, message):
  config = make_config(synthetic)
  n = sources_dataset(config).num_items
  np.save(tmp_path / 'same.npy', rows(n).astype(np.float32))
  config.text.embeddings_file = str(tmp_path / 'same.npy')
  with pytest.raises(errors.DataError, match=message.format(n=n)):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


# ---- 2: the recorded config ---------------------------------------------------------------------
def test_config_changes_lists_state_fields_only():
  old = {'train': {'learning_rate': 1e-3, 'num_epochs': 3, 'seed': 1}, 'eval': {'ks': [10, 20]}}
  new = {'train': {'learning_rate': 2e-3, 'num_epochs': 9, 'seed': 1, 'added': 5},
         'eval': {'ks': [20]}}
  assert checkpointing.config_changes(old, new) == ['config.train.learning_rate: 0.001 -> 0.002']


def test_rerun_with_another_config_is_refused_and_the_flag_allows_it(synthetic, tmp_path,
                                                                     caplog):
  """Finding 2: the old run's metrics were reported silently (or 411 lines of traceback).

  The workdir holds a checkpoint (a step directory) and the config it was trained with.
  """
  base = make_config(synthetic)
  checkpointing.write_config_record(str(tmp_path), base)
  (tmp_path / 'checkpoints' / '40').mkdir(parents=True)
  changed = make_config(dict(synthetic, **{'train.learning_rate': 2e-3,
                                           'embedding.hidden_dim': 8}))
  with pytest.raises(errors.ConfigError) as refused:
    train_lib.train_and_evaluate(changed, str(tmp_path))
  message = str(refused.value)
  assert ('config.embedding.hidden_dim: 16 -> 8; config.train.learning_rate: 0.001 -> 0.002'
          in message)
  assert '--workdir' in message and '--config.allow_config_change=true' in message
  assert '\n' not in message
  # Allowed: more epochs, eval and logging settings; the flag, with the change logged.
  allowed = make_config(dict(synthetic, **{'train.num_epochs': 9, 'eval.batch_size': 32,
                                           'train.patience': 0, 'progress_bar': True}))
  checkpointing.check_config_record(str(tmp_path), allowed)
  changed.allow_config_change = True
  checkpointing.check_config_record(str(tmp_path), changed)
  assert 'continuing' in caplog.text and 'learning_rate: 0.001 -> 0.002' in caplog.text
  # Without a checkpoint there is no state to protect.
  (tmp_path / 'checkpoints' / '40').rmdir()
  changed.allow_config_change = False
  checkpointing.check_config_record(str(tmp_path), changed)


def test_a_run_records_its_config(synthetic, straight):
  recorded = json.loads((straight[2] / 'config.json').read_text())
  assert recorded == checkpointing.config_dict(make_config(dict(synthetic, **RUN)))
  assert recorded['train']['learning_rate'] == 1e-3 and recorded['eval']['ks'] == [1, 5, 10, 20, 50]


# ---- 3: text pipelines need texts ---------------------------------------------------------------
def test_text_pipeline_without_item_texts_fails_at_start(synthetic, tmp_path):
  config = make_config(dict(synthetic, **{'embedding.pipeline': 'morec', 'text.encoder': 'minilm'}))
  with pytest.raises(errors.ConfigError, match='item_text_file is empty'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  # The ID pipeline reads no texts: the same data is fine for it.
  train_lib.validate_config(make_config(dict(synthetic, **{'embedding.pipeline': 'id',
                                                           'text.encoder': 'minilm'})), 1)


# ---- 4, 9: checkpoints and the resumed epoch's loss ---------------------------------------------
def test_truncated_newest_checkpoint_resumes_from_the_previous_one(synthetic, straight, tmp_path,
                                                                  caplog):
  """Finding 4: a truncated checkpoint gave a tensorstore traceback and blocked the run.
  Finding 9: the train loss of an epoch resumed mid-way averaged only the steps after the resume.

  Stopped at step 17 (an epoch has 14 steps): checkpoints 15 and 17 are kept. Every file of
  step 17 is cut in half, so the run resumes from step 15, one step into epoch 2, and must still
  log and report what the uninterrupted run did.
  """
  config = make_config(dict(synthetic, **RUN, **{'train.stop_after_steps': 17}))
  assert train_lib.train_and_evaluate(config, str(tmp_path)) is None
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [15, 17]
  progress = json.loads((tmp_path / 'checkpoints' / '15' / 'progress' / 'metadata').read_text())
  steps_per_epoch = json.loads(straight[1].splitlines()[0])['step']
  assert progress['epoch_steps'] == 15 - steps_per_epoch and progress['epoch_loss_sum'] > 0
  assert 0 < progress['train_seconds'] < progress['elapsed_seconds']
  for path in (tmp_path / 'checkpoints' / '17').rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  results = train_lib.train_and_evaluate(make_config(dict(synthetic, **RUN)), str(tmp_path))
  assert 'checkpoint step 17' in caplog.text and 'resuming from step 15' in caplog.text
  _same_metrics(results, straight[0])
  assert (tmp_path / 'metrics.jsonl').read_text() == straight[1]
  # The run's time adds the stopped process's (to its step-15 checkpoint) to the resumed one's.
  assert results['run_seconds'] == pytest.approx(progress['elapsed_seconds']
                                                 + results['wall_seconds'], abs=0.5)
  assert progress['train_seconds'] < results['train_seconds'] < results['run_seconds']


def test_a_checkpoint_from_before_the_run_time_count_leaves_it_unknown(tmp_path):
  """A checkpoint without `elapsed_seconds` (saved before it was kept) restores it as None, so
  the run reports no run_seconds rather than only its last process's time as the whole run's."""
  state = {'w': np.arange(3, dtype=np.float32)}
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  ckpt.save_latest(2, state, checkpointing.Progress(epochs_done=1, elapsed_seconds=7.5))
  assert ckpt.restore_latest(state)[1].elapsed_seconds == 7.5
  ckpt.close()
  metadata = tmp_path / 'checkpoints' / '2' / 'progress' / 'metadata'
  record = json.loads(metadata.read_text())
  del record['elapsed_seconds']
  metadata.write_text(json.dumps(record))
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  progress = ckpt.restore_latest(state)[1]
  ckpt.close()
  assert progress.elapsed_seconds is None and progress.epochs_done == 1


def test_the_summary_gives_a_resumed_run_its_whole_time():
  metrics_ = {'NDCG@10': 0.5, 'NDCG@20': 0.5, 'HR@10': 0.5, 'HR@20': 0.5, 'MRR@20': 0.5,
              'count': 4}
  results = {'val': metrics_, 'test': metrics_, 'best_epoch': 2, 'devices': 2,
             'train_sequences_per_second': 100.0, 'eval_examples_per_second': None,
             'wall_seconds': 30.0, 'run_seconds': None}
  assert main_lib.format_results(results).endswith('wall 30 s on 2 device(s)')
  results['run_seconds'] = 30.2  # One process.
  assert main_lib.format_results(results).endswith('wall 30 s on 2 device(s)')
  results['run_seconds'] = 95.0
  assert main_lib.format_results(results).endswith(
      'wall 30 s on 2 device(s) (95 s over every process of this resumed run)')


# ---- 5: the workdir lock ------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from alphafuse_jax import checkpointing
lock = checkpointing.WorkdirLock(sys.argv[1])
print('locked', flush=True)
time.sleep(60)
"""


def test_second_run_on_a_locked_workdir_fails_at_once_naming_the_pid(synthetic, tmp_path):
  """Finding 5: two runs on one workdir crashed inside orbax or did every step twice."""
  holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    start = time.perf_counter()
    with pytest.raises(errors.WorkdirError, match=f'in use by another run \\(pid {holder.pid}\\)'):
      train_lib.train_and_evaluate(make_config(synthetic), str(tmp_path))
    assert time.perf_counter() - start < 5
  finally:
    holder.kill()  # SIGKILL: the OS drops the lock with the process.
    holder.wait()
  lock = checkpointing.WorkdirLock(str(tmp_path))
  lock.release()


# ---- 6: readers ---------------------------------------------------------------------------------
def _options(**overrides):
  from configs import default  # pylint: disable=g-import-not-at-top
  options = default.get_data_config().delimited
  options.update(dict(interactions_file='inter.csv', user_column='u', item_column='i',
                      time_column='t', item_text_file='items.csv', item_text_item_column='i',
                      item_text_columns=('title',)))
  options.update(overrides)
  return options


def test_rfc4180_quotes_bom_and_encodings(tmp_path):
  (tmp_path / 'inter.csv').write_bytes('\ufeffu,i,t\r\n1,a,1\r\n1,b,2\r\n'.encode('utf-8'))
  (tmp_path / 'items.csv').write_text('i,title\na,"Crouching Tiger, Hidden Dragon"\n'
                                      'b,"The ""Quoted""\nTitle"\n')
  raw = sources.read_delimited(_options(), str(tmp_path))
  assert raw.users.tolist() == [1, 1]
  assert raw.item_fields['a']['title'] == 'Crouching Tiger, Hidden Dragon'
  assert raw.item_fields['b']['title'] == 'The "Quoted"\nTitle'
  (tmp_path / 'inter.csv').write_text('u,i,t\n1,a,1\n1,b,2\n')
  (tmp_path / 'items.csv').write_bytes('i,title\na,Amélie\nb,Bé\n'.encode('latin-1'))
  with pytest.raises(errors.DataError, match='cannot decode as utf-8.*encoding'):
    sources.read_delimited(_options(), str(tmp_path))
  raw = sources.read_delimited(_options(encoding='latin-1'), str(tmp_path))
  assert raw.item_fields['a']['title'] == 'Amélie'


def test_exact_duplicate_rows_are_dropped_with_a_count_or_kept(tmp_path, caplog):
  (tmp_path / 'inter.csv').write_text('u,i,t\n1,a,1\n1,a,1\n1,b,2\n1,a,1\n1,a,3\n')
  raw = sources.read_delimited(_options(item_text_file=''), str(tmp_path))
  assert raw.items.tolist() == ['a', 'b', 'a'] and raw.timestamps.tolist() == [1, 2, 3]
  assert 'dropped 2 exact duplicate interaction row(s)' in caplog.text
  assert 'first at line 3' in caplog.text and 'duplicates=keep' in caplog.text
  kept = sources.read_delimited(_options(item_text_file='', duplicates='keep'), str(tmp_path))
  assert len(kept.items) == 5


def test_duplicate_text_rows_and_ambiguous_ids_are_errors(tmp_path):
  (tmp_path / 'inter.csv').write_text('u,i,t\n1,a,1\n2,b,2\n')
  (tmp_path / 'items.csv').write_text('i,title\na,First\nb,Second\na,Again\n')
  with pytest.raises(errors.DataError, match=r"items.csv, line 4: a second text row for item 'a' "
                     r'\(the first is line 2\)'):
    sources.read_delimited(_options(), str(tmp_path))
  (tmp_path / 'inter.csv').write_text('u,i,t\n2,a,1\n02,b,2\n')
  with pytest.raises(errors.DataError, match=r"line 3: id '02' in column 'u' reads as the same "
                     r"number as '2' \(line 2\)"):
    sources.read_delimited(_options(item_text_file=''), str(tmp_path))


# ---- 7: config validation -----------------------------------------------------------------------
@pytest.mark.parametrize('overrides, message', [
    ({'eval.ks': (1, 5, 10)}, 'including 20'),
    ({'embedding.pipeline': 'alphafusion'}, 'alphafusion'),
    ({'train.patience': -1}, 'must be >= 0 \\(0 = off\\)'),
])
def test_config_errors_come_first_and_leave_no_workdir(synthetic, tmp_path, monkeypatch, overrides,
                                                       message):
  """Finding 7: ks without 20 crashed after an epoch; the pipeline failed after the data loaded."""
  from alphafuse_jax import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(data, 'load', lambda *a: pytest.fail('data loaded before validation'))
  with pytest.raises(errors.ConfigError, match=message):
    train_lib.train_and_evaluate(make_config(dict(synthetic, **overrides)), str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_patience_zero_means_no_early_stopping(straight):
  """Finding 7: patience=0 stopped after one epoch, where 0 means 'off' elsewhere."""
  assert straight[0]['epochs'] == 2
  assert [json.loads(l)['epoch'] for l in straight[1].splitlines()] == [1, 2]


def test_a_data_error_removes_the_workdir_it_created(synthetic, tmp_path):
  config = make_config(dict(synthetic, **{'data.delimited.user_column': 'nobody'}))
  with pytest.raises(errors.DataError, match="no column 'nobody'"):
    train_lib.train_and_evaluate(config, str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()


# ---- 9: main ------------------------------------------------------------------------------------
def test_main_prints_one_line_and_exits_2(synthetic, tmp_path):
  env = cpu_env(ALPHAFUSE_CPU_DEVICES='1')
  args = [sys.executable, '-m', 'alphafuse_jax.main', '--config=configs/tiny.py',
          f'--workdir={tmp_path / "w"}', '--config.eval.ks=1,5,10']
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      'error: ConfigError: config.eval.ks=(1, 5, 10) must be cut-offs >= 1 including 20 (val '
      'NDCG@20 selects the best epoch); e.g. --config.eval.ks=1,5,10,20,50.']
  assert not (tmp_path / 'w').exists()
  # --debug shows the traceback instead.
  proc = subprocess.run(args + ['--debug'], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 1 and 'Traceback' in proc.stderr


# ---- the kill -9 soak (slow) --------------------------------------------------------------------
def _cli(overrides, workdir, data_dir):
  env = cpu_env(ALPHAFUSE_CPU_DEVICES='2')
  args = [f'--config.{k}={v}' for k, v in overrides.items() if k != 'data.data_dir']
  return subprocess.Popen(
      [sys.executable, '-m', 'alphafuse_jax.main', '--config=configs/tiny.py',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *args],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      start_new_session=True)


@pytest.mark.slow
def test_kill_9_soak(tmp_path):
  """20 SIGKILLs at random moments (data preparation, MiniLM encoding and its cache, training,
  checkpoint writes, evaluation, the test), each resumed: results and metrics.jsonl equal an
  uninterrupted run's. Every third resume also deletes the data and embedding caches, so kills
  land in their preparation again."""
  root = tmp_path / 'data'
  root.mkdir()
  rng = np.random.default_rng(1)
  rows = ['user,item,ts'] + [f'{u},{(u * 7 + t * 3 + int(rng.integers(0, 3))) % 30},{t}'
                             for u in range(60) for t in range(int(rng.integers(6, 14)))]
  (root / 'inter.csv').write_text('\n'.join(rows) + '\n')
  (root / 'items.csv').write_text('item,title\n' + ''.join(f'{i},"Item {i}, part {i % 7}"\n'
                                                           for i in range(30)))
  overrides = {'data.source': 'delimited', 'data.path': str(root),
               'data.delimited.interactions_file': 'inter.csv',
               'data.delimited.item_text_file': 'items.csv',
               'data.delimited.user_column': 'user', 'data.delimited.item_column': 'item',
               'data.delimited.time_column': 'ts', 'data.delimited.item_text_item_column': 'item',
               'embedding.hidden_dim': 16, 'embedding.null_dim': 8, 'train.batch_size': 16,
               'train.num_epochs': 4, 'train.checkpoint_every_steps': 2, 'eval.batch_size': 32}
  start = time.perf_counter()
  proc = _cli(overrides, tmp_path / 'straight', tmp_path / 'cache_straight')
  assert proc.wait(timeout=600) == 0, proc.stderr.read()
  duration = time.perf_counter() - start
  expected = json.loads((tmp_path / 'straight' / 'results.json').read_text())
  expected_log = (tmp_path / 'straight' / 'metrics.jsonl').read_text()

  workdir, cache = tmp_path / 'killed', tmp_path / 'cache_killed'
  random.seed(0)
  kills = 0
  while kills < 20:
    if kills % 3 == 2:
      shutil.rmtree(cache, ignore_errors=True)  # Kills land in preparation and encoding again.
    proc = _cli(overrides, workdir, cache)
    time.sleep(random.uniform(0.5, duration))
    if proc.poll() is not None:  # Finished before the kill: start over in a fresh workdir.
      assert proc.returncode == 0, proc.stderr.read()
      shutil.rmtree(workdir)
      continue
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kills += 1
  proc = _cli(overrides, workdir, cache)
  assert proc.wait(timeout=600) == 0, proc.stderr.read()
  got = json.loads((workdir / 'results.json').read_text())
  _same_metrics(got, expected)
  assert (workdir / 'metrics.jsonl').read_text() == expected_log
  assert not list(cache.glob('.incomplete-*'))
