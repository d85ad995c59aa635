"""Row-sparse item-table updates (config.train.sparse_item_updates; sparse_updates.py).

What they pin down: when a batch touches every row, the sparse step equals the dense optax step
(params and moments) for the three optimizers; rows a step does not touch keep their params and
moments, and touched rows follow a float64 LazyAdam (or SGD) written out here from the dense
step's own gradient; 1 and 2 devices (shard_map and pmap) agree; the state checkpoints and resumes
exactly; the loss never reads the whole table; bad configs are refused with the fix.
"""

import functools
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alphafuse_jax import builders
from alphafuse_jax import checkpointing
from alphafuse_jax import parallel
from alphafuse_jax import sparse_updates
from alphafuse_jax import train
from alphafuse_jax.embeddings import base as embeddings_base
from alphafuse_jax.embeddings import pipelines
from alphafuse_jax.models import base
from configs import default
from tests.cpu_env import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Items, history length, global batch, width, shared negatives, language width.
N, L, B, H, K, D_L = 11, 4, 6, 8, 3, 12
TRAIN_KEY = jax.random.key(1)
B1, B2, EPS = 0.9, 0.999, 1e-8  # optax's Adam defaults, as train.make_optimizer uses them.


def make_config(pipeline='id', optimizer='adam_l2', sparse=True, protocol='cold_start_users',
                in_batch=False):
  config = default.get_config()
  config.embedding.pipeline = pipeline
  config.embedding.hidden_dim, config.embedding.null_dim = H, H // 2
  config.embedding.id_init = 'normal'
  config.data.max_len, config.data.protocol = L, protocol
  config.train.batch_size = B
  config.train.loss, config.train.num_negatives = 'sampled_softmax', K
  config.train.sampler, config.train.in_batch_negatives = 'popularity', in_batch
  config.train.optimizer, config.train.learning_rate, config.train.l2 = optimizer, 1e-2, 1e-2
  config.train.sparse_item_updates = sparse
  return config


@functools.cache
def build(pipeline='id', protocol='cold_start_users', in_batch=False):
  """The model the loop would build for a tiny catalogue (random "text" vectors)."""
  config = make_config(pipeline, protocol=protocol, in_batch=in_batch)
  dataset = types.SimpleNamespace(num_items=N, max_len=L,
                                  train_item_counts=np.arange(1, N + 1) ** 2)
  language = None if pipeline == 'id' else np.random.default_rng(1).normal(size=(N, D_L))
  return builders.build_model(config, dataset, language)


# One pipeline, loss setting and optimizer each (every step compiled once, shared by the tests).
CASES = {
    'adam_l2': ('id', 'leave_one_out', False),  # Per-position targets.
    'adamw': ('alphafuse', 'cold_start_users', True),  # Frozen language rows; in-batch negatives.
    'sgd': ('llminit', 'cold_start_users', False),
}


@functools.cache
def stepper(optimizer='adam_l2', sparse=True, mode='shard_map', jit_init=False):
  """(model, config, fresh state, dp, the step mapped and donated as the loop maps it).

  jit_init: compile the init rather than run it op by op (quicker in a fresh process).
  """
  pipeline, protocol, in_batch = CASES[optimizer]
  config = make_config(pipeline, optimizer, sparse, protocol, in_batch)
  train.validate_config(config, jax.device_count())
  model = build(pipeline, protocol, in_batch)
  dp = parallel.DataParallel(mode)
  mapped = dp.map(train.make_train_step(model, TRAIN_KEY), ('replicated', 'sharded'),
                  ('replicated', 'replicated'), donate_argnums=(0,))
  create = functools.partial(train.create_train_state, model, config)
  state = (jax.jit(create) if jit_init else create)(jax.random.key(0))
  return model, config, state, dp, mapped


def make_batch(seed, items=None, covering=False):
  """A global batch: histories [B, L] left-padded with N, or covering every id 0..N."""
  rng = np.random.default_rng(seed)
  pool = np.arange(N) if items is None else np.asarray(items)
  history = rng.choice(pool, size=(B, L)).astype(np.int32)
  if covering:
    history.flat[:N + 1] = np.roll(np.arange(N + 1), 1)  # Row 0 starts with the pad id N.
  else:
    history[:2, :2] = N  # Two short histories.
  return {'history': history, 'target': rng.choice(pool, size=B).astype(np.int32),
          'index': np.arange(B, dtype=np.int32), 'mask': np.ones(B, bool)}


def run(dp, mapped, state, batches, devices=1):
  """The states (host copies) after each step."""
  out, rstate = [], dp.replicate(state)
  for batch in batches:
    rstate, _ = mapped(rstate, dp.put_batch(
        {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in batch.items()}))
    out.append(dp.unreplicate(rstate))
  return out


