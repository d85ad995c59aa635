"""The loop as it runs on GPU/TPU, shown on CPU: no per-step host sync, bfloat16, profiles.

What they pin down: with the per-step sync off the loop fetches nothing from the device between
its interval reads (every `log_every_steps`, checkpoints, the first step), while with it on it
fetches every step; a NaN loss still names the exact step it happened at; the sync is on exactly
for a CPU backend with several devices; bfloat16 training follows float32 closely with float32
parameters, optimiser state and loss; `profile_steps` writes a trace; device memory statistics
are recorded where the backend reports them.

JAX's transfer guard does not see device-to-host reads on CPU (the buffers are host memory, so
nothing is copied), so the fetches are counted at `jax.Array._value`, through which every read
of a device value passes (float(), np.asarray, jax.device_get, printing); the per-step sync
switched on shows that the count sees the loop's reads.
"""

import contextlib
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import checkpointing
from alphafuse_jax import data as data_lib
from alphafuse_jax import errors
from alphafuse_jax import evaluation
from alphafuse_jax import parallel
from alphafuse_jax import precision
from alphafuse_jax import train as train_lib
from tests.test_train import make_config
from tests.test_train import make_dataset


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp('synthetic'))


def _count_steps_and_fetches(monkeypatch):
  """Counts the train steps the loop queues and, per fetch from the device, the steps so far."""
  record = types.SimpleNamespace(steps=0, fetched_at=set(), poison_step=None)
  real_map = parallel.DataParallel.map

  def counting_map(self, fn, in_kinds, out_kinds, donate_argnums=()):
    mapped = real_map(self, fn, in_kinds, out_kinds, donate_argnums)
    if tuple(in_kinds) != ('replicated', 'sharded') or tuple(donate_argnums) != (0,):
      return mapped  # Not the train step.

    def step(state, batch):
      record.steps += 1
      if record.steps == record.poison_step:  # Ids past the pad id embed as NaN.
        batch = dict(batch, history=jnp.full_like(batch['history'], 10**6))
      return mapped(state, batch)
    return step

  array_impl = type(jnp.zeros(()))  # The concrete jax.Array class.
  real_value = array_impl.__dict__['_value']

  def value(self):
    record.fetched_at.add(record.steps)
    return real_value.fget(self)

  monkeypatch.setattr(parallel.DataParallel, 'map', counting_map)
  monkeypatch.setattr(array_impl, '_value', property(value))
  return record


