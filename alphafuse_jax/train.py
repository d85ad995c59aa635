"""Training and evaluation: wires data, embeddings, backbone, losses and metrics together.

`train_and_evaluate(config, workdir)` is the whole job. It owns no maths: the per-device train and
eval steps call `losses` and `metrics`; `parallel.DataParallel` maps them over devices.

Reproducibility: every random draw comes from `fold_in(seed_key, step)` and then from the global
index of the example within its batch, so the same config and seed give the same numbers on 1 or 8
devices and across a kill-and-resume; the data order is a function of (seed, epoch) and resumes
mid-epoch at the checkpointed step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from alphafuse_jax import data as data_lib
from alphafuse_jax import embeddings as embeddings_lib
from alphafuse_jax import losses as losses_lib
from alphafuse_jax import metrics as metrics_lib
from alphafuse_jax import parallel
from alphafuse_jax.models import dreamrec as dreamrec_lib
from alphafuse_jax.models import llmesr as llmesr_lib
from alphafuse_jax.models import sasrec as sasrec_lib

BACKBONES = ('sasrec', 'dreamrec')
LOSSES = ('infonce', 'bce', 'ce')
OPTIMIZERS = ('adam_l2', 'adamw', 'sgd')


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or inf."""


class TrainState(train_state.TrainState):
  """Flax TrainState; `step` counts optimiser updates over the whole run."""


# ---- configuration checks -------------------------------------------------------------------
def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails at start, with the fix, on config values that would fail (or mislead) later."""
  t = config.train
  if config.model.backbone not in BACKBONES:
    raise ValueError(f'config.model.backbone={config.model.backbone!r} is not one of {BACKBONES}.')
  if config.eval.get('every_epochs', 1) < 1:
    raise ValueError(f'config.eval.every_epochs={config.eval.every_epochs} must be >= 1.')
  if config.model.backbone == 'dreamrec':
    if config.data.protocol == 'leave_one_out':
      raise ValueError('DreamRec trains on the last position only: use '
                       "config.data.protocol='cold_start_users' with backbone='dreamrec'.")
  elif t.loss not in LOSSES:
    raise ValueError(f'config.train.loss={t.loss!r} is not one of {LOSSES}.')
  if t.optimizer not in OPTIMIZERS:
    raise ValueError(f'config.train.optimizer={t.optimizer!r} is not one of {OPTIMIZERS}.')
  for name, batch in (('train.batch_size', t.batch_size), ('eval.batch_size', config.eval.batch_size)):
    if batch < 1 or batch % num_devices:
      raise ValueError(
          f'config.{name}={batch} must be a positive multiple of the {num_devices} devices '
          f'(set --config.{name}={max(num_devices, batch // num_devices * num_devices)}).')
  if t.num_epochs < 1:
    raise ValueError(f'config.train.num_epochs={t.num_epochs} must be >= 1.')
  if t.negative_scoring not in ('dense', 'gather'):
    raise ValueError(f"config.train.negative_scoring={t.negative_scoring!r} is not 'dense' or "
                     "'gather'.")
  if t.loss != 'ce' and t.num_negatives < 1:
    raise ValueError(f'config.train.num_negatives={t.num_negatives} must be >= 1 for {t.loss}.')
  if not t.learning_rate > 0:
    raise ValueError(f'config.train.learning_rate={t.learning_rate} must be > 0.')


def check_workdir(workdir: str) -> str:
  """Creates the workdir and proves it is writable before any work starts."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise PermissionError(
        f'workdir {workdir!r} is not writable ({e.strerror}); pass --workdir=<a directory you own>.'
    ) from e
  return workdir


# ---- building blocks ------------------------------------------------------------------------
def load_language_embeddings(config: ml_collections.ConfigDict,
                             dataset: data_lib.PreparedDataset) -> np.ndarray | None:
  """Item language vectors [N, d_l] scaled by `config.text.scale`, or None for the ID pipeline."""
  if config.embedding.pipeline == 'id':
    return None
  from alphafuse_jax import text as text_lib  # Loads tokenizers only when needed.
  if config.text.encoder == 'file':
    vectors = text_lib.load_embeddings(config.text.embeddings_file, num_items=dataset.num_items)
  elif config.text.encoder == 'minilm':
    if config.data.source == 'authors':
      raise ValueError("the authors' release has no item texts: set --config.text.encoder=file "
                       '--config.text.embeddings_file=<dir>/<name>_emb.pickle.')
    # The cache is keyed on a hash of the texts, so protocols of one source share it.
    cache_dir = os.path.join(data_lib.resolve_data_dir(config.data.data_dir), 'embeddings',
                             config.data.source)
    vectors = text_lib.embed_items(dataset.item_fields, template=config.text.template,
                                   cache_dir=cache_dir, batch_size=config.text.batch_size)
  else:
    raise ValueError(f"config.text.encoder={config.text.encoder!r} is not 'minilm' or 'file'.")
  return np.asarray(vectors, np.float64) * float(config.text.scale)


