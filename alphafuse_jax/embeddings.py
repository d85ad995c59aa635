"""Item-embedding modules (Flax linen): AlphaFuse and the paper's baselines behind one interface.

Every module maps item ids (pad id = N) to vectors and exposes the scoring table:

  module(ids, *, deterministic)           int [...] -> [..., features]
  module.table(*, deterministic=True)     [N, features], real items only (no padding row)
  module.auxiliary_loss(*, deterministic) scalar, 0.0 except RLMRec's reconstruction loss
  module.features, module.num_items       known without init

Frozen language tables are host constants (`FrozenTable` attributes), never params: they get no
gradients and no optimiser state, and `init` returns only the trainable leaves under 'params'.
The decomposition runs once in `make_item_embedding`, on the host, with JAX in float64
(`jax.enable_x64(True)` around `decomposition.fit_semantic_space`/`project`), then the tables are
cast to float32 as in the reference (reference-spec section 8).

Padding rows: the reference appends `np.random.rand(k)` to frozen tables and SI-initialised
tables; here they are zeros (the backbone masks padding positions, so the value never matters).
Frozen tables are embedded as constants in the compiled computations: fine for N x d tables of
tens of MB; for N x 3072 tables of hundreds of MB a non-param variable collection would keep the
executables small (not done yet).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alphafuse_jax import decomposition
from alphafuse_jax.losses import l2_normalize
# PyTorch's nn.Linear (W, b ~ U(+-1/sqrt(fan_in))), shared with the backbones.
from alphafuse_jax.models.layers import Dropout
from alphafuse_jax.models.layers import TorchDense

Array = jax.Array

PIPELINES = ('alphafuse', 'id', 'llminit', 'morec', 'whitenrec', 'unisrec', 'rlmrec', 'llmesr',
             'idreamrec')
ID_INITS = ('zeros', 'normal', 'uniform', 'xavier', 'orthogonal', 'sparse')
RLMREC_ALIGNMENTS = ('con', 'gen')
# Torch `nn.LeakyReLU()` slope and `F.normalize` epsilon.
_LEAKY_SLOPE = 0.01


class FrozenTable:
  """A read-only float32 host table [N + 1, d] (padding row last) held as a module constant.

  Compared and hashed by identity, so modules holding one stay hashable and cheap to compare;
  the repr shows only the shape.
  """
  __slots__ = ('padded',)

  def __init__(self, table: np.ndarray, *, has_padding_row: bool = False):
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 2:
      raise ValueError(f'A frozen table must be a matrix, got shape {table.shape}.')
    if not has_padding_row:
      table = np.concatenate([table, np.zeros((1, table.shape[1]), np.float32)], axis=0)
    table.setflags(write=False)
    self.padded = table

  @property
  def values(self) -> np.ndarray:
    """The N real rows [N, d] (a view, no copy)."""
    return self.padded[:-1]

  @property
  def num_items(self) -> int:
    return self.padded.shape[0] - 1

  @property
  def dim(self) -> int:
    return self.padded.shape[1]

  def __repr__(self) -> str:
    return f'FrozenTable(items={self.num_items}, dim={self.dim})'


def _constant(table: FrozenTable) -> Array:
  """The frozen table [N + 1, d] as a gradient-free constant."""
  return jax.lax.stop_gradient(jnp.asarray(table.padded))


def _lookup(table: Array, ids: Array) -> Array:
  """Rows of table [N + 1, d] for int ids [...] -> [..., d]; out-of-range ids give NaN."""
  return jnp.take(table, jnp.asarray(ids), axis=0, mode='fill', fill_value=jnp.nan)


def _zero_loss() -> Array:
  return jnp.zeros((), jnp.float32)


# ---- initialisers ------------------------------------------------------------------------------
def _uniform(low: float, high: float) -> Callable[..., Array]:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, low, high)
  return init


def sparse_init(sparsity: float = 0.01, std: float = 1.0) -> Callable[..., Array]:
  """torch.nn.init.sparse_: N(0, std), then ceil(sparsity * rows) random zeros per column."""
  def init(key, shape, dtype=jnp.float32):
    rows, cols = shape
    normal_key, perm_key = jax.random.split(key)
    values = std * jax.random.normal(normal_key, shape, dtype)
    num_zeros = int(math.ceil(sparsity * rows))
    # Per column: a random permutation of the rows, its first num_zeros entries zeroed.
    ranks = jax.vmap(lambda k: jax.random.permutation(k, rows))(jax.random.split(perm_key, cols))
    zero = jnp.zeros((cols, rows), bool)
    zero = zero.at[jnp.arange(cols)[:, None], ranks[:, :num_zeros]].set(True)
    return jnp.where(zero.T, jnp.zeros((), dtype), values)
  return init


def id_initializer(name: str) -> Callable[..., Array]:
  """The reference's `--ID_embs_init_type` initialisers (reference-spec section 2.2)."""
  if name == 'zeros':
    return nn.initializers.zeros
  if name == 'normal':
    return nn.initializers.normal(stddev=1.0)
  if name == 'uniform':
    return _uniform(0.0, 1.0)
  if name == 'xavier':
    # bound sqrt(6 / (rows + cols)) in both torch and Flax.
    return nn.initializers.xavier_uniform()
  if name in ('orthogonal', 'ortho'):
    return nn.initializers.orthogonal(scale=1.0)
  if name == 'sparse':
    return sparse_init(0.01, 1.0)
  raise ValueError(f'Unknown ID init {name!r} (config.embedding.id_init); use one of {ID_INITS}.')


