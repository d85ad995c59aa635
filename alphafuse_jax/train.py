"""Training: the train state, the per-device train step and `train_and_evaluate` (the loop).

It owns no maths: the model owns its loss and scores (`models.base.Recommender`), `evaluation`
ranks, `checkpointing` saves, `parallel.DataParallel` maps the step over devices.

Reproducibility: every random draw comes from `fold_in(seed_key, step)` and then from the global
index of the example within its batch, so the same config and seed give the same numbers on 1 or 8
devices and across a kill-and-resume; the data order is a function of (seed, epoch) and resumes
mid-epoch at the checkpointed step.

Accelerators: the loop queues steps without waiting for them; their losses stay on the device
until `step_monitor.StepLosses` reads them every `config.log_every_steps` (and before a
checkpoint), except where `parallel.needs_step_sync` (XLA CPU, several devices) needs each step
read. `config.train.compute_dtype` runs the step's layers in bfloat16 (`precision`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any, Callable

from absl import logging
from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from alphafuse_jax import builders
from alphafuse_jax import checkpointing
from alphafuse_jax import config_checks
from alphafuse_jax import data as data_lib
from alphafuse_jax import errors
from alphafuse_jax import evaluation
from alphafuse_jax import files
from alphafuse_jax import metric_writers
from alphafuse_jax import parallel
from alphafuse_jax.data import grain_input
from alphafuse_jax.embeddings import base as embeddings_base
from alphafuse_jax import precision
from alphafuse_jax import sparse_updates
from alphafuse_jax import step_monitor
from alphafuse_jax.models import base

OPTIMIZERS = config_checks.OPTIMIZERS
validate_config = config_checks.validate_config


NonFiniteLossError = step_monitor.NonFiniteLossError


class TrainState(train_state.TrainState):
  """Flax TrainState; `step` counts optimiser updates over the whole run.

  `sparse_item_updates` (config.train.sparse_item_updates, static): the step updates only the
  item-table rows it touches, and `opt_state` is `sparse_updates.init_state`'s.
  """
  sparse_item_updates: bool = struct.field(pytree_node=False, default=False)


# ---- the workdir ---------------------------------------------------------------------------
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
    raise errors.WorkdirError(
        f'workdir {workdir!r} is not writable ({e.strerror}); pass --workdir=<a directory you own>.'
    ) from e
  return workdir


# ---- state ----------------------------------------------------------------------------------
def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with coupled L2 (the reference's torch Adam weight_decay), AdamW, or plain SGD + L2."""
  t = config.train
  if t.optimizer == 'adam_l2':
    return optax.chain(optax.add_decayed_weights(t.l2), optax.scale_by_adam(eps=1e-8),
                       optax.scale(-t.learning_rate))
  if t.optimizer == 'sgd':
    return optax.chain(optax.add_decayed_weights(t.l2), optax.scale(-t.learning_rate))
  return optax.adamw(t.learning_rate, eps=1e-8, weight_decay=t.l2)


def init_params(model: base.Recommender, key: jax.Array) -> Any:
  """Every parameter of `model` (`Recommender.init_all` touches every submodule)."""
  history = jnp.full((1, model.max_len), model.item_embedding.num_items, jnp.int32)
  return model.init(base.rng_streams(key) | {'params': key}, history,
                    method='init_all')['params']


