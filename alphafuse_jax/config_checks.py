"""Config validation: every check that needs no data, run before a workdir or dataset is touched.

`validate_config` raises `errors.ConfigError` with the field and the fix. One meaning for 0 across
the counts that may be 0: off (patience, mid-epoch checkpoints, stop_after_steps, sampled
negatives); the others must be >= 1.
"""

from __future__ import annotations

import codecs
import math
import os

import ml_collections

from alphafuse_jax import builders
from alphafuse_jax import errors
from alphafuse_jax import metrics as metrics_lib
from alphafuse_jax import parallel
from alphafuse_jax import precision
from alphafuse_jax.data import grain_input
from alphafuse_jax.data import protocols
from alphafuse_jax.embeddings import registry

OPTIMIZERS = ('adam_l2', 'adamw', 'sgd')


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fails at start, before any data or model work, on config values that would fail (or
  mislead) later; every message names the field and the fix (`errors.ConfigError`)."""
  try:
    _validate(config, num_devices)
  except errors.AlphafuseError:
    raise
  except ValueError as e:  # The registry's and the losses' own checks.
    raise errors.ConfigError(str(e)) from e


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise errors.ConfigError(message)


def _validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  t, e = config.train, config.eval
  _check(config.parallelism in parallel.MODES,
         f'config.parallelism={config.parallelism!r} is not one of {parallel.MODES}.')
  shards = config.get('model_shards', 1)
  _check(isinstance(shards, int) and shards >= 1 and not num_devices % shards,
         f'config.model_shards={shards!r} must be an int >= 1 that divides the {num_devices} '
         f'devices (e.g. --config.model_shards={num_devices}).')
  _check(shards == 1 or config.parallelism == 'shard_map',
         f"config.model_shards={shards} shards the item tables over a mesh axis: it needs "
         "config.parallelism='shard_map' (pmap replicates every parameter on every device).")
  _check(config.model.backbone in builders.BACKBONES, f'config.model.backbone='
         f'{config.model.backbone!r} is not one of {builders.BACKBONES}.')
  pipeline = registry.get_pipeline(config.embedding.pipeline)
  if config.model.backbone == 'dreamrec':
    _check(config.data.protocol != 'leave_one_out', 'DreamRec trains on the last position only: '
           "use config.data.protocol='cold_start_users' with backbone='dreamrec'.")
  else:
    builders.objective(config)  # Checks the loss, its negatives and their scoring.
  _check(t.optimizer in OPTIMIZERS,
         f'config.train.optimizer={t.optimizer!r} is not one of {OPTIMIZERS}.')
  _validate_sparse_item_updates(config)
  for name, batch in (('train.batch_size', t.batch_size), ('eval.batch_size', e.batch_size)):
    _check(batch >= 1 and not batch % num_devices,
           f'config.{name}={batch} must be a positive multiple of the {num_devices} devices '
           f'(set --config.{name}={max(num_devices, batch // num_devices * num_devices)}).')
  # Counts that must be >= 1, and those where 0 means off (no field gives 0 another meaning).
  for name, value in (('train.num_epochs', t.num_epochs), ('eval.every_epochs', e.every_epochs),
                      ('eval.item_chunk_size', e.item_chunk_size),
                      ('embedding.hidden_dim', config.embedding.hidden_dim)):
    _check(value >= 1, f'config.{name}={value} must be >= 1.')
  for name, value in (('train.patience', t.patience),
                      ('train.checkpoint_every_steps', t.checkpoint_every_steps),
                      ('train.stop_after_steps', t.stop_after_steps),
                      ('eval.sampled_negatives', e.sampled_negatives),
                      ('eval.short_history', e.short_history)):
    _check(value >= 0, f'config.{name}={value} must be >= 0 (0 = off).')
  _check(config.data.input in grain_input.INPUTS, f'config.data.input={config.data.input!r} is '
         f'not one of {grain_input.INPUTS}.')
  _check(config.data.grain_cache_mb > 0, f'config.data.grain_cache_mb='
         f'{config.data.grain_cache_mb} must be > 0 (MiB of decoded chunks).')
  _check(t.compute_dtype in precision.COMPUTE_DTYPES, f'config.train.compute_dtype='
         f'{t.compute_dtype!r} is not one of {precision.COMPUTE_DTYPES}.')
  _check(config.log_every_steps >= 1,
         f'config.log_every_steps={config.log_every_steps} must be >= 1.')
  # The loop queues up to log_every_steps steps between reads; XLA's CPU runtime with several
  # devices deadlocks past ~32 queued collective steps (parallel.needs_step_sync).
  _check(config.sync_every_step is not False or config.log_every_steps <= 16
         or not parallel.needs_step_sync(device_count=num_devices),
         f'config.sync_every_step=False on a CPU backend with {num_devices} devices would queue up '
         f'to config.log_every_steps={config.log_every_steps} collective steps, and XLA\'s CPU '
         'runtime deadlocks past ~32: set --config.log_every_steps=16 (or less), or leave '
         'config.sync_every_step unset.')
  profile = tuple(config.profile_steps)
  _check(not profile or (len(profile) == 2 and all(isinstance(v, int) for v in profile)
                         and profile[0] >= 1 and profile[1] >= 1),
         f'config.profile_steps={profile} must be () (off) or (first step >= 1, count >= 1), '
         'e.g. --config.profile_steps=10,5.')
  _check(t.learning_rate > 0 and math.isfinite(t.learning_rate),
         f'config.train.learning_rate={t.learning_rate} must be > 0.')
  _check(t.l2 >= 0, f'config.train.l2={t.l2} must be >= 0.')
  _check(t.loss != 'infonce' or t.temperature > 0,
         f'config.train.temperature={t.temperature} must be > 0 for the InfoNCE loss.')
  _check(not t.in_batch_negatives or t.batch_size // num_devices >= 2,
         f'config.train.in_batch_negatives needs >= 2 rows per device (the other rows are the '
         f'negatives), got batch_size={t.batch_size} over {num_devices} devices: raise '
         '--config.train.batch_size or set in_batch_negatives=False.')
  _check(0 <= config.model.dropout_rate < 1,
         f'config.model.dropout_rate={config.model.dropout_rate} must be in [0, 1).')
  _check(0 < e.head_fraction < 1, f'config.eval.head_fraction={e.head_fraction} must be in (0, 1).')
  _check(bool(e.ks) and all(k >= 1 for k in e.ks) and 20 in e.ks,
         f'config.eval.ks={tuple(e.ks)} must be cut-offs >= 1 including 20 (val NDCG@20 selects '
         'the best epoch); e.g. --config.eval.ks=1,5,10,20,50.')
  _check(e.ties in metrics_lib.METRIC_TIE_RULES,
         f'config.eval.ties={e.ties!r} is not one of {metrics_lib.METRIC_TIE_RULES}.')
  _validate_data_and_text(config, pipeline)


# Pipelines whose only trainable item rows are an `id_table` param looked up by id (and never
# read whole in a sampled-softmax step): the ones config.train.sparse_item_updates can update.
SPARSE_UPDATE_PIPELINES = ('id', 'llminit', 'alphafuse')
_NOT_SPARSE = {
    'rlmrec': 'its reconstruction loss reads every row of the ID table each step',
    'llmesr': "LLM-ESR's self-distillation looks up the histories of similar users, which are "
              'not in the batch',
}


def _validate_sparse_item_updates(config: ml_collections.ConfigDict) -> None:
  """config.train.sparse_item_updates: only where a step looks up the rows it can gather."""
  t = config.train
  if not t.get('sparse_item_updates', False):
    return
  off = 'or set --config.train.sparse_item_updates=false'
  _check(config.model.backbone == 'sasrec',
         f'config.train.sparse_item_updates=True needs the SASRec backbone: '
         f'{config.model.backbone!r} does not train by the sampled softmax. Set '
         f'--config.model.backbone=sasrec {off}.')
  _check(t.loss == 'sampled_softmax',
         f"config.train.sparse_item_updates=True needs config.train.loss='sampled_softmax', got "
         f"{t.loss!r} (it scores the whole item table, or per-row negatives the step does not "
         f'gather). Set --config.train.loss=sampled_softmax {off}.')
  name = config.embedding.pipeline
  why = _NOT_SPARSE.get(name, 'it has no trainable item ID table (nothing to update sparsely)')
  _check(name in SPARSE_UPDATE_PIPELINES,
         f'config.train.sparse_item_updates=True needs a pipeline whose trainable item rows are '
         f'looked up by id ({", ".join(SPARSE_UPDATE_PIPELINES)}); {name!r} cannot: {why}. Use '
         f'one of those pipelines {off}.')


def _validate_data_and_text(config: ml_collections.ConfigDict, pipeline) -> None:
  d, text = config.data, config.text
  protocols.check_train_user_fraction(d.get('train_user_fraction', 1.0),
                                      'authors' if d.source == 'authors' else d.protocol)
  if d.source == 'delimited':
    try:
      codecs.lookup(d.delimited.encoding)
    except LookupError:
      raise errors.ConfigError(f'config.data.delimited.encoding={d.delimited.encoding!r} is not a '
                               'known text encoding; use e.g. utf-8 or latin-1.') from None
    _check(d.delimited.duplicates in ('drop', 'keep'), f'config.data.delimited.duplicates='
           f"{d.delimited.duplicates!r} is not 'drop' or 'keep'.")
  if not pipeline.needs_text:
    return
  where = f'pipeline {pipeline.name!r} embeds item texts'
  _check(text.encoder in ('minilm', 'file'),
         f"config.text.encoder={text.encoder!r} is not 'minilm' or 'file'.")
  _check(text.scale > 0 and math.isfinite(text.scale),
         f'config.text.scale={text.scale} must be > 0.')
  if d.source == 'synthetic':
    # Synthetic items have no text, only generated vectors (found by the source when the path is
    # empty).
    _check(text.encoder == 'file', f"{where}, and synthetic items have no text: set "
           "--config.text.encoder=file (an empty embeddings_file uses the generated vectors).")
    _check(not text.embeddings_file or os.path.isfile(os.path.expanduser(text.embeddings_file)),
           f'config.text.embeddings_file={text.embeddings_file!r} does not exist; fix the path or '
           'leave it empty for the generated vectors.')
  elif text.encoder == 'file':
    _check(bool(text.embeddings_file), f'{where}: config.text.encoder=file needs '
           'config.text.embeddings_file=<.npy, .npz or _emb.pickle of [N, d] vectors>.')
    _check(os.path.isfile(os.path.expanduser(text.embeddings_file)),
           f'config.text.embeddings_file={text.embeddings_file!r} does not exist; fix the path.')
  elif d.source == 'authors':
    raise errors.ConfigError(f"{where}, and the authors' release has no item texts: set "
                             '--config.text.encoder=file --config.text.embeddings_file=<dir>/'
                             '<name>_emb.pickle, or --config.embedding.pipeline=id.')
  elif d.source == 'delimited':
    _check(bool(d.delimited.item_text_file),
           f'{where}, but config.data.delimited.item_text_file is empty (every item would get the '
           'same text): set it to the item-text CSV, use --config.text.encoder=file, or '
           '--config.embedding.pipeline=id.')