# ---- plain and semantic ID tables -----------------------------------------------------------
class _TrainableTable(nn.Module):
  """Lookups in a trainable `id_table` [N + 1, h] that a subclass's setup() creates."""

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return _lookup(self.id_table, ids)

  def table(self, *, deterministic: bool = True) -> Array:
    return self.id_table[:self.num_items]

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    return _zero_loss()


class IDEmbedding(_TrainableTable):
  """`ID`: a trainable table [N + 1, hidden_dim] (SASRec, DreamRec).

  Attributes:
    num_items: N; the pad id is N.
    hidden_dim: output width.
    id_init: one of ID_INITS (reference default 'normal').
  """
  num_items: int
  hidden_dim: int
  id_init: str = 'normal'

  @property
  def features(self) -> int:
    return self.hidden_dim

  def setup(self):
    self.id_table = self.param('id_table', id_initializer(self.id_init),
                               (self.num_items + 1, self.hidden_dim))


class SemanticInitEmbedding(_TrainableTable):
  """`SI` (LLMInit): a trainable table initialised from language vectors.

  Attributes:
    num_items: N.
    initial_table: [N, hidden_dim] initial values (raw scaled vectors when d_l == hidden_dim,
      else the top-hidden_dim projection); the padding row starts at zero.
  """
  num_items: int
  initial_table: FrozenTable

  @property
  def features(self) -> int:
    return self.initial_table.dim

  def setup(self):
    self.id_table = self.param('id_table', lambda _: jnp.asarray(self.initial_table.padded))


# ---- AlphaFuse ---------------------------------------------------------------------------------
class AlphaFuseEmbedding(nn.Module):
  """AlphaFuse: frozen whitened language table + trainable ID table in its null dimensions.

  Attributes:
    num_items: N.
    language_table: frozen [N, k] (cover=False) or [N, k - n] (cover=True) projection.
    null_dim: n, the ID width.
    cover: False adds the ID into the last n of the k dims; True concatenates it.
    id_init: one of ID_INITS.
  """
  num_items: int
  language_table: FrozenTable
  null_dim: int
  cover: bool = False
  id_init: str = 'zeros'

  @property
  def features(self) -> int:
    return self.language_table.dim + (self.null_dim if self.cover else 0)

  def setup(self):
    # The reference's AF ID table has no padding_idx: its pad row is an ordinary (masked) row.
    self.id_table = self.param('id_table', id_initializer(self.id_init),
                               (self.num_items + 1, self.null_dim))

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    language = _lookup(_constant(self.language_table), ids)
    return decomposition.fuse(language, _lookup(self.id_table, ids), cover=self.cover)

  def table(self, *, deterministic: bool = True) -> Array:
    language = _constant(self.language_table)[:self.num_items]
    return decomposition.fuse(language, self.id_table[:self.num_items], cover=self.cover)

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    return _zero_loss()


