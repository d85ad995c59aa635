"""The item-embedding pipelines: AlphaFuse and the paper's baselines behind `base.ItemEmbedding`.

The decomposition that feeds the frozen tables runs once, in `registry.make_item_embedding`.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from alphafuse_jax import decomposition
from alphafuse_jax.basic_layers import Dropout
from alphafuse_jax.basic_layers import TorchDense
from alphafuse_jax.embeddings.base import FrozenTable
from alphafuse_jax.embeddings.base import ItemEmbedding
from alphafuse_jax.embeddings.base import constant
from alphafuse_jax.embeddings.base import id_initializer
from alphafuse_jax.embeddings.base import lookup
from alphafuse_jax.embeddings.base import pad_rows
from alphafuse_jax.embeddings.base import scaled
from alphafuse_jax.embeddings.base import padded_initializer
from alphafuse_jax.losses import l2_normalize

Array = jax.Array

RLMREC_ALIGNMENTS = ('con', 'gen')
# Torch `nn.LeakyReLU()` slope.
_LEAKY_SLOPE = 0.01


# ---- plain and semantic ID tables -----------------------------------------------------------
class _TrainableTable(ItemEmbedding):
  """Lookups in a trainable `id_table` [N + 1, h] that a subclass's setup() creates."""

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return lookup(self.id_table, ids)

  def table(self, *, deterministic: bool = True) -> Array:
    return self.id_table[:self.num_items]



class IDEmbedding(_TrainableTable):
  """`ID`: a trainable table [N + 1, hidden_dim] (SASRec, DreamRec).

  Attributes:
    num_items: N; the pad id is N.
    hidden_dim: output width.
    id_init: one of ID_INITS (reference default 'normal').
    row_multiple: the table's rows are padded to a multiple of it (the model-shard count).
  """
  num_items: int
  hidden_dim: int
  id_init: str = 'normal'
  row_multiple: int = 1

  @property
  def features(self) -> int:
    return self.hidden_dim

  def setup(self):
    self.id_table = self.param('id_table',
                               padded_initializer(id_initializer(self.id_init), self.row_multiple),
                               (self.num_items + 1, self.hidden_dim))


class SemanticInitEmbedding(_TrainableTable):
  """`SI` (LLMInit): a trainable table initialised from language vectors.

  Attributes:
    num_items: N.
    initial_table: [N, hidden_dim] initial values (raw scaled vectors when d_l == hidden_dim,
      else the top-hidden_dim projection); the padding row starts at zero.
    row_multiple: the table's rows are padded to a multiple of it (the model-shard count).
    language_scale: the table starts at language_scale x initial_table
      (config.embedding.language_scale; 1 as in the reference).
  """
  num_items: int
  initial_table: FrozenTable
  row_multiple: int = 1
  language_scale: float = 1.0

  @property
  def features(self) -> int:
    return self.initial_table.dim

  def setup(self):
    def init(_):
      table = jnp.asarray(pad_rows(self.initial_table.padded, self.row_multiple))
      return table if self.language_scale == 1.0 else table * self.language_scale
    self.id_table = self.param('id_table', init)


# ---- AlphaFuse ---------------------------------------------------------------------------------
class AlphaFuseEmbedding(ItemEmbedding):
  """AlphaFuse: frozen whitened language table + trainable ID table in its null dimensions.

  Attributes:
    num_items: N.
    language_table: frozen [N, k] (cover=False) or [N, k - n] (cover=True) projection.
    null_dim: n, the ID width.
    cover: False adds the ID into the last n of the k dims; True concatenates it.
    id_init: one of ID_INITS.
    row_multiple: the ID table's rows are padded to a multiple of it (the model-shard count).
    language_scale: the frozen table enters as language_scale x language_table
      (config.embedding.language_scale; 1 as in the reference).
  """
  num_items: int
  language_table: FrozenTable
  null_dim: int
  cover: bool = False
  id_init: str = 'zeros'
  row_multiple: int = 1
  language_scale: float = 1.0

  @property
  def features(self) -> int:
    return self.language_table.dim + (self.null_dim if self.cover else 0)

  def setup(self):
    # The reference's AF ID table has no padding_idx: its pad row is an ordinary (masked) row.
    self.id_table = self.param('id_table',
                               padded_initializer(id_initializer(self.id_init), self.row_multiple),
                               (self.num_items + 1, self.null_dim))

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    language = scaled(lookup(constant(self.language_table), ids), self.language_scale)
    return decomposition.fuse(language, lookup(self.id_table, ids), cover=self.cover)

  def table(self, *, deterministic: bool = True) -> Array:
    language = scaled(constant(self.language_table)[:self.num_items], self.language_scale)
    return decomposition.fuse(language, self.id_table[:self.num_items], cover=self.cover)




