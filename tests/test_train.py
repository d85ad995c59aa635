"""End-to-end training tests on a small synthetic dataset (delimited source, random text vectors).

What they pin down: one run writes every promised output; shard_map and pmap give the same
parameters; 1 and 8 devices agree; a run killed with SIGKILL and resumed ends with exactly the
metrics of an uninterrupted run; NaN losses stop the run at the named step; bad configs fail early.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from alphafuse_jax import data as data_lib
from alphafuse_jax import losses as losses_lib
from alphafuse_jax import metric_writers
from alphafuse_jax import train as train_lib
from configs import dreamrec
from configs import tiny
from tests.cpu_env import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_USERS, NUM_ITEMS, DIM = 80, 40, 24


def make_dataset(root: pathlib.Path) -> dict:
  """Writes interactions.csv and text vectors; returns config overrides pointing at them."""
  rng = np.random.default_rng(0)
  rows = ['user,item,ts']
  for user in range(NUM_USERS):
    length = int(rng.integers(8, 20))
    # Items drift with time so there is a learnable sequential signal.
    start = int(rng.integers(0, NUM_ITEMS))
    for t in range(length):
      item = (start + t + int(rng.integers(0, 3))) % NUM_ITEMS
      rows.append(f'{user},{item},{1000 + t}')
  (root / 'interactions.csv').write_text('\n'.join(rows) + '\n')
  overrides = {
      'data.source': 'delimited',
      'data.path': str(root),
      'data.data_dir': str(root / 'prepared'),
      'data.delimited.interactions_file': 'interactions.csv',
      'data.delimited.user_column': 'user',
      'data.delimited.item_column': 'item',
      'data.delimited.time_column': 'ts',
      'text.encoder': 'file',
      'text.embeddings_file': str(root / 'vectors.npy'),
      'embedding.hidden_dim': 16,
      'embedding.null_dim': 8,
      'train.batch_size': 64,
      'train.num_epochs': 3,
      'train.loss': 'infonce',
      'train.num_negatives': 4,
      'eval.batch_size': 64,
  }
  config = make_config(overrides)
  dataset = data_lib.load(config.data)
  vectors = rng.normal(size=(dataset.num_items, DIM)).astype(np.float32)
  np.save(root / 'vectors.npy', vectors)
  return overrides


def make_config(overrides: dict, base=None):
  config = base if base is not None else tiny.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def flag_args(overrides: dict) -> list[str]:
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('synthetic'))


def run_cli(overrides: dict, workdir, devices: int = 2, **popen):
  env = cpu_env(ALPHAFUSE_CPU_DEVICES=str(devices))
  cmd = [sys.executable, '-m', 'alphafuse_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', *flag_args(overrides)]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def test_end_to_end_writes_results_and_resumes_finished_run(synthetic, tmp_path):
  config = make_config(dict(synthetic, **{'train.loss': 'ce'}))  # The default config's loss.
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  dataset = data_lib.load(config.data)
  # Every example of each split is counted exactly once.
  assert results['val']['count'] == len(dataset.splits['val']['target'])
  assert results['test']['count'] == len(dataset.splits['test']['target'])
  groups = results['test_groups']
  assert groups['head_items']['count'] + groups['tail_items']['count'] == results['test']['count']
  for key in ('HR@10', 'NDCG@20', 'MRR@5'):
    assert 0.0 <= results['test'][key] <= 1.0
  assert results['test']['NDCG@20'] <= results['test']['HR@20']
  assert 1 <= results['best_epoch'] <= 3
  assert results['train_sequences_per_second'] > 0
  assert results['eval_examples_per_second'] > 0  # Validations after the first are timed.
  # Where it ran and how: float32 by default; CPU reports no device memory statistics.
  import jax  # pylint: disable=g-import-not-at-top
  assert results['backend'] == jax.default_backend()
  assert results['device_kind'] == jax.devices()[0].device_kind
  assert results['compute_dtype'] == 'float32'
  assert (results['device_memory'] is None) == (jax.default_backend() == 'cpu')
  # Per-step reads only for a CPU backend with several devices (parallel.needs_step_sync).
  assert results['sync_every_step'] == (jax.default_backend() == 'cpu' and jax.device_count() > 1)
  on_disk = json.loads((tmp_path / 'results.json').read_text())
  assert on_disk['test'] == results['test']
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['epoch'] for l in lines] == [1, 2, 3]
  assert (tmp_path / 'learning_curve.png').stat().st_size > 1000
  # Per-example test ranks: in split order, and they reproduce the reported metrics.
  saved = np.load(tmp_path / 'test_ranks.npz')
  np.testing.assert_array_equal(saved['target'], dataset.splits['test']['target'])
  assert saved['rank'].min() >= 1 and saved['rank'].max() <= dataset.num_items
  assert abs(np.mean(saved['rank'] <= 10) - results['test']['HR@10']) < 1e-12
  assert 'test_sampled' not in results
  # A finished run restarted on its workdir does not train again and reports the same test.
  again = train_lib.train_and_evaluate(config, str(tmp_path))
  assert again['test'] == results['test']
  # Each evaluator ran once (its compiling pass): no speed was measured, so none is reported.
  assert again['eval_examples_per_second'] is None
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 3


# Slow (about 12 s): extending a finished run; resuming mid-run is tested by default.
@pytest.mark.slow
def test_finished_run_extended_with_more_epochs_equals_a_longer_run(synthetic, tmp_path):
  config = make_config(dict(synthetic, **{'train.num_epochs': 3}))
  straight = train_lib.train_and_evaluate(config, str(tmp_path / 'straight'))
  short = make_config(dict(synthetic, **{'train.num_epochs': 2}))
  first = train_lib.train_and_evaluate(short, str(tmp_path / 'extended'))
  assert first['epochs'] == 2
  extended = train_lib.train_and_evaluate(config, str(tmp_path / 'extended'))
  assert extended['epochs'] == 3
  assert extended['val'] == straight['val'] and extended['test'] == straight['test']
  assert extended['best_epoch'] == straight['best_epoch']
  lines = (tmp_path / 'extended' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['epoch'] for l in lines] == [1, 2, 3]


def test_sampled_metrics_are_opt_in_and_labelled(synthetic, tmp_path):
  config = make_config(dict(synthetic, **{'train.num_epochs': 1, 'eval.sampled_negatives': 10}))
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  saved = np.load(tmp_path / 'test_ranks.npz')
  assert results['sampled_negatives'] == 10
  # Sampled ranks lie in 1..K+1 and never exceed the full-ranking rank.
  assert saved['sampled_rank'].max() <= 11 and np.all(saved['sampled_rank'] <= saved['rank'])
  assert abs(np.mean(saved['sampled_rank'] <= 10) - results['test_sampled']['HR@10']) < 1e-12
  assert abs(np.mean(saved['rank'] <= 10) - results['test']['HR@10']) < 1e-12
  assert set(results['test_groups_sampled']) == set(results['test_groups'])


@pytest.mark.slow  # 30 s: three CLI runs. The default suite resumes in process (stop_after_steps).
def test_killed_run_resumes_to_identical_metrics(synthetic, tmp_path):
  overrides = dict(synthetic, **{'train.checkpoint_every_steps': 3})
  straight = run_cli(overrides, tmp_path / 'straight')
  out, _ = straight.communicate(timeout=300)
  assert straight.returncode == 0, out
  expected = json.loads((tmp_path / 'straight' / 'results.json').read_text())

  workdir = tmp_path / 'killed'
  victim = run_cli(overrides, workdir, start_new_session=True)
  ckpt_dir = workdir / 'checkpoints'
  deadline = time.time() + 240
  # Kill as soon as a mid-epoch checkpoint (step 6 or later) is committed.
  while time.time() < deadline and victim.poll() is None:
    steps = [int(p.name) for p in ckpt_dir.glob('*') if p.name.isdigit()] if ckpt_dir.exists() else []
    if any(s >= 6 for s in steps):
      break
    time.sleep(0.05)
  assert victim.poll() is None, 'the run finished before it could be killed'
  os.killpg(victim.pid, signal.SIGKILL)
  victim.wait()
  assert not (workdir / 'results.json').exists()

  resumed = run_cli(overrides, workdir)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  got = json.loads((workdir / 'results.json').read_text())
  assert got['val'] == expected['val']
  assert got['test'] == expected['test']
  assert got['best_epoch'] == expected['best_epoch']
  epochs = [json.loads(l)['epoch'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert epochs == [1, 2, 3]


PARAMS_SCRIPT = """
import sys, json, numpy as np, orbax.checkpoint as ocp, pathlib
from alphafuse_jax import train
sys.path.insert(0, '.')
from tests.test_train import make_config
overrides = json.loads(sys.argv[1])
for mode in sys.argv[3:]:
  parallelism, _, shards = mode.partition('/')  # 'shard_map/4': item tables over 4 devices.
  config = make_config(dict(overrides, **{'parallelism': parallelism, 'train.stop_after_steps': 5,
                                          'model_shards': int(shards or 1)}))
  workdir = pathlib.Path(sys.argv[2]) / mode.replace('/', '_')
  assert train.train_and_evaluate(config, str(workdir)) is None
  mngr = ocp.CheckpointManager(str(workdir / 'checkpoints'))
  restored = mngr.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  leaves = [np.asarray(x) for x in __import__('jax').tree.leaves(restored.state['params'])]
  np.savez(workdir / 'params.npz', *leaves)