# ---- adapters over frozen language tables -------------------------------------------------
class AdapterEmbedding(nn.Module):
  """MoRec (raw vectors) and WhitenRec (whitened vectors): GELU(Linear(d_l -> hidden_dim)).

  Attributes:
    num_items: N.
    language_table: frozen [N, d_l].
    hidden_dim: output width.
  """
  num_items: int
  language_table: FrozenTable
  hidden_dim: int

  @property
  def features(self) -> int:
    return self.hidden_dim

  def setup(self):
    self.adapter = TorchDense(self.hidden_dim)

  def _adapt(self, x: Array) -> Array:
    return nn.gelu(self.adapter(x), approximate=False)  # torch nn.GELU(): exact erf.

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return self._adapt(_lookup(_constant(self.language_table), ids))

  def table(self, *, deterministic: bool = True) -> Array:
    return self._adapt(_constant(self.language_table)[:self.num_items])

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    return _zero_loss()


class MoEAdaptor(nn.Module):
  """UniSRec's MoEAdaptorLayer: a softmax-gated mix of parametric-whitening experts.

  expert_e(x) = (dropout(x) - b_e) W_e (no bias; b_e = 0, W_e ~ N(0, 0.02) at init);
  gates = softmax(x W_gate + [train] eps * (softplus(x W_noise) + 0.01)), eps ~ N(0, 1),
  W_gate = W_noise = 0 at init; all experts are mixed (no top-k). Each expert draws its own
  dropout mask, as torch's separate Dropout modules do.

  Attributes:
    features: output width.
    num_experts: 8 in the reference.
    dropout_rate: expert input dropout (0.2).
    gating_rng: rng stream of the gating noise in train mode.
  """
  features: int
  num_experts: int = 8
  dropout_rate: float = 0.2
  gating_rng: str = 'gating'

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    d, e = x.shape[-1], self.num_experts
    w_gate = self.param('gate_kernel', nn.initializers.zeros, (d, e))
    w_noise = self.param('noise_kernel', nn.initializers.zeros, (d, e))
    bias = self.param('expert_bias', nn.initializers.zeros, (e, d))
    kernel = self.param('expert_kernel', nn.initializers.normal(0.02), (e, d, self.features))
    logits = jnp.matmul(x, w_gate)
    if not deterministic:
      noise_std = nn.softplus(jnp.matmul(x, w_noise)) + 1e-2
      logits = logits + jax.random.normal(self.make_rng(self.gating_rng), logits.shape) * noise_std
    gates = jax.nn.softmax(logits, axis=-1)  # [..., E]
    per_expert = jnp.broadcast_to(x, (e,) + x.shape)
    # Every expert input of the whole catalogue is dropped in train mode: the half-word dropout
    # halves these random bits (the largest part of a UniSRec step on CPU).
    per_expert = Dropout(self.dropout_rate)(per_expert, deterministic=deterministic)
    per_expert = per_expert - bias.reshape((e,) + (1,) * (x.ndim - 1) + (d,))
    outputs = jnp.einsum('e...d,edh->e...h', per_expert, kernel)
    return jnp.einsum('...e,e...h->...h', gates, outputs)


class UniSRecEmbedding(nn.Module):
  """UniSRec: MoEAdaptor over the frozen raw (scaled, uncentred) language table.

  Train mode (deterministic=False) needs the 'dropout' and `gating_rng` rng streams.

  Attributes:
    num_items: N.
    language_table: frozen [N, d_l].
    hidden_dim: output width.
    num_experts, dropout_rate, gating_rng: see MoEAdaptor.
  """
  num_items: int
  language_table: FrozenTable
  hidden_dim: int
  num_experts: int = 8
  dropout_rate: float = 0.2
  gating_rng: str = 'gating'

  @property
  def features(self) -> int:
    return self.hidden_dim

  def setup(self):
    self.adaptor = MoEAdaptor(self.hidden_dim, self.num_experts, self.dropout_rate,
                              self.gating_rng)

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return self.adaptor(_lookup(_constant(self.language_table), ids), deterministic=deterministic)

  def table(self, *, deterministic: bool = True) -> Array:
    language = _constant(self.language_table)[:self.num_items]
    return self.adaptor(language, deterministic=deterministic)

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    return _zero_loss()


