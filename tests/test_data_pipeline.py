"""Batching: coverage with masks, determinism per (seed, epoch), device/host sharding, resume."""

import numpy as np
import pytest

from alphafuse_jax import data


def _arrays(n, length=3):
  ids = np.arange(n, dtype=np.int32)
  return {'target': ids, 'history': np.stack([ids * 10 + j for j in range(length)], axis=1)}


def test_num_batches():
  assert data.num_batches(10, 4) == 3
  assert data.num_batches(8, 4) == 2
  assert data.num_batches(0, 4) == 0
  assert data.num_batches(1, 256) == 1
  with pytest.raises(ValueError, match='batch_size'):
    data.num_batches(10, 0)


def test_every_example_once_per_epoch_with_padded_last_batch():
  arrays = _arrays(10)
  batches = list(data.batches(arrays, 4, seed=3, epoch=0, shuffle=True))
  assert len(batches) == 3
  for batch in batches:
    assert batch['target'].shape == (1, 4) and batch['history'].shape == (1, 4, 3)
    assert batch['mask'].dtype == bool
    # Rows stay whole: history row r belongs to target r.
    np.testing.assert_array_equal(batch['history'][0, :, 0], batch['target'][0] * 10)
  masks = np.concatenate([b['mask'].reshape(-1) for b in batches])
  seen = np.concatenate([b['target'].reshape(-1) for b in batches])[masks]
  assert masks.tolist() == [True] * 10 + [False] * 2
  assert sorted(seen.tolist()) == list(range(10))
  assert seen.tolist() != list(range(10))  # Shuffled.


def test_order_depends_on_seed_and_epoch_only():
  arrays = _arrays(50)
  def order(**kw):
    return np.concatenate([b['target'].reshape(-1)[b['mask'].reshape(-1)]
                           for b in data.batches(arrays, 8, shuffle=True, **kw)])
  np.testing.assert_array_equal(order(seed=1, epoch=2), order(seed=1, epoch=2))
  np.testing.assert_array_equal(order(seed=1, epoch=2),
                                np.random.default_rng([1, 2]).permutation(50))
  assert not np.array_equal(order(seed=1, epoch=2), order(seed=1, epoch=3))
  assert not np.array_equal(order(seed=1, epoch=2), order(seed=2, epoch=2))
  unshuffled = np.concatenate([b['target'].reshape(-1) for b in
                               data.batches(arrays, 10, seed=1, epoch=2, shuffle=False)])
  np.testing.assert_array_equal(unshuffled, np.arange(50))


def test_shuffle_does_not_depend_on_stored_order():
  # A split's rows are permuted from their (user_id, position) order: storing the same examples
  # in another order gives the same shuffled batches, and (user_id, position)-sorted rows give
  # exactly default_rng([seed, epoch]).permutation(n). Unshuffled epochs keep the stored order.
  rng = np.random.default_rng(0)
  user_id = np.repeat(np.arange(6, dtype=np.int32), [3, 1, 4, 2, 5, 3])
  position = np.concatenate([np.arange(1, k + 1) for k in [3, 1, 4, 2, 5, 3]]).astype(np.int32)
  tagged = {'user_id': user_id, 'position': position, 'target': np.arange(18, dtype=np.int32)}
  stored = rng.permutation(18)
  shuffled_storage = {k: v[stored] for k, v in tagged.items()}

  def rows(arrays, shuffle):
    return np.concatenate([b['target'].reshape(-1)[b['mask'].reshape(-1)] for b in
                           data.batches(arrays, 4, seed=7, epoch=1, shuffle=shuffle)])
  np.testing.assert_array_equal(rows(shuffled_storage, True), rows(tagged, True))
  np.testing.assert_array_equal(rows(tagged, True), np.random.default_rng([7, 1]).permutation(18))
  np.testing.assert_array_equal(rows(shuffled_storage, False), stored)


def test_device_and_host_shards_tile_the_global_batch():
  arrays = _arrays(21)
  kw = dict(seed=0, epoch=1, shuffle=True)
  global_batches = list(data.batches(arrays, 8, **kw))
  per_host = [list(data.batches(arrays, 8, num_devices=2, process_index=p, process_count=2,
                                **kw)) for p in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == len(global_batches) == 3
  for step, full in enumerate(global_batches):
    parts = [per_host[p][step] for p in range(2)]
    for part in parts:
      assert part['target'].shape == (2, 2) and part['history'].shape == (2, 2, 3)
    # Host p holds rows [4p, 4p+4) of the global batch, device-major.
    for key in ('target', 'mask', 'history'):
      joined = np.concatenate([part[key].reshape((4,) + part[key].shape[2:]) for part in parts])
      np.testing.assert_array_equal(joined, full[key].reshape((8,) + full[key].shape[2:]))
  # Last batch: 21 = 2 * 8 + 5 rows, so host 1 gets one real row and three padding rows.
  np.testing.assert_array_equal(per_host[1][2]['mask'], [[True, False], [False, False]])


def test_start_step_resumes_mid_epoch():
  arrays = _arrays(37)
  kw = dict(seed=5, epoch=4, shuffle=True)
  full = list(data.batches(arrays, 8, **kw))
  resumed = list(data.batches(arrays, 8, start_step=3, **kw))
  assert len(resumed) == 2
  for a, b in zip(full[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert list(data.batches(arrays, 8, start_step=5, **kw)) == []


def test_bad_arguments():
  arrays = _arrays(10)
  with pytest.raises(ValueError, match='divisible'):
    next(data.batches(arrays, 6, seed=0, epoch=0, shuffle=False, num_devices=4))
  with pytest.raises(ValueError, match='process_index'):
    next(data.batches(arrays, 4, seed=0, epoch=0, shuffle=False, process_index=2,
                      process_count=2))
  with pytest.raises(ValueError, match='start_step'):
    next(data.batches(arrays, 4, seed=0, epoch=0, shuffle=False, start_step=4))
  with pytest.raises(ValueError, match='leading dimension'):
    next(data.batches({'a': np.zeros(3), 'b': np.zeros(4)}, 2, seed=0, epoch=0, shuffle=False))