"""


def _params_after_5_steps(overrides, workdir, devices, modes):
  env = cpu_env(devices)
  proc = subprocess.run([sys.executable, '-c', PARAMS_SCRIPT, json.dumps(overrides),
                         str(workdir), *modes], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = {}
  for mode in modes:
    with np.load(workdir / mode.replace('/', '_') / 'params.npz') as f:
      out[mode] = [f[k] for k in sorted(f.files, key=lambda s: int(s.split('_')[1]))]
  return out


def test_shard_map_pmap_and_device_counts_agree(synthetic, tmp_path):
  # Plain SGD: Adam's normalisation would hide a wrong gradient scale (e.g. a gradient summed
  # instead of averaged over devices) and amplify float noise on near-zero gradients.
  overrides = dict(synthetic, **{'model.dropout_rate': 0.1, 'train.optimizer': 'sgd',
                                 'train.learning_rate': 0.5})
  eight = _params_after_5_steps(overrides, tmp_path / 'eight', 8,
                                ['shard_map', 'pmap', 'shard_map/4'])
  one = _params_after_5_steps(overrides, tmp_path / 'one', 1, ['shard_map'])
  for a, b, c, d in zip(eight['shard_map'], eight['pmap'], one['shard_map'],
                        eight['shard_map/4']):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Dropout and negatives follow each row's global index, so 1 and 8 devices agree too.
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    # A ('data' 2, 'model' 4) mesh with the item tables sharded (model_shards=4): the same
    # params; its ID table has zero rows padding it to a multiple of 4.
    if d.shape != c.shape:
      np.testing.assert_array_equal(d[c.shape[0]:], 0.0)
      d = d[:c.shape[0]]
    np.testing.assert_allclose(d, c, rtol=1e-5, atol=1e-5)


def test_nonfinite_loss_stops_at_named_step(synthetic, tmp_path, monkeypatch):
  original = losses_lib.per_example_loss
  monkeypatch.setattr(losses_lib, 'per_example_loss',
                      lambda *a, **k: original(*a, **k) * np.float32('nan'))
  with pytest.raises(train_lib.NonFiniteLossError, match='at step 1 '):
    train_lib.train_and_evaluate(make_config(synthetic), str(tmp_path))


@pytest.mark.parametrize('overrides, message', [
    ({'embedding.pipeline': 'alphafusion'}, 'alphafusion'),
    ({'embedding.null_dim': 16}, 'null_dim'),
    ({'train.loss': 'mse'}, "config.train.loss='mse'"),
    ({'parallelism': 'vmap'}, "config.parallelism='vmap'"),
])
def test_bad_config_fails_at_start(synthetic, tmp_path, overrides, message):
  config = make_config(dict(synthetic, **overrides))
  with pytest.raises(ValueError, match=message):
    train_lib.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_batch_must_divide_over_devices():
  config = tiny.get_config()
  config.train.batch_size = 60
  with pytest.raises(ValueError, match='multiple of the 8 devices'):
    train_lib.validate_config(config, num_devices=8)


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(train_lib.errors.WorkdirError, match='not writable.*--workdir'):
    train_lib.check_workdir(str(blocker / 'run'))


def test_dreamrec_end_to_end_with_reproducible_sampling(synthetic, tmp_path):
  """DreamRec trains through the same loop; its evaluation noise is fixed, so val is repeatable."""
  overrides = dict(synthetic, **{
      'embedding.hidden_dim': DIM, 'embedding.null_threshold': None, 'embedding.null_dim': 8,
      'train.num_epochs': 2, 'eval.every_epochs': 2, 'progress_bar': False})
  config = make_config(overrides, base=dreamrec.get_config('alphafuse'))
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert results['best_epoch'] == 2
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert ['val/NDCG@20' in r for r in records] == [False, True]
  # results['val'] re-evaluates the best checkpoint: the same sampling noise gives the same value.
  assert results['val']['NDCG@20'] == records[-1]['val/NDCG@20']
  assert results['test']['count'] == len(data_lib.load(config.data).splits['test']['target'])


def test_leave_one_out_with_seen_items_excluded_matches_a_float64_oracle(synthetic, tmp_path):
  """The literature's protocol end to end: per-position loss, seen items masked at evaluation.

  The test ranks the loop saved are recomputed from the best params in float64 numpy: the target's
  rank among the items the user has not seen, counting items that score strictly higher.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from alphafuse_jax import builders, checkpointing, data  # pylint: disable=g-import-not-at-top
  config = make_config(dict(synthetic, **{
      'data.protocol': 'leave_one_out', 'data.min_interactions': 3, 'eval.exclude_seen': True,
      'train.loss': 'ce', 'train.num_epochs': 2, 'model.block': 'standard',
      'model.num_blocks': 2}))
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  dataset = data.load(config.data)
  test = dataset.splits['test']
  # One test example per user: the last item of each sequence.
  assert results['test']['count'] == len(np.unique(test['user_id'])) == len(test['target'])
  model = builders.build_model(config, dataset, builders.load_language_embeddings(config, dataset))
  template = jax.eval_shape(lambda: train_lib.init_params(model, jax.random.key(0)))
  params = checkpointing.Checkpoints(str(tmp_path)).restore_best(template)
  encode = jax.jit(lambda p, h: model.apply({'params': p}, h, deterministic=True))
  states = np.asarray(encode(params, test['history']), np.float64)
  table = np.asarray(model.apply({'params': params}, method='item_table'), np.float64)
  scores = states @ table.T
  indptr, items = data.seen_items(dataset, 'test')
  saved = np.load(tmp_path / 'test_ranks.npz')['rank']
  compared = 0
  for row, target in enumerate(test['target']):
    row_scores = scores[row].copy()
    seen = items[indptr[row]:indptr[row + 1]]
    row_scores[seen[seen != target]] = -np.inf
    # Seen items never outrank the target, so no rank exceeds the unseen items + 1.
    assert saved[row] <= dataset.num_items - len(set(seen) - {target})
    gap = np.abs(row_scores - row_scores[target])
    gap[target] = np.inf
    if gap.min() < 1e-4 * (1 + abs(row_scores[target])):
      continue  # A float32 near-tie: either side is a correct float32 rank.
    assert saved[row] == 1 + np.sum(row_scores > row_scores[target]), row
    compared += 1
  assert compared >= 0.9 * len(saved)