# ---- adapters over frozen language tables -------------------------------------------------
class AdapterEmbedding(ItemEmbedding):
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
    return self._adapt(lookup(constant(self.language_table), ids))

  def table(self, *, deterministic: bool = True) -> Array:
    return self._adapt(constant(self.language_table)[:self.num_items])



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


class UniSRecEmbedding(ItemEmbedding):
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
  random_lookup: ClassVar[bool] = True  # Expert dropout and gating noise in train mode.

  @property
  def features(self) -> int:
    return self.hidden_dim

  def setup(self):
    self.adaptor = MoEAdaptor(self.hidden_dim, self.num_experts, self.dropout_rate,
                              self.gating_rng)

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return self.adaptor(lookup(constant(self.language_table), ids), deterministic=deterministic)

  def table(self, *, deterministic: bool = True) -> Array:
    language = constant(self.language_table)[:self.num_items]
    return self.adaptor(language, deterministic=deterministic)



class FrozenLanguageEmbedding(ItemEmbedding):
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
    return lookup(constant(self.language_table), ids)

  def table(self, *, deterministic: bool = True) -> Array:
    return constant(self.language_table)[:self.num_items]



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


class RLMRecEmbedding(ItemEmbedding):
  """RLMRec (`SR`): ID table + frozen language table + reconstructor for the auxiliary loss.

  'con': rec(lang_i) should match ID_i; 'gen': rec(ID_i) should match lang_i. The loss is
  1 - mean_i cos over the N real items (the whole table every step), weighted by beta
  (`aux_weight`, config.embedding.aux_weight: 0.1).

  Attributes:
    num_items: N.
    hidden_dim: ID width h.
    language_table: frozen raw scaled [N, d_l].
    alignment: 'con' or 'gen'.
    id_init: one of ID_INITS.
    aux_weight: beta, the weight of the reconstruction loss.
  """
  num_items: int
  hidden_dim: int
  language_table: FrozenTable
  alignment: str = 'con'
  id_init: str = 'normal'
  aux_weight: float = 0.1
  row_multiple: int = 1  # ID-table rows padded to a multiple of it (the model-shard count).

  @property
  def features(self) -> int:
    return self.hidden_dim

  def setup(self):
    if self.alignment not in RLMREC_ALIGNMENTS:
      raise ValueError(f'RLMRec alignment {self.alignment!r} (config.embedding.rlmrec_alignment) '
                       f'is not one of {RLMREC_ALIGNMENTS}.')
    self.id_table = self.param('id_table',
                               padded_initializer(id_initializer(self.id_init), self.row_multiple),
                               (self.num_items + 1, self.hidden_dim))
    d_l = self.language_table.dim
    out = self.hidden_dim if self.alignment == 'con' else d_l
    self.reconstructor = Reconstructor((d_l + self.hidden_dim) // 2, out)

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return lookup(self.id_table, ids)

  def table(self, *, deterministic: bool = True) -> Array:
    return self.id_table[:self.num_items]

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    """aux_weight x (1 - mean cosine) between reconstructed and target rows of all N items."""
    ids = self.id_table[:self.num_items]
    language = constant(self.language_table)[:self.num_items]
    if self.alignment == 'con':
      loss = cosine_alignment_loss(self.reconstructor(language), ids)
    else:
      loss = cosine_alignment_loss(self.reconstructor(ids), language)
    return self.aux_weight * loss


# ---- LLM-ESR -----------------------------------------------------------------------------------
class LLMESREmbedding(ItemEmbedding):
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
  row_multiple: int = 1  # ID-table rows padded to a multiple of it (the model-shard count).

  @property
  def hidden_dim(self) -> int:
    return self.initial_table.dim

  @property
  def features(self) -> int:
    return 2 * self.hidden_dim

  def setup(self):
    self.id_table = self.param(
        'id_table', lambda _: jnp.asarray(pad_rows(self.initial_table.padded, self.row_multiple)))
    self.adapter_in = TorchDense(self.adapter_hidden_dim)
    self.adapter_out = TorchDense(self.hidden_dim)

  def _adapt(self, x: Array) -> Array:
    return self.adapter_out(self.adapter_in(x))

  def id_view(self, ids: Array, *, deterministic: bool = True) -> Array:
    """[..., h] trainable ID embeddings."""
    return lookup(self.id_table, ids)

  def text_view(self, ids: Array, *, deterministic: bool = True) -> Array:
    """[..., h] adapted language embeddings."""
    return self._adapt(lookup(constant(self.language_table), ids))

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    return jnp.concatenate([self.id_view(ids), self.text_view(ids)], axis=-1)

  def table(self, *, deterministic: bool = True) -> Array:
    language = constant(self.language_table)[:self.num_items]
    return jnp.concatenate([self.id_table[:self.num_items], self._adapt(language)], axis=-1)


