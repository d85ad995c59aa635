"""The leave-one-out train step: its speed, where its time goes, and a side-by-side with old code.

Commands:
  python -m alphafuse_jax.benchmarks.loo_step                  # this tree: sequences/s + breakdown
  git worktree add /tmp/af_96c4bd6 96c4bd6                      # once: the code to compare with
  python alphafuse_jax/benchmarks/loo_step.py --baseline=/tmp/af_96c4bd6 --rounds=3

The configuration is configs/leave_one_out.py (SASRec-ID, 2 standard blocks, 1 head, h = 128,
L = 200, dropout 0.2, full-softmax CE at every position, batch 128) on ML-1M-shaped synthetic
data: N = 3,416 items (5-core ML-1M), history lengths drawn from ML-1M's (`ML1M_HISTORY_QUANTILES`:
every 5th percentile of min(len - 3, 200) over its 6,040 users; 53% of positions count).

Every measurement runs in a fresh worker process (`--worker`) with the forced host device count,
on a tree given by PYTHONPATH: the side-by-side alternates baseline and this tree, round after
round (A B A B ...), so both see the same machine load. A `step` worker runs the train step as
train.py maps it (shard_map over `--devices`, put_batch, step, read the loss) on 20 fixed
batches from the same initial parameters and keys, prints the 20 losses and the step times. The
comparison reports the largest loss difference and the ratio of median step times, with the
float32 matmul rate measured in the same sitting. The breakdown times, each in its own worker:
  * the whole step; the step with dropout off (dropout's cost by difference);
  * the per-position full-softmax CE alone, forward and backward, as the step computes it (the
    dense CE vmapped over rows in 96c4bd6; the chunked CE with its gradient over the batch);
  * the optimizer update (coupled L2 + Adam, apply) alone; the host (numpy batch + put_batch);
  * the rest, the encoder's forward and backward, by difference.
The worker speaks both the redesigned API (`builders`, `make_train_step(model, key)`) and the
older one of 96c4bd6 (`train.build_model`, `make_train_step(model, config, key, per_position)`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT = 'LOO_RESULT '
NUM_ITEMS, MAX_LEN, BATCH = 3416, 200, 128
# min(len - 3, 200) of ML-1M's users at percentiles 0, 5, ..., 100 (len - 3: the train example's
# history under leave-one-out; 26% of users fill all 200 positions).
ML1M_HISTORY_QUANTILES = (17, 20, 24, 29, 35, 41, 48, 57, 67, 78, 93, 106, 123, 145, 170, 200,
                          200, 200, 200, 200, 200)
LOSS_STEPS = 20
PARTS = ('step', 'step_no_dropout', 'ce', 'optimizer', 'host')


# ---- worker: runs inside the tree on PYTHONPATH ----------------------------------------------
def synthetic_batches(count: int, seed: int = 0, batch: int = BATCH):
  """`count` host batches {history [B, L], target [B], mask [B], index [B]} (numpy, no JAX)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    lengths = np.interp(rng.random(batch), np.linspace(0, 1, len(ML1M_HISTORY_QUANTILES)),
                        ML1M_HISTORY_QUANTILES).round().astype(int)
    history = rng.integers(0, NUM_ITEMS, size=(batch, MAX_LEN)).astype(np.int32)
    history[np.arange(MAX_LEN)[None, :] < (MAX_LEN - lengths)[:, None]] = NUM_ITEMS
    out.append({'history': history,
                'target': rng.integers(0, NUM_ITEMS, size=batch).astype(np.int32),
                'mask': np.ones(batch, bool), 'index': np.arange(batch, dtype=np.int32)})
  return out


def _api():
  """(build_model(config, dataset), create_train_state, make_step(model, config, key)) of the
  tree on sys.path: the redesigned one or 96c4bd6's."""
  from alphafuse_jax import train  # pylint: disable=g-import-not-at-top
  try:
    from alphafuse_jax import builders  # pylint: disable=g-import-not-at-top
  except ImportError:  # 96c4bd6: the factory lives in train.py, the step takes the protocol.
    return (lambda config, dataset: train.build_model(config, dataset, None),
            train.create_train_state,
            lambda model, config, key: train.make_train_step(model, config, key,
                                                             per_position=True))
  return (lambda config, dataset: builders.build_model(config, dataset, None),
          train.create_train_state, lambda model, config, key: train.make_train_step(model, key))