class FrozenLanguageEmbedding(nn.Module):
  """iDreamRec: the frozen fully-whitened (WAP) table itself; no parameters.

  Attributes:
    num_items: N.
    language_table: frozen [N, d_l].
  """
  num_items: int
  language_table: FrozenTable

  @property
  def features(self) -> int:
    return self.language_table.dim

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return _lookup(_constant(self.language_table), ids)

  def table(self, *, deterministic: bool = True) -> Array:
    return _constant(self.language_table)[:self.num_items]

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    return _zero_loss()


# ---- RLMRec ------------------------------------------------------------------------------------
def cosine_alignment_loss(predicted: Array, target: Array) -> Array:
  """1 - mean_i cos(predicted_i, target_i) over rows [N, d] (RLMRec's reconstruction loss)."""
  cos = jnp.sum(l2_normalize(predicted) * l2_normalize(target), axis=-1)
  return 1.0 - jnp.sum(cos) / predicted.shape[0]


class Reconstructor(nn.Module):
  """RLMRec's Linear -> LeakyReLU(0.01) -> Linear."""
  hidden: int
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.leaky_relu(TorchDense(self.hidden)(x), negative_slope=_LEAKY_SLOPE)
    return TorchDense(self.features)(x)


class RLMRecEmbedding(nn.Module):
  """RLMRec (`SR`): ID table + frozen language table + reconstructor for the auxiliary loss.

  'con': rec(lang_i) should match ID_i; 'gen': rec(ID_i) should match lang_i. The loss is
  1 - mean_i cos over the N real items (the whole table every step); the caller weighs it by
  beta (config.embedding.aux_weight, 0.1).

  Attributes:
    num_items: N.
    hidden_dim: ID width h.
    language_table: frozen raw scaled [N, d_l].
    alignment: 'con' or 'gen'.
    id_init: one of ID_INITS.
  """
  num_items: int
  hidden_dim: int
  language_table: FrozenTable
  alignment: str = 'con'
  id_init: str = 'normal'

  @property
  def features(self) -> int:
    return self.hidden_dim

  def setup(self):
    if self.alignment not in RLMREC_ALIGNMENTS:
      raise ValueError(f'RLMRec alignment {self.alignment!r} (config.embedding.rlmrec_alignment) '
                       f'is not one of {RLMREC_ALIGNMENTS}.')
    self.id_table = self.param('id_table', id_initializer(self.id_init),
                               (self.num_items + 1, self.hidden_dim))
    d_l = self.language_table.dim
    out = self.hidden_dim if self.alignment == 'con' else d_l
    self.reconstructor = Reconstructor((d_l + self.hidden_dim) // 2, out)

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    if self.is_initializing():
      self.auxiliary_loss(deterministic=True)  # Creates the reconstructor's params.
    return _lookup(self.id_table, ids)

  def table(self, *, deterministic: bool = True) -> Array:
    return self.id_table[:self.num_items]

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    ids = self.id_table[:self.num_items]
    language = _constant(self.language_table)[:self.num_items]
    if self.alignment == 'con':
      return cosine_alignment_loss(self.reconstructor(language), ids)
    return cosine_alignment_loss(self.reconstructor(ids), language)


# ---- LLM-ESR -----------------------------------------------------------------------------------
class LLMESREmbedding(nn.Module):
  """LLM-ESR item side (`Dual_view`): trainable SI ID table and an adapted frozen text table.

  id_view = ID_i (initialised like LLMInit); text_view = Linear(Linear(lang_i)) with no
  activation (d_l -> adapter_hidden_dim -> hidden_dim); the item embedding is their
  concatenation [..., 2 * hidden_dim].

  Attributes:
    num_items: N.
    initial_table: [N, hidden_dim] SI initial values of the ID view.
    language_table: frozen raw scaled [N, d_l].
    adapter_hidden_dim: middle width (reference: d_l // 2 for SASRec, (d_l + h) // 2 for DreamRec).
  """
  num_items: int
  initial_table: FrozenTable
  language_table: FrozenTable
  adapter_hidden_dim: int

  @property
  def hidden_dim(self) -> int:
    return self.initial_table.dim

  @property
  def features(self) -> int:
    return 2 * self.hidden_dim

  def setup(self):
    self.id_table = self.param('id_table', lambda _: jnp.asarray(self.initial_table.padded))
    self.adapter_in = TorchDense(self.adapter_hidden_dim)
    self.adapter_out = TorchDense(self.hidden_dim)

  def _adapt(self, x: Array) -> Array:
    return self.adapter_out(self.adapter_in(x))

  def id_view(self, ids: Array, *, deterministic: bool = True) -> Array:
    """[..., h] trainable ID embeddings."""
    return _lookup(self.id_table, ids)

  def text_view(self, ids: Array, *, deterministic: bool = True) -> Array:
    """[..., h] adapted language embeddings."""
    return self._adapt(_lookup(_constant(self.language_table), ids))

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return jnp.concatenate([self.id_view(ids), self.text_view(ids)], axis=-1)

  def table(self, *, deterministic: bool = True) -> Array:
    language = _constant(self.language_table)[:self.num_items]
    return jnp.concatenate([self.id_table[:self.num_items], self._adapt(language)], axis=-1)

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    # LLM-ESR's contrastive term needs the batch's items: the backbone computes it with
    # `contrastive_loss2(id_view, text_view)`.
    return _zero_loss()


class LLMESRCrossAttention(nn.Module):
  """LLM-ESR's Multi_CrossAttention: queries from x, keys/values from y.

  Bias-free Q/K/V projections (h -> h), scores QK^T with padded keys set to -1e9 BEFORE the
  1/sqrt(h / heads) scaling, softmax over keys, an output Linear with bias; no causal mask and no
  dropout (reference-spec section 2.3).

  Attributes:
    hidden_dim: h (input and output width).
    num_heads: 2 in the reference.
  """
  hidden_dim: int
  num_heads: int = 2

  @nn.compact
  def __call__(self, x: Array, y: Array, key_padding_mask: Array) -> Array:
    """x [B, L, h], y [B, S, h], key_padding_mask bool [B, S] (True = pad) -> [B, L, h]."""
    if self.hidden_dim % self.num_heads:
      raise ValueError(f'hidden_dim {self.hidden_dim} is not divisible by {self.num_heads} heads.')
    head = self.hidden_dim // self.num_heads

    def split(t):
      return t.reshape(t.shape[:-1] + (self.num_heads, head))
    q = split(TorchDense(self.hidden_dim, use_bias=False, name='query')(x))
    k = split(TorchDense(self.hidden_dim, use_bias=False, name='key')(y))
    v = split(TorchDense(self.hidden_dim, use_bias=False, name='value')(y))
    scores = jnp.einsum('blhd,bshd->bhls', q, k)
    scores = jnp.where(key_padding_mask[:, None, None, :], -1e9, scores) / math.sqrt(head)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bhls,bshd->blhd', probs, v).reshape(x.shape[:-1] + (self.hidden_dim,))
    return TorchDense(self.hidden_dim, name='output')(out)


def contrastive_loss2(x: Array, y: Array, *, temperature: float = 1.0,
                      mask: Array | None = None) -> Array:
  """LLM-ESR's Contrastive_Loss2 between two views of the same M items.

  logits = X Y^T / tau; targets = row-softmax((Y Y^T + X X^T) / 2 * tau) (the reference
  multiplies by tau here); loss = mean_i (CE_row_i(logits, targets) + CE_row_i(logits^T,
  targets^T)) / 2, with CE(p, t) = -sum_j t_j log_softmax(p)_j. The reference calls it with
  X = ID view and Y = text view of every non-pad item in the batch.

  Args:
    x: [M, h] first view.
    y: [M, h] second view.
    temperature: tau (1 in the reference).
    mask: optional bool [M]; False rows/columns (padding of a static-shape batch) are left out,
      which equals the reference on the selected rows.

  Returns:
    Scalar loss.
  """
  neg = jnp.asarray(-1e9, x.dtype)
  logits = jnp.matmul(x, y.T) / temperature
  similarity = (jnp.matmul(y, y.T) + jnp.matmul(x, x.T)) / 2 * temperature
  if mask is None:
    mask = jnp.ones((x.shape[0],), bool)
  pair = mask[:, None] & mask[None, :]
  targets = jax.nn.softmax(jnp.where(pair, similarity, neg), axis=-1)
  targets = jnp.where(pair, targets, 0.0)
  # Row-wise log-softmax over valid columns, and over valid rows for the transposed term.
  row_log = jax.nn.log_softmax(jnp.where(pair, logits, neg), axis=1)
  col_log = jax.nn.log_softmax(jnp.where(pair, logits, neg), axis=0)
  x_loss = -jnp.sum(jnp.where(pair, targets * row_log, 0.0), axis=1)
  y_loss = -jnp.sum(jnp.where(pair, targets * col_log, 0.0), axis=0)
  count = jnp.maximum(jnp.sum(mask), 1)
  return jnp.sum(jnp.where(mask, (x_loss + y_loss) / 2.0, 0.0)) / count


# ---- factory -----------------------------------------------------------------------------------
def _get(config: Any, name: str, default: Any) -> Any:
  """config.<name>, or `default` when the field does not exist (yet) or is None."""
  value = config.get(name, default) if hasattr(config, 'get') else getattr(config, name, default)
  return default if value is None else value


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'config.embedding.{name}={value!r} must be an int >= {minimum}.')
  return int(value)


