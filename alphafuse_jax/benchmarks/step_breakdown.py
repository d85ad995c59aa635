"""Where the reference SASRec train step's time goes on this machine.

Command:
  python -m alphafuse_jax.benchmarks.step_breakdown [--devices=2]

The reference configuration of `alphafuse_jax.benchmarks.sweep` (h=128, one reference block,
InfoNCE with 64 negatives, batch 256, N=3706, L=10) measured four ways, each in a fresh process
with the forced host device count:
  * the whole step as the training loop runs it (sweep.py's train measurement);
  * the same step with dropout off: the difference is the cost of dropout's random bits;
  * the optimizer alone: optax's update (coupled L2 + Adam) and apply_updates on the parameters;
  * the host side alone: building one numpy batch (`data.batches`) and `put_batch` (the step
    measurement includes `put_batch` of prebuilt batches, not their building).
The rest of the step is the model's forward and backward and the gradient pmean. Prints a Markdown
table of milliseconds per step and shares of the whole step.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags

from alphafuse_jax.benchmarks import loo_step
from alphafuse_jax.benchmarks import sweep  # Also defines --min_seconds, shared here.

_DEVICES = flags.DEFINE_integer('devices', 2, 'Forced host devices (one per core by default).')
_PART = flags.DEFINE_string('part', None, 'Internal: measure one part in this process.')

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POINT = dict(hidden=128, batch=256, eval_batch=1024, negatives=64, steps=5, model='reference',
             num_items=3706, max_len=10, train=True, eval='model')


def _median_seconds(fn, min_seconds: float, min_calls: int = 20) -> float:
  return statistics.median(loo_step.call_times(fn, min_seconds, min_calls))


def measure_part(part: str, min_seconds: float) -> float:
  """Seconds per step of one part, in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from alphafuse_jax import builders, data, parallel, train

  point = dict(POINT, devices=jax.device_count())
  if part in ('step', 'step_no_dropout'):
    if part == 'step_no_dropout':
      point['dropout_rate'] = 0.0
    return sweep.run_point(point, min_seconds, chunk_size=1024)['train_step_s']
  config = sweep._config(point)  # pylint: disable=protected-access
  dp = parallel.DataParallel('shard_map')
  if part == 'host':
    rng = np.random.default_rng(0)
    n = 100_000
    # pylint: disable-next=protected-access
    history, target = sweep._synthetic_history(rng, n, point['num_items'], point['max_len'])
    arrays = {'history': history, 'target': target, 'user_id': np.zeros(n, np.int32),
              'position': np.zeros(n, np.int32)}
    it = iter(())

    def one():
      nonlocal it
      batch = next(it, None)
      if batch is None:
        it = data.batches(arrays, point['batch'], seed=0, epoch=0, shuffle=True,
                          num_devices=dp.num_local_devices)
        batch = next(it)
      batch['index'] = np.arange(point['batch'], dtype=np.int32).reshape(batch['mask'].shape)
      jax.block_until_ready(dp.put_batch(batch))
    return _median_seconds(one, min_seconds)
  if part == 'optimizer':
    import types  # pylint: disable=g-import-not-at-top
    dataset = types.SimpleNamespace(num_items=point['num_items'], max_len=point['max_len'],
                                    train_item_counts=np.ones(point['num_items'], np.int64))
    language = np.random.default_rng(0).normal(
        size=(point['num_items'], sweep.LANGUAGE_DIM)) * config.text.scale
    model = builders.build_model(config, dataset, language)
    state = train.create_train_state(model, config, jax.random.key(0))
    grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 1e-3), state.params)
    update = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=(0,))
    holder = {'state': state}

    def one():
      holder['state'] = update(holder['state'], grads)
      jax.block_until_ready(holder['state'].params)
    return _median_seconds(one, min_seconds)
  raise ValueError(f'unknown part {part!r}')


def main(argv):
  del argv
  if _PART.value:
    seconds = measure_part(_PART.value, flags.FLAGS.min_seconds)
    from alphafuse_jax import parallel  # pylint: disable=g-import-not-at-top
    print('PART_RESULT', json.dumps({'seconds': seconds, **parallel.describe_devices()}))
    return
  env = dict(os.environ)
  flags_env = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                       if 'xla_force_host_platform_device_count' not in f)
  env['XLA_FLAGS'] = f'{flags_env} --xla_force_host_platform_device_count={_DEVICES.value}'
  seconds = {}
  for part in ('step', 'step_no_dropout', 'optimizer', 'host'):
    proc = subprocess.run(
        [sys.executable, '-m', 'alphafuse_jax.benchmarks.step_breakdown', f'--part={part}',
         f'--min_seconds={flags.FLAGS.min_seconds}'], cwd=_ROOT, env=env, capture_output=True,
        text=True, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith('PART_RESULT ')]
    if proc.returncode or not line:
      raise RuntimeError(f'part {part} failed:\n{proc.stderr[-3000:]}')
    result = json.loads(line[0].removeprefix('PART_RESULT '))
    seconds[part] = result['seconds']
    print(f'{part}: {seconds[part] * 1e3:.2f} ms', file=sys.stderr, flush=True)
  step = seconds['step']
  rows = [('whole train step (loop path)', step),
          ('dropout random bits (step - step without dropout)', step - seconds['step_no_dropout']),
          ('optimizer update (coupled L2 + Adam, apply)', seconds['optimizer']),
          ('host: numpy batch + put_batch', seconds['host']),
          ('rest: forward + backward + pmean (by difference)',
           seconds['step_no_dropout'] - seconds['optimizer'] - seconds['host'])]
  # Where the parts ran (the last part's process; all run alike): CPU figures are CPU-only.
  print(f'\nReference SASRec step, batch 256, on {result["device_count"]} x '
        f'{result["device_kind"]} ({result["backend"]}): {POINT["batch"] / step:,.0f} '
        'sequences/s\n')
  print('| part | ms per step | share of the step |')
  print('|---|---|---|')
  for name, value in rows:
    print(f'| {name} | {value * 1e3:.2f} | {value / step:.0%} |')


if __name__ == '__main__':
  app.run(main)
