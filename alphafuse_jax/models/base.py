"""The training contract shared by every backbone (SASRec, LLM-ESR, DreamRec).

A backbone owns its loss and its scores, so the train and eval steps never ask what model they
hold. The train step, per device, does exactly this (keys are explained in `train.py`):

  table = model.train_table()                                   once per step (rngs: table key)
  losses, weights = model.batch_example_loss(params, history, target, mask, keys, table)
    (by default, for each row, vmapped, rngs and key from `split_example_key`:
     loss, weight = model.example_loss(history, target, mask, key, table))
  loss = sum(loss * weight) / global weight + model.auxiliary_loss() + model.batch_loss(...)

and the eval step ranks `ranking_states(history, index)` against `item_table()`. `init_all`
touches every submodule so `init` creates every parameter.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from alphafuse_jax import losses
from alphafuse_jax import sampled_softmax

Array = jax.Array


def rng_streams(key: Array) -> dict[str, Array]:
  """Every stochastic stream a module may ask for: dropout and UniSRec's gating noise."""
  dropout_key, gating_key = jax.random.split(key)
  return {'dropout': dropout_key, 'gating': gating_key}


class Recommender(nn.Module):
  """Base class: a subclass has `item_embedding` and `objective` fields and implements `__call__`.

  `__call__(history [B, L], *, deterministic) -> [B, d]` is the user state scored by dot product
  against `item_table()`; by default it trains by `objective` (a `losses.Objective`). A backbone
  that trains otherwise (DreamRec) overrides `example_loss` and the hooks that differ.
  """

  # ---- scoring --------------------------------------------------------------------------------
  def item_table(self, *, deterministic: bool = True) -> Array:
    """The N real items' embeddings [N, d] used for scoring."""
    return self.item_embedding.table(deterministic=deterministic)

  def score(self, states: Array, *, deterministic: bool = True) -> Array:
    """Dot-product scores [batch, N] of states [batch, d] against every real item."""
    return jnp.matmul(states, self.item_table(deterministic=deterministic).T)

  def ranking_states(self, history: Array, index: Array) -> Array:
    """Eval-mode states [B, d] to rank all items with; `index` [B] (the rows' indices in their
    split) seeds any sampling a model does at evaluation (DreamRec's), so reruns agree."""
    del index
    return self(history, deterministic=True)

  # ---- training -------------------------------------------------------------------------------
  @staticmethod
  def split_example_key(key: Array) -> tuple[dict[str, Array], Array]:
    """A row's key -> (the rng streams of its forward pass, the key of its loss' sampling)."""
    model_key, loss_key = jax.random.split(key)
    return rng_streams(model_key), loss_key

  def train_table(self) -> Array | dict[str, Array] | None:
    """What every row's loss scores against, built once per step (train mode), or None.

    The sampled softmax's K shared negatives {'ids', 'embeddings'} are drawn here, from the
    step's key (the same on every device), and embedded once for the whole batch.
    """
    if isinstance(self.objective, sampled_softmax.SampledSoftmax):
      return self.objective.shared_negatives(
          self.make_rng('dropout'), lambda ids: self.item_embedding(ids, deterministic=False),
          self.num_items)
    # With gathered negatives only the sampled rows are embedded (no whole table per step).
    return None if self.objective.gathers else self.item_table(deterministic=False)

  def shared_negative_ids(self) -> Array:
    """int32 [K]: the ids of `train_table`'s shared negatives (sampled softmax only), the same
    draw when called with the same rngs; a sparse step gathers their rows before the loss."""
    return self.objective.negative_ids(self.make_rng('dropout'), self.num_items)

  def example_loss(self, history: Array, target: Array, mask: Array, key: Array,
                   table: Array | None) -> tuple[Array, Array]:
    """One row's loss and weight (train mode), by the backbone's `objective`.

    The default scores user states against the items: the state at the last position, or at
    every position with `objective.per_position` (which needs `encode`).

    Args:
      history: int [L]; target: int []; mask: bool [] (False on padding rows of the last batch);
      key: the row's loss key (negatives, diffusion noise); table: `train_table()`.
    Returns:
      (loss, weight), both [] or both [L] (per-position losses); weight 0 marks what does not
      count.
    """
    states, targets, weights = self.training_states(history, target, mask)
    items = table if table is not None else (
        lambda ids: self.item_embedding(ids, deterministic=False))
    return self.objective.per_example(states, targets, items, key=key,
                                      num_items=self.num_items), weights

  @nn.nowrap
  def batch_example_loss(self, params, history: Array, target: Array, mask: Array, keys: Array,
                         table: Array | None) -> tuple[Array, Array]:
    """Every row's (loss, weight) on one device's batch, as `example_loss` gives them per row.

    Called on the unbound model with its params, inside the step's grad. By default `example_loss`
    vmapped over the rows, each with the rngs and loss key `split_example_key` makes of its key;
    a backbone may compute the batch at once (SASRec's leave-one-out training does).

    Args:
      params: the model's params; history int [b, L]; target int [b]; mask bool [b]; keys: [b]
        row keys; table: `train_table()`.
    Returns:
      (losses, weights), both [b] or both [b, L]; a weight-0 loss is any finite value.
    """
    if isinstance(getattr(self, 'objective', None), sampled_softmax.SampledSoftmax):
      return self._sampled_softmax_loss(params, history, target, mask, keys, table)

    def row_loss(history, target, mask, key):
      rngs, loss_key = self.split_example_key(key)
      return self.apply({'params': params}, history, target, mask, loss_key, table, rngs=rngs,
                        method='example_loss')

    return jax.vmap(row_loss)(history, target, mask, keys)

  def training_states(self, history: Array, target: Array,
                      mask: Array) -> tuple[Array, Array, Array]:
    """One row's train-mode states with their targets and weights, as the loss sees them.

    The state at the last position ([h], [], []), or with `objective.per_position` at every
    position ([L, h], [L], [L]; needs `encode`). What does not count (weight 0) targets item 0,
    so every value (and gradient) stays finite.
    """
    if self.objective.per_position:
      states = self.encode(history[None], deterministic=False)[0]  # [L, h]
      targets, valid = losses.positional_targets(history[None], target[None], self.num_items)
      targets, weights = targets[0], valid[0].astype(jnp.float32) * mask
    else:
      states = self(history[None], deterministic=False)[0]  # [h]
      targets, weights = target, mask.astype(jnp.float32)
    return states, jnp.where(weights > 0, targets, 0), weights

  def sampled_softmax_row(self, history: Array, target: Array,
                          mask: Array) -> tuple[Array, Array, Array, Array]:
    """`training_states` and the targets' embeddings (states, positives, targets, weights)."""
    states, targets, weights = self.training_states(history, target, mask)
    return states, self.item_embedding(targets, deterministic=False), targets, weights

  @nn.nowrap
  def _sampled_softmax_loss(self, params, history, target, mask, keys, table):
    """`batch_example_loss` of the sampled softmax: each row's states (with its own rngs, as
    the per-row path draws them), then the loss of the batch at once (negatives shared by the
    rows; in-batch negatives couple them)."""

    def row(history, target, mask, key):
      rngs, _ = self.split_example_key(key)
      return self.apply({'params': params}, history, target, mask, rngs=rngs,
                        method='sampled_softmax_row')

    states, positives, targets, weights = jax.vmap(row)(history, target, mask, keys)
    return self.objective.batch_loss(states, positives, targets, weights, table,
                                     num_items=self.num_items), weights

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    """The item embedding's own weighted loss (RLMRec's reconstruction; 0 for most)."""
    return self.item_embedding.auxiliary_loss(deterministic=deterministic)

  def batch_loss(self, history: Array, user_id: Array | None, mask: Array, *,
                 deterministic: bool) -> Array:
    """Weighted terms over this device's batch [B, L] (LLM-ESR's); 0 by default."""
    del history, user_id, mask, deterministic
    return jnp.zeros((), jnp.float32)

  def init_all(self, history: Array) -> Array:
    """Touches every submodule so `init` creates all parameters (scoring and auxiliary heads)."""
    states = self(history, deterministic=True)
    self.score(states)
    return self.auxiliary_loss(deterministic=True)