def build_model(config: ml_collections.ConfigDict, dataset: data_lib.PreparedDataset,
                language_embeddings: np.ndarray | None):
  """The item-embedding pipeline inside the sequence backbone (SASRec or DreamRec)."""
  item_embedding = embeddings_lib.make_item_embedding(
      config.embedding, num_items=dataset.num_items, language_embeddings=language_embeddings,
      item_counts=dataset.train_item_counts)
  if config.model.backbone == 'dreamrec':
    return dreamrec_lib.from_config(config, item_embedding, dataset.max_len)
  if config.embedding.pipeline == 'llmesr':
    # Dual-view LLM-ESR backbone (cross-attention fusion, shared encoder, self-distillation).
    return llmesr_lib.from_config(config, item_embedding, dataset, language_embeddings)
  return sasrec_lib.SASRec(
      item_embedding=item_embedding, max_len=dataset.max_len, block=config.model.block,
      num_blocks=config.model.num_blocks, num_heads=config.model.num_heads,
      dropout_rate=config.model.dropout_rate, pre_ln=config.model.get('pre_ln', True))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with coupled L2 (the reference's torch Adam weight_decay), AdamW, or plain SGD + L2."""
  t = config.train
  if t.optimizer == 'adam_l2':
    return optax.chain(optax.add_decayed_weights(t.l2), optax.scale_by_adam(eps=1e-8),
                       optax.scale(-t.learning_rate))
  if t.optimizer == 'sgd':
    return optax.chain(optax.add_decayed_weights(t.l2), optax.scale(-t.learning_rate))
  return optax.adamw(t.learning_rate, eps=1e-8, weight_decay=t.l2)


def _rngs(key: jax.Array) -> dict[str, jax.Array]:
  """Every stochastic stream a module may ask for (dropout, UniSRec's gating noise)."""
  dropout_key, gating_key = jax.random.split(key)
  return {'dropout': dropout_key, 'gating': gating_key}


def _init_all(module, history: jax.Array) -> Any:
  """Touches every submodule so `init` creates all parameters (scoring and auxiliary heads too)."""
  states = module(history, deterministic=True)
  module.score(states)
  return module.auxiliary_loss(deterministic=True)


def create_train_state(model, config: ml_collections.ConfigDict,
                       key: jax.Array) -> TrainState:
  history = jnp.full((1, model.max_len), model.item_embedding.num_items, jnp.int32)
  params = model.init(_rngs(key) | {'params': key}, history, method=_init_all)['params']
  return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config))


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---- per-device steps -----------------------------------------------------------------------
def make_train_step(model, config: ml_collections.ConfigDict,
                    base_key: jax.Array, *, per_position: bool):
  """The per-device train step: loss -> grads -> pmean over 'data' -> optax update.

  `batch` holds this device's rows: history [b, L], target [b], mask [b] (False on padding rows of
  the last batch) and index [b] (the row's position in the global batch, which seeds its dropout
  and negatives, so the result does not depend on how the batch is split over devices).
  """
  t = config.train
  num_items = model.item_embedding.num_items
  is_dreamrec = isinstance(model, dreamrec_lib.DreamRec)

  def per_example_diffusion(params, history, target, key):
    dropout_key, diffusion_key = jax.random.split(key)
    return model.apply({'params': params}, history[None], target[None], diffusion_key,
                       deterministic=False, rngs=_rngs(dropout_key),
                       method=dreamrec_lib.DreamRec.loss)[0]

  def per_example(params, history, key):
    method = type(model).encode if per_position else type(model).__call__
    out = model.apply({'params': params}, history[None], deterministic=False, rngs=_rngs(key),
                      method=method)
    return out[0]

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    step_key = jax.random.fold_in(base_key, state.step)
    table_key, example_key = jax.random.split(step_key)
    example_keys = jax.vmap(jax.random.fold_in, (None, 0))(example_key, batch['index'])
    model_keys, negative_keys = jnp.split(jax.vmap(jax.random.split)(example_keys), 2, axis=1)
    model_keys, negative_keys = model_keys[:, 0], negative_keys[:, 0]
    mask = batch['mask']
    if per_position:
      targets, valid = losses_lib.positional_targets(batch['history'], batch['target'], num_items)
      weights = valid.astype(jnp.float32) * mask[:, None]
    else:
      targets, weights = batch['target'], mask.astype(jnp.float32)
    # Rows that do not count (padding of the last batch) point at item 0 so all values stay finite.
    targets = jnp.where(weights > 0, targets, 0)
    # Examples (or positions) counted over all devices: the loss is their global mean.
    global_count = jnp.maximum(jax.lax.psum(jnp.sum(weights), parallel.AXIS), 1.0)
    num_devices = jax.lax.psum(1, parallel.AXIS)

    def row_loss(states, row_targets, key, table):
      return losses_lib.per_example_loss(
          t.loss, states, row_targets, table, num_items=num_items, key=key,
          num_negatives=t.num_negatives, temperature=t.temperature,
          dense=t.negative_scoring == 'dense')

    def loss_fn(params):
      if is_dreamrec:
        # x0 = the target's embedding: gradients reach the item table through the target.
        per_row = jax.vmap(per_example_diffusion, (None, 0, 0, 0))(
            params, batch['history'], targets, model_keys)
      else:
        table = model.apply({'params': params}, deterministic=False, rngs=_rngs(table_key),
                            method=type(model).item_table)
        states = jax.vmap(per_example, (None, 0, 0))(params, batch['history'], model_keys)
        # Negatives are drawn per row from the row's own key (device-split invariant).
        per_row = jax.vmap(row_loss, (0, 0, 0, None))(states, targets, negative_keys, table)
      main = jnp.sum(per_row * weights) / global_count * num_devices
      aux = model.apply({'params': params}, deterministic=False, rngs=_rngs(table_key),
                        method=type(model).auxiliary_loss)
      loss = main + config.embedding.aux_weight * aux
      if hasattr(model, 'batch_auxiliary_loss'):
        # LLM-ESR's weighted terms over THIS DEVICE's batch (the reference's are per batch): its
        # contrastive term couples the rows, so it is not device-split invariant.
        batch_key = jax.random.fold_in(table_key, jax.lax.axis_index(parallel.AXIS) + 1)
        loss += model.apply({'params': params}, batch['history'], batch.get('user_id'), mask,
                            deterministic=False, rngs=_rngs(batch_key),
                            method=type(model).batch_auxiliary_loss)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    loss = jax.lax.pmean(loss, parallel.AXIS)
    return state.apply_gradients(grads=grads), {'loss': loss}

  return train_step