def call_times(fn, min_seconds: float, min_calls: int) -> list[float]:
  """Seconds of each call of fn after one warm-up call: at least min_calls, for min_seconds.

  (Self-contained: the worker runs on whichever tree PYTHONPATH names, old code included.)"""
  fn()  # Warm-up.
  times, start = [], time.perf_counter()
  while len(times) < min_calls or time.perf_counter() - start < min_seconds:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def run_worker(part: str, dropout: bool, min_seconds: float) -> dict:
  """Measures one part in this process (JAX started with the forced device count)."""
  import types  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import alphafuse_jax  # pylint: disable=g-import-not-at-top
  from alphafuse_jax import losses, parallel  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(alphafuse_jax.__file__))))
  from configs import leave_one_out  # pylint: disable=g-import-not-at-top

  out = {'part': part, 'tree': os.path.dirname(os.path.dirname(alphafuse_jax.__file__)),
         'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
         'device_kind': jax.devices()[0].device_kind}
  config = leave_one_out.get_config()
  if not dropout or part == 'step_no_dropout':
    config.model.dropout_rate = 0.0
  build, create_state, make_step = _api()
  dataset = types.SimpleNamespace(num_items=NUM_ITEMS, max_len=MAX_LEN,
                                  train_item_counts=np.ones(NUM_ITEMS, np.int64))
  model = build(config, dataset)
  init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
  state = create_state(model, config, init_key)
  dp = parallel.DataParallel('shard_map')
  devices = dp.num_local_devices
  per_device = lambda b: {k: v.reshape((devices, -1) + v.shape[1:]) for k, v in b.items()}
  batches = [per_device(b) for b in synthetic_batches(LOSS_STEPS)]

  if part in ('step', 'step_no_dropout'):
    import inspect  # pylint: disable=g-import-not-at-top
    from alphafuse_jax import train  # pylint: disable=g-import-not-at-top
    # Whether the step calls the model's batch-level loss (else rows, vmapped, in the step).
    out['batch_level'] = 'batch_example_loss' in inspect.getsource(train.make_train_step)
    step = dp.map(make_step(model, config, train_key), ('replicated', 'sharded'),
                  ('replicated', 'replicated'), donate_argnums=(0,))
    rstate = dp.replicate(state)
    t0 = time.perf_counter()
    compiled = step.lower(rstate, dp.put_batch(batches[0])).compile()
    out['compile_s'] = time.perf_counter() - t0
    out['losses'], out['step_s'] = [], []
    start = time.perf_counter()
    # The 20 loss steps; then (min_seconds > 0) the same batches again until that much time.
    while len(out['step_s']) < LOSS_STEPS or time.perf_counter() - start < min_seconds:
      t0 = time.perf_counter()  # As train.py: put_batch -> step -> read the loss (a sync).
      rstate, metrics = compiled(rstate, dp.put_batch(batches[len(out['step_s']) % LOSS_STEPS]))
      loss = float(np.asarray(metrics['loss']))
      out['step_s'].append(time.perf_counter() - t0)
      if len(out['losses']) < LOSS_STEPS:
        out['losses'].append(loss)
    out['step_s'] = out['step_s'][2:]  # The first two steps allocate.
    out['seconds'] = statistics.median(out['step_s'])
    return out
  if part == 'ce':  # On every device at once, each with its rows, as in the step.
    batch = dp.put_batch(batches[0])
    states = dp.put_batch({'s': np.random.default_rng(1).normal(
        size=(devices, BATCH // devices, MAX_LEN, 128)).astype(np.float32)})['s']
    table = jnp.asarray(np.random.default_rng(2).normal(size=(NUM_ITEMS, 128)) * 0.05,
                        jnp.float32)

    def ce(states, table, batch):
      targets, valid = losses.positional_targets(batch['history'], batch['target'], NUM_ITEMS)
      weights, targets = valid.astype(jnp.float32), jnp.where(valid, targets, 0)
      try:  # The batch-level CE and its gradient.
        from alphafuse_jax import chunked_ce  # pylint: disable=g-import-not-at-top
        return chunked_ce.chunked_ce_with_gradient(states, table, targets, weights)[1:]
      except ImportError:
        pass
      per_row = lambda s, e: jnp.sum(jax.vmap(lambda s, t: losses.per_example_loss(
          'ce', s, t, e, num_items=NUM_ITEMS))(s, targets) * weights)  # 96c4bd6: rows, dense.
      return jax.grad(per_row, (0, 1))(states, table)

    grad = dp.map(ce, ('sharded', 'replicated', 'sharded'), ('sharded', 'sharded'))
    times = call_times(lambda: jax.block_until_ready(grad(states, table, batch)),
                            min_seconds, 5)
    out['seconds'] = statistics.median(times)
    return out
  if part == 'optimizer':
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
    update = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=(0,))
    holder = {'state': state}

    def one():
      holder['state'] = update(holder['state'], grads)
      jax.block_until_ready(holder['state'].params)
    out['seconds'] = statistics.median(call_times(one, min_seconds, 20))
    return out
  if part == 'host':
    count = {'i': 0}

    def one():
      count['i'] += 1
      batch = per_device(synthetic_batches(1, seed=count['i'])[0])
      jax.block_until_ready(dp.put_batch(batch))
    out['seconds'] = statistics.median(call_times(one, min_seconds, 20))
    return out
  if part == 'matmul':
    size = 2048
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    mm = jax.jit(jnp.matmul)
    times = call_times(lambda: jax.block_until_ready(mm(a, a)), 0.0, 10)
    out['flop_per_s'] = 2.0 * size ** 3 / statistics.median(times)
    return out
  raise ValueError(f'unknown part {part!r}')


# ---- orchestrator: no JAX here ---------------------------------------------------------------
def run_subprocess(tree: str, part: str, devices: int, dropout: bool, min_seconds: float) -> dict:
  """One worker in a fresh Python on `tree` (PYTHONPATH) with `devices` host devices."""
  env = dict(os.environ, PYTHONPATH=tree)
  flags = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                   if 'xla_force_host_platform_device_count' not in f)
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  worker = json.dumps({'part': part, 'dropout': dropout, 'min_seconds': min_seconds})
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--worker={worker}'],
                        cwd=tree, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
  if proc.returncode or not lines:
    raise RuntimeError(f'{part} on {tree} failed:\n{proc.stderr[-3000:]}')
  result = json.loads(lines[-1].removeprefix(RESULT))
  if os.path.realpath(result['tree']) != os.path.realpath(tree):
    raise RuntimeError(f'the worker imported {result["tree"]}, not {tree}: check PYTHONPATH.')
  return result


def breakdown(tree: str, devices: int, min_seconds: float) -> dict[str, float]:
  """Seconds per step of each part on `tree` (the steps timed for min_seconds too)."""
  return {part: run_subprocess(tree, part, devices, True, min_seconds)['seconds']
          for part in PARTS}


def breakdown_table(seconds: dict[str, float], title: str) -> str:
  step = seconds['step']
  rows = [('whole train step (loop path: put_batch, step, read the loss)', step),
          ('dropout (step - step without dropout)', step - seconds['step_no_dropout']),
          ('per-position full-softmax CE, forward + backward (alone)', seconds['ce']),
          ('optimizer update (coupled L2 + Adam, apply)', seconds['optimizer']),
          ('host: numpy batch + put_batch', seconds['host']),
          ('rest: encoder forward + backward, pmean (by difference)',
           seconds['step_no_dropout'] - seconds['ce'] - seconds['optimizer'] - seconds['host'])]
  lines = [f'{title}: {BATCH / step:,.1f} sequences/s', '', '| part | ms per step | share |',
           '|---|---|---|']
  lines += [f'| {name} | {value * 1e3:.1f} | {value / step:.0%} |' for name, value in rows]
  return '\n'.join(lines)


def side_by_side(baseline: str, candidate: str, rounds: int, devices: int, dropout: bool) -> str:
  """A B A B ...: step times and losses of two trees, and the matmul rate, every round."""
  runs = {baseline: [], candidate: []}
  rates = []
  for r in range(rounds):
    for tree in (baseline, candidate):
      runs[tree].append(run_subprocess(tree, 'step', devices, dropout, 0.0))
      print(f'round {r + 1} {tree}: {runs[tree][-1]["seconds"] * 1e3:.0f} ms per step',
            file=sys.stderr, flush=True)
    rates.append(run_subprocess(candidate, 'matmul', 1, dropout, 0.0)['flop_per_s'])
  diff = max(abs(a - b) for old, new in zip(runs[baseline], runs[candidate])
             for a, b in zip(old['losses'], new['losses']))
  median = {t: statistics.median(s for run in v for s in run['step_s']) for t, v in runs.items()}
  best = {t: min(run['seconds'] for run in v) for t, v in runs.items()}
  ran_on = runs[candidate][0]
  lines = [f'backend {ran_on["platform"]} ({ran_on["device_kind"]}), '
           f'{rounds} rounds (A B A B ...), {devices} host device(s), dropout '
           f'{"0.2" if dropout else "off"}, {LOSS_STEPS} steps each, float32 matmul rate '
           f'{statistics.median(rates) / 1e9:.1f} GFLOP/s (median of the rounds: '
           f'{", ".join(f"{x / 1e9:.1f}" for x in rates)})', '',
           '| tree | median step ms | best round ms | sequences/s (median) | per round ms | '
           'compile s |', '|---|---|---|---|---|---|']
  for tree, label in ((baseline, f'baseline {baseline}'), (candidate, f'candidate {candidate}')):
    label += ' (batch-level loss)' if runs[tree][0].get('batch_level') else ' (per-row loss)'
    per_round = ', '.join(f'{run["seconds"] * 1e3:.0f}' for run in runs[tree])
    compile_s = statistics.median(run['compile_s'] for run in runs[tree])
    lines.append(f'| {label} | {median[tree] * 1e3:.0f} | {best[tree] * 1e3:.0f} | '
                 f'{BATCH / median[tree]:.1f} | {per_round} | {compile_s:.1f} |')
  lines += ['', f'speed-up (median step time ratio): {median[baseline] / median[candidate]:.2f}x;'
            f' best rounds: {best[baseline] / best[candidate]:.2f}x',
            f'largest loss difference over {LOSS_STEPS} steps x {rounds} rounds: {diff:.2e} '
            f'(losses {runs[candidate][0]["losses"][0]:.6f} ... '
            f'{runs[candidate][0]["losses"][-1]:.6f})']
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--baseline', help='a tree to compare with (a git worktree)')
  parser.add_argument('--candidate', default=ROOT, help='the tree compared (default: this one)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--devices', type=int, default=2, help='forced host devices (main.py: 1 '
                      'per core)')
  parser.add_argument('--no_dropout', action='store_true', help='compare with dropout off')
  parser.add_argument('--breakdown', action='store_true', help='with --baseline: break both down')
  parser.add_argument('--min_seconds', type=float, default=5.0)
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    # Run by path, this file's folder leads sys.path: the tree comes from PYTHONPATH alone.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
      sys.path.pop(0)
    # An editable install's finder would fill modules the tree lacks from the installed checkout.
    sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(
        f, '__module__', '') and '__editable__' not in type(f).__module__]
    spec = json.loads(args.worker)
    print(RESULT + json.dumps(run_worker(spec['part'], spec['dropout'], spec['min_seconds'])))
    return
  if args.baseline:
    print(side_by_side(os.path.abspath(args.baseline), os.path.abspath(args.candidate),
                       args.rounds, args.devices, not args.no_dropout))
  if not args.baseline or args.breakdown:
    trees = ([os.path.abspath(args.baseline)] if args.baseline else []) + [
        os.path.abspath(args.candidate)]
    for tree in trees:
      print('\n' + breakdown_table(breakdown(tree, args.devices, args.min_seconds),
                                   f'{tree}, {args.devices} host device(s)'))


if __name__ == '__main__':
  main()
