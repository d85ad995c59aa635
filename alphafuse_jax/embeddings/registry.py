"""The registry of named pipelines (the one list) and the factory that builds them from a config.

`PIPELINES` is the registry's names in table order; configs, the experiment suites and the model
factory read it. The decomposition runs here, once per build, on the host in float64 JAX
(`jax.enable_x64(True)` around `decomposition.fit_semantic_space`/`project`); the tables are then
cast to float32 as in the reference (reference-spec section 8).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from alphafuse_jax import decomposition
from alphafuse_jax.embeddings import pipelines as P
from alphafuse_jax.embeddings import variants
from alphafuse_jax.embeddings.base import FrozenTable
from alphafuse_jax.embeddings.base import id_initializer


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """One named pipeline.

  Attributes:
    name: the `config.embedding.pipeline` value.
    build: (_Inputs) -> the unbound item-embedding module.
    needs_text: whether it reads language embeddings (every pipeline but 'id').
    text_map: an item's vector is a fixed function of its text (a new item can be placed from its
      text alone); False where the rows are free parameters (ID, LLMInit, RLMRec).
    backbones: the backbones the suites pair it with.
    summary: one line for docs and errors.
  """
  name: str
  build: Callable[['_Inputs'], nn.Module]
  needs_text: bool
  text_map: bool
  backbones: tuple[str, ...]
  summary: str


@dataclasses.dataclass(frozen=True)
class _Inputs:
  cfg: Any  # config.embedding
  num_items: int
  hidden: int
  x: np.ndarray | None  # [N, d_l] float64 scaled language vectors
  weights: np.ndarray | None  # [N] popularity weights for the moments, or None
  fit: np.ndarray | None = None  # bool [N]: the items the moments are fitted on (None: all)

  @property
  def d_l(self) -> int:
    return self.x.shape[1]

  def semantic(self, dim: int | None, **kwargs) -> tuple[np.ndarray, int | None]:
    return semantic_table(self.x, dim=dim, standardize=bool(self.cfg.standardize),
                          item_weights=self.weights, weighting=self.cfg.frequency_weighting,
                          eigenvalue_floor=self.cfg.eigenvalue_floor, fit_items=self.fit,
                          **kwargs)

  def semantic_init(self) -> np.ndarray:
    """The SI table [N, hidden]: raw vectors if d_l == hidden, else the top-hidden projection."""
    if self.hidden > self.d_l:
      raise ValueError(f'config.embedding.hidden_dim={self.hidden} exceeds the language dimension '
                       f'd_l={self.d_l}; the SI table cannot have more columns than d_l.')
    if self.hidden == self.d_l:
      return self.x.astype(np.float32)
    return self.semantic(self.hidden)[0]

  def whitened_full(self) -> np.ndarray:
    """WAP: full-dimension whitening; uniform weights and standardisation forced (reference)."""
    return semantic_table(self.x, dim=None, standardize=True,
                          eigenvalue_floor=self.cfg.eigenvalue_floor, fit_items=self.fit)[0]


def semantic_table(language_embeddings: np.ndarray, *, dim: int | None, standardize: bool,
                   item_weights: np.ndarray | None = None, weighting: str = 'weighted',
                   eigenvalue_floor: float | None = None, null_dim: int | None = None,
                   null_threshold: float | None = None, cover: bool = False,
                   fit_items: np.ndarray | None = None) -> tuple[np.ndarray, int | None]:
  """The reference's `semantic_space_decomposion`, in float64 JAX on the host.

  Args:
    language_embeddings: [N, d_l] scaled vectors.
    dim: kept width k (None: d_l).
    standardize: whiten each kept direction.
    item_weights: optional [N] popularity for the weighted moments.
    weighting: 'weighted' or 'authors' (see decomposition.fit_semantic_space).
    eigenvalue_floor: optional clamp for whitening (see decomposition.project).
    null_dim, null_threshold: nullity; only computed when one is set.
    cover: project k - n directions (the ID will be concatenated).
    fit_items: optional bool [N]: fit the moments on these rows only (cold_start_items: the old
      items, whose texts exist at training time), then project every row.

  Returns:
    (table float32 [N, k or k - n], nullity n or None).
  """
  d_l = language_embeddings.shape[1]
  k = d_l if dim is None else dim
  with jax.enable_x64(True):
    space = _fit_space(language_embeddings, item_weights, weighting, fit_items)
    nullity = None
    if null_dim is not None or null_threshold is not None:
      nullity = decomposition.null_space_dim(space.eigenvalues, null_dim=null_dim,
                                             null_threshold=null_threshold, kept_dim=k)
    width = k - nullity if cover else k
    if width < 1:
      raise ValueError(f'cover=True with nullity {nullity} leaves no language dimension of the '
                       f'{k} kept; lower the nullity or raise hidden_dim.')
    table = decomposition.project(language_embeddings, space, width, standardize,
                                  eigenvalue_floor=eigenvalue_floor)
    return np.asarray(table, dtype=np.float32), nullity


def _fit_space(x: np.ndarray, weights: np.ndarray | None, weighting: str,
               fit_items: np.ndarray | None) -> decomposition.SemanticSpace:
  """`decomposition.fit_semantic_space` on the rows `fit_items` (all rows when None)."""
  if fit_items is not None:
    x = np.asarray(x)[fit_items]
    weights = None if weights is None else np.asarray(weights)[fit_items]
  return decomposition.fit_semantic_space(x, weights, weighting=weighting)


@dataclasses.dataclass(frozen=True)
class TextMap:
  """How a text-map pipeline's frozen `language_table` rows are made from scaled language vectors.

  A new item gets its row by `rows` of its vector, exactly as the catalogue's rows were made, so
  it can be ranked without retraining. `space` is None when the rows are the vectors themselves
  (MoRec, UniSRec, LLM-ESR's text view); otherwise rows = project(x, space, width, standardize,
  eigenvalue_floor) in float64, cast to float32 (AlphaFuse, WhitenRec, iDreamRec).

  Attributes:
    pipeline: the pipeline's name.
    space: the fitted `decomposition.SemanticSpace` (float64 numpy), or None.
    width: projected directions (AlphaFuse: k, or k - n with cover; full whitening: d_l).
    standardize: whether the rows are whitened.
    eigenvalue_floor: the whitening clamp (config.embedding.eigenvalue_floor).
    nullity: AlphaFuse's ID width n (None elsewhere).
    cover: AlphaFuse's cover mode (the ID dims follow the `width` language dims).
  """
  pipeline: str
  space: decomposition.SemanticSpace | None
  width: int | None
  standardize: bool
  eigenvalue_floor: float | None
  nullity: int | None
  cover: bool

  def rows(self, language_embeddings: np.ndarray) -> np.ndarray:
    """float32 [M, width or d_l] frozen-table rows of scaled vectors [M, d_l]."""
    x = np.asarray(language_embeddings, np.float64)
    if self.space is None:
      return x.astype(np.float32)
    with jax.enable_x64(True):
      space = decomposition.SemanticSpace(*(np.asarray(a, np.float64) for a in self.space))
      table = decomposition.project(x, space, self.width, self.standardize,
                                    eigenvalue_floor=self.eigenvalue_floor)
      return np.asarray(table, dtype=np.float32)


# Pipelines with free rows whose new rows may be their INITIAL values (behind an explicit flag).
INITIAL_ROW_PIPELINES = ('llminit',)


def check_text_map(name: str, *, initial_rows: bool = False) -> Pipeline:
  """The pipeline `name` if a new item gets its vector from its text alone, else a clear error.

  `initial_rows` also accepts `INITIAL_ROW_PIPELINES`: a new item then gets the row its ID table
  started from (LLMInit's language projection), not a trained one.
  """
  pipeline = get_pipeline(name)
  if pipeline.text_map or (initial_rows and name in INITIAL_ROW_PIPELINES):
    return pipeline
  text_maps = ', '.join(p.name for p in REGISTRY.values() if p.text_map)
  hint = (f'; {name!r} can give new items their initial rows instead (initial_rows=True, '
          '--initial_rows)' if name in INITIAL_ROW_PIPELINES else '')
  raise ValueError(f'Pipeline {name!r} has free item rows ({pipeline.summary}): an item it never '
                   f'trained on has no vector. New items need a text-map pipeline: '
                   f'{text_maps}{hint}.')


def text_map(config_embedding: Any, *, language_embeddings: np.ndarray,
             item_counts: np.ndarray | None, initial_rows: bool = False,
             fit_items: np.ndarray | None = None) -> TextMap:
  """The `TextMap` that `make_item_embedding` builds the pipeline's `language_table` with.

  Same arguments as `make_item_embedding` (plus `initial_rows`, see `check_text_map`: LLMInit's
  map then gives the initial ID rows); the space is fitted the same way (float64, the same
  weights, the same `fit_items`), so `rows(language_embeddings)` equals the module's frozen (or
  initial) table.
  """
  cfg = config_embedding
  pipeline = check_text_map(cfg.pipeline, initial_rows=initial_rows)
  module = make_item_embedding(cfg, num_items=np.shape(language_embeddings)[0],
                               language_embeddings=language_embeddings, item_counts=item_counts,
                               fit_items=fit_items)
  x = np.asarray(language_embeddings, np.float64)
  if pipeline.name in _RAW_TEXT_TABLES or (pipeline.name == 'llminit'
                                           and module.features == x.shape[1]):
    return TextMap(pipeline.name, None, None, False, None, None, False)
  with jax.enable_x64(True):
    if pipeline.name in ('alphafuse', 'alphafuse_anchor', 'llminit'):  # _Inputs.semantic.
      weights = np.asarray(item_counts, np.float64) if cfg.item_frequency_weighting else None
      space = _fit_space(x, weights, cfg.frequency_weighting, fit_items)
      fused = pipeline.name != 'llminit'
      return TextMap(pipeline.name, jax.tree.map(np.asarray, space),
                     module.language_table.dim if fused else module.features,
                     bool(cfg.standardize), cfg.eigenvalue_floor,
                     module.null_dim if fused else None,
                     bool(fused and getattr(module, 'cover', False)))
    if pipeline.name in _WHITENED_TEXT_TABLES:  # _Inputs.whitened_full: uniform weights.
      space = _fit_space(x, None, 'weighted', fit_items)
      return TextMap(pipeline.name, jax.tree.map(np.asarray, space), x.shape[1], True,
                     cfg.eigenvalue_floor, None, False)
  raise NotImplementedError(f'text_map does not know how pipeline {pipeline.name!r} builds its '
                            'language_table; add it to embeddings/registry.py text_map.')


# The text-map pipelines whose language_table is the scaled vectors, or their full whitening.
_RAW_TEXT_TABLES = ('morec', 'unisrec', 'llmesr')
_WHITENED_TEXT_TABLES = ('whitenrec', 'idreamrec')


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'config.embedding.{name}={value!r} must be an int >= {minimum}.')
  return int(value)


# ---- one builder per pipeline -------------------------------------------------------------------
def _id(a: _Inputs) -> nn.Module:
  return P.IDEmbedding(a.num_items, a.hidden, a.cfg.id_init)


def _alphafuse(a: _Inputs) -> nn.Module:
  cfg, hidden = a.cfg, a.hidden
  if hidden > a.d_l:
    raise ValueError(f'config.embedding.hidden_dim={hidden} exceeds the language dimension '
                     f'd_l={a.d_l}: AlphaFuse keeps at most d_l directions.')
  if cfg.null_threshold is None and cfg.null_dim is not None and cfg.null_dim >= hidden:
    raise ValueError(f'config.embedding.null_dim={cfg.null_dim} must be < hidden_dim={hidden}: '
                     'the ID goes into the last null_dim of the hidden_dim kept dimensions.')
  table, nullity = a.semantic(hidden, null_dim=cfg.null_dim, null_threshold=cfg.null_threshold,
                              cover=bool(cfg.cover))
  if nullity >= hidden:
    raise ValueError(f'Nullity {nullity} (from null_threshold={cfg.null_threshold}) must be < '
                     f'hidden_dim={hidden}; lower config.embedding.null_threshold.')
  return P.AlphaFuseEmbedding(a.num_items, FrozenTable(table), nullity, bool(cfg.cover),
                              cfg.id_init, language_scale=_language_scale(cfg))


def _alphafuse_anchor(a: _Inputs) -> nn.Module:
  weight = a.cfg.anchor_weight
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
    raise ValueError(f'config.embedding.anchor_weight={weight!r} must be a number >= 0 (0 frees '
                     'the semantic dims; larger keeps them nearer AlphaFuse).')
  fused = _alphafuse(a)  # AlphaFuse's checks and its table (cover is refused before this).
  return variants.AnchoredAlphaFuseEmbedding(a.num_items, fused.language_table, fused.null_dim,
                                             a.cfg.id_init, float(weight),
                                             language_scale=fused.language_scale)


def _llminit(a: _Inputs) -> nn.Module:
  return P.SemanticInitEmbedding(a.num_items, FrozenTable(a.semantic_init()),
                                 language_scale=_language_scale(a.cfg))


# The pipelines whose language table (LLMInit: initial table) config.embedding.language_scale scales.
LANGUAGE_SCALE_PIPELINES = ('alphafuse', 'alphafuse_anchor', 'llminit')


def _language_scale(cfg: Any) -> float:
  scale = cfg.get('language_scale', 1.0)
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < np.inf:
    raise ValueError(f'config.embedding.language_scale={scale!r} must be a finite number > 0.')
  return float(scale)


def _morec(a: _Inputs) -> nn.Module:
  return P.AdapterEmbedding(a.num_items, FrozenTable(a.x), a.hidden)


def _whitenrec(a: _Inputs) -> nn.Module:
  return P.AdapterEmbedding(a.num_items, FrozenTable(a.whitened_full()), a.hidden)


def _unisrec(a: _Inputs) -> nn.Module:
  return P.UniSRecEmbedding(
      a.num_items, FrozenTable(a.x), a.hidden,
      num_experts=_check_int('unisrec_num_experts', a.cfg.unisrec_num_experts),
      dropout_rate=float(a.cfg.unisrec_dropout))


def _rlmrec(a: _Inputs) -> nn.Module:
  alignment = a.cfg.rlmrec_alignment
  if alignment not in P.RLMREC_ALIGNMENTS:
    raise ValueError(f'config.embedding.rlmrec_alignment={alignment!r}: use one of '
                     f'{P.RLMREC_ALIGNMENTS}.')
  return P.RLMRecEmbedding(a.num_items, a.hidden, FrozenTable(a.x), alignment, a.cfg.id_init,
                           float(a.cfg.aux_weight))


def _llmesr(a: _Inputs) -> nn.Module:
  adapter = a.cfg.adapter_hidden_dim
  adapter = _check_int('adapter_hidden_dim', a.d_l // 2 if adapter is None else adapter)
  return P.LLMESREmbedding(a.num_items, FrozenTable(a.semantic_init()), FrozenTable(a.x), adapter)


def _idreamrec(a: _Inputs) -> nn.Module:
  # The whitened table is the item embedding, so its width is the model width.
  if a.hidden != a.d_l:
    raise ValueError(f'iDreamRec uses the full whitened language vectors: config.embedding.'
                     f'hidden_dim={a.hidden} must equal d_l={a.d_l}.')
  return P.FrozenLanguageEmbedding(a.num_items, FrozenTable(a.whitened_full()))


_BOTH = ('sasrec', 'dreamrec')
REGISTRY: dict[str, Pipeline] = {p.name: p for p in (
    Pipeline('alphafuse', _alphafuse, True, True, _BOTH,
             'frozen whitened language directions + an ID table in the null dims'),
    Pipeline('id', _id, False, False, _BOTH, 'a trainable ID table'),
    Pipeline('llminit', _llminit, True, False, _BOTH,
             'an ID table initialised from the language vectors (SI)'),
    Pipeline('morec', _morec, True, True, _BOTH, 'an adapter over the raw language vectors'),
    Pipeline('whitenrec', _whitenrec, True, True, _BOTH,
             'an adapter over fully whitened language vectors'),
    Pipeline('unisrec', _unisrec, True, True, _BOTH,
             "UniSRec's MoE adaptor over the language vectors"),
    Pipeline('rlmrec', _rlmrec, True, False, _BOTH,
             'an ID table aligned to the language vectors by a reconstruction loss'),
    Pipeline('llmesr', _llmesr, True, True, _BOTH,
             "LLM-ESR's dual view: an SI ID table beside an adapted text table"),
    Pipeline('idreamrec', _idreamrec, True, True, ('dreamrec',),
             'the frozen fully whitened language table itself'),
    # A variant beyond the paper (issue 20 item 6), in no paper suite: reported under its own name.
    Pipeline('alphafuse_anchor', _alphafuse_anchor, True, True, (),
             "AlphaFuse-Anchor (a variant, not the paper's AlphaFuse): AlphaFuse whose semantic "
             'dims get a trainable offset anchored to zero (config.embedding.anchor_weight)'),
)}
PIPELINES = tuple(REGISTRY)


def get_pipeline(name: str) -> Pipeline:
  """The registry entry of `name`; an unknown name is an error that lists the valid ones."""
  if name not in REGISTRY:
    raise ValueError(f'Unknown config.embedding.pipeline={name!r}; valid: {", ".join(PIPELINES)}.')
  return REGISTRY[name]


def pipelines_for(backbone: str) -> tuple[str, ...]:
  """The pipelines the suites pair with `backbone` ('sasrec' or 'dreamrec'), in table order."""
  return tuple(p.name for p in REGISTRY.values() if backbone in p.backbones)


def make_item_embedding(config_embedding: Any, *, num_items: int,
                        language_embeddings: np.ndarray | None,
                        item_counts: np.ndarray | None,
                        fit_items: np.ndarray | None = None,
                        row_multiple: int = 1) -> nn.Module:
  """Builds the item-embedding module of `config.embedding.pipeline`.

  Args:
    config_embedding: the `config.embedding` ConfigDict (every field of configs/default.py).
    num_items: N (pad id = N).
    language_embeddings: [N, d_l] vectors ALREADY multiplied by config.text.scale (the
      reference's language_embs_scale); unused (may be None) for the 'id' pipeline.
    item_counts: [N] train popularity; needed only with item_frequency_weighting.
    fit_items: optional bool [N]: the items whose vectors the decomposition (mean, covariance)
      is fitted on; None fits on all. cold_start_items passes the old items: a new item's text
      is unknown at training time, so it must not shape the space (its row is still projected).
    row_multiple: trainable ID tables get their rows padded to a multiple of it
      (`config.model_shards`: a table sharded over M devices needs rows divisible by M).

  Returns:
    An unbound `base.ItemEmbedding`.
  """
  module = _make_item_embedding(config_embedding, num_items, language_embeddings, item_counts,
                                fit_items)
  row_multiple = _check_int('row_multiple', row_multiple)
  if row_multiple > 1 and 'row_multiple' in {f.name for f in dataclasses.fields(module)}:
    module = module.clone(row_multiple=row_multiple)
  return module


def _make_item_embedding(config_embedding, num_items, language_embeddings, item_counts,
                         fit_items) -> nn.Module:
  """`make_item_embedding` before its rows are padded for model sharding."""
  cfg = config_embedding
  pipeline = get_pipeline(cfg.pipeline)
  num_items = _check_int('num_items', num_items)
  hidden = _check_int('hidden_dim', cfg.hidden_dim)
  id_initializer(cfg.id_init)  # Fails early on an unknown name.
  if cfg.get('language_scale', 1.0) != 1.0 and pipeline.name not in LANGUAGE_SCALE_PIPELINES:
    raise ValueError(f'config.embedding.language_scale={cfg.language_scale} only applies to '
                     f'{", ".join(LANGUAGE_SCALE_PIPELINES)}, not {pipeline.name!r}; set it to 1.')
  if cfg.cover and pipeline.name != 'alphafuse':
    raise ValueError(f'config.embedding.cover=True only applies to the alphafuse pipeline, not '
                     f'{pipeline.name!r} (in the reference it shrinks the table to hidden_dim - '
                     'null_dim columns and the backbone then fails); set cover=False.')
  if not pipeline.needs_text:
    return pipeline.build(_Inputs(cfg, num_items, hidden, None, None))
  if language_embeddings is None:
    raise ValueError(f'Pipeline {pipeline.name!r} needs language embeddings (config.text), '
                     'got None.')
  x = np.asarray(language_embeddings, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] != num_items:
    raise ValueError(f'language_embeddings has shape {x.shape}; expected [num_items={num_items}, '
                     'd_l], row i = item i.')
  if not np.all(np.isfinite(x)):
    bad = int(np.nonzero(~np.all(np.isfinite(x), axis=1))[0][0])
    raise ValueError(f'language_embeddings row {bad} contains NaN or inf; re-encode the item '
                     'texts.')
  weights = None
  if cfg.item_frequency_weighting:
    if item_counts is None:
      raise ValueError('config.embedding.item_frequency_weighting=True needs train item counts '
                       '(item_counts), got None.')
    weights = np.asarray(item_counts, dtype=np.float64)
    if weights.shape != (num_items,):
      raise ValueError(f'item_counts has shape {weights.shape}; expected ({num_items},).')
  if fit_items is not None:
    fit_items = np.asarray(fit_items)
    if fit_items.dtype != bool or fit_items.shape != (num_items,) or fit_items.sum() < 2:
      raise ValueError(f'fit_items must be a bool mask [num_items={num_items}] with at least 2 '
                       f'items to fit the moments on, got {fit_items.dtype} {fit_items.shape}.')
  return pipeline.build(_Inputs(cfg, num_items, hidden, x, weights, fit_items))