def make_eval_step(model, eval_key: jax.Array | None = None, sampled_negatives: int = 0,
                   sampled_key: jax.Array | None = None):
  """Per-device eval step: user states -> scores against all N items -> the target's rank.

  DreamRec's state is the generated next-item embedding; its sampling noise comes from
  `fold_in(eval_key, global row index)`, so every evaluation of a row draws the same noise.
  With `sampled_negatives` K > 0 the step returns int32 [b, 2]: the full-ranking rank and the
  rank among the target and K negatives drawn from `fold_in(sampled_key, row index)` (the same
  negatives at every evaluation), excluding the history (and seen items when excluded).
  """

  def eval_step(params, table, batch):
    if isinstance(model, dreamrec_lib.DreamRec):
      keys = jax.vmap(jax.random.fold_in, (None, 0))(eval_key, batch['index'])
      states = model.apply({'params': params}, batch['history'], keys,
                           method=dreamrec_lib.DreamRec.generate)
    else:
      states = model.apply({'params': params}, batch['history'], deterministic=True)
    scores = states @ table.T
    exclude = batch.get('seen')
    ranks = metrics_lib.target_ranks(scores, batch['target'], exclude=exclude)
    if not sampled_negatives:
      return ranks
    history = batch['history'] if exclude is None else jnp.concatenate(
        [batch['history'], exclude], axis=1)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(sampled_key, batch['index'])
    sampled = metrics_lib.sampled_target_ranks(scores, batch['target'], keys, sampled_negatives,
                                               exclude=history)
    return jnp.stack([ranks, sampled], axis=1)

  return eval_step