def semantic_table(language_embeddings: np.ndarray, *, dim: int | None, standardize: bool,
                   item_weights: np.ndarray | None = None, weighting: str = 'weighted',
                   eigenvalue_floor: float | None = None, null_dim: int | None = None,
                   null_threshold: float | None = None, cover: bool = False,
                   ) -> tuple[np.ndarray, int | None]:
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

  Returns:
    (table float32 [N, k or k - n], nullity n or None).
  """
  d_l = language_embeddings.shape[1]
  k = d_l if dim is None else dim
  with jax.enable_x64(True):
    space = decomposition.fit_semantic_space(language_embeddings, item_weights,
                                             weighting=weighting)
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


def make_item_embedding(config_embedding: Any, *, num_items: int,
                        language_embeddings: np.ndarray | None,
                        item_counts: np.ndarray | None) -> nn.Module:
  """Builds the item-embedding module of `config.embedding.pipeline`.

  Reads pipeline, hidden_dim, null_dim, null_threshold, cover, standardize, id_init,
  item_frequency_weighting and, when present, frequency_weighting ('weighted' | 'authors'),
  eigenvalue_floor, rlmrec_alignment ('con' | 'gen'), adapter_hidden_dim (LLM-ESR),
  unisrec_num_experts and unisrec_dropout.

  Args:
    config_embedding: the `config.embedding` ConfigDict.
    num_items: N (pad id = N).
    language_embeddings: [N, d_l] vectors ALREADY multiplied by config.text.scale (the
      reference's language_embs_scale); unused (may be None) for the 'id' pipeline.
    item_counts: [N] train popularity; needed only with item_frequency_weighting.

  Returns:
    An unbound Flax module with the interface described in the module docstring.
  """
  cfg = config_embedding
  pipeline = cfg.pipeline
  if pipeline not in PIPELINES:
    raise ValueError(f'Unknown config.embedding.pipeline={pipeline!r}; '
                     f'valid: {", ".join(PIPELINES)}.')
  num_items = _check_int('num_items', num_items)
  hidden = _check_int('hidden_dim', cfg.hidden_dim)
  id_init = _get(cfg, 'id_init', 'normal')
  id_initializer(id_init)  # Fails early on an unknown name.
  cover = bool(_get(cfg, 'cover', False))
  if cover and pipeline != 'alphafuse':
    raise ValueError(f'config.embedding.cover=True only applies to the alphafuse pipeline, not '
                     f'{pipeline!r} (in the reference it shrinks the table to hidden_dim - '
                     'null_dim columns and the backbone then fails); set cover=False.')
  if pipeline == 'id':
    return IDEmbedding(num_items, hidden, id_init)

  if language_embeddings is None:
    raise ValueError(f'Pipeline {pipeline!r} needs language embeddings (config.text), got None.')
  x = np.asarray(language_embeddings, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] != num_items:
    raise ValueError(f'language_embeddings has shape {x.shape}; expected [num_items={num_items}, '
                     'd_l], row i = item i.')
  if not np.all(np.isfinite(x)):
    bad = int(np.nonzero(~np.all(np.isfinite(x), axis=1))[0][0])
    raise ValueError(f'language_embeddings row {bad} contains NaN or inf; re-encode the item '
                     'texts.')
  d_l = x.shape[1]
  standardize = bool(_get(cfg, 'standardize', True))
  floor = cfg.get('eigenvalue_floor', None) if hasattr(cfg, 'get') else None
  weights, weighting = None, _get(cfg, 'frequency_weighting', 'weighted')
  if bool(_get(cfg, 'item_frequency_weighting', False)):
    if item_counts is None:
      raise ValueError('config.embedding.item_frequency_weighting=True needs train item counts '
                       '(item_counts), got None.')
    weights = np.asarray(item_counts, dtype=np.float64)
    if weights.shape != (num_items,):
      raise ValueError(f'item_counts has shape {weights.shape}; expected ({num_items},).')

  def semantic_init() -> np.ndarray:
    """The SI table [N, hidden]: raw vectors if d_l == hidden, else the top-hidden projection."""
    if hidden > d_l:
      raise ValueError(f'config.embedding.hidden_dim={hidden} exceeds the language dimension '
                       f'd_l={d_l}; the SI table cannot have more columns than d_l.')
    if hidden == d_l:
      return x.astype(np.float32)
    table, _ = semantic_table(x, dim=hidden, standardize=standardize, item_weights=weights,
                              weighting=weighting, eigenvalue_floor=floor)
    return table

  def whitened_full() -> np.ndarray:
    """WAP: full-dimension whitening; uniform weights and standardisation forced (reference)."""
    table, _ = semantic_table(x, dim=None, standardize=True, eigenvalue_floor=floor)
    return table

  if pipeline == 'alphafuse':
    if hidden > d_l:
      raise ValueError(f'config.embedding.hidden_dim={hidden} exceeds the language dimension '
                       f'd_l={d_l}: AlphaFuse keeps at most d_l directions.')
    null_dim, null_threshold = cfg.get('null_dim', None), cfg.get('null_threshold', None)
    if null_threshold is None and null_dim is not None and null_dim >= hidden:
      raise ValueError(f'config.embedding.null_dim={null_dim} must be < hidden_dim={hidden}: the '
                       'ID goes into the last null_dim of the hidden_dim kept dimensions.')
    table, nullity = semantic_table(x, dim=hidden, standardize=standardize, item_weights=weights,
                                    weighting=weighting, eigenvalue_floor=floor,
                                    null_dim=null_dim, null_threshold=null_threshold, cover=cover)
    if nullity >= hidden:
      raise ValueError(f'Nullity {nullity} (from null_threshold={null_threshold}) must be < '
                       f'hidden_dim={hidden}; lower config.embedding.null_threshold.')
    return AlphaFuseEmbedding(num_items, FrozenTable(table), nullity, cover, id_init)
  if pipeline == 'llminit':
    return SemanticInitEmbedding(num_items, FrozenTable(semantic_init()))
  if pipeline == 'morec':
    return AdapterEmbedding(num_items, FrozenTable(x), hidden)
  if pipeline == 'whitenrec':
    return AdapterEmbedding(num_items, FrozenTable(whitened_full()), hidden)
  if pipeline == 'unisrec':
    return UniSRecEmbedding(num_items, FrozenTable(x), hidden,
                            num_experts=_check_int('unisrec_num_experts',
                                                   _get(cfg, 'unisrec_num_experts', 8)),
                            dropout_rate=float(_get(cfg, 'unisrec_dropout', 0.2)))
  if pipeline == 'rlmrec':
    alignment = _get(cfg, 'rlmrec_alignment', 'con')
    if alignment not in RLMREC_ALIGNMENTS:
      raise ValueError(f'config.embedding.rlmrec_alignment={alignment!r}: use one of '
                       f'{RLMREC_ALIGNMENTS}.')
    return RLMRecEmbedding(num_items, hidden, FrozenTable(x), alignment, id_init)
  if pipeline == 'llmesr':
    adapter_hidden = _check_int('adapter_hidden_dim', _get(cfg, 'adapter_hidden_dim', d_l // 2))
    return LLMESREmbedding(num_items, FrozenTable(semantic_init()), FrozenTable(x), adapter_hidden)
  # idreamrec: the whitened table is the item embedding, so its width is the model width.
  if hidden != d_l:
    raise ValueError(f'iDreamRec uses the full whitened language vectors: config.embedding.'
                     f'hidden_dim={hidden} must equal d_l={d_l}.')
  return FrozenLanguageEmbedding(num_items, FrozenTable(whitened_full()))
