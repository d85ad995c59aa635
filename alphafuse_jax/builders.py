"""The model factory: config + dataset metadata -> language table and model.

Used by training and by anything that loads a trained model: it needs the dataset's metadata
(item count, history length, item texts, train popularity), never its examples, except for
LLM-ESR's self-distillation, whose similar-user retrieval reads the train split (`for_training`).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from alphafuse_jax import data as data_lib
from alphafuse_jax import losses
from alphafuse_jax import parallel
from alphafuse_jax import sampled_softmax
from alphafuse_jax.embeddings import base as emb_base
from alphafuse_jax.embeddings import registry
from alphafuse_jax.models import dreamrec as dreamrec_lib
from alphafuse_jax.models import llmesr as llmesr_lib
from alphafuse_jax.models import sasrec as sasrec_lib

BACKBONES = ('sasrec', 'dreamrec')


def load_language_embeddings(config: ml_collections.ConfigDict,
                             dataset: data_lib.PreparedDataset) -> np.ndarray | None:
  """Item language vectors [N, d_l] scaled by `config.text.scale`, or None for the ID pipeline."""
  if not registry.get_pipeline(config.embedding.pipeline).needs_text:
    return None
  from alphafuse_jax import text as text_lib  # pylint: disable=g-import-not-at-top
  if config.text.encoder == 'file':
    path = config.text.embeddings_file
    if not path and config.data.source == 'synthetic':
      # The generated vectors, rows aligned with the prepared items.
      path = data_lib.synthetic.embeddings_file(
          config.data.synthetic, data_lib.resolve_data_dir(config.data.data_dir),
          dataset.item_keys)
    vectors = text_lib.load_embeddings(path, num_items=dataset.num_items)
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
  vectors = np.asarray(vectors, np.float64) * float(config.text.scale)
  # Duplicate rows would tie in every score: refused when they are most of the table.
  text_lib.readers.check_distinct(vectors, config.text.embeddings_file
                                  if config.text.encoder == 'file' else 'the item-text vectors')
  return vectors


def old_items(dataset) -> np.ndarray | None:
  """bool [N]: the items training may know (cold_start_items: all but the new ones), or None.

  The decomposition is fitted on these items' vectors only: a new item's text is unknown at
  training time. `dataset` is a `PreparedDataset` or anything with its metadata (serving's
  artifacts); without `new_items` every item is old (None).
  """
  new_items = getattr(dataset, 'new_items', None)
  return None if new_items is None else ~np.asarray(new_items, bool)


def objective(config: ml_collections.ConfigDict, dataset=None) -> losses.Objective:
  """The training loss of the user states, from config.train and the protocol.

  With a `dataset` that has new items (cold_start_items) they are excluded from training's
  softmax and negatives (`losses.Objective.excluded_items`). 'sampled_softmax' builds its sampler's tables
  from the dataset's train item counts (without a dataset: the fields are checked only).
  """
  t = config.train
  if t.loss == sampled_softmax.KIND:
    # Its sampler and in-batch tables need the item counts; new items are never drawn.
    return sampled_softmax.make_objective(
        num_negatives=t.num_negatives, per_position=config.data.protocol == 'leave_one_out',
        sampler=t.sampler, sampler_alpha=t.sampler_alpha,
        in_batch_negatives=t.in_batch_negatives, num_items=getattr(dataset, 'num_items', None),
        counts=getattr(dataset, 'train_item_counts', None), allowed=old_items(dataset))
  if t.sampler != 'uniform' or t.in_batch_negatives:
    raise ValueError(f"config.train.sampler={t.sampler!r} and in_batch_negatives="
                     f"{t.in_batch_negatives} apply to loss='sampled_softmax' only, not "
                     f"{t.loss!r}: set --config.train.loss=sampled_softmax or leave them at "
                     "'uniform' and False.")
  kwargs = dict(kind=t.loss, num_negatives=t.num_negatives, temperature=t.temperature,
                negative_scoring=t.negative_scoring,
                per_position=config.data.protocol == 'leave_one_out')
  old = old_items(dataset)
  excluded = () if old is None else tuple(int(i) for i in np.flatnonzero(~old))
  return losses.Objective(**kwargs, excluded_items=excluded)


def _dreamrec(config, item_embedding, max_len: int) -> dreamrec_lib.DreamRec:
  if 'diffusion' not in config:
    raise ValueError('config.diffusion is missing: DreamRec needs the diffusion section; start '
                     'from configs/dreamrec.py.')
  m, d = config.model, config.diffusion
  return dreamrec_lib.DreamRec(
      item_embedding=item_embedding, max_len=max_len, num_blocks=m.num_blocks,
      num_heads=m.num_heads, dropout_rate=m.dropout_rate, p_uncond=m.p_uncond,
      denoiser=m.denoiser, mlp_hidden_dim=m.mlp_hidden_dim, timesteps=d.timesteps,
      beta_schedule=d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end,
      sampling_stride=d.sampling_stride, guidance_weight=d.guidance_weight, sampler=d.sampler,
      reference_quirks=d.reference_quirks, eval_seed=d.eval_seed)


def _llmesr(config, item_embedding, dataset, language_embeddings,
            for_training: bool) -> llmesr_lib.LLMESR:
  e, m = config.embedding, config.model
  alpha = float(e.llmesr_distill_weight)
  if alpha < 0:
    raise ValueError(f'config.embedding.llmesr_distill_weight={alpha} must be >= 0.')
  similar = None
  if alpha > 0 and for_training:
    similar = llmesr_lib.retrieve_similar_users(
        dataset.splits['train'], dataset.user_sequences, language_embeddings,
        num_users=len(dataset.user_keys), num_items=dataset.num_items,
        num_similar=int(e.llmesr_num_similar_users))
  return llmesr_lib.LLMESR(
      item_embedding=item_embedding, max_len=dataset.max_len, block=m.block,
      num_blocks=m.num_blocks, num_heads=m.num_heads, dropout_rate=m.dropout_rate,
      pre_ln=m.pre_ln, cross_heads=int(e.llmesr_cross_heads),
      bug_compatible=bool(e.llmesr_bug_compatible), item_reg_weight=float(e.aux_weight),
      # Distillation only shapes training: a model built for inference leaves it off.
      distill_weight=alpha if for_training else 0.0, distill_loss=e.llmesr_distill_loss,
      similar_users=similar, objective=objective(config, dataset))


def build_model(config: ml_collections.ConfigDict, dataset: data_lib.PreparedDataset,
                language_embeddings: np.ndarray | None, *, for_training: bool = True):
  """The item-embedding pipeline inside the backbone of `config.model.backbone`.

  Args:
    config: the run's config.
    dataset: its metadata (num_items, max_len, train_item_counts; LLM-ESR's distillation also
      reads the train split, only when `for_training`).
    language_embeddings: from `load_language_embeddings` (None for the ID pipeline).
    for_training: False builds the same parameters without training-only state.
  """
  if config.model.backbone not in BACKBONES:
    raise ValueError(f'config.model.backbone={config.model.backbone!r} is not one of '
                     f'{BACKBONES}.')
  item_embedding = registry.make_item_embedding(
      config.embedding, num_items=dataset.num_items, language_embeddings=language_embeddings,
      item_counts=dataset.train_item_counts, fit_items=old_items(dataset),
      row_multiple=config.get('model_shards', 1))  # Tables sharded over M devices: rows % M == 0.
  m = config.model
  if m.get('position_init_std', 1.0) != 1.0 and (
      m.backbone == 'dreamrec' or config.embedding.pipeline == 'llmesr'):
    raise ValueError(f'config.model.position_init_std={m.position_init_std} applies to SASRec '
                     'only; DreamRec and LLM-ESR keep 1.0 (leave it at 1.0).')
  if config.model.backbone == 'dreamrec':
    return _dreamrec(config, item_embedding, dataset.max_len)
  if config.embedding.pipeline == 'llmesr':
    # Dual-view LLM-ESR backbone (cross-attention fusion, shared encoder, self-distillation).
    return _llmesr(config, item_embedding, dataset, language_embeddings, for_training)
  return sasrec_lib.SASRec(
      item_embedding=item_embedding, max_len=dataset.max_len, block=m.block,
      num_blocks=m.num_blocks, num_heads=m.num_heads, dropout_rate=m.dropout_rate,
      pre_ln=m.pre_ln, objective=objective(config, dataset),
      position_init_std=float(m.get('position_init_std', 1.0)))


def frozen_item_tables(dp: parallel.DataParallel, model: Any):
  """The model's frozen tables and their rows padded to the model-shard count and sharded over
  'model' (placed once per `dp`, shared with the evaluation)."""
  tables = emb_base.frozen_tables(model)
  frozen = tuple(dp.item_constant(id(t), lambda t=t: emb_base.pad_rows(
      t.padded, dp.model_shards)) for t in tables)
  return tables, frozen