def moments(state, name):
  """A moment tree of a dense state's or a sparse state's optimizer, as params (None: none)."""
  opt = state.opt_state
  if state.sparse_item_updates:
    rest, tables = optax.tree.get(opt['dense'], name), optax.tree.get(opt['items'], name)
    return None if rest is None else sparse_updates.merge_tables(rest, tables)
  return optax.tree.get(opt, name)


def table(tree):
  return np.asarray(tree['item_embedding']['id_table'])


# ---- the pieces ----------------------------------------------------------------------------------
def test_touched_ids_are_sorted_unique_and_padded_out_of_range():
  history = np.array([[5, 3, 11], [11, 3, 2]], np.int32)
  ids = sparse_updates.touched_ids(history, np.array([7, 2]), np.array([9, 5, 9]), num_rows=12)
  # U = B L + B + K + 1 = 6 + 2 + 3 + 1; item 0 is the placeholder of rows that do not count.
  np.testing.assert_array_equal(ids, [0, 2, 3, 5, 7, 9, 11, 12, 12, 12, 12, 12])
  small = sparse_updates.touched_ids(history, np.array([7, 2]), np.array([9]), num_rows=8)
  assert small.shape == (8,)  # Never more than the table's rows.


def test_gathered_rows_look_up_by_id_and_refuse_whole_table_use():
  full = np.random.default_rng(0).normal(size=(N + 1, H // 2)).astype(np.float32)
  ids = jnp.array([0, 3, 4, 11, 12, 12], jnp.int32)
  gathered = sparse_updates.GatheredRows(jnp.asarray(full)[jnp.minimum(ids, N)], ids, full.shape)
  np.testing.assert_array_equal(gathered.lookup(jnp.array([[4, 11], [0, 3]])),
                                full[[[4, 11], [0, 3]]])
  assert np.isnan(np.asarray(gathered.lookup(jnp.array([5])))).all()  # Not gathered: NaN.
  for use in (lambda t: t[:N], jnp.asarray, np.asarray):
    with pytest.raises(TypeError, match='sparse_item_updates'):
      use(gathered)
  with pytest.raises((TypeError, ValueError)):  # JAX's own refusal of a non-array.
    jnp.sum(gathered)
  # Through the pipelines: lookups work (AlphaFuse's frozen language rows by the original ids),
  # the scoring table of every row fails loudly.
  language = embeddings_base.FrozenTable(np.random.default_rng(1).normal(size=(N, H)))
  for module in (pipelines.IDEmbedding(N, H // 2),
                 pipelines.AlphaFuseEmbedding(N, language, null_dim=H // 2)):
    got = module.apply({'params': {'id_table': gathered}}, jnp.array([3, 11, 0]),
                       deterministic=True)
    want = module.apply({'params': {'id_table': full}}, jnp.array([3, 11, 0]), deterministic=True)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match='only gathered'):
      module.apply({'params': {'id_table': gathered}}, method='table')


def test_shared_negative_ids_are_the_ids_the_loss_uses():
  model, _, state, _, _ = stepper('adamw')  # AlphaFuse, popularity sampler, in-batch negatives.
  params = state.params
  for seed in range(3):
    rngs = base.rng_streams(jax.random.key(seed))
    drawn = model.apply({'params': params}, rngs=rngs, method='shared_negative_ids')
    used = model.apply({'params': params}, rngs=rngs, method='train_table')['ids']
    assert drawn.shape == (K,)
    np.testing.assert_array_equal(drawn, used)


# ---- the step against the dense step and a float64 oracle ----------------------------------------
# adamw and sgd (with their own pipelines and protocols) are slow (~5 s each): the default suite
# keeps adam_l2; `bash launch/test.sh -m slow` runs the others.
@pytest.mark.parametrize('optimizer', [
    o if o == 'adam_l2' else pytest.param(o, marks=pytest.mark.slow) for o in CASES])
def test_every_row_touched_equals_the_dense_step(optimizer):
  batches = [make_batch(seed, covering=True) for seed in range(3)]
  _, _, state, dp, mapped = stepper(optimizer, sparse=False)
  dense = run(dp, mapped, state, batches)
  _, _, state, dp, mapped = stepper(optimizer)
  sparse = run(dp, mapped, state, batches)
  def close(path, a, b):
    where = jax.tree_util.keystr(path)
    # The attention key bias has gradient 0 (a softmax ignores a shift of all its logits): its
    # moments are float noise, which Adam turns into steps of +-lr in either path.
    if name != 'params' or optimizer == 'sgd' or "['key']['bias']" not in where:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=where)

  for d, s in zip(dense, sparse):  # After one, two and three steps.
    assert int(s.step) == int(d.step)
    for name in ('params', 'mu', 'nu'):
      want = d.params if name == 'params' else moments(d, name)
      got = s.params if name == 'params' else moments(s, name)
      if want is None:  # SGD has no moments.
        assert got is None and optimizer == 'sgd'
        continue
      jax.tree_util.tree_map_with_path(close, got, want)


def dense_gradient(optimizer, params, step, batch):
  """The table's gradient [R, d] that the dense step takes at `params` and step count `step`.

  Adam's first moment from zero is (1 - b1) times the gradient it is given (plus adam_l2's
  coupled l2 * params), so one dense step from zero moments gives it to float32 precision, with
  the compiled dense step the tests share. SGD has no moments: a state whose optimizer keeps
  the gradient as its state (one more compile; that case is a slow test).
  """
  model, config, state, dp, mapped = stepper(optimizer, sparse=False)
  tx = state.tx
  if optimizer == 'sgd':
    tx = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    mapped = dp.map(train.make_train_step(model, TRAIN_KEY), ('replicated', 'sharded'),
                    ('replicated', 'replicated'))
  probe = state.replace(step=np.int32(step), params=params, tx=tx, opt_state=tx.init(params))
  after = run(dp, mapped, probe, [batch])[0]
  if optimizer == 'sgd':
    return table(after.opt_state)
  coupled = config.train.l2 * table(params) if optimizer == 'adam_l2' else 0.0
  return table(moments(after, 'mu')).astype(np.float64) / (1 - B1) - coupled


def lazy_reference(optimizer, p, mu, nu, g, rows, count, lr, l2):
  """float64 TF-Addons LazyAdam (or SGD + L2) of table p [R, d] at `rows`, step `count`."""
  p, mu, nu = (np.array(x, np.float64) for x in (p, mu, nu))
  g = np.asarray(g, np.float64)[rows]
  if optimizer in ('adam_l2', 'sgd'):
    g = g + l2 * p[rows]  # Coupled L2.
  if optimizer == 'sgd':
    p[rows] -= lr * g
    return p, mu, nu
  mu[rows] = B1 * mu[rows] + (1 - B1) * g
  nu[rows] = B2 * nu[rows] + (1 - B2) * g * g
  update = mu[rows] / (1 - B1 ** count) / (np.sqrt(nu[rows] / (1 - B2 ** count)) + EPS)
  if optimizer == 'adamw':
    update = update + l2 * p[rows]  # Decoupled decay.
  p[rows] -= lr * update
  return p, mu, nu


@pytest.mark.parametrize('optimizer', [
    'adam_l2', *(pytest.param(o, marks=pytest.mark.slow) for o in ('adamw', 'sgd'))])
def test_untouched_rows_stay_and_touched_rows_follow_a_float64_lazy_optimizer(optimizer):
  model, config, state, dp, mapped = stepper(optimizer)
  # Two steps over different item subsets: rows of the first only keep its moments in the second.
  batches = [make_batch(0, items=[1, 2, 3, 4]), make_batch(1, items=[3, 4, 5, 6])]
  states = [state] + run(dp, mapped, state, batches)
  p = table(state.params)
  mu, nu = np.zeros(p.shape), np.zeros(p.shape)
  for count, (before, after, batch) in enumerate(zip(states, states[1:], batches), start=1):
    table_key = jax.random.split(jax.random.fold_in(TRAIN_KEY, count - 1))[0]
    negatives = model.apply({'params': before.params}, rngs=base.rng_streams(table_key),
                            method='shared_negative_ids')
    rows = np.unique(np.concatenate([batch['history'].ravel(), batch['target'], negatives, [0]]))
    grads = dense_gradient(optimizer, before.params, count - 1, batch)
    assert np.abs(grads[rows]).max() > 1e-4  # The touched rows get a real gradient.
    p, mu, nu = lazy_reference(optimizer, p, mu, nu, grads, rows, count,
                               config.train.learning_rate, config.train.l2)
    untouched = np.setdiff1d(np.arange(N + 1), rows)
    got = [table(after.params)] + ([] if optimizer == 'sgd' else
                                   [table(moments(after, 'mu')), table(moments(after, 'nu'))])
    old = [table(before.params)] + ([] if optimizer == 'sgd' else
                                    [table(moments(before, 'mu')), table(moments(before, 'nu'))])
    for g, o, want in zip(got, old, (p, mu, nu)):
      np.testing.assert_array_equal(g[untouched], o[untouched])  # Never written.
      np.testing.assert_allclose(g[rows], want[rows], rtol=1e-5, atol=1e-6)
    p = table(after.params).astype(np.float64)  # The next gradient is taken at these params.


# ---- devices, checkpoints, configs ---------------------------------------------------------------
DEVICES_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, '.')
from tests import test_sparse_updates as t
mode = sys.argv[2]
_, _, state, dp, mapped = t.stepper(mode=mode, jit_init=True)
final = t.run(dp, mapped, state, t.device_batches(), devices=2)[-1]
np.savez(sys.argv[1], params=t.table(final.params), nu=t.table(t.moments(final, 'nu')),
         dense=final.params['position_embedding']['embedding'])
"""


def device_batches():
  return [make_batch(seed, items=range(2, 9)) for seed in range(3)]


@pytest.mark.parametrize('mode', ['shard_map', pytest.param('pmap', marks=pytest.mark.slow)])
def test_one_and_two_devices_agree(tmp_path, mode):
  _, _, state, dp, mapped = stepper()
  one = run(dp, mapped, state, device_batches())[-1]
  env = cpu_env(2)
  proc = subprocess.run([sys.executable, '-c', DEVICES_SCRIPT, str(tmp_path / 'two.npz'), mode],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with np.load(tmp_path / 'two.npz') as two:
    # Every device gathers the same rows (ids over the global batch) and the mean gradient.
    np.testing.assert_allclose(two['params'], table(one.params), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two['nu'], table(moments(one, 'nu')), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(two['dense'], one.params['position_embedding']['embedding'],
                               rtol=1e-5, atol=1e-6)


def test_a_checkpointed_state_resumes_exactly(tmp_path):
  _, _, state, dp, mapped = stepper('adamw')
  batches = [make_batch(seed, items=range(1, 7)) for seed in range(4)]
  straight = run(dp, mapped, state, batches)[-1]
  halfway = run(dp, mapped, state, batches[:2])[-1]
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  ckpt.save_latest(2, halfway, checkpointing.Progress())
  ckpt.close()
  template = stepper('adamw')[2]
  restored, _ = checkpointing.Checkpoints(str(tmp_path)).restore_latest(template)
  assert restored.sparse_item_updates and int(restored.step) == 2
  resumed = run(dp, mapped, restored, batches[2:])[-1]
  jax.tree.map(np.testing.assert_array_equal, (resumed.params, resumed.opt_state),
               (straight.params, straight.opt_state))


@pytest.mark.parametrize('overrides, message', [
    ({'train.loss': 'ce', 'train.sampler': 'uniform'},
     "needs config.train.loss='sampled_softmax', got 'ce'"),
    ({'train.loss': 'infonce', 'train.sampler': 'uniform'}, '--config.train.loss=sampled_softmax'),
    ({'embedding.pipeline': 'rlmrec'}, 'reconstruction loss reads every row'),
    ({'embedding.pipeline': 'llmesr'}, 'similar users'),
    ({'embedding.pipeline': 'morec'}, 'no trainable item ID table'),
    ({'model.backbone': 'dreamrec'}, 'needs the SASRec backbone'),
])
def test_configs_it_cannot_serve_are_refused_with_the_fix(overrides, message):
  config = make_config()
  train.validate_config(config, 2)  # The test config itself passes.
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  with pytest.raises(ValueError, match=message) as error:
    train.validate_config(config, 2)
  assert 'sparse_item_updates=false' in str(error.value)


def test_a_resumed_run_cannot_change_it():
  recorded = checkpointing.config_dict(make_config(sparse=False))
  changes = checkpointing.config_changes(recorded, checkpointing.config_dict(make_config()))
  assert changes == ['config.train.sparse_item_updates: False -> True']
  assert not default.get_config().train.sparse_item_updates  # Off by default.


@pytest.mark.slow  # About 20 s: three short runs of the loop on a synthetic dataset.
def test_the_loop_trains_and_a_stopped_run_resumes_to_the_same_metrics(tmp_path):
  from tests import test_train  # pylint: disable=g-import-not-at-top
  overrides = dict(test_train.make_dataset(tmp_path), **{
      'train.loss': 'sampled_softmax', 'train.sampler': 'popularity', 'train.num_negatives': 8,
      'train.sparse_item_updates': True, 'train.num_epochs': 2,
      'train.checkpoint_every_steps': 3})
  straight = train.train_and_evaluate(test_train.make_config(overrides), str(tmp_path / 'a'))
  stopped = test_train.make_config(dict(overrides, **{'train.stop_after_steps': 4}))
  assert train.train_and_evaluate(stopped, str(tmp_path / 'b')) is None
  resumed = train.train_and_evaluate(test_train.make_config(overrides), str(tmp_path / 'b'))
  assert resumed['val'] == straight['val'] and resumed['test'] == straight['test']
  assert 0 < straight['test']['NDCG@20'] <= 1
