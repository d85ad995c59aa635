"""Item tables sharded over a 'model' mesh axis (`config.model_shards`).

What they pin down: 8 forced host devices as a ('data' 2, 'model' 4) mesh train to the
parameters of 1 device (5 SGD steps, to 1e-5) and evaluate to the same metrics; the item tables,
their optimizer moments and the frozen language table live 1/4 on each device (measured from the
arrays' shardings), and stay so through the train step; per-shard rank counts merged over shards
equal the whole-table counts; padded ID tables start with the unpadded rows; bad settings fail at
start with the fix named.
"""

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import metrics as metrics_lib
from alphafuse_jax import parallel
from alphafuse_jax import serving
from alphafuse_jax import train as train_lib
from alphafuse_jax.embeddings import base as emb_base
from alphafuse_jax.embeddings import pipelines
from tests.cpu_env import cpu_env
from tests.test_train import make_config
from tests.test_train import make_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, pathlib, sys
import jax, numpy as np, orbax.checkpoint as ocp
sys.path.insert(0, '.')
from alphafuse_jax import builders, data as data_lib, parallel, train
from tests.test_train import make_config
overrides, out, shards = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
overrides = dict(overrides, model_shards=shards)
# 5 SGD steps, then stop (the checkpoint holds the params).
config = make_config(dict(overrides, **{'train.stop_after_steps': 5}))
assert train.train_and_evaluate(config, str(out / 'stopped')) is None
mngr = ocp.CheckpointManager(str(out / 'stopped' / 'checkpoints'))
state = mngr.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
np.savez(out / 'params.npz', **{jax.tree_util.keystr(p): np.asarray(x) for p, x in
                                jax.tree_util.tree_leaves_with_path(state['params'])})
