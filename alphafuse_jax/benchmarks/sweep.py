"""Throughput benchmark: the training loop's own train and eval steps, swept over scale.

Command (full sweep; about 15 minutes on a 2-core CPU, see the report of the performance issue):
  python -m alphafuse_jax.benchmarks.sweep --out_dir=workdirs/bench
Smoke run (seconds):
  python -m alphafuse_jax.benchmarks.sweep --quick --out_dir=/tmp/bench

What is measured, for the reference SASRec (configs/default.py: h=128, 1 reference block,
InfoNCE with 64 negatives, batch 256) and the standard one (block='standard', 2 blocks), built by
`builders.build_model` as the loop builds them:
  * train: sequences/s of `train.make_train_step` mapped by `parallel.DataParallel` as the loop
    maps it (numpy batch -> put_batch -> step -> float(loss) every step: the loop's path on CPU
    with several devices; on GPU/TPU it reads the loss every config.log_every_steps, so this is a
    lower bound there), compile seconds, peak memory and achieved FLOP/s;
  * eval: examples/s of `evaluation.make_eval_step` mapped as `evaluation.Evaluator` maps it
    (ranking states, then `metrics.target_ranks_chunked` over all N items in chunks of
    min(--chunk_size, N), i.e. config.eval.item_chunk_size; batch 1024), compile s and FLOP/s.
Sweeps: catalogue size N in 10^3..10^5 (train and eval) and 10^6 (the same eval step over random
user states, `GivenStates`: the model is the one at 10^5, and its 10^6-row frozen table would be a
512 MB compile-time constant); history length L in (10, 50, 200) and device count in (1, 2, 8)
at the ML-1M catalogue size N=3706.

Each point runs in a fresh subprocess (`--worker`) with
XLA_FLAGS=--xla_force_host_platform_device_count=K, so device counts can differ and peak memory
is per point. Peak memory: `jax.Device.memory_stats()['peak_bytes_in_use']` where the backend
reports it (GPU/TPU); on CPU (None there) the growth of the process's peak RSS (`ru_maxrss`) from
just before the model is built (XLA CPU buffers, frozen tables, the host-side decomposition).
FLOPs: train steps use XLA's `compiled.cost_analysis()['flops']` (per device under shard_map,
times the device count); evaluation counts 2*B*N*h for the ranking analytically (XLA counts a scan
body once) plus the forward's cost_analysis. The float32 matmul rate is measured in the same run
(2048x2048 on one device, median of 10); every FLOP/s is also given as a fraction of it.

Every point records the backend, device kind and device count it ran on. Outputs: a Markdown
table on stdout, `bench.json` and `bench.png` in --out_dir (BENCHMARKS.md shows the plot of the
full sweep as docs/bench.png).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alphafuse_jax import builders
from alphafuse_jax import evaluation
from alphafuse_jax import files
from alphafuse_jax import parallel
from alphafuse_jax import train

_OUT_DIR = flags.DEFINE_string('out_dir', 'workdirs/bench', 'Where bench.json and bench.png go.')
_QUICK = flags.DEFINE_bool('quick', False, 'A tiny sweep that runs in seconds (smoke test).')
# 1024 was the fastest of 1024/4096/8192 for B=1024, N=10^5, h=128 on a 2-core CPU (76 vs 72
# vs 63 GFLOP/s; a plain [B, N] matmul reached 55).
_CHUNK = flags.DEFINE_integer('chunk_size', 1024, 'Max items per chunk of the full-ranking scan.')
_MIN_SECONDS = flags.DEFINE_float('min_seconds', 5.0, 'Time each measurement at least this long.')
_WORKER = flags.DEFINE_string('worker', None, 'Internal: run one point (JSON) and print it.')
_TIMEOUT = flags.DEFINE_integer('point_timeout', 900, 'Seconds before a point is abandoned.')

RESULT_PREFIX = 'BENCH_RESULT '
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LANGUAGE_DIM = 384  # all-MiniLM-L6-v2 width.
ML1M_ITEMS = 3706
MODELS = {'reference': {'block': 'reference', 'num_blocks': 1},
          'standard': {'block': 'standard', 'num_blocks': 2}}


# ---- the points of the sweep ------------------------------------------------------------------
def sweep_points(quick: bool) -> list[dict[str, Any]]:
  """Every measurement as a dict: model, num_items, max_len, devices, train (bool), eval kind."""
  if quick:
    base = dict(hidden=32, batch=32, eval_batch=64, negatives=8, steps=2)
    return [dict(base, model='reference', num_items=300, max_len=10, devices=2, train=True,
                 eval='model'),
            dict(base, model='ranking', num_items=10_000, max_len=10, devices=1, train=False,
                 eval='ranking')]
  base = dict(hidden=128, batch=256, eval_batch=1024, negatives=64, steps=5)
  points, seen = [], set()

  def add(**kw):
    key = tuple(sorted(kw.items()))
    if key not in seen:
      seen.add(key)
      points.append(dict(base, **kw))

  for model in MODELS:
    for n in (1_000, 10_000, 100_000):
      add(model=model, num_items=n, max_len=10, devices=1, train=True, eval='model')
    for length in (10, 50, 200):
      add(model=model, num_items=ML1M_ITEMS, max_len=length, devices=1, train=True, eval='model')
    for devices in (2, 8):
      add(model=model, num_items=ML1M_ITEMS, max_len=10, devices=devices, train=True,
          eval='model')
  add(model='ranking', num_items=1_000_000, max_len=10, devices=1, train=False, eval='ranking')
  # DreamRec sampling: AlphaFuse-DreamRec at h = d_l, 21-step guided DDIM, ranked over ML-1M.
  for devices in (1, 2):
    add(model='dreamrec', num_items=ML1M_ITEMS, max_len=10, devices=devices, train=False,
        eval='model', hidden=LANGUAGE_DIM)
  return points


# ---- worker: one point in this process --------------------------------------------------------
def _config(point: dict[str, Any]):
  """configs/default.py with the point's model, widths and batch sizes."""
  if _ROOT not in sys.path:  # configs/ is a top-level package of the repository.
    sys.path.insert(0, _ROOT)
  from configs import default, dreamrec  # pylint: disable=g-import-not-at-top
  config = dreamrec.get_config('alphafuse') if point['model'] == 'dreamrec' else (
      default.get_config())
  config.embedding.hidden_dim = point['hidden']
  config.eval.batch_size = point['eval_batch']
  config.data.max_len = point['max_len']
  if point['model'] == 'dreamrec':
    # Random language vectors have no near-null directions for the 0.25 threshold: take the
    # nullity it gives on ML-1M's MiniLM spectrum (111 of 384; configs/dreamrec.py) instead.
    config.embedding.null_threshold = None
    config.embedding.null_dim = 111
    return config
  model = MODELS.get(point['model'], MODELS['reference'])
  config.model.block = model['block']
  config.model.num_blocks = model['num_blocks']
  config.embedding.null_dim = point['hidden'] // 2
  config.train.batch_size = point['batch']
  # The reference's loss (configs/reference_parity.py), whatever the default config trains with.
  config.train.loss = 'infonce'
  config.train.num_negatives = point['negatives']
  if 'dropout_rate' in point:  # benchmarks/step_breakdown.py: the step without dropout.
    config.model.dropout_rate = point['dropout_rate']
  return config


