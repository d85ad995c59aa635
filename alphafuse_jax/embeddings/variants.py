"""Variants beyond the paper, each reported under its own name (never as AlphaFuse).

  AnchoredAlphaFuseEmbedding  'alphafuse_anchor': AlphaFuse whose semantic dims get a trainable
                              offset anchored to zero (issue 20 item 6)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alphafuse_jax.embeddings.base import constant
from alphafuse_jax.embeddings.base import FrozenTable
from alphafuse_jax.embeddings.base import id_initializer
from alphafuse_jax.embeddings.base import ItemEmbedding
from alphafuse_jax.embeddings.base import lookup
from alphafuse_jax.embeddings.base import padded_initializer
from alphafuse_jax.embeddings.base import scaled

Array = jax.Array


class AnchoredAlphaFuseEmbedding(ItemEmbedding):
  """AlphaFuse-Anchor, a variant (not the paper's AlphaFuse): the language dims may move, anchored.

  AlphaFuse freezes the k - n semantic (row-space) dims of every item. Here item i is L_i + T_i:
  L the same frozen whitened table [N, k] as AlphaFuse's (cover=False), T a trainable `id_table`
  [N + 1, k]. T's last n columns are AlphaFuse's ID (the null dims, initialised by `id_init`);
  its first k - n columns are an offset of the semantic dims, initialised at zero and pulled back
  to zero by `auxiliary_loss`: anchor_weight x the mean over the N items of ||T_i[:k - n]||^2.
  At initialisation the table equals AlphaFuse's exactly; an infinite anchor_weight is AlphaFuse,
  0 frees the semantic dims (rows that start at the whitened projection, as LLMInit's start at
  the plain one). A new item gets T_i = 0, its text row, as AlphaFuse places one, so the
  pipeline stays a text map. Rows that are rarely trained stay near their text rows (the tail),
  frequent ones may move: the hypothesis is AlphaFuse's tail advantage with less of its overall
  gap. Its anchor touches every row each step, so it has no sparse item updates.

  Attributes:
    num_items: N.
    language_table: frozen [N, k] projection (AlphaFuse's, cover=False).
    null_dim: n, the ID width (the last n of the k columns).
    id_init: one of ID_INITS, for the ID columns.
    anchor_weight: the weight of the anchor (config.embedding.anchor_weight), >= 0.
    row_multiple: the table's rows are padded to a multiple of it (the model-shard count).
    language_scale: L enters as language_scale x language_table, as in AlphaFuse.
  """
  num_items: int
  language_table: FrozenTable
  null_dim: int
  id_init: str = 'zeros'
  anchor_weight: float = 1.0
  row_multiple: int = 1
  language_scale: float = 1.0

  @property
  def features(self) -> int:
    return self.language_table.dim

  def setup(self):
    k, n = self.language_table.dim, self.null_dim
    id_init = id_initializer(self.id_init)

    def init(key, shape, dtype=jnp.float32):
      # The ID columns draw exactly what AlphaFuse's [N + 1, n] ID table draws from this key.
      return jnp.concatenate([jnp.zeros((shape[0], k - n), dtype),
                              id_init(key, (shape[0], n), dtype)], axis=1)

    self.id_table = self.param('id_table', padded_initializer(init, self.row_multiple),
                               (self.num_items + 1, k))

  def __call__(self, ids: Array, *, deterministic: bool) -> Array:
    language = scaled(lookup(constant(self.language_table), ids), self.language_scale)
    return language + lookup(self.id_table, ids)

  def table(self, *, deterministic: bool = True) -> Array:
    language = scaled(constant(self.language_table)[:self.num_items], self.language_scale)
    return language + self.id_table[:self.num_items]

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    """anchor_weight x mean over the N items of the squared norm of their semantic offsets."""
    del deterministic
    offsets = self.id_table[:self.num_items, :self.language_table.dim - self.null_dim]
    return self.anchor_weight * jnp.mean(jnp.sum(jnp.square(offsets), axis=-1))