def test_tensorboard_events_are_written_beside_metrics_jsonl(synthetic, tmp_path):
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  config = make_config(dict(synthetic, **{'train.num_epochs': 2}))
  train_lib.train_and_evaluate(config, str(tmp_path))
  (events_file,) = (tmp_path / 'tensorboard').glob('events.out.tfevents.*')
  scalars = {}
  data = events_file.read_bytes()
  offset = 0
  while offset < len(data):  # TFRecord framing: length, crc, payload, crc.
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [s for s, _ in scalars['train_loss']] == [r['step'] for r in records]
  assert metric_writers.tensorboard_tag('val/NDCG@20') == 'val/NDCG_20'
  np.testing.assert_allclose([v for _, v in scalars['val/NDCG_20']],
                             [r['val/NDCG@20'] for r in records], rtol=1e-6)


def test_child_processes_keep_the_parents_xla_flags_but_not_its_device_count(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_a=1  --xla_b')
  assert cpu_env(2)['XLA_FLAGS'] == '--xla_a=1 --xla_b --xla_force_host_platform_device_count=2'
  env = cpu_env(ALPHAFUSE_CPU_DEVICES='3')
  assert env['XLA_FLAGS'] == '--xla_a=1 --xla_b' and env['ALPHAFUSE_CPU_DEVICES'] == '3'
  assert env['JAX_PLATFORMS'] == 'cpu'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert 'XLA_FLAGS' not in cpu_env()
