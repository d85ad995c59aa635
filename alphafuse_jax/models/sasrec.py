"""SASRec: a causal transformer over item histories that scores every item by a dot product.

Two block styles (see `layers.py`):
  * 'reference': the authors' backbone (reference-spec §3.1), the default for parity.
      e = item_emb(x) + pos_emb (N(0,1) positions, no sqrt(h) scaling); e = Dropout(e) * m;
      then `num_blocks` reference blocks (the authors always use exactly 1).
  * 'standard': Kang & McAuley (2018). e = item_emb(x) * sqrt(h) + pos_emb, as in the paper and the
      original code; e = Dropout(e) * m; `num_blocks` pre-LN (or post-LN) blocks; a final LayerNorm
      in the pre-LN case (post-LN outputs are already normalised).

The item embedding is any `embeddings.ItemEmbedding` (pad id = num_items). SASRec trains by its
`objective` (losses.Objective): the last position's state, or every position's (leave-one-out),
against the item table (full softmax) or sampled negatives.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from alphafuse_jax import losses
from alphafuse_jax.models import base
from alphafuse_jax.models import layers

Array = jax.Array

BLOCK_STYLES = layers.BLOCK_STYLES


def last_nonpad_index(pad_mask: Array) -> Array:
  """Index of the last non-pad position per row; L-1 for an all-pad row.

  For left-padded histories this is always L-1 (the reference's `ff_out[:, -1]`); for right-padded
  ones it is len-1, so the representation never comes from a padding position.

  Args:
    pad_mask: bool [batch, seq_len], True at padding positions.
  Returns:
    int32 [batch].
  """
  seq_len = pad_mask.shape[-1]
  positions = jnp.arange(seq_len, dtype=jnp.int32)
  last = jnp.max(jnp.where(pad_mask, -1, positions), axis=-1)
  return jnp.where(last < 0, seq_len - 1, last).astype(jnp.int32)


class SASRec(base.Recommender):
  """SASRec backbone over an item-embedding submodule.

  Attributes:
    item_embedding: the item-embedding module (pad id = item_embedding.num_items = N).
    max_len: history length L; inputs must be exactly [batch, L].
    block: 'reference' (authors) or 'standard' (Kang & McAuley).
    num_blocks: stacked blocks (the reference always uses 1).
    num_heads: attention heads; the hidden width h = item_embedding.features must divide evenly.
    dropout_rate: dropout at embeddings, attention probabilities and FFN outputs.
    pre_ln: 'standard' only: pre-LN (True) or post-LN (False) residual sub-layers.
    objective: the training loss (config.train.loss and friends).
  """
  item_embedding: nn.Module
  max_len: int
  block: str = 'reference'
  num_blocks: int = 1
  num_heads: int = 1
  dropout_rate: float = 0.1
  pre_ln: bool = True
  objective: losses.Objective = losses.Objective()

  def setup(self):
    hidden = self.item_embedding.features
    if self.num_heads < 1 or hidden % self.num_heads:
      raise ValueError(f'Hidden width {hidden} (the item embedding features) is not divisible by '
                       f'config.model.num_heads={self.num_heads}; pick a divisor of {hidden}.')
    if self.max_len < 1:
      raise ValueError(f'max_len (config.data.max_len) must be >= 1, got {self.max_len}.')
    # PyTorch nn.Embedding default: N(0, 1).
    self.position_embedding = nn.Embed(self.max_len, hidden,
                                       embedding_init=nn.initializers.normal(1.0))
    self.embedding_dropout = layers.Dropout(self.dropout_rate)
    self.blocks, self.final_ln = layers.encoder_blocks(
        self.block, self.num_blocks, self.num_heads, self.dropout_rate, self.pre_ln)

  @property
  def num_items(self) -> int:
    return self.item_embedding.num_items

  def encode(self, history: Array, *, deterministic: bool) -> Array:
    """Hidden states at every position.

    Args:
      history: int [batch, L] item ids, pad = N.
    Returns:
      [batch, L, h]; position i has seen items 0..i only.
    """
    return self._encode(history, deterministic=deterministic)

  def _encode(self, history: Array, *, deterministic: bool,
              query_positions: Array | None = None) -> Array:
    """`encode`, or with `query_positions` [batch] the last block at those positions only."""
    if history.ndim != 2 or history.shape[1] != self.max_len:
      raise ValueError(f'SASRec expects history of shape [batch, {self.max_len}] '
                       f'(config.data.max_len), got {history.shape}.')
    pad_mask = history == self.num_items
    x = self.item_embedding(history, deterministic=deterministic)
    if self.block == 'standard':
      x = x * math.sqrt(x.shape[-1])
    x = x + self.position_embedding(jnp.arange(self.max_len))[None]
    x = self.embedding_dropout(x, deterministic=deterministic)
    return layers.run_encoder(self.blocks, self.final_ln, x, pad_mask,
                              deterministic=deterministic, query_positions=query_positions)

  def __call__(self, history: Array, *, deterministic: bool) -> Array:
    """User states [batch, h]: the hidden state at the last non-pad position (L-1 if none).

    A reference block computes its last layer at that position only (keys and values still see
    the whole history): the same state as `encode(...)[last]` for about half the work.
    """
    last = last_nonpad_index(history == self.num_items)
    return self._encode(history, deterministic=deterministic, query_positions=last)[:, 0]
