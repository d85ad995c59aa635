"""The k best items of each user state, chunk by chunk over the catalogue (bounded memory).

The table is cut into chunks once (`chunk_table`): padding it inside every call would copy the
whole table per request (512 MB at N = 10^6, d = 128), which dominated single-request latency.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alphafuse_jax import metrics

Array = jax.Array

# Scores are grouped in runs of this many items for the two-stage top-k within a chunk.
DEFAULT_GROUP_SIZE = 128


def chunk_table(item_table: Array, chunk_size: int) -> tuple[Array, Array]:
  """[N, d] -> zero-padded chunks [C, min(chunk_size, N), d] and each chunk's first id [C]."""
  return metrics._chunked_table(  # pylint: disable=protected-access
      item_table, min(chunk_size, item_table.shape[0]))


def _chunk_top_k(scores: Array, k: int, group_size: int) -> tuple[Array, Array]:
  """lax.top_k of scores [B, C] (ties to the lower index), in two stages when C is large.

  The k best items lie in the k groups (runs of `group_size`) with the best maxima: at most k
  groups hold an item scoring at least the k-th best. Those groups are gathered in id order and
  ranked, which is exact, ties included, and cheaper than one top-k over C on CPU.
  """
  batch, size = scores.shape
  num_groups = size // group_size
  if size % group_size or num_groups <= k:
    return jax.lax.top_k(scores, k)
  grouped = scores.reshape(batch, num_groups, group_size)
  _, groups = jax.lax.top_k(grouped.max(axis=-1), k)
  groups = jnp.sort(groups, axis=-1)  # Candidates in id order: lower ids win ties below.
  candidates = jnp.take_along_axis(grouped, groups[..., None], axis=1).reshape(batch, -1)
  ids = (groups[..., None] * group_size + jnp.arange(group_size)).reshape(batch, -1)
  top, position = jax.lax.top_k(candidates, k)
  return top, jnp.take_along_axis(ids, position, axis=1)


def top_k_of_chunks(states: Array, chunks: Array, starts: Array, num_items: int, k: int,
                    exclude: Array | None = None, *,
                    group_size: int = DEFAULT_GROUP_SIZE) -> tuple[Array, Array]:
  """The k best items of each row: scores [B, k] (descending) and int32 ids [B, k].

  A running top-k: each chunk's top-k is merged with the best k so far, so at most
  O(B * (chunk + k)) scores are alive (N = 10^6 and B = 1024 would be 4 GB unchunked). Ties
  break towards the lower item id, as `lax.top_k` does on the full [B, N] scores.

  Args:
    states: [B, d] user states.
    chunks, starts: `chunk_table` of the [N, d] item vectors; scores are dot products.
    num_items: N (padding rows of the last chunk never count).
    k: 1 <= k <= N.
    exclude: optional int [B, S] item ids scored -inf (seen items); entries outside [0, N) are
      ignored, so pad with N or -1.
    group_size: see `_chunk_top_k`.
  Returns:
    (scores, ids). A row with fewer than k eligible items ends with -inf scores and the id N.
  """
  if not 1 <= k <= num_items:
    raise ValueError(f'k={k} must lie in 1..N={num_items} (the number of items to rank).')
  batch, chunk_size = states.shape[0], chunks.shape[1]
  no_target = jnp.full((batch,), -1, jnp.int32)
  kind, data = metrics._chunk_exclusion(  # pylint: disable=protected-access
      exclude, no_target, num_items, chunk_size)
  chunk_k = min(k, chunk_size)

  def merge_chunk(best, chunk_and_start):
    best_scores, best_ids = best
    chunk, start = chunk_and_start
    scores = states @ chunk.T
    scores = metrics._mask_chunk(scores, start, kind, data)  # pylint: disable=protected-access
    ids = start + jnp.arange(chunk_size, dtype=jnp.int32)
    scores = jnp.where(ids[None, :] < num_items, scores, -jnp.inf).astype(best_scores.dtype)
    top, local = _chunk_top_k(scores, chunk_k, group_size)
    # Earlier (lower-id) candidates first, so lax.top_k's stable order keeps lower ids on ties.
    merged = jnp.concatenate([best_scores, top], axis=1)
    merged_ids = jnp.concatenate([best_ids, start + local.astype(jnp.int32)], axis=1)
    top, position = jax.lax.top_k(merged, k)
    return (top, jnp.take_along_axis(merged_ids, position, axis=1)), None

  dtype = jnp.result_type(states.dtype, chunks.dtype)
  init = (jnp.full((batch, k), -jnp.inf, dtype), jnp.full((batch, k), num_items, jnp.int32))
  (scores, ids), _ = jax.lax.scan(merge_chunk, init, (chunks, starts))
  return scores, ids


def top_k_chunked(states: Array, item_table: Array, k: int, exclude: Array | None = None, *,
                  chunk_size: int, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[Array, Array]:
  """`top_k_of_chunks` of an unchunked table [N, d] (chunks it first: one copy of the table)."""
  chunks, starts = chunk_table(item_table, chunk_size)
  return top_k_of_chunks(states, chunks, starts, item_table.shape[0], k, exclude,
                         group_size=group_size)