# ---- checkpoints ----------------------------------------------------------------------------
@dataclasses.dataclass
class Progress:
  """Loop state saved with every checkpoint (JSON)."""
  epochs_done: int = 0
  best_metric: float = -1.0
  best_epoch: int = -1
  evals_since_best: int = 0
  finished: bool = False
  train_seconds: float = 0.0
  train_sequences: int = 0


class Checkpoints:
  """Orbax managers for the latest train state (resume) and the best params (model selection)."""

  def __init__(self, workdir: str):
    def options(name):
      # Distinct barrier keys: in multi-process runs both managers save the same step, and
      # orbax names its barriers by step alone ('Barrier _async_write_complete.N is already
      # ongoing' otherwise).
      multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
      return ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                          multiprocessing_options=multiprocessing)
    self.latest = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                        options=options('latest'))
    self.best = ocp.CheckpointManager(os.path.join(workdir, 'best'), options=options('best'))

  def save_latest(self, step: int, state: TrainState, progress: Progress) -> None:
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(dataclasses.asdict(progress))),
        force=True)

  def restore_latest(self, template: TrainState) -> tuple[TrainState, Progress] | None:
    step = self.latest.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
    return restored.state, Progress(**restored.progress)

  def save_best(self, step: int, params: Any) -> None:
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)

  def restore_best(self, template: Any) -> Any:
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError('no best checkpoint was written (no evaluation ran).')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract))).params

  def close(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


# ---- evaluation -----------------------------------------------------------------------------
def _eval_arrays(dataset: data_lib.PreparedDataset, split: str, exclude_seen: bool
                 ) -> dict[str, np.ndarray]:
  arrays = dict(dataset.splits[split])
  if exclude_seen:
    indptr, items = data_lib.seen_items(dataset, split)
    lengths = np.diff(indptr)
    width = max(int(lengths.max(initial=0)), 1)
    seen = np.full((len(lengths), width), dataset.num_items, np.int32)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(items)) - np.repeat(indptr[:-1], lengths)
    seen[rows, cols] = items
    arrays['seen'] = seen
  return arrays


