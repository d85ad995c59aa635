"""Catalogue-size benchmark: the loop's train step with the sampled softmax at N = 10^4 .. 10^6.

Command (about 10 minutes on a 2-core CPU; put it under `nice -n 10` on a shared machine):
  python -m alphafuse_jax.benchmarks.catalogue
Smoke run (seconds):
  python -m alphafuse_jax.benchmarks.catalogue --quick

What is measured, in this process on one host device, for each item pipeline (--pipelines: 'id',
and 'alphafuse' on random 384-d "text" vectors) and catalogue size N (--sizes): SASRec (reference
block, h = 128, L = 50, batch 256) built by `builders.build_model` as the loop builds it, trained
with loss='sampled_softmax' (K = --negatives shared negatives from --sampler, optionally in-batch
negatives); train item counts and targets Zipf(1)-distributed. Per point:
  * step: `train.make_train_step` mapped by `parallel.DataParallel` as `train_and_evaluate` maps
    it (numpy batch -> put_batch -> step -> float(loss));
  * grads: the step's loss and gradient alone (train table + `batch_example_loss`, weighted mean),
    jitted; it includes the dense [N + 1, d] cotangent of the embedding lookups;
  * grads, tables frozen: the same without the item tables' gradient (all other parameters'
    gradients): flat in N when the loss and the backbone do not grow with N;
  * optimizer: `train.make_optimizer`'s update (coupled L2 + Adam) and apply on the full
    parameters with zero gradients (what the step adds after the gradient);
  * compile seconds of the step, the bytes it accesses (XLA's cost analysis) and the trainable
    parameter count.
The sizes are timed round-robin (one block of steps per size per round, --rounds rounds), so a
change of machine load hits every size alike; the medians and their ratio to the smallest N are
printed with the float32 matmul rate. 'ce' (the full softmax) is timed too up to --ce_max_items,
for the "which loss" comparison. Also written to --out_dir/catalogue.json.

--sparse_item_updates times the same sampled-softmax points with config.train.sparse_item_updates
(`sparse_updates`: only the rows a step touches are gathered, differentiated and updated); 'grads'
is then the gradient of those rows ([U, d]) and 'optimizer' the dense update of the other params
plus the lazy update of U rows. 'ce' is left out (it cannot be sparse); the results go to
--out_dir/catalogue_sparse.json.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from alphafuse_jax import builders
from alphafuse_jax import files
from alphafuse_jax import parallel
from alphafuse_jax import sparse_updates
from alphafuse_jax import train
from alphafuse_jax.benchmarks import sweep
from alphafuse_jax.models import base

_SIZES = flags.DEFINE_list('sizes', ['10000', '100000', '1000000'], 'Catalogue sizes N.')
_PIPELINES = flags.DEFINE_list('pipelines', ['id', 'alphafuse'], 'Item-embedding pipelines.')
_NEGATIVES = flags.DEFINE_integer('negatives', 256, 'K: shared negatives per step.')
_SAMPLER = flags.DEFINE_enum('sampler', 'popularity', ['uniform', 'popularity'], 'The sampler.')
_IN_BATCH = flags.DEFINE_bool('in_batch', False, 'Also the in-batch negatives.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Global batch (one device).')
_MAX_LEN = flags.DEFINE_integer('max_len', 50, 'History length L.')
_HIDDEN = flags.DEFINE_integer('hidden', 128, 'Item embedding width h (AlphaFuse: k; n = h/2).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Round-robin rounds over the sizes.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed calls per size per round.')
_CE_MAX = flags.DEFINE_integer('ce_max_items', 100_000, "Also time loss='ce' up to this N.")
_SPARSE = flags.DEFINE_bool('sparse_item_updates', False, 'Time the sampled-softmax steps with '
                            'config.train.sparse_item_updates (row-sparse item-table updates).')
# --out_dir (where catalogue.json goes) and --quick (tiny sizes, one round) are sweep.py's flags.
_OUT, _QUICK = sweep._OUT_DIR, sweep._QUICK  # pylint: disable=protected-access

TEXT_DIM = sweep.LANGUAGE_DIM


def zipf_counts(num_items: int, seed: int = 0) -> np.ndarray:
  """Train counts [N] of a Zipf(1) catalogue: the r-th most popular item has ~1e7 / r (>= 1)."""
  rank = np.random.default_rng(seed).permutation(num_items) + 1
  return np.maximum(np.round(1e7 / rank), 1).astype(np.int64)


def _config(pipeline: str, loss: str):
  if sweep._ROOT not in sys.path:  # pylint: disable=protected-access
    sys.path.insert(0, sweep._ROOT)  # pylint: disable=protected-access
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.embedding.pipeline = pipeline
  config.embedding.hidden_dim = _HIDDEN.value
  config.embedding.null_dim = _HIDDEN.value // 2
  config.embedding.id_init = 'normal' if pipeline == 'id' else 'zeros'
  config.data.max_len = _MAX_LEN.value
  config.train.batch_size = _BATCH.value
  config.train.loss = loss
  config.train.num_negatives = _NEGATIVES.value
  if loss == 'sampled_softmax':
    config.train.sampler = _SAMPLER.value
    config.train.in_batch_negatives = _IN_BATCH.value
    config.train.sparse_item_updates = _SPARSE.value
  return config


def _host_batches(counts: np.ndarray, count: int = 4) -> list[dict[str, np.ndarray]]:
  """Left-padded histories [1, B, L] (lengths 1..L) and targets, items ~ the train counts."""
  n, rows, length = counts.size, _BATCH.value, _MAX_LEN.value
  p = counts / counts.sum()
  out = []
  for i in range(count):
    rng = np.random.default_rng(i)
    history = rng.choice(n, size=(rows, length), p=p).astype(np.int32)
    lengths = rng.integers(1, length + 1, size=rows)
    history[np.arange(length)[None, :] < (length - lengths)[:, None]] = n
    batch = {'history': history, 'target': rng.choice(n, size=rows, p=p).astype(np.int32),
             'index': np.arange(rows, dtype=np.int32), 'mask': np.ones(rows, bool)}
    out.append({k: v[None] for k, v in batch.items()})
  return out


def _loss_fn(model, key):
  """(params, batch) -> the step's loss (as train.make_train_step's loss_fn, one device)."""

  def loss_fn(params, batch):
    table_key, example_key = jax.random.split(key)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(example_key, batch['index'])
    table = model.apply({'params': params}, rngs=base.rng_streams(table_key),
                        method='train_table')
    losses, weights = model.batch_example_loss(params, batch['history'], batch['target'],
                                               batch['mask'], keys, table)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  return loss_fn


def _sparse_grads_fn(model, key):
  """The sparse step's loss and gradient (sparse_updates.train_step without its update): the
  touched rows gathered, the loss through them, the gradient of the rows [U, d]."""
  loss_fn = _loss_fn(model, key)

  def grads(params, batch):
    table_key = jax.random.split(key)[0]
    negatives = model.apply({'params': params}, rngs=base.rng_streams(table_key),
                            method='shared_negative_ids')
    rest, tables = sparse_updates.split_tables(params)
    ids = sparse_updates.touched_ids(batch['history'], batch['target'], negatives,
                                     sparse_updates.table_rows(tables))
    rows = sparse_updates.gather_tables(tables, ids)
    partial = lambda rest, rows: loss_fn(
        sparse_updates.merge_tables(rest, sparse_updates.gathered(tables, rows, ids)), batch)
    return jax.value_and_grad(partial, argnums=(0, 1))(rest, rows)

  return jax.jit(grads)


def _sparse_update_fn(tx, params, host_batch):
  """The sparse step's optimizer with zero gradients: the dense update of the other params and
  the lazy update of the rows `host_batch` touches (K stand-in negatives)."""
  tables = sparse_updates.split_tables(params)[1]
  ids = sparse_updates.touched_ids(host_batch['history'], host_batch['target'],
                                   jnp.arange(_NEGATIVES.value), sparse_updates.table_rows(tables))

  def update(params, opt_state):
    rest, tables = sparse_updates.split_tables(params)
    updates, dense = tx.update(jax.tree.map(jnp.zeros_like, rest), opt_state['dense'], rest)
    rows = sparse_updates.gather_tables(tables, ids)
    tables, items = sparse_updates.lazy_update(tx, tables, opt_state['items'], ids, rows,
                                               jax.tree.map(jnp.zeros_like, rows))
    return (sparse_updates.merge_tables(jax.tree.map(jnp.add, rest, updates), tables),
            {'dense': dense, 'items': items})

  return update


def _grads_fn(model, key, frozen_tables: bool = False):
  """The step's loss and gradient without the optimizer (as train.make_train_step's loss_fn).

  frozen_tables: no gradient for the [N + 1, d] item tables (so no dense cotangent of theirs):
  what is left grows with N only if the loss itself does.
  """
  loss_fn = _loss_fn(model, key)
  if not frozen_tables:
    return jax.jit(jax.value_and_grad(loss_fn))
  is_table = lambda x: x.ndim == 2 and x.shape[0] == model.num_items + 1

  def without_tables(params, batch):
    leaves, tree = jax.tree.flatten(params)
    rest = [x for x in leaves if not is_table(x)]

    def partial(rest):
      others = iter(rest)
      full = [x if is_table(x) else next(others) for x in leaves]
      return loss_fn(jax.tree.unflatten(tree, full), batch)
    return jax.value_and_grad(partial)(rest)

  return jax.jit(without_tables)


class Point:
  """One (pipeline, loss, N): its compiled step, gradient and optimizer calls, and timings."""

  def __init__(self, pipeline: str, loss: str, num_items: int, dp: parallel.DataParallel):
    self.pipeline, self.loss, self.num_items, self.dp = pipeline, loss, num_items, dp
    config = _config(pipeline, loss)
    counts = zipf_counts(num_items)
    dataset = types.SimpleNamespace(num_items=num_items, max_len=_MAX_LEN.value,
                                    train_item_counts=counts)
    language = None
    if pipeline != 'id':
      language = np.random.default_rng(1).normal(size=(num_items, TEXT_DIM)).astype(np.float32)
      language *= np.float32(config.text.scale)
    model = builders.build_model(config, dataset, language)
    del language
    init_key, train_key = jax.random.split(jax.random.key(config.train.seed))
    state = train.create_train_state(model, config, init_key)
    self.params = train.count_params(state.params)
    self.batches = _host_batches(counts)
    step = dp.map(train.make_train_step(model, train_key), ('replicated', 'sharded'),
                  ('replicated', 'replicated'), donate_argnums=(0,))
    self.state = dp.replicate(state)
    t0 = time.perf_counter()
    self.step = step.lower(self.state, dp.put_batch(self.batches[0])).compile()
    self.compile_s = time.perf_counter() - t0
    analysis = self.step.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    self.step_bytes = float((analysis or {}).get('bytes accessed', float('nan')))
    self.sparse = state.sparse_item_updates
    self.grads = (_sparse_grads_fn if self.sparse else _grads_fn)(model, train_key)
    self.grads_frozen = _grads_fn(model, train_key, frozen_tables=True)
    self.host_batch0 = {k: v[0] for k, v in self.batches[0].items()}
    tx = train.make_optimizer(config)
    if self.sparse:
      update, opt_state = _sparse_update_fn(tx, state.params, self.host_batch0), state.opt_state
    else:
      opt_state = tx.init(state.params)
      zeros = jax.tree.map(jnp.zeros_like, state.params)

      def update(params, opt_state):
        updates, opt_state = tx.update(zeros, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state

    self.update = jax.jit(update, donate_argnums=(0, 1))
    self.opt = (state.params, opt_state)
    self.i = 0
    self.times = {'step': [], 'grads': [], 'grads_frozen_tables': [], 'optimizer': []}
    for _ in range(2):  # Warm-up: the first calls allocate.
      self.run_step(), self.run_grads(), self.run_grads_frozen(), self.run_update()

  def run_step(self):
    self.state, out = self.step(self.state, self.dp.put_batch(self.batches[self.i % 4]))
    self.i += 1
    loss = float(np.asarray(out['loss']))
    if not np.isfinite(loss):
      raise FloatingPointError(f'{self.pipeline} N={self.num_items}: loss {loss}.')

  def run_grads(self):
    jax.block_until_ready(self.grads(self.state.params, self.host_batch0))

  def run_grads_frozen(self):
    jax.block_until_ready(self.grads_frozen(self.state.params, self.host_batch0))

  def run_update(self):
    self.opt = jax.block_until_ready(self.update(*self.opt))

  def time_round(self, steps: int):
    for name, fn in (('step', self.run_step), ('grads', self.run_grads),
                     ('grads_frozen_tables', self.run_grads_frozen),
                     ('optimizer', self.run_update)):
      for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        self.times[name].append(time.perf_counter() - t0)

  def result(self) -> dict[str, Any]:
    out = dict(pipeline=self.pipeline, loss=self.loss, num_items=self.num_items,
               params=self.params, compile_s=self.compile_s, step_bytes=self.step_bytes,
               steps_timed=len(self.times['step']), sparse_item_updates=bool(self.sparse))
    for name, values in self.times.items():
      out[f'{name}_ms'] = 1e3 * statistics.median(values)
    return out


def memory_rate(megabytes: int = 512, repeats: int = 10) -> float:
  """Bytes/s of a streaming float32 update x <- 2x + 1 in place (read + write), median."""
  x = jnp.zeros(megabytes * 2 ** 18, jnp.float32)
  update = jax.jit(lambda x: 2 * x + 1, donate_argnums=0)
  x = jax.block_until_ready(update(x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    x = jax.block_until_ready(update(x))
    times.append(time.perf_counter() - t0)
  return 2 * x.nbytes / statistics.median(times)


def markdown_table(results: list[dict[str, Any]]) -> str:
  """One row per point; 'x smallest N' is the step's ratio to the first size of its rows."""
  lines = ['| pipeline | loss | N | params | step ms | x smallest N | grads ms | grads, tables '
           'frozen, ms | optimizer ms | step GB accessed | compile s |', '|' + '---|' * 11]
  for r in results:
    lines.append(' | '.join([
        f'| {r["pipeline"]}', r['loss'] + (' (sparse)' if r.get('sparse_item_updates') else ''),
        f'{r["num_items"]:,}', f'{r["params"]:,}',
        f'{r["step_ms"]:.1f}', f'{r["ratio"]:.2f}', f'{r["grads_ms"]:.1f}',
        f'{r["grads_frozen_tables_ms"]:.1f}', f'{r["optimizer_ms"]:.1f}',
        f'{r["step_bytes"] / 1e9:.2f}', f'{r["compile_s"]:.1f}']) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if jax.device_count() != 1:
    raise app.UsageError(f'run on one device (XLA_FLAGS without a forced device count), found '
                         f'{jax.device_count()}.')
  if _QUICK.value:
    for name, value in (('batch', 32), ('max_len', 10), ('hidden', 32), ('negatives', 16)):
      if not flags.FLAGS[name].present:
        flags.FLAGS[name].value = value
  sizes = [300, 3000] if _QUICK.value else [int(s) for s in _SIZES.value]
  rounds, steps = (1, 1) if _QUICK.value else (_ROUNDS.value, _STEPS.value)
  peak = sweep.matmul_rate(512 if _QUICK.value else 2048)
  bandwidth = memory_rate(64 if _QUICK.value else 512)
  print(f'float32 matmul rate ({jax.devices()[0].platform}, one device): {peak / 1e9:.1f} GFLOP/s'
        f'; streaming memory rate {bandwidth / 1e9:.1f} GB/s', file=sys.stderr, flush=True)
  dp = parallel.DataParallel('shard_map')
  results = []
  for pipeline in _PIPELINES.value:
    for loss in ('sampled_softmax',) + (() if _SPARSE.value else ('ce',)):
      points = []
      for n in sizes:
        if loss == 'ce' and n > _CE_MAX.value:
          continue
        t0 = time.perf_counter()
        points.append(Point(pipeline, loss, n, dp))
        print(f'{pipeline} {loss} N={n}: built and compiled in {time.perf_counter() - t0:.0f} s',
              file=sys.stderr, flush=True)
      for _ in range(rounds):
        for point in points:
          point.time_round(steps)
      rows = [p.result() for p in points]
      for row in rows:
        row['ratio'] = row['step_ms'] / rows[0]['step_ms']
      results += rows
      del points
  print(f'float32 matmul rate: {peak / 1e9:.1f} GFLOP/s; streaming memory rate '
        f'{bandwidth / 1e9:.1f} GB/s (x <- 2x + 1 over 512 MB). K={_NEGATIVES.value} '
        f'({_SAMPLER.value}{", in-batch" if _IN_BATCH.value else ""}), batch {_BATCH.value}, '
        f'L={_MAX_LEN.value}, h={_HIDDEN.value}; medians of {rounds} x {steps} calls, sizes '
        'round-robin.\n')
  print(markdown_table(results))
  out_dir = os.path.abspath(_OUT.value)
  os.makedirs(out_dir, exist_ok=True)
  name = 'catalogue_sparse.json' if _SPARSE.value else 'catalogue.json'
  files.write_json(os.path.join(out_dir, name),
                   {'matmul_flop_per_s': peak, 'memory_bytes_per_s': bandwidth,
                    'results': results, 'quick': _QUICK.value})


if __name__ == '__main__':
  app.run(main)
