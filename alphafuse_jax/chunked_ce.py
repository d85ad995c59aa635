"""The full-softmax cross-entropy in chunks, with its gradient (cut cross-entropy's idea).

Leave-one-out training scores B x L = 25,600 positions against all N items per step (~350 MB of
float32 logits on ML-1M, Wijmans et al. 2024, "Cut your losses in large-vocabulary language
models"). Here P positions and C items at a time, a running log-sum-exp, gradients accumulated per
chunk (d states = d logits E, d table = d logits^T states): at most [P, C] logits alive. Positions
that do not count (zero cotangent, weight 0) are skipped. `losses.ce_per_example` is the dense
form it equals.
"""

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

POSITION_CHUNK = 128
ITEM_CHUNK = 4096  # >= N (ML-1M's 3,416): one pass over the items, the logits computed once.


def _item_chunks(item_table: Array, item_chunk: int) -> Array:
  """item_table [N, h] -> [num_chunks, C, h], zero rows appended up to a multiple of C."""
  (num_items, hidden), size = item_table.shape, min(item_chunk, item_table.shape[0])
  count = -(-num_items // size)
  return jnp.pad(item_table, ((0, count * size - num_items), (0, 0))).reshape(count, size, hidden)


def _over_chunks(body, init, chunks: Array):
  """Folds body(j, carry) over the item chunks (no loop for a single chunk)."""
  n = chunks.shape[0]
  return body(0, init) if n == 1 else jax.lax.fori_loop(0, n, body, init)


def _logits(rows: Array, j, chunks: Array, num_items: int) -> Array:
  """[P, C] logits of rows against item chunk j; padded items get -inf."""
  logits, (count, size) = jnp.matmul(rows, chunks[j].T), chunks.shape[:2]
  if count * size == num_items:
    return logits
  return jnp.where(j * size + jnp.arange(size) < num_items, logits, -jnp.inf)


def _sweep(states, item_table, targets, scale, active, position_chunk, item_chunk, lse=None,
           grads=True):
  """Chunked loops over the `active` positions of states [M, h]: (lse [M], d states [M, h],
  d table [N, h]) for d logits = scale (softmax - onehot), zeros elsewhere; `lse` given: reused."""
  (rows, hidden), size = states.shape, position_chunk
  padded = -(-rows // size) * size
  num_active = jnp.sum(active, dtype=jnp.int32)
  # A stable partition: active positions first, in order; slot[m] is where position m goes.
  slot = jnp.where(active, jnp.cumsum(active) - 1, num_active + jnp.cumsum(~active) - 1)
  order = jnp.full(padded, rows, jnp.int32).at[slot].set(jnp.arange(rows, dtype=jnp.int32),
                                                         unique_indices=True)
  take = lambda x: None if x is None else jnp.take(x, order, axis=0, mode='fill', fill_value=0)
  # (The last block's tail holds inactive positions: their scale must be 0.)
  sorted_ = [take(x) for x in (states, targets, jnp.where(active, scale, 0), lse)]
  chunks, num_items = _item_chunks(item_table, item_chunk), item_table.shape[0]
  single = chunks.shape[0] == 1

  def block(i, carry):
    lse_out, d_out, d_chunks = carry
    s, t, g, lse_i = [x if x is None else jax.lax.dynamic_slice_in_dim(x, i * size, size)
                      for x in sorted_]
    probs = []  # With one item chunk, its softmax, for the gradient pass.
    if lse_i is None:  # Running log-sum-exp over the item chunks.
      def lse_body(j, c):
        z = _logits(s, j, chunks, num_items)
        new_max = jnp.maximum(c[0], jnp.max(z, axis=-1))
        e = jnp.exp(z - new_max[:, None])
        probs.extend([e] if single else [])
        return new_max, c[1] * jnp.exp(c[0] - new_max) + jnp.sum(e, axis=-1)
      init = (jnp.full(size, -jnp.inf, jnp.float32), jnp.zeros(size, jnp.float32))
      m, total = _over_chunks(lse_body, init, chunks)
      lse_i = m + jnp.log(total)
      probs = [e / total[:, None] for e in probs]
      lse_out = jax.lax.dynamic_update_slice_in_dim(lse_out, lse_i, i * size, 0)
    if not grads:
      return lse_out, d_out, d_chunks
    def grad_body(j, c):
      d_rows, d_chunks = c
      # One item chunk: the softmax of the log-sum-exp pass, else recomputed.
      p = probs[0] if probs else jnp.exp(_logits(s, j, chunks, num_items) - lse_i[:, None])
      onehot = t[:, None] == j * chunks.shape[1] + jnp.arange(chunks.shape[1])
      d_logits = g[:, None] * p - jnp.where(onehot, g[:, None], 0)
      d_chunks = d_chunks.at[j].add(jnp.matmul(s.T, d_logits))  # [h, C]: no [P, C] transpose.
      return d_rows + jnp.matmul(d_logits, chunks[j]), d_chunks

    d_rows, d_chunks = _over_chunks(grad_body, (jnp.zeros_like(s), d_chunks), chunks)
    return lse_out, jax.lax.dynamic_update_slice_in_dim(d_out, d_rows, i * size, 0), d_chunks

  init = (jnp.zeros((padded,), states.dtype), jnp.zeros((padded, hidden), states.dtype),
          jnp.zeros_like(chunks.transpose(0, 2, 1)))
  lse_out, d_out, d_chunks = jax.lax.fori_loop(0, -(-num_active // size), block, init)
  unsort = lambda x: jnp.take(x, slot, axis=0)
  return (unsort(lse_out) if lse is None else lse, unsort(d_out),
          d_chunks.transpose(0, 2, 1).reshape(-1, hidden)[:num_items])


def _ce_forward(states, item_table, targets, weights, chunks, fused):
  """Losses [...] and residuals; `fused` (weights given): weight-0 positions are skipped and the
  gradient for the cotangent `weights` is computed on the way (the train step's case)."""
  w = weights.reshape(-1)
  lse, d_states, d_table = _sweep(states.reshape(-1, states.shape[-1]), item_table,
                                  targets.reshape(-1), w, (w != 0) | (not fused), *chunks,
                                  grads=fused)
  lse = lse.reshape(weights.shape)
  losses_ = lse - jnp.sum(states * jnp.take(item_table, targets, axis=0), axis=-1)
  if fused:
    return jnp.where(weights != 0, losses_, 0), (lse, d_states.reshape(states.shape), d_table)
  return losses_, (lse,)


def _ce_backward(states, item_table, targets, weights, residuals, cotangent, chunks, fused):
  """(d states, d table): the forward's gradient scaled when the cotangent is c * weights (a
  weighted mean's), else the chunked loops over the positions of nonzero cotangent."""

  def recompute():
    active = (cotangent != 0) & ((weights != 0) | (not fused))
    _, d_states, d_table = _sweep(states.reshape(-1, states.shape[-1]), item_table,
                                  targets.reshape(-1), cotangent.reshape(-1), active.reshape(-1),
                                  *chunks, lse=residuals[0].reshape(-1))
    return d_states.reshape(states.shape), d_table

  if not fused:
    return recompute()
  c = proportionality(cotangent, weights)
  return jax.lax.cond(jnp.all(cotangent == c * weights),
                      lambda: (c * residuals[1], c * residuals[2]), recompute)


def proportionality(cotangent: Array, weights: Array) -> Array:
  """c with cotangent == c * weights when the two are proportional (something else if not)."""
  w, g = weights.reshape(-1), cotangent.reshape(-1)
  pick = jnp.argmax(w != 0)
  return jnp.where(w[pick] != 0, g[pick], 0.0) / jnp.where(w[pick] != 0, w[pick], 1.0)


def chunked_ce_with_gradient(states: Array, item_table: Array, targets: Array, weights: Array, *,
                             position_chunk: int = POSITION_CHUNK,
                             item_chunk: int = ITEM_CHUNK) -> tuple[Array, Array, Array]:
  """(losses [...], d states [..., h], d table [N, h]) in one chunked pass: the CE where weights
  [...] are nonzero (0 elsewhere, at no cost) and the gradient of sum(losses * weights)."""
  losses_, (_, d_states, d_table) = _ce_forward(states, item_table, targets, weights,
                                                (position_chunk, item_chunk), True)
  return losses_, d_states, d_table


@functools.lru_cache(maxsize=None)
def _chunked_ce(position_chunk: int, item_chunk: int, fused: bool):
  """The custom_vjp CE for one chunking."""
  chunks = (position_chunk, item_chunk)
  ce = jax.custom_vjp(lambda s, e, t, w: _ce_forward(s, e, t, w, chunks, fused)[0])

  def ce_fwd(states, item_table, targets, weights):
    losses_, residuals = _ce_forward(states, item_table, targets, weights, chunks, fused)
    return losses_, (states, item_table, targets, weights, residuals)

  def ce_bwd(saved, cotangent):
    return _ce_backward(*saved, cotangent, chunks, fused) + (None, None)

  ce.defvjp(ce_fwd, ce_bwd)
  return ce


def chunked_ce_per_example(states: Array, item_table: Array, targets: Array,
                           weights: Array | None = None, *,
                           position_chunk: int = POSITION_CHUNK,
                           item_chunk: int = ITEM_CHUNK) -> Array:
  """`ce_per_example` without its [..., N] logits: states [..., h], item_table [N, h] -> [...].

  Equal to it in value and gradients (float32 rounding aside), with [position_chunk,
  item_chunk] logits at a time; the backward pass skips positions of zero cotangent. With
  `weights` [...] (a weighted mean's), positions of weight 0 get loss 0 at no cost, and the
  forward pass also computes the gradient for the cotangent `weights`: the backward pass scales
  it when its cotangent is proportional to the weights (a matmul less per chunk) and recomputes
  for any other. Call it on a whole batch (all leading dims are positions): under `jax.vmap` it
  stays exact, but every mapped row then carries its own [N, h] table gradient.
  """
  if position_chunk < 1 or item_chunk < 1:
    raise ValueError(f'chunk sizes must be >= 1, got {position_chunk} and {item_chunk}.')
  fused = weights is not None
  weights = jnp.ones(targets.shape, states.dtype) if weights is None else jnp.asarray(
      weights, states.dtype)
  return _chunked_ce(int(position_chunk), int(item_chunk), fused)(
      states, item_table, jnp.asarray(targets, jnp.int32), weights)