class Evaluator:
  """Full-ranking evaluation of one split: every example counted exactly once."""

  def __init__(self, dp: parallel.DataParallel, model, config, dataset, split: str):
    self.dp, self.dataset, self.split = dp, dataset, split
    self.batch_size = config.eval.batch_size
    self.arrays = _eval_arrays(dataset, split, config.eval.exclude_seen)
    self.ks = tuple(config.eval.ks)
    self.head_fraction = config.eval.head_fraction
    self.short_history = config.eval.short_history
    eval_key = jax.random.key(config.get('diffusion', {}).get('eval_seed', 0))
    # Sampled metrics (opt-in): their negatives come from a fixed key of their own.
    self.sampled_negatives = int(config.eval.get('sampled_negatives', 0) or 0)
    self._step = dp.map(
        make_eval_step(model, eval_key, self.sampled_negatives,
                       jax.random.key(config.eval.get('sampled_seed', 0))),
        ('replicated', 'replicated', 'sharded'), 'sharded')
    # The ranks of the last pass: [n] full ranking, or [n, 2] with the sampled ranks.
    self.last_ranks: np.ndarray | None = None
    self._table = jax.jit(lambda p: model.apply({'params': p}, deterministic=True,
                                                method=type(model).item_table))
    # Steady-state speed: the first pass (which compiles) is not counted.
    self.seconds = 0.0
    self.examples = 0
    self._passes = 0

  def ranks(self, params) -> np.ndarray:
    """The 1-based rank of every example's target, in split order."""
    start = time.perf_counter()
    host_params = params if self.dp.mode == 'shard_map' else self.dp.unreplicate(params)
    table = self._table(host_params)
    table = self.dp.replicate(table) if self.dp.mode == 'pmap' else table
    out, masks = [], []
    n = len(self.arrays['target'])
    local_rows = self.batch_size // jax.process_count()
    for i, batch in enumerate(data_lib.batches(
        self.arrays, self.batch_size, seed=0, epoch=0, shuffle=False,
        num_devices=self.dp.num_local_devices, process_index=jax.process_index(),
        process_count=jax.process_count())):
      mask = batch.pop('mask')
      # The row's index in the split (seeds DreamRec's sampling noise).
      index = i * self.batch_size + jax.process_index() * local_rows + np.arange(local_rows)
      batch['index'] = index.astype(np.int32).reshape(mask.shape)
      ranks = self.dp.get_sharded(self._step(params, table, self.dp.put_batch(batch)))
      out.append(ranks)
      masks.append(mask.reshape(-1))
    # [num_batches, local_rows] on every process (padding rows included), so the gather below
    # sees equal shapes; process_allgather requires them.
    width = (2,) if self.sampled_negatives else ()
    ranks = np.stack(out) if out else np.zeros((0, local_rows) + width, np.int32)
    valid = np.stack(masks) if masks else np.zeros((0, local_rows), bool)
    ranks = ranks.reshape(valid.shape + width)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      # [processes, batches, rows] -> [batches, processes, rows]: global batch b is process 0's
      # rows then process 1's..., so the flattened ranks are in split order (group metrics).
      ranks = np.asarray(multihost_utils.process_allgather(ranks)).swapaxes(0, 1)
      valid = np.asarray(multihost_utils.process_allgather(valid.astype(np.int32))
                         ).transpose(1, 0, 2).astype(bool)
    ranks = ranks.reshape((-1,) + width)[valid.reshape(-1)]
    if len(ranks) != n:
      raise RuntimeError(f'evaluation of {self.split} counted {len(ranks)} of {n} examples.')
    self._passes += 1
    if self._passes > 1:
      self.seconds += time.perf_counter() - start
      self.examples += n
    self.last_ranks = ranks
    return ranks

  def evaluate(self, params, groups: bool = False) -> dict[str, Any]:
    """Full-ranking metrics; with `groups`, {'all': .., <group>: ..} (and 'sampled' when on)."""
    ranks = self.ranks(params)
    full = ranks[:, 0] if ranks.ndim == 2 else ranks
    result = metrics_lib.summarize_ranks(full, ks=self.ks)
    if groups:
      result = {'all': result, **group_metrics(
          self.dataset, self.split, full, self.ks, head_fraction=self.head_fraction,
          short_history=self.short_history)}
      if ranks.ndim == 2:
        result['sampled'] = {'all': metrics_lib.summarize_ranks(ranks[:, 1], ks=self.ks),
                             **group_metrics(self.dataset, self.split, ranks[:, 1], self.ks,
                                             head_fraction=self.head_fraction,
                                             short_history=self.short_history)}
    return result

  def save_ranks(self, path: str) -> None:
    """Writes the last pass's ranks with each example's target and position (npz, atomic)."""
    arrays = self.dataset.splits[self.split]
    out = {'target': np.asarray(arrays['target'], np.int32),
           'user_id': np.asarray(arrays['user_id'], np.int32),
           'position': np.asarray(arrays['position'], np.int32)}
    if self.last_ranks.ndim == 2:
      out['rank'], out['sampled_rank'] = self.last_ranks[:, 0], self.last_ranks[:, 1]
    else:
      out['rank'] = self.last_ranks
    tmp = path + '.tmp.npz'
    np.savez(tmp, **out)
    os.replace(tmp, path)


def group_metrics(dataset, split: str, ranks: np.ndarray, ks, *, head_fraction: float,
                  short_history: int) -> dict[str, dict[str, float]]:
  """Metrics for head/tail target items (train popularity) and short/long histories.

  Head items are the `head_fraction` most interacted items in train; an example has a short
  history when fewer than `short_history` items precede its target in the user's sequence.
  """
  arrays = dataset.splits[split]
  is_head = np.asarray(metrics_lib.item_groups(dataset.train_item_counts, head_fraction))
  target_head = is_head[arrays['target']]
  threshold = short_history
  short = arrays['position'] < threshold
  out = {}
  for name, sel in (('head_items', target_head), ('tail_items', ~target_head),
                    (f'short_history(<{threshold})', short), (f'long_history(>={threshold})', ~short)):
    if sel.any():
      out[name] = metrics_lib.summarize_ranks(ranks[sel], ks=ks)
  return out