# A whole run: training and full-ranking evaluation.
results = train.train_and_evaluate(make_config(overrides), str(out / 'full'))
# Per-device bytes of the item tables, from the arrays' shardings, before and after 2 steps.
config = make_config(overrides)
dataset = data_lib.load(config.data)
model = train.build_model(config, dataset)
dp = parallel.DataParallel('shard_map', shards)
rstate = dp.place_state(train.create_train_state(model, config, jax.random.key(0)))
step = train.map_train_step(dp, model, train.make_train_step(model, jax.random.key(1)))
def device_bytes(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return sum(a.addressable_shards[0].data.nbytes for p, a in leaves if parallel.is_item_table(p))
before = device_bytes(rstate)
batches = data_lib.batches(dataset.splits['train'], config.train.batch_size, seed=0, epoch=0,
                           shuffle=False, num_devices=dp.num_local_devices)
for i, batch in zip(range(2), batches):
  batch['index'] = np.arange(batch['mask'].size, dtype=np.int32).reshape(batch['mask'].shape)
  rstate, _ = step(rstate, dp.put_batch(batch))
tables, frozen = builders.frozen_item_tables(dp, model)
json.dump({'results': results, 'table_bytes': before, 'table_bytes_after': device_bytes(rstate),
           'frozen_bytes': [a.addressable_shards[0].data.nbytes for a in frozen],
           'frozen_rows': [t.padded.shape[0] for t in tables],
           'frozen_dim': [t.padded.shape[1] for t in tables]},
          open(out / 'out.json', 'w'))
"""


def _run(overrides, out: pathlib.Path, devices: int, shards: int) -> dict:
  out.mkdir(parents=True)
  env = cpu_env(devices)
  proc = subprocess.run([sys.executable, '-c', SCRIPT, json.dumps(overrides), str(out),
                         str(shards)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  with np.load(out / 'params.npz') as f:
    params = {k: f[k] for k in f.files}
  return dict(json.loads((out / 'out.json').read_text()), params=params)


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('synthetic_sharding'))


@pytest.mark.slow  # 33 s: two subprocesses. The default suite has the 5-step equality in
# test_train.test_shard_map_pmap_and_device_counts_agree ('shard_map/4').
def test_sharded_tables_train_and_rank_as_one_device(synthetic, tmp_path):
  # Plain SGD (Adam's normalisation would hide a wrong gradient scale); dropout on, so the
  # rows' random streams must also follow the global row index on the 2 x 4 mesh.
  overrides = dict(synthetic, **{'train.optimizer': 'sgd', 'train.learning_rate': 0.5,
                                 'model.dropout_rate': 0.1, 'train.num_epochs': 1})
  one = _run(overrides, tmp_path / 'one', devices=1, shards=1)
  mesh = _run(overrides, tmp_path / 'mesh', devices=8, shards=4)
  assert one['params'].keys() == mesh['params'].keys()
  for key, expected in one['params'].items():
    got = mesh['params'][key]
    if 'id_table' in key:  # Padded to a multiple of 4 rows: the extra rows stay zero.
      assert got.shape[0] % 4 == 0 and got.shape[0] >= expected.shape[0]
      np.testing.assert_array_equal(got[expected.shape[0]:], 0.0)
      got = got[:expected.shape[0]]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=key)
  # Full ranking, merged from the shards' counts: the same metrics (float32 scores may move an
  # item within rounding of the target across it, so allow a tiny difference).
  for split in ('val', 'test'):
    for metric, value in one['results'][split].items():
      assert mesh['results'][split][metric] == pytest.approx(value, abs=2e-3), (split, metric)
  # Memory per device: the item tables and their moments (SGD: params only) and the frozen
  # language table hold 1/4 of their rows on each device.
  rows = next(v for k, v in mesh['params'].items() if 'id_table' in k).shape[0]
  assert mesh['table_bytes'] * 4 == one['table_bytes'] * rows // one['params'][
      next(k for k in one['params'] if 'id_table' in k)].shape[0]
  assert mesh['table_bytes_after'] == mesh['table_bytes']  # Still sharded after the step.
  for nbytes, rows, dim in zip(mesh['frozen_bytes'], mesh['frozen_rows'], mesh['frozen_dim']):
    assert nbytes * 4 == -(-rows // 4) * 4 * dim * 4
  # Trained on 8 devices with sharded tables, served on this process's one device: the top-K
  # of the 1-device run, for every test history.
  one_rec = serving.Recommender.from_workdir(str(tmp_path / 'one' / 'full'))
  mesh_rec = serving.Recommender.from_workdir(str(tmp_path / 'mesh' / 'full'))
  assert mesh_rec.params['item_embedding']['id_table'].shape == (
      one_rec.params['item_embedding']['id_table'].shape)
  histories = [one_rec.catalogue.keys[:3], one_rec.catalogue.keys[5:9]]
  for history in histories:
    a, b = one_rec.recommend(history, k=5), mesh_rec.recommend(history, k=5)
    np.testing.assert_allclose([r.score for r in b], [r.score for r in a], rtol=1e-4, atol=1e-5)
    # The same items, except where two scores are within float32 rounding of each other (the
    # two runs compiled differently may order such a near-tie either way).
    scores = np.array([r.score for r in a])
    clear = np.ones(len(a), bool)
    close = np.abs(np.diff(scores)) < 1e-4
    clear[:-1] &= ~close
    clear[1:] &= ~close
    assert [r.key for r, c in zip(a, clear) if c] == [r.key for r, c in zip(b, clear) if c]


def test_shard_counts_sum_to_whole_table_counts():
  rng = np.random.default_rng(0)
  num_items, batch, dim, shards = 37, 6, 5, 4
  # Integer-valued scores: exact in float32, with many ties.
  table = rng.integers(-2, 3, size=(num_items, dim)).astype(np.float32)
  states = rng.integers(-2, 3, size=(batch, dim)).astype(np.float32)
  targets = rng.integers(0, num_items, size=batch).astype(np.int32)
  exclude = rng.integers(0, num_items + 3, size=(batch, 7)).astype(np.int32)
  scores = states @ table.T
  want_above = np.zeros(batch, int)
  want_ties = np.zeros(batch, int)
  for b in range(batch):  # The oracle: plain loops over the whole table.
    for i in range(num_items):
      if i == targets[b] or i in exclude[b]:
        continue
      want_above[b] += scores[b, i] > scores[b, targets[b]]
      want_ties[b] += scores[b, i] == scores[b, targets[b]]
  padded = emb_base.pad_rows(table, shards)
  rows = padded.shape[0] // shards
  target_score = jnp.asarray(scores[np.arange(batch), targets])
  above = np.zeros(batch, int)
  ties = np.zeros(batch, int)
  for s in range(shards):
    a, t = metrics_lib.shard_rank_counts_chunked(
        jnp.asarray(states), jnp.asarray(padded[s * rows:(s + 1) * rows]), target_score,
        jnp.asarray(targets), jnp.asarray(exclude), offset=s * rows, num_items=num_items,
        chunk_size=4)
    above += np.asarray(a)
    ties += np.asarray(t)
  np.testing.assert_array_equal(above, want_above)
  np.testing.assert_array_equal(ties, want_ties)


def test_bound_frozen_tables_replace_the_constants():
  language = np.arange(9, dtype=np.float32).reshape(3, 3)  # N = 3 items, d = 3.
  module = pipelines.AlphaFuseEmbedding(3, emb_base.FrozenTable(language), null_dim=1)
  ids = jnp.asarray([0, 2])
  params = module.init(jax.random.key(0), ids, deterministic=True)
  (table,) = emb_base.frozen_tables(module)
  # Other values, with rows past the pad row as a table padded for 2 or 3 shards has.
  bound = jnp.concatenate([-language, jnp.zeros((3, 3))])
  apply = lambda p: module.apply(p, ids, deterministic=True)
  plain = np.asarray(apply(params))
  swapped = np.asarray(jax.jit(emb_base.with_frozen_args(apply, (table,)))((bound,), params))
  # The ID part (zeros at init) is added into the last dim; the rest is the table's rows.
  np.testing.assert_array_equal(plain[:, :2], language[[0, 2], :2])
  np.testing.assert_array_equal(swapped[:, :2], -language[[0, 2], :2])
  # Outside the binding the constant is back.
  np.testing.assert_array_equal(np.asarray(apply(params)), plain)


def test_padded_id_table_starts_with_the_unpadded_rows():
  ids = jnp.arange(11)
  for init in ('normal', 'xavier'):
    plain = pipelines.IDEmbedding(10, 6, init)
    padded = pipelines.IDEmbedding(10, 6, init, row_multiple=4)
    a = plain.init(jax.random.key(3), ids, deterministic=True)['params']['id_table']
    b = padded.init(jax.random.key(3), ids, deterministic=True)['params']['id_table']
    assert b.shape == (12, 6)
    np.testing.assert_allclose(np.asarray(b[:11]), np.asarray(a), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(b[11:]), 0.0)


@pytest.mark.parametrize('overrides, message', [
    ({'model_shards': 3}, 'config.model_shards=3 must be an int >= 1 that divides'),
    ({'model_shards': 0}, 'config.model_shards=0'),
    ({'model_shards': 2, 'parallelism': 'pmap'}, "needs config.parallelism='shard_map'"),
])
def test_bad_model_shards_fail_at_start(overrides, message):
  config = make_config(overrides)
  with pytest.raises(ValueError, match=message):
    train_lib.validate_config(config, 2)


def test_builder_builds_item_tables_sharded_and_place_state_keeps_them():
  env = cpu_env(2)
  proc = subprocess.run([sys.executable, '-c', 'from tests.test_model_sharding import '
                         'check_builder; check_builder()'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'builder checked' in proc.stdout


def check_builder():
  """Run with 2 devices (the test above)."""
  assert jax.device_count() == 2, jax.devices()
  dp = parallel.DataParallel('shard_map', 2)

  def make():  # A state-like tree: an item table (6 rows), its moment, and a replicated leaf.
    table = jax.random.normal(jax.random.key(1), (6, 3))
    return {'params': {'id_table': table, 'dense': jnp.ones(4)},
            'opt': {'mu': {'id_table': 2.0 * table}}}

  state = dp.builder()(make)
  want = make()
  for path in (('params', 'id_table'), ('opt', 'mu', 'id_table')):
    leaf = functools.reduce(lambda t, k: t[k], path, state)
    assert leaf.sharding.spec == jax.sharding.PartitionSpec(parallel.MODEL_AXIS)
    # Each of the 2 devices holds 3 of the 6 rows, never the whole table.
    assert {s.data.shape for s in leaf.addressable_shards} == {(3, 3)}
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(
        functools.reduce(lambda t, k: t[k], path, want)), rtol=1e-6, atol=1e-6)
  assert state['params']['dense'].sharding.is_fully_replicated
  # Already placed: place_state keeps the very arrays (no copy of a large table).
  placed = dp.place_state(state)
  assert placed['params']['id_table'] is state['params']['id_table']
  # Not yet placed (host numpy): placed as the builder places it.
  host = dp.place_state(jax.tree.map(np.asarray, want))
  assert host['params']['id_table'].sharding.spec == jax.sharding.PartitionSpec(parallel.MODEL_AXIS)
  # Without item sharding, the builder runs make() itself (place_state replicates later), unless
  # asked to build in place: then replicated, and kept by place_state.
  unsharded = parallel.DataParallel('shard_map', 1)
  plain = unsharded.builder()(make)
  np.testing.assert_array_equal(np.asarray(plain['params']['id_table']),
                                np.asarray(want['params']['id_table']))
  assert unsharded.place_state(plain)['params']['id_table'] is not plain['params']['id_table']
  built = unsharded.builder(in_place=True)(make)
  assert built['params']['id_table'].sharding.is_fully_replicated
  assert unsharded.place_state(built)['params']['id_table'] is built['params']['id_table']
  np.testing.assert_allclose(np.asarray(built['params']['id_table']),
                             np.asarray(want['params']['id_table']), rtol=1e-6, atol=1e-6)
  print('builder checked')
