"""Sequence backbones (SASRec; DreamRec reuses `layers.ReferenceBlock`) and a plain ID embedding.

`SimpleIdEmbedding` is the smallest module with the item-embedding interface the backbones expect
(see `sasrec.py`); tests and quick experiments use it where the real pipelines of
`alphafuse_jax.embeddings` are not needed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from alphafuse_jax.models.sasrec import BLOCK_STYLES, SASRec, last_nonpad_index


class SimpleIdEmbedding(nn.Module):
  """A trainable ID table of N+1 rows (row N = padding), initialised N(0, 1) like torch.nn.Embedding.

  Attributes:
    num_items: N real items; the pad id is N.
    features: embedding width h.
  """
  num_items: int
  features: int

  def setup(self):
    self.embedding = self.param('embedding', nn.initializers.normal(1.0),
                                (self.num_items + 1, self.features))

  def __call__(self, ids: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """ids int [...] in 0..N -> [..., features]."""
    del deterministic  # No dropout in a plain table.
    return jnp.take(self.embedding, ids, axis=0)

  def table(self, *, deterministic: bool = True) -> jax.Array:
    """The N real items' rows [N, features] (the pad row excluded)."""
    del deterministic
    return self.embedding[:self.num_items]

  def auxiliary_loss(self, *, deterministic: bool = True) -> jax.Array:
    del deterministic
    return jnp.zeros((), jnp.float32)


__all__ = ['BLOCK_STYLES', 'SASRec', 'SimpleIdEmbedding', 'last_nonpad_index']
