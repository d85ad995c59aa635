"""Chunked full ranking (metrics.target_ranks_chunked).

Embeddings are small integers, so every score is exact in float32 whatever the matmul blocking:
chunked and unchunked ranks must then be IDENTICAL, including many ties, excluded items, a chunk
size that does not divide N, and padding rows that must never count. The oracle is a float64
numpy ranking written here from the definitions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import metrics

B, N, H = 12, 37, 4


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  # Values in -2..2 over 4 dims: scores in -16..16, so ties with the target are frequent.
  states = rng.integers(-2, 3, size=(B, H)).astype(np.float32)
  table = rng.integers(-2, 3, size=(N, H)).astype(np.float32)
  targets = rng.integers(0, N, size=B).astype(np.int32)
  # Padded index lists: pad N, out-of-range ids, duplicates and the target itself.
  exclude = np.full((B, 6), N, np.int32)
  for b in range(B):
    exclude[b, :4] = rng.integers(0, N, size=4)
  exclude[0, 4] = targets[0]
  exclude[1, 4:] = (-1, N + 5)
  exclude[2, 4:] = exclude[2, 0]
  return states, table, targets, exclude


def _oracle_ranks(states, table, targets, exclude, ties):
  """float64 ranks from the definitions in metrics' module docstring."""
  scores = states.astype(np.float64) @ table.astype(np.float64).T
  ranks = []
  for b, t in enumerate(targets):
    row = scores[b].copy()
    target_score = row[t]
    for e in (exclude[b] if exclude is not None else ()):
      if 0 <= e < N and e != t:
        row[e] = -np.inf
    if ties == 'optimistic':
      ranks.append(1 + np.sum(row > target_score))
    else:
      ranks.append(np.sum(row >= target_score))
  return np.asarray(ranks)


@pytest.mark.parametrize('ties', ['optimistic', 'pessimistic'])
@pytest.mark.parametrize('chunk_size', [1, 8, 37, 64])
@pytest.mark.parametrize('use_exclude', [False, True])
def test_chunked_ranks_equal_unchunked(ties, chunk_size, use_exclude):
  states, table, targets, exclude = _problem()
  exclude = exclude if use_exclude else None
  expected = _oracle_ranks(states, table, targets, exclude, ties)
  # The oracle sees real ties, and exclusion changes some ranks (the test can fail).
  scores = states @ table.T
  assert np.sum(scores == scores[np.arange(B), targets][:, None]) > 2 * B
  unchunked = metrics.target_ranks(jnp.asarray(scores), jnp.asarray(targets),
                                   None if exclude is None else jnp.asarray(exclude), ties=ties)
  chunked = jax.jit(metrics.target_ranks_chunked, static_argnames=('chunk_size', 'ties'))(
      jnp.asarray(states), jnp.asarray(table), jnp.asarray(targets),
      None if exclude is None else jnp.asarray(exclude), chunk_size=chunk_size, ties=ties)
  assert chunked.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(unchunked), expected)
  np.testing.assert_array_equal(np.asarray(chunked), expected)


def test_exclusion_changes_ranks_and_bool_mask_matches_list():
  states, table, targets, exclude = _problem(1)
  plain = metrics.target_ranks_chunked(states, table, targets, chunk_size=8)
  listed = metrics.target_ranks_chunked(states, table, targets, exclude, chunk_size=8)
  assert np.any(np.asarray(listed) < np.asarray(plain))
  mask = np.zeros((B, N), bool)
  for b in range(B):
    for e in exclude[b]:
      if 0 <= e < N:
        mask[b, e] = True  # Includes the target in row 0: it must still not be excluded.
  masked = metrics.target_ranks_chunked(states, table, targets, jnp.asarray(mask), chunk_size=8)
  np.testing.assert_array_equal(np.asarray(masked), np.asarray(listed))


def test_padding_rows_never_count():
  # Every real item scores below 0 and the zero padding rows would score 0 > target: a rank of 1
  # for all rows proves padding is ignored (N=5 with chunks of 4 leaves 3 padding rows).
  states = np.ones((3, 2), np.float32)
  table = -np.arange(1, 6, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
  targets = np.zeros(3, np.int32)
  ranks = metrics.target_ranks_chunked(states, table, targets, chunk_size=4, ties='pessimistic')
  np.testing.assert_array_equal(np.asarray(ranks), [1, 1, 1])


def test_nan_target_gets_worst_rank_and_bad_arguments_fail():
  states, table, targets, _ = _problem()
  table = table.copy()
  table[targets[3]] = np.nan
  ranks = np.asarray(metrics.target_ranks_chunked(states, table, targets, chunk_size=8))
  assert ranks[3] == N
  with pytest.raises(ValueError, match='tie rule'):
    metrics.target_ranks_chunked(states, table, targets, chunk_size=8, ties='random')
  with pytest.raises(ValueError, match='chunk_size'):
    metrics.target_ranks_chunked(states, table, targets, chunk_size=0)
  with pytest.raises(ValueError, match=r'expected \[12, S\]'):
    metrics.target_ranks_chunked(states, table, targets, np.zeros((5, 2), np.int32), chunk_size=8)