def _per_device(dp, batch: dict[str, Any]) -> dict[str, Any]:
  """A host batch [B, ...] -> [local devices, B / devices, ...] (`data.batches`' layout)."""
  return {k: v.reshape((dp.num_local_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def _synthetic_history(rng, rows: int, num_items: int, max_len: int):
  """Left-padded histories int32 [rows, L] (pad id N) with lengths 1..L, and targets [rows]."""
  history = rng.integers(0, num_items, size=(rows, max_len)).astype(np.int32)
  lengths = rng.integers(1, max_len + 1, size=rows)
  history[np.arange(max_len)[None, :] < (max_len - lengths)[:, None]] = num_items
  return history, rng.integers(0, num_items, size=rows).astype(np.int32)


def _timed(fn, min_steps: int, min_seconds: float, max_steps: int = 200) -> list[float]:
  """Seconds per call of `fn` (which must block), at least min_steps and min_seconds long."""
  times = []
  start = time.perf_counter()
  while len(times) < max_steps and (len(times) < min_steps or
                                    time.perf_counter() - start < min_seconds):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _peak_memory(rss_start: int) -> tuple[int, str]:
  """Peak device memory where the backend tracks it (GPU/TPU), else the peak RSS growth (CPU)."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if all(s is not None and 'peak_bytes_in_use' in s for s in stats):
    return int(sum(s['peak_bytes_in_use'] for s in stats)), 'device peak_bytes_in_use'
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_start,
          'host ru_maxrss growth')


def _flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # Older JAX: one dict per module.
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


class GivenStates(nn.Module):
  """A stand-in model for the ranking-only point: its "histories" are the user states [B, h].

  It has no parameters; `evaluation.make_eval_step` over it times the loop's ranking alone.
  """

  def ranking_states(self, history, index):
    del index
    return history


def _train(out, dp, model, state, config, train_key, min_seconds: float):
  """Times `train.make_train_step` mapped as `train_and_evaluate` maps it; returns the params."""
  batch_size, num_items, max_len = config.train.batch_size, out['num_items'], out['max_len']
  step = dp.map(train.make_train_step(model, train_key), ('replicated', 'sharded'),
                ('replicated', 'replicated'), donate_argnums=(0,))

  def host_batch(i):
    history, target = _synthetic_history(np.random.default_rng(i), batch_size, num_items,
                                         max_len)
    return _per_device(dp, {'history': history, 'target': target, 'index': np.arange(
        batch_size, dtype=np.int32), 'mask': np.ones(batch_size, bool)})

  batches = [host_batch(i) for i in range(4)]
  rstate = dp.replicate(state)
  t0 = time.perf_counter()
  compiled = step.lower(rstate, dp.put_batch(batches[0])).compile()
  out['train_compile_s'] = time.perf_counter() - t0
  per_device = _flops(compiled)
  out['train_flops'] = per_device * dp.num_devices if per_device is not None else None
  holder = {'state': rstate, 'i': 0}

  def one_step():
    # As in train.py: numpy batch -> put_batch -> step -> float(loss) (a host sync per step).
    holder['state'], metrics_out = compiled(holder['state'],
                                            dp.put_batch(batches[holder['i'] % 4]))
    holder['i'] += 1
    loss = float(np.asarray(metrics_out['loss']))
    if not np.isfinite(loss):
      raise FloatingPointError(f'bench train loss is {loss}.')

  one_step()  # Warm-up (first execution allocates).
  times = _timed(one_step, out['steps'], min_seconds)
  out['train_step_s'] = statistics.median(times)
  out['train_steps_timed'] = len(times)
  out['train_seq_per_s'] = batch_size / out['train_step_s']
  if out['train_flops']:
    out['train_flop_per_s'] = out['train_flops'] / out['train_step_s']
  return jax.block_until_ready(holder['state'].params)


def run_point(point: dict[str, Any], min_seconds: float, chunk_size: int) -> dict[str, Any]:
  """Measures one point in this process (JAX already started with the point's device count)."""
  if jax.device_count() != point['devices']:
    raise RuntimeError(f'point wants {point["devices"]} devices, JAX has {jax.device_count()}.')
  rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  config = _config(point)
  config.eval.item_chunk_size = chunk_size
  num_items, max_len, hidden = point['num_items'], point['max_len'], point['hidden']
  rng = np.random.default_rng(0)
  dp = parallel.DataParallel('shard_map')
  # The chunk the eval step ranks with (evaluation.make_eval_step: min(item_chunk_size, N)).
  out = dict(point, **parallel.describe_devices(), chunk_size=min(chunk_size, num_items))
  eval_batch = config.eval.batch_size
  history, target = _synthetic_history(rng, eval_batch, num_items, max_len)
  host = {'history': history, 'target': target, 'index': np.arange(eval_batch, dtype=np.int32)}

  if point['eval'] == 'ranking':
    # The ranking alone, over random user states (see the module docstring).
    model, params, forward_flops = GivenStates(), {}, 0.0
    table = dp.replicate(rng.normal(size=(num_items, hidden)).astype(np.float32))
    host['history'] = rng.normal(size=(eval_batch, hidden)).astype(np.float32)
  else:
    dataset = types.SimpleNamespace(num_items=num_items, max_len=max_len,
                                    train_item_counts=np.ones(num_items, np.int64))
    language = rng.normal(size=(num_items, LANGUAGE_DIM)) * config.text.scale
    model = builders.build_model(config, dataset, language)
    del language
    init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
    state = train.create_train_state(model, config, init_key)
    out['params'] = train.count_params(state.params)
    if point['train']:
      params = _train(out, dp, model, state, config, train_key, min_seconds)
    else:
      params = dp.replicate(state.params)
    # As evaluation.Evaluator (shard_map): the eval-mode table from the replicated params.
    table = jax.jit(lambda p: model.apply({'params': p}, deterministic=True,
                                          method='item_table'))(params)
    forward = jax.jit(lambda p, h: model.apply({'params': p}, h, deterministic=True))
    forward_flops = _flops(forward.lower(
        params, jnp.zeros((eval_batch, max_len), jnp.int32)).compile()) or 0.0

  # The loop's eval step (evaluation.make_eval_step), mapped as evaluation.Evaluator maps it.
  evaluate = dp.map(evaluation.make_eval_step(model, chunk_size=config.eval.item_chunk_size),
                    ('replicated', 'replicated', 'sharded'), 'sharded')
  host = _per_device(dp, host)
  t0 = time.perf_counter()
  compiled_eval = evaluate.lower(params, table, dp.put_batch(host)).compile()
  out['eval_compile_s'] = time.perf_counter() - t0

  def one_eval():
    dp.get_sharded(compiled_eval(params, table, dp.put_batch(host)))

  one_eval()
  times = _timed(one_eval, min(point['steps'], 3), min_seconds)
  out['eval_batch_s'] = statistics.median(times)
  out['eval_examples_per_s'] = eval_batch / out['eval_batch_s']
  out['eval_flops'] = 2.0 * eval_batch * num_items * hidden + forward_flops
  if point['model'] == 'dreamrec':
    # The sampler's fori_loop body is counted once by XLA: add its denoiser calls analytically.
    # Per row and call: timestep MLP 2 * (256 h + h^2) + Linear(3h -> h) 2 * 3h * h.
    steps = config.diffusion.timesteps // config.diffusion.sampling_stride + 1  # 21
    calls = 2 * steps  # Guided: a conditional and an unconditional row per step.
    out['eval_flops'] += eval_batch * calls * (8.0 * hidden ** 2 + 512.0 * hidden)
  out['eval_flop_per_s'] = out['eval_flops'] / out['eval_batch_s']

  out['peak_memory_bytes'], out['peak_memory_kind'] = _peak_memory(rss_start)
  return out


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
  """float32 FLOP/s of a jitted size x size matmul on one device (median of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  times = _timed(lambda: jax.block_until_ready(mm(a, b)), repeats, 0.0, max_steps=repeats)
  return 2.0 * size ** 3 / statistics.median(times)


# ---- orchestrator -----------------------------------------------------------------------------
def run_subprocess(point: dict[str, Any], timeout: int) -> dict[str, Any]:
  """Runs one point in a fresh Python with the point's forced host device count."""
  env = dict(os.environ)
  flags_env = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                       if 'xla_force_host_platform_device_count' not in f)
  env['XLA_FLAGS'] = f'{flags_env} --xla_force_host_platform_device_count={point["devices"]}'
  cmd = [sys.executable, '-m', 'alphafuse_jax.benchmarks.sweep', f'--worker={json.dumps(point)}',
         f'--min_seconds={_MIN_SECONDS.value}', f'--chunk_size={_CHUNK.value}']
  try:
    proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(point, error=f'timed out after {timeout} s')
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return dict(point, error=f'exit {proc.returncode}: ' + ' | '.join(tail))


def _fmt(value, spec: str, scale: float = 1.0) -> str:
  return '-' if value is None else format(value / scale, spec)


def markdown_table(results: list[dict[str, Any]], peak: float) -> str:
  """One row per point; FLOP/s also as a percentage of the measured matmul rate."""
  head = ('| model | N | L | dev | train seq/s | step ms | compile s | train GFLOP/s '
          '| % mm | eval ex/s | eval GFLOP/s | % mm | eval compile s | peak mem MiB |')
  lines = [head, '|' + '---|' * 14]
  for r in results:
    if 'error' in r:
      lines.append(f'| {r["model"]} | {r["num_items"]} | {r["max_len"]} | {r["devices"]} | '
                   f'error: {r["error"][:120]} |' + ' |' * 9)
      continue
    tf, ef = r.get('train_flop_per_s'), r.get('eval_flop_per_s')
    lines.append(' | '.join([
        f'| {r["model"]}', str(r['num_items']), str(r['max_len']), str(r['devices']),
        _fmt(r.get('train_seq_per_s'), '.0f'), _fmt(r.get('train_step_s'), '.1f', 1e-3),
        _fmt(r.get('train_compile_s'), '.1f'), _fmt(tf, '.2f', 1e9),
        _fmt(None if tf is None else 100 * tf / peak, '.1f'),
        _fmt(r.get('eval_examples_per_s'), '.0f'), _fmt(ef, '.2f', 1e9),
        _fmt(None if ef is None else 100 * ef / peak, '.1f'),
        _fmt(r.get('eval_compile_s'), '.1f'), _fmt(r.get('peak_memory_bytes'), '.0f', 2 ** 20),
    ]) + ' |')
  return '\n'.join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
  """Four panels: train seq/s and eval ex/s vs N, train seq/s vs L and vs devices."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  ok = [r for r in results if 'error' not in r]
  models = sorted({r['model'] for r in ok})
  base_len = min((r['max_len'] for r in ok), default=10)
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  panels = [
      (axes[0, 0], 'num_items', 'train_seq_per_s', 'catalogue size N', 'train sequences/s',
       lambda r: r['max_len'] == base_len and r['devices'] == 1),
      (axes[0, 1], 'num_items', 'eval_examples_per_s', 'catalogue size N', 'eval examples/s',
       lambda r: r['max_len'] == base_len and r['devices'] == 1),
      (axes[1, 0], 'max_len', 'train_seq_per_s', 'history length L', 'train sequences/s',
       lambda r: r['devices'] == 1),
      (axes[1, 1], 'devices', 'train_seq_per_s', 'host devices', 'train sequences/s',
       lambda r: r['max_len'] == base_len),
  ]
  for ax, x_key, y_key, x_label, y_label, keep in panels:
    for model in models:
      rows = [r for r in ok if r['model'] == model and keep(r) and r.get(y_key)]
      if x_key != 'num_items' and rows:  # L and device sweeps share one catalogue size.
        common = max({r['num_items'] for r in rows},
                     key=lambda n: sum(r['num_items'] == n for r in rows))
        rows = [r for r in rows if r['num_items'] == common]
      rows.sort(key=lambda r: r[x_key])
      if rows:
        ax.plot([r[x_key] for r in rows], [r[y_key] for r in rows], '-o', ms=4, label=model)
    ax.set_xscale('log')
    ax.set_yscale('log')
    if x_key == 'devices':  # Few integer values: label them plainly (1, 2, 8), not as 2x10^0.
      ticks = sorted({x for line in ax.lines for x in line.get_xdata()})
      ax.set_xticks(ticks, [str(int(t)) for t in ticks])
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, which='both', alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  files.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=110), mode='wb')
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _WORKER.value:
    result = run_point(json.loads(_WORKER.value), _MIN_SECONDS.value, _CHUNK.value)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return
  if _CHUNK.value < 1:
    raise app.UsageError(f'--chunk_size={_CHUNK.value} must be >= 1.')
  out_dir = os.path.abspath(_OUT_DIR.value)
  os.makedirs(out_dir, exist_ok=True)
  if _QUICK.value and not flags.FLAGS['min_seconds'].present:
    flags.FLAGS.min_seconds = 0.0
  size = 512 if _QUICK.value else 2048
  peak, device = matmul_rate(size), parallel.describe_devices()
  where = f'{device["backend"]}, {device["device_kind"]}'
  print(f'float32 matmul rate ({where}, one device): {peak / 1e9:.1f} GFLOP/s', file=sys.stderr,
        flush=True)
  results = []
  for i, point in enumerate(sweep_points(_QUICK.value)):
    t0 = time.perf_counter()
    result = run_subprocess(point, _TIMEOUT.value)
    results.append(result)
    status = result.get('error', 'ok')
    print(f'[{i + 1}] {point["model"]} N={point["num_items"]} L={point["max_len"]} '
          f'devices={point["devices"]}: {status} ({time.perf_counter() - t0:.0f} s)',
          file=sys.stderr, flush=True)
  table = markdown_table(results, peak)
  memory_kind = next((r['peak_memory_kind'] for r in results if 'peak_memory_kind' in r), '-')
  print(f'float32 matmul rate: {peak / 1e9:.1f} GFLOP/s ({size}x{size} on one {where} device; '
        f'"% mm" columns are fractions of it). Train FLOPs: XLA cost_analysis; eval FLOPs: '
        f'2*B*N*h + forward cost_analysis. Peak memory: {memory_kind}.\n')
  print(table)
  record = dict(matmul_flop_per_s=peak, matmul_device=device, results=results, quick=_QUICK.value)
  files.write_json(os.path.join(out_dir, 'bench.json'), record)
  plot(results, os.path.join(out_dir, 'bench.png'))
  if any('error' in r for r in results):
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