def create_train_state(model: base.Recommender, config: ml_collections.ConfigDict,
                       key: jax.Array, build: Callable[..., Any] | None = None) -> TrainState:
  """A fresh state; with config.train.sparse_item_updates the optimizer state is split into the
  other params' and the item tables' (`sparse_updates.init_state`).

  `build(fn, *args)` (default: `fn(*args)`; `parallel.DataParallel.builder` builds in place)
  makes the params, then the optimizer state from them: the params' init temporaries are freed
  before the moments exist, so the peak is the larger of the two, not their sum.
  """
  build = build or (lambda fn, *args: fn(*args))
  tx, sparse = make_optimizer(config), bool(config.train.get('sparse_item_updates', False))
  params = build(lambda k: init_params(model, k), key)
  opt_state = build(lambda p: sparse_updates.init_state(tx, p) if sparse else tx.init(p), params)
  return TrainState(step=0, apply_fn=model.apply, params=params, tx=tx, opt_state=opt_state,
                    sparse_item_updates=sparse)


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---- the per-device step --------------------------------------------------------------------
def make_train_step(model: base.Recommender, base_key: jax.Array, *,
                    compute_dtype: Any = jnp.float32):
  """The per-device train step: loss -> grads -> pmean over 'data' -> optax update.

  `batch` holds this device's rows: history [b, L], target [b], mask [b] (False on padding rows of
  the last batch) and index [b] (the row's position in the global batch, which seeds its dropout
  and sampling, so the result does not depend on how the batch is split over devices).
  `compute_dtype` (config.train.compute_dtype) is the layers' dtype; parameters, gradients, the
  optimiser and the returned float32 loss stay float32 (`precision`). A state with
  `sparse_item_updates` takes `sparse_updates.train_step`.
  """

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    step_key = jax.random.fold_in(base_key, state.step)
    table_key, example_key = jax.random.split(step_key)
    example_keys = jax.vmap(jax.random.fold_in, (None, 0))(example_key, batch['index'])
    num_devices = jax.lax.psum(1, parallel.AXIS)
    # This device's key for the batch-level terms (they couple rows, so they are per device).
    batch_key = jax.random.fold_in(table_key, jax.lax.axis_index(parallel.AXIS) + 1)

    def model_loss(params):  # params in the compute dtype.
      variables = {'params': params}
      table = model.apply(variables, rngs=base.rng_streams(table_key), method='train_table')
      per_row, weights = model.batch_example_loss(
          params, batch['history'], batch['target'], batch['mask'], example_keys, table)
      # Examples (or positions) counted over all devices: the loss is their global mean.
      count = jax.lax.stop_gradient(jax.lax.psum(jnp.sum(weights), parallel.AXIS))
      loss = jnp.sum(per_row * weights) / jnp.maximum(count, 1.0) * num_devices
      loss += model.apply(variables, deterministic=False, rngs=base.rng_streams(table_key),
                          method='auxiliary_loss')
      return loss + model.apply(variables, batch['history'], batch.get('user_id'), batch['mask'],
                                deterministic=False, rngs=base.rng_streams(batch_key),
                                method='batch_loss')

    def loss_fn(params):
      # float32 grads flow through the cast.
      return model_loss(precision.cast_floating(params, compute_dtype))

    if state.sparse_item_updates:  # The shared negatives' rows are gathered before the loss.
      negatives = model.apply({'params': state.params}, rngs=base.rng_streams(table_key),
                              method='shared_negative_ids')
      return sparse_updates.train_step(state, batch, negatives, model_loss, compute_dtype)
    with precision.compute_in(compute_dtype):  # Also while custom VJPs trace their backward.
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    loss = jax.lax.pmean(loss, parallel.AXIS)
    return state.apply_gradients(grads=grads), {'loss': loss}

  return train_step