# ---- the loop -------------------------------------------------------------------------------
def _append_jsonl(path: str, record: dict[str, Any]) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def _truncate_jsonl(path: str, max_step: int) -> None:
  """Drops log lines written after the checkpoint we resume from (they will be redone)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= max_step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(lines)
  os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Trains with early stopping on val NDCG@20, resumes from `workdir`, tests the best params.

  Returns the results (also written to `workdir/results.json`), or None when
  `config.train.stop_after_steps` stopped the run early.
  """
  wall_start = time.perf_counter()
  workdir = check_workdir(workdir)
  dp = parallel.DataParallel(config.parallelism)
  validate_config(config, dp.num_devices)
  dataset = data_lib.load(config.data)
  per_position = config.data.protocol == 'leave_one_out'
  model = build_model(config, dataset, load_language_embeddings(config, dataset))

  seed_key = jax.random.key(config.train.seed)
  init_key, train_key = jax.random.split(seed_key)
  state = create_train_state(model, config, init_key)
  logging.info('parameters: %d trainable', count_params(state.params))
  ckpt = Checkpoints(workdir)
  restored = ckpt.restore_latest(state)
  progress = Progress()
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if restored is not None:
    state, progress = restored
    logging.info('resuming from step %d (epoch %d)', int(state.step), progress.epochs_done)
    if (progress.finished and progress.epochs_done < config.train.num_epochs
        and progress.evals_since_best < config.train.patience):
      # A run that ended at its epoch limit, restarted with a higher one, trains on (one that
      # stopped early on patience stays finished).
      progress.finished = False
      logging.info('extending a finished run from %d to %d epochs', progress.epochs_done,
                   config.train.num_epochs)
  # Process 0 alone owns metrics.jsonl (the workdir is shared by all processes).
  if restored is not None and jax.process_index() == 0:
    _truncate_jsonl(metrics_path, int(state.step))
  elif restored is None and jax.process_index() == 0 and os.path.exists(metrics_path):
    os.remove(metrics_path)

  train_arrays = dict(dataset.splits['train'])
  global_batch = config.train.batch_size
  steps_per_epoch = data_lib.num_batches(len(train_arrays['target']), global_batch)
  train_step = dp.map(make_train_step(model, config, train_key, per_position=per_position),
                      ('replicated', 'sharded'), ('replicated', 'replicated'), donate_argnums=(0,))
  val_eval = Evaluator(dp, model, config, dataset, 'val')
  every = config.train.get('checkpoint_every_steps', 0)
  stop_after = config.train.get('stop_after_steps', 0)  # Tests: simulate a kill mid-run.
  local_rows = global_batch // jax.process_count()
  row_offset = jax.process_index() * local_rows

  rstate = dp.replicate(state)
  epoch = progress.epochs_done
  while not progress.finished and epoch < config.train.num_epochs:
    step = int(state.step)
    start_step = step - epoch * steps_per_epoch
    batches = data_lib.batches(
        train_arrays, global_batch, seed=config.train.seed, epoch=epoch,
        shuffle=config.train.shuffle, num_devices=dp.num_local_devices,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step)
    bar = tqdm.tqdm(batches, total=steps_per_epoch, initial=start_step,
                    desc=f'epoch {epoch + 1}/{config.train.num_epochs}', leave=False,
                    mininterval=1.0,
                    disable=jax.process_index() != 0 or not config.get('progress_bar', True))
    epoch_loss, epoch_steps = 0.0, 0
    for batch in bar:
      index = row_offset + np.arange(local_rows, dtype=np.int32)
      batch['index'] = index.reshape(batch['mask'].shape)
      t0 = time.perf_counter()
      rstate, out = train_step(rstate, dp.put_batch(batch))
      # Sync every step: reading the loss bounds the queue of collective steps (XLA CPU
      # deadlocks past ~32 queued) and catches NaN at the step it happens.
      loss = float(np.asarray(dp.unreplicate(out['loss']) if dp.mode == 'pmap' else out['loss']))
      step += 1
      if step > 1 or restored is not None:  # Exclude the first (compiling) step from speed.
        progress.train_seconds += time.perf_counter() - t0
        progress.train_sequences += int(batch['mask'].sum()) * jax.process_count()
      if not math.isfinite(loss):
        raise NonFiniteLossError(
            f'training loss is {loss} at step {step} (epoch {epoch + 1}); lower '
            f'config.train.learning_rate or check the embeddings for NaN/inf.')
      epoch_loss += loss
      epoch_steps += 1
      bar.set_postfix(loss=f'{loss:.4f}', refresh=False)
      if every and step % every == 0 and step % steps_per_epoch:
        ckpt.save_latest(step, dp.unreplicate(rstate), progress)
      if stop_after and step >= stop_after:
        # Tests: stop here as a preempted job would after its last checkpoint.
        ckpt.save_latest(step, dp.unreplicate(rstate), progress)
        ckpt.close()
        logging.info('stopping after step %d (config.train.stop_after_steps)', step)
        return None
    state = dp.unreplicate(rstate)
    epoch += 1
    progress.epochs_done = epoch
    record = {'step': step, 'epoch': epoch, 'train_loss': epoch_loss / max(epoch_steps, 1)}
    if epoch % config.eval.every_epochs == 0 or epoch >= config.train.num_epochs:
      val = val_eval.evaluate(rstate.params)
      improved = val['NDCG@20'] > progress.best_metric
      if improved:
        progress.best_metric, progress.best_epoch, progress.evals_since_best = (
            val['NDCG@20'], epoch, 0)
        ckpt.save_best(step, state.params)
      else:
        progress.evals_since_best += 1
      record.update({f'val/{k}': v for k, v in val.items()})
      if jax.process_index() == 0:
        print(f'epoch {epoch:3d}  loss {record["train_loss"]:.4f}  val NDCG@20 '
              f'{val["NDCG@20"]:.4f}  HR@10 {val["HR@10"]:.4f}{"  *" if improved else ""}',
              flush=True)
    elif jax.process_index() == 0:
      print(f'epoch {epoch:3d}  loss {record["train_loss"]:.4f}', flush=True)
    if jax.process_index() == 0:
      _append_jsonl(metrics_path, record)
    if progress.evals_since_best >= config.train.patience or epoch >= config.train.num_epochs:
      progress.finished = True
    ckpt.save_latest(step, state, progress)

  # Test once, from the best checkpoint.
  best_params = ckpt.restore_best(state.params)
  best_params = dp.replicate(best_params)
  val_result = val_eval.evaluate(best_params)
  test_eval = Evaluator(dp, model, config, dataset, 'test')
  test_result = test_eval.evaluate(best_params, groups=True)
  sampled = test_result.pop('sampled', None)
  ckpt.close()
  eval_seconds = val_eval.seconds + test_eval.seconds
  results = {
      'val': val_result,
      'test': test_result.pop('all'),
      'test_groups': test_result,
      'best_epoch': progress.best_epoch,
      'epochs': progress.epochs_done,
      'train_sequences_per_second': progress.train_sequences / max(progress.train_seconds, 1e-9),
      'eval_examples_per_second': (val_eval.examples + test_eval.examples) / max(eval_seconds, 1e-9),
      'wall_seconds': time.perf_counter() - wall_start,
      'num_trainable_params': count_params(state.params),
      'devices': dp.num_devices,
      'parallelism': dp.mode,
  }
  if sampled is not None:
    # Labelled as sampled everywhere: not comparable to the full-ranking numbers above.
    results['test_sampled'] = sampled.pop('all')
    results['test_groups_sampled'] = sampled
    results['sampled_negatives'] = test_eval.sampled_negatives
  if jax.process_index() == 0:
    # Per-example test ranks, for group and decile analyses (experiments.py).
    test_eval.save_ranks(os.path.join(workdir, 'test_ranks.npz'))
    _write_json(os.path.join(workdir, 'results.json'), results)
    plot_learning_curve(metrics_path, os.path.join(workdir, 'learning_curve.png'))
  return results


def plot_learning_curve(metrics_path: str, out_path: str) -> None:
  """Train loss and val NDCG@20 per epoch, from metrics.jsonl."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  with open(metrics_path) as f:
    records = [json.loads(l) for l in f if l.strip()]
  if not records:
    return
  epochs = [r['epoch'] for r in records]
  evaluated = [r for r in records if 'val/NDCG@20' in r]
  fig, ax1 = plt.subplots(figsize=(6, 3.5))
  ax1.plot(epochs, [r['train_loss'] for r in records], 'C0-o', ms=3, label='train loss')
  ax1.set_xlabel('epoch')
  ax1.set_ylabel('train loss', color='C0')
  ax2 = ax1.twinx()
  ax2.plot([r['epoch'] for r in evaluated], [r['val/NDCG@20'] for r in evaluated], 'C1-s', ms=3,
           label='val NDCG@20')
  ax2.set_ylabel('val NDCG@20', color='C1')
  fig.tight_layout()
  tmp = out_path + '.tmp.png'
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, out_path)
