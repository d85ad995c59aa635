"""SASRec: a causal transformer over item histories that scores every item by a dot product.

Three block styles (see `layers.py`):
  * 'reference': the authors' backbone (reference-spec §3.1), the default for parity.
      e = item_emb(x) + pos_emb (N(0,1) positions, no sqrt(h) scaling); e = Dropout(e) * m;
      then `num_blocks` reference blocks (the authors always use exactly 1).
  * 'standard': Kang & McAuley (2018). e = item_emb(x) * sqrt(h) + pos_emb, as in the paper and the
      original code; e = Dropout(e) * m; `num_blocks` pre-LN (or post-LN) blocks; a final LayerNorm
      in the pre-LN case (post-LN outputs are already normalised).
  * 'kang_code': the block Kang & McAuley's code computes (layers.KangCodeBlock), input as
      'standard', a final LayerNorm.
Positions are learned, N(0, position_init_std^2) at init: 1 is PyTorch's nn.Embedding default
(the reference's); the ports behind the literature's leave-one-out numbers use 0.02.

The item embedding is any `embeddings.ItemEmbedding` (pad id = num_items). SASRec trains by its
`objective` (losses.Objective): the last position's state, or every position's (leave-one-out),
against the item table (full softmax) or sampled negatives.

Leave-one-out training with the full softmax runs a device's batch at once
(`batch_example_loss`): rows are sorted by history length and encoded in groups, each group at the
shortest of a few lengths that covers its longest (left-padded) history, and the CE skips the
positions that do not count. Dropout masks, losses and gradients are those of the per-row path.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from alphafuse_jax import chunked_ce
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
    block: 'reference' (authors), 'standard' (Kang & McAuley's paper) or 'kang_code' (their code).
    num_blocks: stacked blocks (the reference always uses 1).
    num_heads: attention heads; the hidden width h = item_embedding.features must divide evenly.
    dropout_rate: dropout at embeddings, attention probabilities and FFN outputs.
    pre_ln: 'standard' only: pre-LN (True) or post-LN (False) residual sub-layers.
    position_init_std: standard deviation of the learned positions at init.
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
  position_init_std: float = 1.0

  def setup(self):
    hidden = self.item_embedding.features
    if self.num_heads < 1 or hidden % self.num_heads:
      raise ValueError(f'Hidden width {hidden} (the item embedding features) is not divisible by '
                       f'config.model.num_heads={self.num_heads}; pick a divisor of {hidden}.')
    if self.max_len < 1:
      raise ValueError(f'max_len (config.data.max_len) must be >= 1, got {self.max_len}.')
    if not (math.isfinite(self.position_init_std) and self.position_init_std > 0):
      raise ValueError(f'config.model.position_init_std must be a finite number > 0, got '
                       f'{self.position_init_std}.')
    # 1: PyTorch nn.Embedding's default N(0, 1).
    self.position_embedding = nn.Embed(
        self.max_len, hidden, embedding_init=nn.initializers.normal(self.position_init_std))
    self.embedding_dropout = layers.Dropout(self.dropout_rate)
    self.blocks, self.final_ln = layers.encoder_blocks(
        self.block, self.num_blocks, self.num_heads, self.dropout_rate, self.pre_ln)

  @property
  def num_items(self) -> int:
    return self.item_embedding.num_items

  # Leave-one-out batches: rows per group, and the number of lengths a group may be encoded at.
  # A bucket is at least MIN_LENGTH_STEP positions wide: narrower ones save less than their
  # branch costs to compile (L = 200: 8 lengths 25, 50, ..., 200; L = 50: 3; L <= 31: 1).
  GROUP_ROWS = 8
  NUM_LENGTHS = 8
  MIN_LENGTH_STEP = 16

  def encode(self, history: Array, *, deterministic: bool) -> Array:
    """Hidden states at every position.

    Args:
      history: int [batch, L] item ids, pad = N.
    Returns:
      [batch, L, h]; position i has seen items 0..i only.
    """
    return self._encode(history, deterministic=deterministic)

  def encode_suffix(self, history: Array, *, deterministic: bool) -> Array:
    """`encode` of rows' last S positions, when all their earlier positions are padding.

    Args:
      history: int [batch, S], 1 <= S <= L: the last S positions of [batch, L] histories.
    Returns:
      [batch, S, h]: `encode` of the full rows at those positions (same dropout masks).
    """
    return self._encode(history, deterministic=deterministic, suffix=True)

  def _encode(self, history: Array, *, deterministic: bool,
              query_positions: Array | None = None, suffix: bool = False) -> Array:
    """`encode`, or with `query_positions` [batch] the last block at those positions only."""
    length = history.shape[-1]
    if history.ndim != 2 or not (length <= self.max_len if suffix else length == self.max_len):
      raise ValueError(f'SASRec expects history of shape [batch, {self.max_len}] '
                       f'(config.data.max_len), got {history.shape}.')
    full_len = self.max_len if suffix else None
    pad_mask = history == self.num_items
    x = self.item_embedding(history, deterministic=deterministic)
    if self.block in layers.SCALED_INPUT_BLOCKS:
      x = x * math.sqrt(x.shape[-1])
    x = x + self.position_embedding(jnp.arange(self.max_len - length, self.max_len))[None]
    x = layers.dropout_as_in_full(self.embedding_dropout, x, deterministic=deterministic,
                                  full_len=full_len)
    return layers.run_encoder(self.blocks, self.final_ln, x, pad_mask, deterministic=deterministic,
                              query_positions=query_positions, full_len=full_len)

  def __call__(self, history: Array, *, deterministic: bool) -> Array:
    """User states [batch, h]: the hidden state at the last non-pad position (L-1 if none).

    A reference block computes its last layer at that position only (keys and values still see
    the whole history): the same state as `encode(...)[last]` for about half the work.
    """
    last = last_nonpad_index(history == self.num_items)
    return self._encode(history, deterministic=deterministic, query_positions=last)[:, 0]

  # ---- leave-one-out training, a batch at once ------------------------------------------------
  @nn.nowrap
  def batch_example_loss(self, params, history: Array, target: Array, mask: Array, keys: Array,
                         table: Array | None) -> tuple[Array, Array]:
    """`Recommender.batch_example_loss`; per-position full-softmax CE runs the batch at once.

    Rows are sorted by the length they need (from their first real item on; 0 for padding rows
    of the last batch) and taken GROUP_ROWS at a time; a group is encoded at the shortest of
    NUM_LENGTHS lengths (multiples of L / NUM_LENGTHS; fewer for short L) that covers its
    longest row (`encode_suffix`, each row with its own rngs), and its CE skips the positions
    that do not count. Losses at weight-0 positions are 0 here (the per-row path scores them). Pipelines
    whose lookups draw random numbers (`ItemEmbedding.random_lookup`: UniSRec) keep the per-row
    path, whose draws this path could not reproduce.

    A group's gradient is computed with its forward pass, inside the branch that picked its
    length, so no branch-dependent residuals cross the `lax.switch` (reverse-mode through it
    would copy every branch's residual slots); the backward pass scales the summed gradient
    when its cotangent is c * weights (the train step's weighted mean) and otherwise
    differentiates the per-row path exactly. Hence a call pays for the gradient even if none is
    taken: meant for the train step.
    """
    objective = self.objective
    if (not (objective.per_position and objective.kind == 'ce') or table is None
        or self.item_embedding.random_lookup):
      return super().batch_example_loss(params, history, target, mask, keys, table)
    return _grouped_positional_ce(self)(params, table, history, target, mask, keys)

  @nn.nowrap
  def suffix_states(self, params, size: int, history: Array, keys: Array) -> Array:
    """Train-mode states [n, L, h] of rows [n, L] whose first L - size positions are padding
    (zeros there), each row with the rngs of its key."""

    def row(history, key):
      rngs, _ = self.split_example_key(key)
      return self.apply({'params': params}, history[None, history.shape[0] - size:],
                        deterministic=False, rngs=rngs, method='encode_suffix')[0]

    states = jax.vmap(row)(history, keys)
    return jnp.pad(states, ((0, 0), (history.shape[1] - size, 0), (0, 0)))


def _positional_weights(history: Array, target: Array, mask: Array, pad: int):
  """(targets, weights) [b, L] of leave-one-out training (uncounted positions target item 0)."""
  targets, valid = losses.positional_targets(history, target, pad)
  weights = valid.astype(jnp.float32) * mask[:, None]
  return jnp.where(weights > 0, targets, 0), weights


def _grouped_positional_ce(model: SASRec):
  """(params, table, history, target, mask, keys) -> (losses, weights) [b, L], as a custom_vjp."""
  pad, rows_per_group = model.num_items, model.GROUP_ROWS

  def group_step(sizes, params, table):
    def branch(size):
      def run(history, target, mask, keys):
        targets, weights = _positional_weights(history, target, mask, pad)
        states, encoder_vjp = jax.vjp(lambda p: model.suffix_states(p, size, history, keys),
                                      params)
        per_position, d_states, d_table = chunked_ce.chunked_ce_with_gradient(
            states, table, targets, weights)
        return per_position, (encoder_vjp(d_states)[0], d_table)
      return run

    def body(total, group):
      index, *arrays = group
      per_position, grads = jax.lax.switch(index, [branch(size) for size in sizes], *arrays)
      return jax.tree.map(jnp.add, total, grads), per_position
    return body

  def forward(params, table, history, target, mask, keys):
    rows, length = history.shape
    real = history != pad
    needed = jnp.where(mask & real.any(axis=1), length - jnp.argmax(real, axis=1), 0)
    order = jnp.argsort(needed, stable=True)
    # Rows sorted by need; padding rows (need 0, uncounted) first up to whole groups.
    extra = -rows % rows_per_group
    fill = lambda x, value: jnp.concatenate(
        [jnp.broadcast_to(value, (extra,) + x.shape[1:]).astype(x.dtype), x[order]])
    arrays = (fill(history, pad), fill(target, 0), fill(mask, False),
              jnp.concatenate([jnp.stack([keys[0]] * extra), keys[order]]) if extra else
              keys[order])
    grouped = [x.reshape((-1, rows_per_group) + x.shape[1:]) for x in arrays]
    count = max(1, min(model.NUM_LENGTHS, length // model.MIN_LENGTH_STEP))
    sizes = sorted({-(-length * k // count) for k in range(1, count + 1)})
    longest = jnp.max(jnp.concatenate([jnp.zeros(extra, needed.dtype), needed[order]]).reshape(
        -1, rows_per_group), axis=1)
    index = jnp.searchsorted(jnp.asarray(sizes), longest)
    # Summed over the groups in at least float32 (bfloat16 params: config.train.compute_dtype).
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
                         (params, table))
    grads, per_position = jax.lax.scan(group_step(sizes, params, table), zeros,
                                       (index, *grouped))
    per_position = per_position.reshape(-1, length)[extra:][jnp.argsort(order)]
    _, weights = _positional_weights(history, target, mask, pad)
    return (per_position, weights), grads

  @jax.custom_vjp
  def grouped(params, table, history, target, mask, keys):
    return forward(params, table, history, target, mask, keys)[0]

  def grouped_fwd(params, table, history, target, mask, keys):
    (per_position, weights), grads = forward(params, table, history, target, mask, keys)
    return (per_position, weights), (grads, weights, (params, table, history, target, mask, keys))

  def grouped_bwd(saved, cotangents):
    grads, weights, inputs = saved
    cotangent = cotangents[0]  # The weights depend on no parameter.
    scale = chunked_ce.proportionality(cotangent, weights)

    def exact():  # Any other cotangent: the per-row path, at the counted positions.
      params, table, history, target, mask, keys = inputs
      per_row = lambda p, e: base.Recommender.batch_example_loss(
          model, p, history, target, mask, keys, e)[0] * (weights != 0)
      return jax.vjp(per_row, params, table)[1](cotangent)

    def scaled():  # The forward pass's gradient, scaled; in the params' dtype (maybe bfloat16).
      return jax.tree.map(lambda g, x: (scale * g).astype(x.dtype), grads, inputs[:2])

    d_params, d_table = jax.lax.cond(jnp.all(cotangent == scale * weights), scaled, exact)
    return d_params, d_table, None, None, None, None

  grouped.defvjp(grouped_fwd, grouped_bwd)
  return grouped
