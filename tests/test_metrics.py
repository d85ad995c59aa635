"""Full-ranking metrics against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import evaluation
from alphafuse_jax import metrics


def test_target_ranks_counts_strictly_higher_scores():
  scores = jnp.array([[0.5, 0.9, 0.1, 0.9, 0.3],
                      [0.0, 1.0, 2.0, 3.0, 4.0],
                      [0.0, 1.0, 2.0, 3.0, 4.0]])
  targets = jnp.array([0, 4, 0])
  # Row 0: 0.9 and 0.9 beat 0.5 -> 3. Row 1: best -> 1. Row 2: worst of 5 -> 5.
  np.testing.assert_array_equal(metrics.target_ranks(scores, targets), [3, 1, 5])


def test_ties_optimistic_and_pessimistic():
  scores = jnp.array([[0.5, 0.9, 0.1, 0.9, 0.3],
                      [0.2, 0.2, 0.2, 0.2, 0.2]])
  targets = jnp.array([1, 2])
  # Row 0: the target ties with item 3 at the top: optimistic 1, pessimistic 2.
  # Row 1: all five tie: optimistic 1, pessimistic 5.
  np.testing.assert_array_equal(metrics.target_ranks(scores, targets), [1, 1])
  np.testing.assert_array_equal(metrics.target_ranks(scores, targets, ties='pessimistic'), [2, 5])
  with pytest.raises(ValueError, match='tie rule'):
    metrics.target_ranks(scores, targets, ties='random')


def test_tie_at_the_cutoff_changes_hr():
  # Target (item 0) ties with item 5 after four strictly better items: rank 5 or 6.
  scores = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 0.0]])
  targets = jnp.array([0])
  optimistic_rank = metrics.target_ranks(scores, targets)
  pessimistic_rank = metrics.target_ranks(scores, targets, ties='pessimistic')
  np.testing.assert_array_equal(optimistic_rank, [5])
  np.testing.assert_array_equal(pessimistic_rank, [6])
  optimistic = metrics.summarize_ranks(np.asarray(optimistic_rank), ks=(5,))
  pessimistic = metrics.summarize_ranks(np.asarray(pessimistic_rank), ks=(5,))
  # Host-side float64 means of one row: hits are exactly 1.0 or 0.0.
  assert optimistic['HR@5'] == 1.0
  assert optimistic['NDCG@5'] == pytest.approx(1 / math.log2(6), rel=1e-12)
  assert optimistic['MRR@5'] == pytest.approx(0.2, rel=1e-12)
  assert pessimistic['HR@5'] == 0.0
  assert pessimistic['NDCG@5'] == 0.0
  assert pessimistic['MRR@5'] == 0.0


def test_nan_target_score_gets_the_worst_rank():
  scores = jnp.array([[jnp.nan, 1.0, 2.0]])
  assert int(metrics.target_ranks(scores, jnp.array([0]))[0]) == 3


def test_exclude_padded_index_list_never_drops_the_target():
  n = 6
  scores = jnp.array([[0.1, 0.9, 0.8, 0.7, 0.2, 0.3],
                      [0.1, 0.9, 0.8, 0.7, 0.2, 0.3]])
  targets = jnp.array([3, 3])
  # Row 0 excludes items 1 and 2 (better than the target), the target itself, pads (n) and -1.
  # Row 1 excludes only item 5 (worse than the target).
  exclude = jnp.array([[1, 3, 2, n, -1],
                       [5, n, n, n, n]])
  np.testing.assert_array_equal(metrics.target_ranks(scores, targets), [3, 3])
  np.testing.assert_array_equal(metrics.target_ranks(scores, targets, exclude), [1, 3])
  # The same exclusion as a boolean mask.
  mask = np.zeros((2, n), bool)
  mask[0, [1, 2, 3]] = True
  mask[1, 5] = True
  np.testing.assert_array_equal(metrics.target_ranks(scores, targets, jnp.asarray(mask)), [1, 3])
  np.testing.assert_array_equal(
      metrics.target_ranks(scores, targets, jnp.asarray(mask), ties='pessimistic'), [1, 3])
  with pytest.raises(ValueError, match='shape'):
    metrics.target_ranks(scores, targets, jnp.zeros((2, 3), bool))


def test_summarize_ranks_hand_computed():
  # Ranks 1, 3, 12, 60 by hand: means over the four rows, in float64.
  ndcg_12 = 1 / math.log2(13)  # 0.2702381...
  sums = {
      'HR@1': 1, 'HR@5': 2, 'HR@10': 2, 'HR@20': 3, 'HR@50': 3,
      'NDCG@1': 1, 'NDCG@5': 1.5, 'NDCG@10': 1.5, 'NDCG@20': 1.5 + ndcg_12, 'NDCG@50': 1.5 + ndcg_12,
      'MRR@1': 1, 'MRR@5': 1 + 1 / 3, 'MRR@10': 1 + 1 / 3, 'MRR@20': 1 + 1 / 3 + 1 / 12,
      'MRR@50': 1 + 1 / 3 + 1 / 12,
  }
  means = metrics.summarize_ranks(np.array([1, 3, 12, 60]))
  assert set(means) == set(sums) | {'count'}
  assert means['count'] == 4
  for key, value in sums.items():
    assert means[key] == pytest.approx(value / 4, rel=1e-12), key
  assert means['HR@20'] == 0.75
  # Custom cut-offs: only those keys. Rank 7: HR@7 = 1, NDCG@7 = 1 / log2(8) = 1/3, MRR@7 = 1/7.
  custom = metrics.summarize_ranks(np.array([7, 8]), ks=(7,))
  assert set(custom) == {'count', 'HR@7', 'NDCG@7', 'MRR@7'}
  assert custom['HR@7'] == 0.5
  assert custom['NDCG@7'] == pytest.approx(1 / 6, rel=1e-12)
  assert custom['MRR@7'] == pytest.approx(1 / 14, rel=1e-12)


def test_summarize_ranks_counts_every_entry_once():
  # Ranks gathered as [batches, rows] (e.g. from several devices) count once each: the same means
  # as the flat ranks, and the count is the number of entries.
  ranks = np.array([1, 3, 12, 60, 2, 7])
  flat = metrics.summarize_ranks(ranks)
  batched = metrics.summarize_ranks(ranks.reshape(2, 3))
  assert batched['count'] == flat['count'] == 6
  assert batched == pytest.approx(flat, rel=1e-12)
  assert flat['HR@5'] == pytest.approx(3 / 6, rel=1e-12)  # Ranks 1, 3, 2.
  # Splitting the ranks into batches and weighting each batch's means by its count is the same.
  first, second = metrics.summarize_ranks(ranks[:4]), metrics.summarize_ranks(ranks[4:])
  for key in flat:
    if key != 'count':
      assert (4 * first[key] + 2 * second[key]) / 6 == pytest.approx(flat[key], rel=1e-12), key
  # No example: count 0 and NaN means (there is nothing to average).
  empty = metrics.summarize_ranks(np.zeros((0,), np.int32), ks=(10,))
  assert empty['count'] == 0 and math.isnan(empty['HR@10']) and math.isnan(empty['NDCG@10'])


def test_item_groups_top_fraction_ties_by_id():
  counts = np.array([5, 1, 5, 0, 9, 2, 2, 7, 3, 1])
  # 20% of 10 items: the two most popular, items 4 (9) and 7 (7).
  np.testing.assert_array_equal(np.flatnonzero(metrics.item_groups(counts, 0.2)), [4, 7])
  # 30%: items 0 and 2 tie at 5 for the third place; the lower id (0) wins.
  np.testing.assert_array_equal(np.flatnonzero(metrics.item_groups(counts, 0.3)), [0, 4, 7])
  with pytest.raises(ValueError, match='head_fraction'):
    metrics.item_groups(counts, 1.5)


def test_group_masks_and_group_metrics():
  # The report's groups (evaluation.group_masks) and their means (summarize_ranks per group).
  counts = np.array([1, 0, 9, 0, 3, 0, 0, 8, 2])
  # head_fraction 0.25 of 9 items: the two most popular, items 2 (9) and 7 (8).
  np.testing.assert_array_equal(np.flatnonzero(metrics.item_groups(counts, 0.25)), [2, 7])
  targets = np.array([7, 0, 2, 5])
  positions = np.array([2, 4, 3, 0])  # Items before each target; short: fewer than 3.
  ranks = np.array([1, 3, 12, 60])
  masks = evaluation.group_masks(counts, targets, positions, head_fraction=0.25,
                                 short_history=3)
  np.testing.assert_array_equal(masks['head_items'], [True, False, True, False])
  np.testing.assert_array_equal(masks['tail_items'], [False, True, False, True])
  np.testing.assert_array_equal(masks['short_users'], [True, False, False, True])
  np.testing.assert_array_equal(masks['long_users'], [False, True, True, False])
  means = evaluation.group_metrics(ranks, masks, ks=(10, 20))
  assert set(means) == set(evaluation.GROUPS)
  assert means['overall'] == pytest.approx(metrics.summarize_ranks(ranks, ks=(10, 20)))
  # head: ranks 1 and 12 -> HR@10 1/2, NDCG@10 1/2, MRR@10 1/2; tail: ranks 3 and 60.
  assert means['head_items']['count'] == 2 and means['tail_items']['count'] == 2
  assert means['head_items']['HR@10'] == pytest.approx(0.5)
  assert means['head_items']['NDCG@10'] == pytest.approx(0.5)
  assert means['head_items']['MRR@10'] == pytest.approx(0.5)
  assert means['tail_items']['HR@10'] == pytest.approx(0.5)
  assert means['tail_items']['NDCG@10'] == pytest.approx(0.25)
  assert means['tail_items']['MRR@10'] == pytest.approx(1 / 6)
  # short: ranks 1 and 60; long: ranks 3 and 12 (HR@20 1, NDCG@20 (1/2 + 1/log2(13)) / 2).
  assert means['short_users']['MRR@10'] == pytest.approx(0.5)
  assert means['long_users']['HR@10'] == pytest.approx(0.5)
  assert means['long_users']['HR@20'] == pytest.approx(1.0)
  assert means['long_users']['NDCG@20'] == pytest.approx((0.5 + 1 / math.log2(13)) / 2)
  # A group with no example is left out (there is nothing to average).
  masks = evaluation.group_masks(counts, targets, positions, head_fraction=0.25,
                                 short_history=0)
  assert not masks['short_users'].any()
  assert 'short_users' not in evaluation.group_metrics(ranks, masks, ks=(10,))


def test_ranks_match_a_sort_on_random_scores_and_jit():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(16, 50)).astype(np.float32)
  targets = rng.integers(0, 50, size=16)
  order = np.argsort(-scores, axis=1, kind='stable')
  expected = np.array([np.flatnonzero(order[i] == targets[i])[0] + 1 for i in range(16)])
  got = jax.jit(metrics.target_ranks)(jnp.asarray(scores), jnp.asarray(targets))
  np.testing.assert_array_equal(got, expected)


def test_sampled_ranks_hand_computed_and_exclusions():
  # N = 6 items; with K = N - 1 - |history| every eligible item is drawn, so the rank is exact:
  # row 0: target 2 (score 0.5), history {0, 4}; eligible negatives {1, 3, 5} with scores
  # 0.9, 0.1, 0.6 -> two beat the target -> rank 3 (items 0 and 4 scoring 2.0 and 3.0 ignored).
  scores = jnp.array([[2.0, 0.9, 0.5, 0.1, 3.0, 0.6]])
  keys = jax.random.split(jax.random.key(0), 1)
  history = jnp.array([[0, 4, 6]])  # 6 = the pad id N, ignored.
  ranks = metrics.sampled_target_ranks(scores, jnp.array([2]), keys, 3, exclude=history)
  assert ranks.tolist() == [3]
  # Without the exclusion all 5 others are drawn: 0, 1, 4, 5 beat 0.5 -> rank 5.
  assert metrics.sampled_target_ranks(scores, jnp.array([2]), keys, 5).tolist() == [5]


def test_sampled_negatives_are_distinct_uniform_and_key_determined():
  n, k, rows = 50, 10, 4000
  # Scores = item id, target item 0 (lowest): rank - 1 = K for every row, and the sampled set
  # is recovered by giving the target the highest score instead and counting per item.
  keys = jax.random.split(jax.random.key(1), rows)
  targets = jnp.zeros((rows,), jnp.int32)
  history = jnp.full((rows, 2), n).at[:, 0].set(7)  # Item 7 is always in the history.
  scores = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (rows, n))
  ranks = metrics.sampled_target_ranks(scores, targets, keys, k, exclude=history)
  assert np.all(np.asarray(ranks) == k + 1)  # K distinct negatives, all above item 0.
  # Inclusion frequency of each item: one-hot scores make item j alone beat the target.
  freq = []
  for j in (1, 7, 25, 49):
    one_hot = jnp.zeros((rows, n)).at[:, j].set(1.0)
    freq.append(float(np.mean(np.asarray(
        metrics.sampled_target_ranks(one_hot, targets, keys, k, exclude=history)) == 2)))
  expected = k / (n - 2)  # Uniform over the 48 items that are neither the target nor item 7.
  for f in (freq[0], freq[2], freq[3]):
    assert abs(f - expected) < 4 * math.sqrt(expected * (1 - expected) / rows)
  assert freq[1] == 0.0
  again = metrics.sampled_target_ranks(scores * -1, targets, keys, k, exclude=history)
  assert np.all(np.asarray(again) == 1)


def test_sampled_ranks_reject_too_many_negatives():
  with pytest.raises(ValueError, match='sampled_negatives'):
    metrics.sampled_target_ranks(jnp.zeros((1, 5)), jnp.array([0]),
                                 jax.random.split(jax.random.key(0), 1), 5)