# ---- the loop -------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Trains with early stopping on val NDCG@20, resumes from `workdir`, tests the best params.

  In order, before any training: the config is validated (nothing is created on an error), the
  workdir is created and locked (`checkpointing.WorkdirLock`: one run at a time), its recorded
  config is compared (`checkpointing.check_config_record`), then data and model are built. A
  run that fails before its first checkpoint removes the workdir it created.

  Returns the results (also written to `workdir/results.json`), or None when
  `config.train.stop_after_steps` stopped the run early.
  """
  wall_start = time.perf_counter()
  validate_config(config, jax.device_count())
  workdir = os.path.abspath(os.path.expanduser(workdir))
  created = not os.path.exists(workdir)
  is_chief = jax.process_index() == 0
  lock = None
  profile = step_monitor.StepProfile(workdir, config.profile_steps)  # Stopped on any exit.
  try:
    check_workdir(workdir)
    lock = checkpointing.WorkdirLock(workdir) if is_chief else None
    checkpointing.check_config_record(workdir, config)
    dp = parallel.DataParallel(config.parallelism, config.get('model_shards', 1))
    # The Grain input reads the train split from disk: its arrays stay out of host memory.
    dataset = data_lib.load(config.data, train_arrays=config.data.input != 'grain')
    model = build_model(config, dataset)
    if is_chief:
      checkpointing.write_config_record(workdir, config)
    return _train(config, workdir, dp, dataset, model, wall_start, profile)
  except BaseException:
    if created and is_chief and not checkpointing.has_checkpoint(workdir):
      shutil.rmtree(workdir, ignore_errors=True)  # Nothing worth keeping was written.
    raise
  finally:
    profile.stop()
    if lock is not None:
      lock.release()


def build_model(config: ml_collections.ConfigDict, dataset: data_lib.PreparedDataset):
  """`builders.build_model` with its language table; the factory's ValueErrors (a config that
  does not fit the data) become `errors.ConfigError`s."""
  try:
    return builders.build_model(config, dataset,
                                builders.load_language_embeddings(config, dataset))
  except errors.AlphafuseError:
    raise
  except ValueError as e:
    raise errors.ConfigError(str(e)) from e


def _train(config: ml_collections.ConfigDict, workdir: str, dp: parallel.DataParallel,
           dataset: data_lib.PreparedDataset, model: base.Recommender, wall_start: float,
           profile: step_monitor.StepProfile) -> dict[str, Any] | None:
  """The loop of `train_and_evaluate` on a locked, checked workdir."""
  patience = config.train.patience or math.inf  # 0 = no early stopping.
  seed_key = jax.random.key(config.train.seed)
  init_key, train_key = jax.random.split(seed_key)
  # Placed as it is made: with item tables sharded, each device builds only its share of them.
  state = create_train_state(model, config, init_key, dp.builder())
  logging.info('parameters: %d trainable', count_params(state.params))
  # Training batches (config.data.input); a Grain iterator takes the checkpoint's state.
  train_input = grain_input.train_input(
      config, dataset, num_devices=dp.num_local_devices, process_index=jax.process_index(),
      process_count=jax.process_count(), place=dp.put_batch)
  ckpt = checkpointing.Checkpoints(workdir)
  restored = ckpt.restore_latest(state, data_iterator=train_input.iterator)
  progress = checkpointing.Progress()
  if restored is not None:
    state, progress = restored
    logging.info('resuming from step %d (epoch %d)', int(state.step), progress.epochs_done)
    if (progress.finished and progress.epochs_done < config.train.num_epochs
        and progress.evals_since_best < patience):
      # A run that ended at its epoch limit, restarted with a higher one, trains on (one that
      # stopped early on patience stays finished).
      progress.finished = False
      logging.info('extending a finished run from %d to %d epochs', progress.epochs_done,
                   config.train.num_epochs)
  # Wall seconds of this run's earlier processes (None: a checkpoint predating the count).
  earlier = progress.elapsed_seconds
  run_seconds = lambda: None if earlier is None else earlier + time.perf_counter() - wall_start

  def save(step: int, state: Any) -> None:
    progress.elapsed_seconds = run_seconds()
    ckpt.save_latest(step, state, progress, train_input.iterator)

  is_chief = jax.process_index() == 0
  # Process 0 alone owns the metric log (the workdir is shared by all processes).
  writer = metric_writers.MetricWriter(workdir, tensorboard=config.tensorboard)
  if is_chief:
    writer.start(int(state.step) if restored is not None else None)

  steps_per_epoch = train_input.steps_per_epoch
  compute_dtype = precision.compute_dtype(config.train.compute_dtype)
  train_step = map_train_step(dp, model,
                              make_train_step(model, train_key, compute_dtype=compute_dtype))
  # Losses stay on the device and are read every log_every_steps (and before every checkpoint);
  # only where parallel.needs_step_sync says so (XLA CPU, several devices) is each step read.
  sync = (parallel.needs_step_sync() if config.sync_every_step is None
          else config.sync_every_step)
  losses = step_monitor.StepLosses(progress, pmap=dp.mode == 'pmap')
  first_step = None  # This process's first step compiles: read alone, left out of the speed.
  val_eval = evaluation.Evaluator(dp, model, config, dataset, 'val')
  every = config.train.checkpoint_every_steps
  stop_after = config.train.stop_after_steps  # Tests: simulate a kill mid-run.

  rstate = dp.place_state(state)  # Replicated; item tables sharded over 'model' (if any).
  epoch = progress.epochs_done
  while not progress.finished and epoch < config.train.num_epochs:
    step = int(state.step)
    start_step = step - epoch * steps_per_epoch
    # (device batch with its 'index', real rows over all processes) per step.
    batches = train_input.epoch(epoch, start_step)
    bar = tqdm.tqdm(batches, total=steps_per_epoch, initial=start_step,
                    desc=f'epoch {epoch + 1}/{config.train.num_epochs}', leave=False,
                    mininterval=1.0, disable=not is_chief or not config.progress_bar)
    for batch, rows in bar:
      t0 = time.perf_counter()
      profile.before_step(step + 1)
      rstate, out = train_step(rstate, batch)
      step += 1
      losses.add(out['loss'], rows, t0)  # No transfer: the step may still be running.
      profile.after_step(step, rstate)
      first_step = first_step or step
      saving = every and step % every == 0 and step % steps_per_epoch
      stopping = stop_after and step >= stop_after
      if sync or saving or stopping or step == first_step or not step % config.log_every_steps:
        # The epoch's loss sum is checkpointed, so a resumed epoch logs the same mean.
        _show_losses(losses.read(step, epoch + 1, timed=step != first_step), step, bar,
                     writer if is_chief else None)
      if saving:
        save(step, dp.unreplicate(rstate))
      if stopping:
        # Tests: stop here as a preempted job would after its last checkpoint.
        save(step, dp.unreplicate(rstate))
        ckpt.close()
        train_input.close()
        writer.close()
        logging.info('stopping after step %d (config.train.stop_after_steps)', step)
        return None
    if len(losses):
      _show_losses(losses.read(step, epoch + 1), step, bar, writer if is_chief else None)
    state = dp.unreplicate(rstate)
    epoch += 1
    progress.epochs_done = epoch
    record = {'step': step, 'epoch': epoch,
              'train_loss': progress.epoch_loss_sum / max(progress.epoch_steps, 1)}
    progress.epoch_loss_sum, progress.epoch_steps = 0.0, 0
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
      if is_chief:
        print(f'epoch {epoch:3d}  loss {record["train_loss"]:.4f}  val NDCG@20 '
              f'{val["NDCG@20"]:.4f}  HR@10 {val["HR@10"]:.4f}{"  *" if improved else ""}',
              flush=True)
    elif is_chief:
      print(f'epoch {epoch:3d}  loss {record["train_loss"]:.4f}', flush=True)
    if is_chief:
      writer.write(record)
    if progress.evals_since_best >= patience or epoch >= config.train.num_epochs:
      progress.finished = True
    save(step, state)
  train_input.close()

  # Test once, from the best checkpoint.
  best_params = dp.place_state(ckpt.restore_best(state.params))
  val_result = val_eval.evaluate(best_params)
  test_eval = val_eval.for_split('test')  # The same compiled programs.
  test_groups = test_eval.evaluate(best_params, groups=True)
  sampled = test_groups.pop('sampled', None)
  ckpt.close()
  writer.close()
  eval_seconds = val_eval.seconds + test_eval.seconds
  results = {
      'val': val_result,
      'test': test_groups.pop('overall'),
      'test_groups': test_groups,
      # The popularity ranker on the same test examples (train counts; same exclusions).
      'test_popularity': test_eval.popularity(),
      'best_epoch': progress.best_epoch,
      'epochs': progress.epochs_done,
      'train_sequences_per_second': progress.train_sequences / max(progress.train_seconds, 1e-9),
      # Steady-state passes only (each evaluator's first compiles): None when none ran (e.g. a
      # finished run evaluated again), not a misleading 0.
      'eval_examples_per_second': ((val_eval.examples + test_eval.examples) / eval_seconds
                                   if val_eval.examples + test_eval.examples else None),
      # This process, from its start (setup included) to here.
      'wall_seconds': time.perf_counter() - wall_start,
      # Every process of the run (a resumed one's earlier ones to their last checkpoints) and the
      # steps alone; run_seconds is None for a run resumed from a checkpoint that predates it.
      'run_seconds': run_seconds(),
      'train_seconds': progress.train_seconds,
      'num_trainable_params': count_params(state.params),
      'devices': dp.num_devices,
      'parallelism': dp.mode,
      # Where the figures above were measured, and how the steps ran.
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'compute_dtype': config.train.compute_dtype,
      'sync_every_step': bool(sync),
      # Device memory in bytes (the peak over the whole run, training and evaluation; largest
      # over this process's devices); None where the backend reports none (CPU).
      'device_memory': parallel.memory_stats(),
  }
  if sampled is not None:
    # Labelled as sampled everywhere: not comparable to the full-ranking numbers above.
    results['test_sampled'] = sampled.pop('overall')
    results['test_groups_sampled'] = sampled
    results['sampled_negatives'] = test_eval.sampled_negatives
  if is_chief:
    # Per-example test ranks, for group and decile analyses (the experiment suites).
    test_eval.save_ranks(os.path.join(workdir, 'test_ranks.npz'))
    files.write_json(os.path.join(workdir, 'results.json'), results)
    plot_learning_curve(writer.jsonl_path, os.path.join(workdir, 'learning_curve.png'))
    # What inference needs beside best/ (config, catalogue, semantic space): alphafuse_jax.serving.
    from alphafuse_jax import inference_artifacts  # pylint: disable=g-import-not-at-top
    inference_artifacts.save(workdir, config, dataset)
  return results


def map_train_step(dp: parallel.DataParallel, model: base.Recommender, step) -> Any:
  """`step(state, batch)` mapped over the devices, the state donated.

  With item tables sharded over a 'model' axis (`dp.sharded_items`), the frozen language tables
  are arguments too, sharded like the ID tables (`builders.frozen_item_tables`), instead of
  constants every device would hold whole.
  """
  if not dp.sharded_items:
    return dp.map(step, ('replicated', 'sharded'), ('replicated', 'replicated'),
                  donate_argnums=(0,))
  tables, frozen = builders.frozen_item_tables(dp, model)
  mapped = dp.map(embeddings_base.with_frozen_args(step, tables),
                  ('replicated', 'replicated', 'sharded'), ('replicated', 'replicated'),
                  donate_argnums=(1,))
  return lambda state, batch: mapped(frozen, state, batch)


def _show_losses(values: list[float], step: int, bar: tqdm.tqdm,
                 writer: metric_writers.MetricWriter | None) -> None:
  """Losses just read (of steps step - len + 1 .. step) -> the progress bar and TensorBoard."""
  if values:
    bar.set_postfix(loss=f'{values[-1]:.4f}', refresh=False)
  for offset, value in enumerate(values if writer is not None else ()):
    writer.write_scalars(step - len(values) + 1 + offset, {'train/loss': value})


def plot_learning_curve(metrics_path: str, out_path: str) -> None:
  """Train loss and val NDCG@20 per epoch, from metrics.jsonl."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = files.read_jsonl(metrics_path)
  if not records:
    return
  evaluated = [r for r in records if 'val/NDCG@20' in r]
  fig, ax1 = plt.subplots(figsize=(6, 3.5))
  ax1.plot([r['epoch'] for r in records], [r['train_loss'] for r in records], 'C0-o', ms=3)
  ax1.set_xlabel('epoch')
  ax1.set_ylabel('train loss', color='C0')
  ax2 = ax1.twinx()
  ax2.plot([r['epoch'] for r in evaluated], [r['val/NDCG@20'] for r in evaluated], 'C1-s', ms=3)
  ax2.set_ylabel('val NDCG@20', color='C1')
  fig.tight_layout()
  files.atomic_write(out_path, lambda f: fig.savefig(f, format='png', dpi=120), mode='wb')
  plt.close(fig)