@pytest.mark.parametrize('sync, expected', [
    (False, {1, 4, 8, 9}),  # The compiling first step, every 4th, the last before stopping.
    # Slow (a second run): the forced sync reads every step (2-device CPU runs take this path in
    # tests/test_train.py).
    pytest.param(True, set(range(1, 10)), marks=pytest.mark.slow),
])
def test_steps_fetch_nothing_between_loss_reads(synthetic, tmp_path, monkeypatch, sync,
                                                expected):
  record = _count_steps_and_fetches(monkeypatch)
  # Profiling steps 2-3 waits for them on the device, but reads nothing back.
  config = make_config(dict(synthetic, **{'sync_every_step': sync, 'log_every_steps': 4,
                                          'train.stop_after_steps': 9, 'profile_steps': (2, 2)}))
  assert train_lib.train_and_evaluate(config, str(tmp_path)) is None
  assert record.steps == 9
  assert record.fetched_at - {0} == expected
  # The trace of the profiled steps, readable by TensorBoard's profile plugin.
  traces = list((tmp_path / 'profile' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_nonfinite_loss_names_its_step_between_reads(synthetic, tmp_path, monkeypatch):
  record = _count_steps_and_fetches(monkeypatch)
  record.poison_step = 6
  config = make_config(dict(synthetic, **{'sync_every_step': False, 'log_every_steps': 4}))
  with pytest.raises(train_lib.NonFiniteLossError, match=r'loss is nan at step 6 \(epoch 1\)'):
    train_lib.train_and_evaluate(config, str(tmp_path))
  # Found when steps 5-8 were read, after step 8 was queued; no checkpoint of the NaN state.
  assert record.steps == 8 and record.fetched_at - {0} == {1, 4, 8}
  assert not checkpointing.has_checkpoint(str(tmp_path))


@pytest.mark.parametrize('backend, devices, sync', [
    ('cpu', 1, False), ('cpu', 2, True), ('cpu', 8, True), ('gpu', 8, False), ('tpu', 4, False),
])
def test_per_step_sync_only_for_cpu_with_several_devices(backend, devices, sync):
  assert parallel.needs_step_sync(backend, devices) is sync


def _mapped_step(config, model, dtype_name):
  """The loop's own train step in `dtype_name`, mapped as the loop maps it, and its state."""
  dp = parallel.DataParallel('shard_map')
  init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
  state = train_lib.create_train_state(model, config, init_key)
  step_fn = train_lib.make_train_step(model, train_key,
                                      compute_dtype=precision.compute_dtype(dtype_name))
  return dp, dp.map(step_fn, ('replicated', 'sharded'), ('replicated', 'replicated')), state


def _train_steps(config, model, dtype_name, batches):
  """Per-step losses, final params and the step's jaxpr."""
  dp, step, state = _mapped_step(config, model, dtype_name)
  rstate, losses = dp.replicate(state), []
  traced = step.trace(rstate, dp.put_batch(batches[0]))  # One trace: its jaxpr, then compiled.
  step = traced.lower().compile()
  for batch in batches:
    rstate, out = step(rstate, dp.put_batch(batch))
    losses.append(float(out['loss']))
  return np.asarray(losses), jax.device_get(rstate.params), str(traced.jaxpr)


def _batches(dataset, count, size=64):
  train = dataset.splits['train']
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    rows = rng.choice(len(train['target']), size=size, replace=False)
    batch = {'history': train['history'][rows], 'target': train['target'][rows],
             'mask': np.ones(size, bool), 'index': np.arange(size, dtype=np.int32)}
    # [local devices, rows per device, ...], the layout the loop's batches have.
    out.append({k: v.reshape((jax.local_device_count(), -1) + v.shape[1:])
                for k, v in batch.items()})
  return out


def test_bfloat16_training_follows_float32(synthetic):
  # Plain SGD: Adam's first steps move each weight by about lr * sign(gradient), which turns the
  # rounding of near-zero gradients into full-size differences.
  config = make_config(dict(synthetic, **{'model.dropout_rate': 0.0, 'train.loss': 'ce',
                                          'train.optimizer': 'sgd', 'train.learning_rate': 0.1}))
  dataset = data_lib.load(config.data)
  model = train_lib.build_model(config, dataset)
  batches = _batches(dataset, 8)
  f32_losses, f32_params, f32_jaxpr = _train_steps(config, model, 'float32', batches)
  bf16_losses, bf16_params, bf16_jaxpr = _train_steps(config, model, 'bfloat16', batches)
  # The layers really ran in bfloat16 (float32 has none), yet training follows float32: the loss
  # falls the same way (8.4 -> 4.0; measured within 0.13% of float32's at every step) ...
  assert re.search(r'bf16\[[\d,]*\] = dot_general', bf16_jaxpr)
  assert 'bf16' not in f32_jaxpr
  assert not np.array_equal(bf16_losses, f32_losses)
  assert f32_losses[-1] < 0.6 * f32_losses[0]
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=1e-2)
  # ... and the float32 master parameters move as float32's do (measured: 0.6% of the move).
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  init = flat(train_lib.init_params(model, jax.random.split(jax.random.key(config.train.seed))[0]))
  moved = np.linalg.norm(flat(f32_params) - init)
  assert np.linalg.norm(flat(bf16_params) - flat(f32_params)) < 0.03 * moved


def test_bfloat16_keeps_parameters_optimiser_state_and_loss_in_float32(synthetic):
  config = make_config(dict(synthetic, **{'train.compute_dtype': 'bfloat16'}))  # Adam.
  dataset = data_lib.load(config.data)
  model = train_lib.build_model(config, dataset)
  dp, step, state = _mapped_step(config, model, config.train.compute_dtype)
  new_state, out = jax.eval_shape(step, dp.replicate(state), dp.put_batch(_batches(dataset, 1)[0]))
  floats = [x.dtype for x in jax.tree.leaves((new_state.params, new_state.opt_state, out))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert len(floats) > 2 * len(jax.tree.leaves(state.params))  # Params, Adam's mu and nu.
  assert set(floats) == {jnp.dtype(jnp.float32)}


def _leave_one_out(synthetic):
  # Histories of 4: the batched CE's custom VJP traces one branch per length bucket (4 here).
  config = make_config(dict(synthetic, **{
      'data.protocol': 'leave_one_out', 'data.min_interactions': 3, 'data.max_len': 4,
      'train.loss': 'ce',
      'model.dropout_rate': 0.0, 'train.optimizer': 'sgd', 'train.learning_rate': 0.1}))
  dataset = data_lib.load(config.data)
  return config, dataset, train_lib.build_model(config, dataset)


def test_bfloat16_leave_one_out_full_softmax_keeps_float32_state(synthetic):
  """SASRec's batched leave-one-out CE (a custom VJP over groups of rows) traces in bfloat16."""
  config, dataset, model = _leave_one_out(synthetic)
  dp, step, state = _mapped_step(config, model, 'bfloat16')
  new_state, out = jax.eval_shape(step, dp.replicate(state),
                                  dp.put_batch(_batches(dataset, 1, size=32)[0]))
  assert {x.dtype for x in jax.tree.leaves((new_state.params, out))} == {jnp.dtype(jnp.float32)}


# Slow (compiles the leave-one-out step twice); the test above checks that it traces.
@pytest.mark.slow
def test_bfloat16_leave_one_out_full_softmax_follows_float32(synthetic):
  config, dataset, model = _leave_one_out(synthetic)
  batches = _batches(dataset, 2, size=32)
  f32_losses, _, _ = _train_steps(config, model, 'float32', batches)
  bf16_losses, _, bf16_jaxpr = _train_steps(config, model, 'bfloat16', batches)
  assert re.search(r'bf16\[[\d,]*\] = dot_general', bf16_jaxpr)
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=1e-2)


seen = []  # (what, dtype) in the order _Inner and _Outer see them.


class _Inner(nn.Module):
  """Records the dtypes it sees; a frozen float32 constant joins its input."""

  @nn.compact
  def __call__(self, x):
    seen.append(('inner input', x.dtype))
    y = nn.Dense(3, use_bias=False)(x) + jnp.ones(3, jnp.float32)
    seen.append(('inner result', y.dtype))
    return y

  def aux_loss(self, x):
    return jnp.sum(x * x)


class _Outer(nn.Module):

  @nn.compact
  def __call__(self, x):
    inner = _Inner()
    y = inner(x)
    seen.append(('outer sees', y.dtype))
    seen.append(('outer sees aux loss', inner.aux_loss(y).dtype))
    return y


def test_compute_in_runs_submodules_in_the_compute_dtype_and_returns_float32():
  model, x = _Outer(), jnp.ones((2, 4), jnp.float32)
  params = model.init(jax.random.key(0), x)['params']
  seen.clear()
  with precision.compute_in(jnp.bfloat16):
    out = model.apply({'params': precision.cast_floating(params, jnp.bfloat16)}, x)
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  # The submodule gets and returns bfloat16 (its float32 constant promotes inside it); a *loss
  # method keeps float32; the top-level model hands float32 back.
  assert seen == [('inner input', bf16), ('inner result', f32), ('outer sees', bf16),
                  ('outer sees aux loss', f32)]
  assert out.dtype == f32
  expected = np.asarray(x) @ np.asarray(params['_Inner_0']['Dense_0']['kernel'], np.float64) + 1
  np.testing.assert_allclose(out, expected, rtol=1e-2)  # bfloat16: 8 bits of mantissa.
  seen.clear()
  with precision.compute_in(jnp.float32):  # float32 intercepts nothing.
    assert model.apply({'params': params}, x).dtype == f32
  assert seen[0] == ('inner input', f32) and seen[2] == ('outer sees', f32)
  assert precision.cast_floating({'a': jnp.ones(2), 'b': jnp.arange(2)}, bf16)['b'].dtype == (
      jnp.arange(2).dtype)


def test_device_memory_statistics_where_reported():
  assert jax.default_backend() != 'cpu' or parallel.memory_stats() is None
  gpu = lambda **stats: types.SimpleNamespace(memory_stats=lambda: stats)
  two = [gpu(peak_bytes_in_use=300, bytes_in_use=100, bytes_limit=1000, num_allocs=7),
         gpu(peak_bytes_in_use=500, bytes_in_use=50, bytes_limit=900, num_allocs=9)]
  # The largest use over the devices, the smallest limit; only keys every device reports.
  assert parallel.memory_stats(two) == {'peak_bytes_in_use': 500, 'bytes_in_use': 100,
                                        'bytes_limit': 900}
  assert parallel.memory_stats([two[0], types.SimpleNamespace(memory_stats=lambda: None)]) is None
  assert parallel.describe_devices() == {'backend': jax.default_backend(),
                                         'device_kind': jax.devices()[0].device_kind,
                                         'device_count': jax.device_count()}


@pytest.mark.parametrize('overrides, message', [
    ({'train.compute_dtype': 'float16'}, "compute_dtype='float16' is not one of"),
    ({'log_every_steps': 0}, 'log_every_steps=0 must be >= 1'),
    ({'profile_steps': (0, 2)}, r'profile_steps=\(0, 2\) must be \(\) \(off\)'),
    ({'profile_steps': (5,)}, r'profile_steps=\(5,\) must be'),
    ({'data.input': 'tfdata'}, "data.input='tfdata' is not one of"),
    ({'data.grain_cache_mb': 0.0}, 'grain_cache_mb=0.0 must be > 0'),
])
def test_bad_precision_log_and_profile_fields_fail_at_start(overrides, message):
  config = make_config(overrides)
  with pytest.raises(errors.ConfigError, match=message):
    train_lib.validate_config(config, 1)


def test_unsynced_cpu_steps_with_several_devices_stay_under_the_deadlock():
  config = make_config({'sync_every_step': False, 'log_every_steps': 100})
  train_lib.validate_config(config, 1)  # One device: no collectives to deadlock.
  if jax.default_backend() == 'cpu':
    with pytest.raises(errors.ConfigError, match='log_every_steps=100 collective steps.*=16'):
      train_lib.validate_config(config, 2)
  config.log_every_steps = 16
  train_lib.validate_config(config, 2)
  config.sync_every_step, config.log_every_steps = None, 100  # Auto: every step read on CPU.
  train_lib.validate_config(config, 2)


LOWERED = '/jax/core/compile/jaxpr_to_mlir_module_duration'  # JAX's event: one jaxpr lowered.


@contextlib.contextmanager
def _lowerings():
  """The jaxprs JAX lowers (to compile or to look up in the compilation cache) inside."""
  lowered = []

  def listen(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == LOWERED:
      lowered.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield lowered
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize('mode', ['pmap', 'shard_map'])
def test_a_step_is_lowered_and_compiled_once(mode):
  """The replicated state has the placement the step gives its outputs, so the first call's
  program is every later call's. (Placed by flax's `replicate`, pmap's state lived on a mesh
  axis named '_device_put_sharded': the second call lowered and compiled the step again. That
  is JAX's tracing cache, not XLA:CPU's, so every backend paid it.)"""
  dp = parallel.DataParallel(mode)
  mapped = dp.map(lambda t: jax.tree.map(lambda v: v + 1, t), ('replicated',), 'replicated')
  state = dp.replicate({'w': np.arange(3.0, dtype=np.float32), 'step': 0})
  with _lowerings() as lowered:
    for _ in range(3):
      state = mapped(state)
  assert len(lowered) == 1
  np.testing.assert_array_equal(np.asarray(dp.unreplicate(state)['w']), [3.0, 4.0, 5.0])


def test_the_test_split_runs_the_programs_the_validation_compiled(synthetic):
  """`Evaluator.for_split`: the test pass lowers nothing (a second `Evaluator` traced and compiled
  the same eval step again) and gives the ranks a fresh test `Evaluator` gives."""
  config = make_config(synthetic)
  dataset = data_lib.load(config.data)
  model = train_lib.build_model(config, dataset)
  dp = parallel.DataParallel(config.parallelism)
  params = dp.replicate(train_lib.init_params(model, jax.random.key(0)))
  val = evaluation.Evaluator(dp, model, config, dataset, 'val')
  val_ranks = val.ranks(params)
  with _lowerings() as lowered:
    test = val.for_split('test')
    got = test.ranks(params)
  assert not lowered
  assert test.split == 'test' and val.split == 'val'
  assert len(got) == len(dataset.splits['test']['target']) != len(val_ranks)
  np.testing.assert_array_equal(
      got, evaluation.Evaluator(dp, model, config, dataset, 'test').ranks(params))
  np.testing.assert_array_equal(val.ranks(params), val_ranks)
  with pytest.raises(ValueError, match="no split 'tset' to evaluate; the dataset has"):
    val.for_split('tset')
