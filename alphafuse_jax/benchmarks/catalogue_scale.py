"""Catalogue scale: the train step and the item tables' memory per device, N = 10^4 .. 10^7.

Command (about 15 minutes on a 2-core CPU; --quick for a smoke run):
  python -m alphafuse_jax.benchmarks.catalogue_scale --sizes=10000,100000,1000000,10000000
  python -m alphafuse_jax.benchmarks.catalogue_scale --sizes=10000,100000 --devices=1,8

For each device count D (--devices; forced host devices on CPU) and catalogue size N (--sizes),
one worker process (the forced device count is fixed when JAX starts, and a process's peak RSS
is its own) builds the loop's model and state as `train_and_evaluate` does, with the item tables
sharded over all D devices (`config.model_shards` = D: a ('data' 1, 'model' D) mesh) and the
sampled softmax with row-sparse item updates (K = --negatives popularity negatives, so the step
does not grow with N), and times the loop's mapped step (`train.map_train_step`: put_batch,
step, float(loss)), median of --timed_steps calls after two warm-up calls. Memory per device is read
from the arrays' shardings: the bytes of the train state (params and optimizer moments) and of
the frozen language tables on device 0, and the item tables' share of it; the process's peak RSS
is the host's view (CPU devices share one host memory, so RSS does not fall with D).

SASRec reference block, h = --hidden (AlphaFuse: k = h, n = h / 2, on random 384-d "text"
vectors, up to --alphafuse_max_items: its decomposition needs the [N, 384] vectors in float64),
L = 50, batch 256, histories and targets Zipf(1)-distributed (`catalogue._host_batches`). Prints
a Markdown table and writes catalogue_scale.json and catalogue_scale.png to --out_dir.
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

from absl import app
from absl import flags
import jax
import numpy as np

from alphafuse_jax import builders
from alphafuse_jax import parallel
from alphafuse_jax import train
from alphafuse_jax.benchmarks import catalogue
from alphafuse_jax.benchmarks import sweep
from alphafuse_jax.embeddings import base as emb_base

_DEVICES = flags.DEFINE_list('devices', ['1', '8'], 'Device counts D (tables over all D).')
_ALPHAFUSE_MAX = flags.DEFINE_integer('alphafuse_max_items', 1_000_000,
                                      'Largest N for AlphaFuse (its text vectors fit in memory).')
_STEPS = flags.DEFINE_integer('timed_steps', 10, 'Timed steps per point.')
# --sizes, --pipelines, --hidden, --negatives, --batch, --max_len: catalogue.py's flags;
# --out_dir and --quick: sweep.py's.
_SIZES, _PIPELINES = catalogue._SIZES, catalogue._PIPELINES  # pylint: disable=protected-access
_WORKER = flags.DEFINE_string('scale_worker', '', 'Internal: run one point, "pipeline,N,D".')


def _worker(spec: str) -> dict:
  """One point in this process (started with D forced host devices)."""

  pipeline, n, devices = spec.split(',')
  n, devices = int(n), int(devices)
  if jax.device_count() != devices:
    raise RuntimeError(f'worker for {devices} devices found {jax.device_count()}.')
  config = catalogue._config(pipeline, 'sampled_softmax')  # pylint: disable=protected-access
  config.train.sparse_item_updates = True
  config.model_shards = devices
  counts = catalogue.zipf_counts(n)
  max_len = catalogue._MAX_LEN.value  # pylint: disable=protected-access
  dataset = types.SimpleNamespace(num_items=n, max_len=max_len, train_item_counts=counts)
  language = None
  if pipeline != 'id':
    language = np.random.default_rng(1).normal(size=(n, catalogue.TEXT_DIM)).astype(np.float32)
    language *= np.float32(config.text.scale)
  began = time.perf_counter()
  model = builders.build_model(config, dataset, language)
  del language
  init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
  dp = parallel.DataParallel('shard_map', devices)
  # Built in place, part by part (no whole copy, also at D = 1).
  state = dp.place_state(train.create_train_state(model, config, init_key,
                                                  dp.builder(in_place=True)))
  step = train.map_train_step(dp, model, train.make_train_step(model, train_key))
  _, frozen = builders.frozen_item_tables(dp, model) if dp.sharded_items else ((), ())
  batches = catalogue._host_batches(counts)  # pylint: disable=protected-access
  build_s = time.perf_counter() - began
  times = []
  for i in range(2 + _STEPS.value):
    t0 = time.perf_counter()
    state, out = step(state, dp.put_batch(batches[i % len(batches)]))
    loss = float(np.asarray(out['loss']))
    if not np.isfinite(loss):
      raise FloatingPointError(f'{spec}: loss {loss}')
    if i >= 2:
      times.append(time.perf_counter() - t0)

  def device0_bytes(tree, tables_only=False):
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if isinstance(leaf, jax.Array) and (not tables_only or parallel.is_item_table(path)):
        total += leaf.addressable_shards[0].data.nbytes
    return total

  frozen_bytes = sum(a.addressable_shards[0].data.nbytes for a in frozen)
  if not dp.sharded_items:  # Constants of the compiled step: every device holds them whole.
    frozen_bytes = sum(t.padded.nbytes for t in emb_base.frozen_tables(model))
  return dict(pipeline=pipeline, num_items=n, devices=devices,
              step_ms=1e3 * statistics.median(times),
              state_bytes_per_device=device0_bytes(state),
              table_bytes_per_device=device0_bytes(state, tables_only=True),
              frozen_bytes_per_device=frozen_bytes,
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              build_s=build_s, loss=loss, backend=jax.default_backend(),
              device_kind=jax.devices()[0].device_kind)


def _run_point(pipeline: str, n: int, devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  cmd = [sys.executable, '-m', 'alphafuse_jax.benchmarks.catalogue_scale',
         f'--scale_worker={pipeline},{n},{devices}', f'--timed_steps={_STEPS.value}'] + _passed_flags()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{pipeline} N={n} D={devices} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _passed_flags() -> list[str]:
  """The model-shape flags given to this process, for its workers."""
  names = ('hidden', 'negatives', 'batch', 'max_len', 'sampler', 'in_batch')
  return [f'--{name}={flags.FLAGS[name].value}' for name in names if flags.FLAGS[name].present]


def markdown_table(results: list[dict]) -> str:
  lines = ['| pipeline | N | devices | step ms | state MB / device | of which item tables | '
           'frozen tables MB / device | peak RSS GB |', '|' + '---|' * 8]
  for r in results:
    lines.append(f'| {r["pipeline"]} | {r["num_items"]:,} | {r["devices"]} | {r["step_ms"]:.1f} '
                 f'| {r["state_bytes_per_device"] / 2**20:,.1f} | '
                 f'{r["table_bytes_per_device"] / 2**20:,.1f} | '
                 f'{r["frozen_bytes_per_device"] / 2**20:,.1f} | {r["peak_rss_gb"]:.2f} |')
  return '\n'.join(lines)


def plot(results: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  keys = sorted({(r['pipeline'], r['devices']) for r in results})
  for pipeline, devices in keys:
    rows = sorted((r for r in results if (r['pipeline'], r['devices']) == (pipeline, devices)),
                  key=lambda r: r['num_items'])
    label = f'{pipeline}, {devices} device{"s" if devices > 1 else ""}'
    xs = [r['num_items'] for r in rows]
    ax1.plot(xs, [r['step_ms'] for r in rows], '-o', ms=3, label=label)
    ax2.plot(xs, [(r['state_bytes_per_device'] + r['frozen_bytes_per_device']) / 2**20
                  for r in rows], '-o', ms=3, label=label)
  for ax, ylabel in ((ax1, 'train step (ms)'), (ax2, 'item state per device (MiB)')):
    ax.set_xscale('log')
    ax.set_xlabel('catalogue size N')
    ax.set_ylabel(ylabel)
  ax2.set_yscale('log')
  ax1.set_ylim(bottom=0)
  ax1.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _WORKER.value:
    print(json.dumps(_worker(_WORKER.value)), flush=True)
    return
  quick = sweep._QUICK.value  # pylint: disable=protected-access
  out_dir = sweep._OUT_DIR.value  # pylint: disable=protected-access
  if quick:  # The workers get these too (_passed_flags).
    for name, value in (('batch', 32), ('max_len', 10), ('hidden', 32), ('negatives', 16)):
      if not flags.FLAGS[name].present:
        flags.FLAGS[name].value, flags.FLAGS[name].present = value, 1
  sizes = [300, 3000] if quick else [int(s) for s in _SIZES.value]
  devices = [int(d) for d in _DEVICES.value]
  peak = sweep.matmul_rate(512 if quick else 2048)
  print(f'float32 matmul rate: {peak / 1e9:.1f} GFLOP/s', file=sys.stderr, flush=True)
  results = []
  for pipeline in _PIPELINES.value:
    for d in devices:
      for n in sizes:
        if pipeline != 'id' and n > _ALPHAFUSE_MAX.value:
          continue
        results.append(_run_point(pipeline, n, d))
        print(f'{pipeline} N={n:,} D={d}: {results[-1]["step_ms"]:.1f} ms', file=sys.stderr,
              flush=True)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'catalogue_scale.json'), 'w') as f:
    json.dump({'matmul_gflops': peak / 1e9, 'results': results}, f, indent=1)
  plot(results, os.path.join(out_dir, 'catalogue_scale.png'))
  print(f'float32 matmul rate: {peak / 1e9:.1f} GFLOP/s; sampled softmax + sparse item updates; '
        f'tables over all devices; medians of {_STEPS.value} steps.\n')
  print(markdown_table(results))


if __name__ == '__main__':
  app.run(main)
