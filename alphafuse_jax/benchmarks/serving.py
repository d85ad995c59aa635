"""Benchmark: serving latency and throughput of top-K recommendation (`serving.Recommender`).

Command:
  python -m alphafuse_jax.benchmarks.serving [--sizes=3706,1000000] [--requests=1000]
      [--workdir=W]  # also a trained run, at its own N

For each catalogue size N a SASRec (the reference block, hidden 128, L = 10, as
configs/default.py) over a random N x 128 item table (no training: scores do not depend on how
the table was learned) answers
  * one history's top-K `--requests` times, one request after another: p50 and p99 latency of the
    jit-compiled path (history ids in, top-K ids and scores back on the host), and of the Python
    API (`Recommender.recommend`: keys in, keys, titles and scores out);
  * batches of `--batch` histories for at least `--batch_seconds`: histories per second.
The float32 matmul rate of the same device is measured in the same run, before and after (on a
shared machine it moves with the other jobs); "% mm" is the batch's scoring FLOPs (2 * B * N * d)
per second as a fraction of the higher of the two.
"""

from __future__ import annotations

import platform
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from alphafuse_jax import builders
from alphafuse_jax import inference_artifacts
from alphafuse_jax import parallel
from alphafuse_jax import serving
from alphafuse_jax import train
from alphafuse_jax.benchmarks import sweep
from configs import default

_SIZES = flags.DEFINE_list('sizes', ['3706', '1000000'], 'Catalogue sizes N (synthetic).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Also measure this trained run.')
_REQUESTS = flags.DEFINE_integer('requests', 1000, 'Single-history requests per size.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Histories per batch for the throughput.')
_BATCH_SECONDS = flags.DEFINE_float('batch_seconds', 5.0, 'Minimum time of the batch loop.')
_K = flags.DEFINE_integer('k', 10, 'Items per recommendation.')
_CHUNK = flags.DEFINE_integer('top_k_chunk', serving.recommender.DEFAULT_CHUNK_SIZE,
                              'Items scored per top-K step.')
_MATMUL = flags.DEFINE_integer('matmul_size', 2048, 'Size of the matmul-rate probe.')


def synthetic_recommender(num_items: int, chunk_size: int) -> serving.Recommender:
  """configs/default.py's SASRec over a random ID table of `num_items` rows (never trained)."""
  config = default.get_config()
  config.embedding.pipeline, config.embedding.id_init = 'id', 'normal'
  keys = [f'item-{i}' for i in range(num_items)]
  artifacts = inference_artifacts.Artifacts(
      config=config, num_items=num_items, max_len=config.data.max_len, item_keys=keys,
      item_fields=[{'title': k} for k in keys], train_item_counts=np.ones(num_items, np.int64),
      language=None, text_map=None, text={})
  model = builders.build_model(config, artifacts, None, for_training=False)
  params = jax.jit(lambda key: train.init_params(model, key))(jax.random.key(0))
  catalogue = serving.Catalogue(keys, artifacts.item_fields)
  return serving.Recommender(artifacts, model, params, catalogue, chunk_size=chunk_size)


def measure(rec: serving.Recommender, label: str) -> dict:
  """Latency percentiles of single requests and batch throughput of one recommender."""
  rng = np.random.default_rng(0)
  n, k = rec.num_items, min(_K.value, rec.num_items)
  chunks, _ = rec.scoring_table()
  jax.block_until_ready(chunks)
  histories = [list(rng.integers(0, n, size=rec.max_len)) for _ in range(_REQUESTS.value)]
  padded = [rec.pad_histories([h], exclude_seen=False)[0] for h in histories]
  start = time.perf_counter()
  rec.top_k_arrays(padded[0], None, k)  # Compiles.
  compile_s = time.perf_counter() - start
  jit_times = []
  for history in padded:
    t0 = time.perf_counter()
    rec.top_k_arrays(history, None, k)  # Blocks: the results come back as numpy.
    jit_times.append(time.perf_counter() - t0)
  api_times = []
  names = [[rec.catalogue.keys[i] for i in h] for h in histories]
  for history in names:
    t0 = time.perf_counter()
    rec.recommend(history, k=k)
    api_times.append(time.perf_counter() - t0)
  batch = [histories[i % len(histories)] for i in range(_BATCH.value)]
  batch_history, _ = rec.pad_histories(batch, exclude_seen=False)
  rec.top_k_arrays(batch_history, None, k)  # Compiles the batch shape.
  count, start = 0, time.perf_counter()
  while count == 0 or time.perf_counter() - start < _BATCH_SECONDS.value:
    rec.top_k_arrays(batch_history, None, k)
    count += 1
  batch_s = (time.perf_counter() - start) / count
  dim = int(chunks.shape[-1])
  ms = lambda times, q: 1e3 * float(np.percentile(times, q))
  return {'label': label, 'num_items': n, 'dim': dim, 'compile_s': compile_s,
          'p50_ms': ms(jit_times, 50), 'p99_ms': ms(jit_times, 99),
          'api_p50_ms': ms(api_times, 50), 'api_p99_ms': ms(api_times, 99),
          'histories_per_s': _BATCH.value / batch_s,
          'batch_flop_per_s': 2.0 * _BATCH.value * n * dim / batch_s,
          'table_mb': n * dim * 4 / 2**20}


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  peak = sweep.matmul_rate(_MATMUL.value)
  device = parallel.describe_devices()
  rows = []
  if _WORKDIR.value:
    rows.append(measure(serving.Recommender.from_workdir(_WORKDIR.value, chunk_size=_CHUNK.value),
                        f'trained ({_WORKDIR.value})'))
  for size in _SIZES.value:
    rows.append(measure(synthetic_recommender(int(size), _CHUNK.value), 'random table'))
  # Measured again at the end: on a shared machine the rate moves with the other jobs.
  peak_end = sweep.matmul_rate(_MATMUL.value)
  print(f'\nServing top-{_K.value} on {device["backend"]} ({device["device_kind"]}, '
        f'{platform.processor() or platform.machine()}), one of {device["device_count"]} '
        f'device(s); SASRec reference block, '
        f'L=10; chunk {_CHUNK.value} items; {_REQUESTS.value} single requests; batches of '
        f'{_BATCH.value}. float32 matmul rate ({_MATMUL.value}x{_MATMUL.value}): '
        f'{peak / 1e9:.1f} GFLOP/s before, {peak_end / 1e9:.1f} after; "% mm" uses the higher.\n')
  peak = max(peak, peak_end)
  print('| items N | table | d | compile s | p50 ms | p99 ms | API p50 ms | API p99 ms | '
        f'batch {_BATCH.value}: histories/s | % mm |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["num_items"]:,} | {r["label"]} ({r["table_mb"]:.0f} MB) | {r["dim"]} | '
          f'{r["compile_s"]:.2f} | {r["p50_ms"]:.2f} | {r["p99_ms"]:.2f} | '
          f'{r["api_p50_ms"]:.2f} | {r["api_p99_ms"]:.2f} | {r["histories_per_s"]:,.0f} | '
          f'{100 * r["batch_flop_per_s"] / peak:.0f}% |')


if __name__ == '__main__':
  app.run(main)
