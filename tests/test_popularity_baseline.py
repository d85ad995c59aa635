"""The popularity ranker that results.json reports beside every model (`test_popularity`)."""

import numpy as np
import pytest

from alphafuse_jax import evaluation


@pytest.mark.parametrize('block_rows', [7, 4096])  # Several seen-item blocks, and one.
def test_popularity_ranks_match_a_brute_force_count(block_rows, monkeypatch):
  monkeypatch.setattr(evaluation, '_POPULARITY_ROWS', block_rows)
  rng = np.random.default_rng(0)
  num_items, n = 30, 50
  counts = rng.integers(0, 6, size=num_items)  # Many ties.
  targets = rng.integers(0, num_items, size=n)
  # Padded seen lists with repeats, the target itself and padding ids (num_items, -1).
  seen = rng.integers(-1, num_items + 1, size=(n, 9))
  seen[:, 0] = targets
  seen[:, 1] = seen[:, 2]
  for with_seen in (False, True):
    rank, ties = evaluation.popularity_rank_counts(counts, targets, seen if with_seen else None)
    for i in range(n):  # The oracle: loop over the catalogue.
      excluded = set(seen[i]) - {targets[i]} if with_seen else set()
      others = [j for j in range(num_items) if j != targets[i] and j not in excluded]
      assert rank[i] == 1 + sum(counts[j] > counts[targets[i]] for j in others)
      assert ties[i] == sum(counts[j] == counts[targets[i]] for j in others)
