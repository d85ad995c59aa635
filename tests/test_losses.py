"""Losses against float64 numpy computations with the same negatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import chunked_ce
from alphafuse_jax import losses

N, H, B, K = 7, 5, 6, 4
# float32 losses of O(1) against float64 oracles: a tolerance any CPU and fusion order honours.
TOL = dict(rtol=1e-5, atol=1e-6)


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_softplus(x):
  return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  states = rng.normal(size=(B, H)).astype(np.float32)
  table = rng.normal(size=(N + 1, H)).astype(np.float32)  # Row N is the pad row.
  targets = rng.integers(0, N, size=B).astype(np.int32)
  return states, table, targets


def _weighted_mean(values, weights):
  """The train step's reduction of (loss, weight) pairs: sum(w * v) / max(sum(w), 1)."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def test_negatives_never_hit_the_target_and_are_uniform_over_the_rest():
  targets = jnp.array([0, 3, 6, 2], jnp.int32)
  negatives = np.asarray(losses.sample_negatives(jax.random.key(0), targets, N, 3000))
  assert negatives.shape == (4, 3000) and negatives.dtype == np.int32
  for row, target in enumerate(np.asarray(targets)):
    assert not np.any(negatives[row] == target)
    counts = np.bincount(negatives[row], minlength=N)
    others = np.delete(counts, target)
    # Every other item appears, about 3000 / 6 = 500 times each.
    assert set(np.flatnonzero(counts)) == set(range(N)) - {target}
    assert np.all(np.abs(others - 500) < 100), counts
  with pytest.raises(ValueError, match='num_negatives'):
    losses.sample_negatives(jax.random.key(0), targets, N, 0)


def test_ce_matches_numpy_and_accepts_the_pad_row():
  states, table, targets = _data()
  logits = states.astype(np.float64) @ table[:N].astype(np.float64).T
  expected = -_np_log_softmax(logits)[np.arange(B), targets]
  got = losses.ce_per_example(jnp.asarray(states), jnp.asarray(table[:N]), jnp.asarray(targets))
  # A table of N rows or of N + 1 rows (the pad row is dropped) gives the same per-row values.
  got_n = losses.per_example_loss('ce', jnp.asarray(states), jnp.asarray(targets),
                                  jnp.asarray(table[:N]), num_items=N)
  got_n1 = losses.per_example_loss('ce', jnp.asarray(states), jnp.asarray(targets),
                                   jnp.asarray(table), num_items=N)
  assert got.shape == got_n.shape == got_n1.shape == (B,)
  for value in (got, got_n, got_n1):
    np.testing.assert_allclose(value, expected, **TOL)
  with pytest.raises(ValueError, match='rows'):
    losses.per_example_loss('ce', jnp.asarray(states), jnp.asarray(targets),
                            jnp.asarray(table[:3]), num_items=N)
  with pytest.raises(ValueError, match='full item table'):
    losses.per_example_loss('ce', jnp.asarray(states), jnp.asarray(targets),
                            lambda ids: jnp.take(jnp.asarray(table), ids, axis=0), num_items=N)


def _np_bce(states, table, targets, negatives, valid):
  s, e = states.astype(np.float64), table.astype(np.float64)
  pos = np.einsum('bh,bh->b', s, e[targets])
  neg = np.einsum('bh,bkh->bk', s, e[negatives])
  # The reference: BCE(pos, 1) averaged over rows + BCE(neg, 0) averaged over rows x K.
  return _np_softplus(-pos)[valid].mean() + _np_softplus(neg)[valid].mean()


def _np_infonce(states, table, targets, negatives, tau, valid):
  s = _np_normalize(states.astype(np.float64))
  e = table.astype(np.float64)
  pos = np.einsum('bh,bh->b', s, _np_normalize(e[targets]))
  neg = np.einsum('bh,bkh->bk', s, _np_normalize(e[negatives]))
  logits = np.concatenate([pos[:, None], neg], axis=1) / tau
  return -_np_log_softmax(logits)[:, 0][valid].mean()


@pytest.mark.parametrize('dense', [False, True])
def test_bce_and_infonce_match_numpy_with_the_same_negatives(dense):
  states, table, targets = _data(1)
  key = jax.random.key(3)
  negatives = np.asarray(losses.sample_negatives(key, jnp.asarray(targets), N, K))
  valid = np.ones(B, bool)
  args = (jnp.asarray(states), jnp.asarray(targets), jnp.asarray(table))
  kwargs = dict(num_items=N, key=key, num_negatives=K, dense=dense)
  got = losses.per_example_loss('bce', *args, **kwargs)
  assert got.shape == (B,)
  np.testing.assert_allclose(jnp.mean(got), _np_bce(states, table, targets, negatives, valid),
                             **TOL)
  got = losses.per_example_loss('infonce', *args, temperature=0.07, **kwargs)
  np.testing.assert_allclose(
      jnp.mean(got), _np_infonce(states, table, targets, negatives, 0.07, valid), **TOL)
  if not dense:
    # A lookup function gives the same value as the table (two graphs: a tolerance).
    lookup = lambda ids: jnp.take(jnp.asarray(table), ids, axis=0)
    got_fn = losses.per_example_loss('infonce', args[0], args[1], lookup, temperature=0.07,
                                     **kwargs)
    np.testing.assert_allclose(got_fn, got, **TOL)


@pytest.mark.parametrize('kind', ['ce', 'bce', 'infonce'])
def test_padded_rows_do_not_count(kind):
  """The backbones' contract: padded rows (weight 0) point at item 0 and get weight 0."""
  states, table, targets = _data(2)
  weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
  valid = weights > 0
  # Padded rows carry the pad id N as target; `Recommender.example_loss` sends them to item 0.
  used_targets = np.where(valid, targets, 0).astype(np.int32)
  key = jax.random.key(5)
  kwargs = dict(num_items=N, key=key, num_negatives=K, temperature=0.1)

  def padded_loss(s):
    values = losses.per_example_loss(kind, s, jnp.asarray(used_targets), jnp.asarray(table),
                                     **kwargs)
    return _weighted_mean(values, jnp.asarray(weights))

  got, grad = jax.value_and_grad(padded_loss)(jnp.asarray(states))
  if kind == 'ce':
    logits = states.astype(np.float64) @ table[:N].astype(np.float64).T
    expected = -_np_log_softmax(logits)[np.arange(B), targets][valid].mean()
  else:
    # The valid rows' draws are those of their own targets.
    negatives = np.asarray(losses.sample_negatives(key, jnp.asarray(used_targets), N, K))
    oracle = _np_bce if kind == 'bce' else (
        lambda *a: _np_infonce(*a[:4], 0.1, a[4]))
    expected = oracle(states, table, targets, negatives, valid)
  np.testing.assert_allclose(got, expected, **TOL)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  # Exact zeros: a padded row's state only reaches the loss through its own value times 0.
  np.testing.assert_array_equal(grad[~valid], 0.0)
  assert np.abs(grad[valid]).sum() > 0


def test_positional_loss_matches_a_per_position_numpy_loop():
  """Leave-one-out training: the mean over counted positions of `per_example_loss` on
  `positional_targets` (as `Recommender.example_loss` with per_position does it)."""
  rng = np.random.default_rng(4)
  seq_len = 4
  history = np.array([[N, N, 1, 2],
                      [0, 3, 5, 6],
                      [N, N, N, N],   # Empty history: no position counts.
                      [N, 4, 4, 0]], np.int32)
  targets = np.array([3, 2, 1, 5], np.int32)
  row_weights = np.array([1, 1, 1, 0], np.float32)  # The last row is batch padding.
  encoded = rng.normal(size=(4, seq_len, H)).astype(np.float32)
  table = rng.normal(size=(N + 1, H)).astype(np.float32)

  next_items, valid = losses.positional_targets(jnp.asarray(history), jnp.asarray(targets), N)
  np.testing.assert_array_equal(next_items[0], [N, 1, 2, 3])
  np.testing.assert_array_equal(next_items[1], [3, 5, 6, 2])
  np.testing.assert_array_equal(valid[0], [False, False, True, True])
  np.testing.assert_array_equal(valid[1], [True] * 4)
  np.testing.assert_array_equal(valid[2], [False] * 4)
  np.testing.assert_array_equal(valid[3], [False, True, True, True])

  key = jax.random.key(7)
  # Counted positions: (0, 2) -> 2, (0, 3) -> 3, (1, 0..3) -> 3, 5, 6, 2. Row 3 has weight 0.
  counted = [(0, 2, 2), (0, 3, 3), (1, 0, 3), (1, 1, 5), (1, 2, 6), (1, 3, 2)]
  position_weights = np.asarray(valid, np.float32) * row_weights[:, None]
  # Non-counted positions get item 0 as target, so no NaN reaches the gradient.
  used = np.where(position_weights > 0, np.asarray(next_items), 0).astype(np.int32)
  negatives = np.asarray(losses.sample_negatives(key, jnp.asarray(used), N, K))
  for kind in ('ce', 'bce', 'infonce'):
    values = losses.per_example_loss(kind, jnp.asarray(encoded), jnp.asarray(used),
                                     jnp.asarray(table), num_items=N, key=key, num_negatives=K,
                                     temperature=0.2)
    assert values.shape == (4, seq_len)
    got = _weighted_mean(values, jnp.asarray(position_weights))
    expected = []
    for b, i, target in counted:
      s = encoded[b, i].astype(np.float64)
      e = table.astype(np.float64)
      if kind == 'ce':
        expected.append(-_np_log_softmax(e[:N] @ s)[target])
      elif kind == 'bce':
        expected.append(_np_softplus(-(s @ e[target]))
                        + _np_softplus(e[negatives[b, i]] @ s).mean())
      else:
        sn = _np_normalize(s)
        logits = np.concatenate([[sn @ _np_normalize(e[target])],
                                 _np_normalize(e[negatives[b, i]]) @ sn]) / 0.2
        expected.append(-_np_log_softmax(logits)[0])
    np.testing.assert_allclose(got, np.mean(expected), err_msg=kind, **TOL)


def test_bad_arguments_raise():
  states, table, targets = _data()
  args = (jnp.asarray(states), jnp.asarray(targets), jnp.asarray(table))
  with pytest.raises(ValueError, match='config.train.loss'):
    losses.per_example_loss('hinge', *args, num_items=N)
  with pytest.raises(ValueError, match='random key'):
    losses.per_example_loss('bce', *args, num_items=N)
  with pytest.raises(ValueError, match='temperature'):
    losses.per_example_loss('infonce', *args, num_items=N, key=jax.random.key(0),
                            temperature=0.0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(kind='hinge'), 'config.train.loss'),
    (dict(kind='bce', negative_scoring='sparse'), 'config.train.negative_scoring'),
    (dict(kind='bce', num_negatives=0), 'config.train.num_negatives'),
    (dict(kind='infonce', num_negatives=-1), 'config.train.num_negatives'),
])
def test_objective_validates_its_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.Objective(**kwargs)


def test_objective_per_example_uses_its_settings():
  # Full-softmax CE ignores K (no negatives are drawn).
  assert losses.Objective('ce', num_negatives=0).kind == 'ce'
  assert not losses.Objective('ce', negative_scoring='gather').gathers
  assert not losses.Objective('bce', negative_scoring='dense').gathers
  assert losses.Objective('infonce', negative_scoring='gather').gathers

  states, table, targets = _data(3)
  key = jax.random.key(11)
  negatives = np.asarray(losses.sample_negatives(key, jnp.asarray(targets), N, K))
  valid = np.ones(B, bool)
  expected = _np_infonce(states, table, targets, negatives, 0.2, valid)
  lookup = lambda ids: jnp.take(jnp.asarray(table), ids, axis=0)
  gather = losses.Objective('infonce', num_negatives=K, temperature=0.2,
                            negative_scoring='gather')
  dense = losses.Objective('infonce', num_negatives=K, temperature=0.2, negative_scoring='dense')
  # K, tau and the scoring reach the loss: a lookup function with 'gather', a table with 'dense'.
  got = gather.per_example(jnp.asarray(states), jnp.asarray(targets), lookup, key=key,
                           num_items=N)
  np.testing.assert_allclose(jnp.mean(got), expected, **TOL)
  got = dense.per_example(jnp.asarray(states), jnp.asarray(targets), jnp.asarray(table), key=key,
                          num_items=N)
  np.testing.assert_allclose(jnp.mean(got), expected, **TOL)
  with pytest.raises(ValueError, match='full item table'):
    dense.per_example(jnp.asarray(states), jnp.asarray(targets), lookup, key=key, num_items=N)
  ce = losses.Objective('ce').per_example(jnp.asarray(states), jnp.asarray(targets),
                                          jnp.asarray(table), key=key, num_items=N)
  logits = states.astype(np.float64) @ table[:N].astype(np.float64).T
  np.testing.assert_allclose(ce, -_np_log_softmax(logits)[np.arange(B), targets], **TOL)


@pytest.mark.parametrize('kind', ['bce', 'infonce'])
def test_dense_scoring_equals_gathered_embeddings(kind):
  """Scores against the whole table, then picked, give the gathered path's loss and gradients."""
  rng = np.random.default_rng(7)
  states = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(11, 5)), jnp.float32)
  targets = jnp.asarray([0, 3, 10, 4, 4, 7], jnp.int32)
  key = jax.random.key(3)

  def total(table, dense):
    return jnp.sum(losses.per_example_loss(kind, states, targets, table, num_items=11, key=key,
                                           num_negatives=4, temperature=0.5, dense=dense))

  np.testing.assert_allclose(total(table, True), total(table, False), **TOL)
  np.testing.assert_allclose(jax.grad(total)(table, True), jax.grad(total)(table, False),
                             rtol=1e-4, atol=1e-6)


def test_l2_normalize_has_torch_gradient_at_zero():
  """A zero row (zeros-initialised ID table) gets torch's finite gradient 1/eps, not NaN."""
  x = jnp.zeros((2, 3), jnp.float32).at[1].set(jnp.array([3.0, 4.0, 0.0]))
  np.testing.assert_allclose(losses.l2_normalize(x), [[0, 0, 0], [0.6, 0.8, 0]], **TOL)
  grad = jax.grad(lambda x: jnp.sum(losses.l2_normalize(x)[:, 0]))(x)
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_allclose(grad[0], [1.0 / losses.NORMALIZE_EPS, 0.0, 0.0], rtol=1e-5)
  # Away from zero: d(x0/|x|)/dx = (|x|^2 e0 - x0 x) / |x|^3 = [0.64, -0.48, 0] / 5.
  np.testing.assert_allclose(grad[1], [0.128, -0.096, 0.0], **TOL)


# ---------------------------------------------------------------- the chunked full softmax
def _np_ce_and_grads(states, table, targets, cotangent):
  """float64 CE per position and its gradients (d states, d table) for a cotangent."""
  s, e = states.astype(np.float64).reshape(-1, states.shape[-1]), table.astype(np.float64)
  t, g = targets.reshape(-1), cotangent.astype(np.float64).reshape(-1)
  log_p = _np_log_softmax(s @ e.T)
  d_logits = g[:, None] * (np.exp(log_p) - np.eye(e.shape[0])[t])
  return (-log_p[np.arange(t.size), t].reshape(targets.shape),
          (d_logits @ e).reshape(states.shape), d_logits.T @ s)


def _values_and_vjp(fn, states, table, *cotangents):
  """fn(states, table) and its vjp of each cotangent, in one compiled program."""
  def run(s, e, gs):
    values, vjp = jax.vjp(fn, s, e)
    return values, [vjp(g) for g in gs]
  values, grads = jax.jit(run)(jnp.asarray(states), jnp.asarray(table),
                               [jnp.asarray(g) for g in cotangents])
  return (values, grads[0]) if len(cotangents) == 1 else (values, grads)


def _chunk_data(num_items=11, seed=5):
  """[3, 7] positions; targets include item 0, the last item and chunk boundaries (3, 4: C=4)."""
  rng = np.random.default_rng(seed)
  states = rng.normal(size=(3, 7, H)).astype(np.float32)
  table = rng.normal(size=(num_items, H)).astype(np.float32)
  targets = rng.integers(0, num_items, size=(3, 7)).astype(np.int32)
  targets[0, :5] = [0, 3, 4, 7, num_items - 1]
  weights = (rng.random((3, 7)) > 0.35).astype(np.float32)
  return states, table, targets, weights


@pytest.mark.parametrize('position_chunk, item_chunk', [(1, 1), (5, 3), (512, 4096)])
def test_chunked_ce_matches_float64_values_and_gradients(position_chunk, item_chunk):
  """Any chunking (N = 11 not a multiple of C; P not dividing the 21 positions) gives the dense
  CE's values and gradients; positions of zero cotangent are skipped, not mis-weighted."""
  states, table, targets, weights = _chunk_data()
  cotangent = weights * np.arange(1, 22, dtype=np.float32).reshape(3, 7) / 21
  loss, d_states, d_table = _np_ce_and_grads(states, table, targets, cotangent)
  fn = lambda s, e: chunked_ce.chunked_ce_per_example(s, e, jnp.asarray(targets),
                                                  position_chunk=position_chunk,
                                                  item_chunk=item_chunk)
  values, got = _values_and_vjp(fn, states, table, cotangent)
  np.testing.assert_allclose(values, loss, **TOL)
  np.testing.assert_allclose(got[0], d_states, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], d_table, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got[0])[cotangent == 0], 0.0)
  # The dense reference agrees too.
  np.testing.assert_allclose(losses.ce_per_example(jnp.asarray(states), jnp.asarray(table),
                                                   jnp.asarray(targets)), loss, **TOL)


@pytest.mark.parametrize('item_chunk', [4, 4096])
def test_chunked_ce_with_weights_skips_weight_zero_and_honours_any_cotangent(item_chunk):
  """With weights: 0 where the weight is 0, the CE elsewhere; the gradient of a weighted mean
  (cotangent c * weights: the forward's own gradient, scaled) and of any other cotangent (the
  recomputing path) are the float64 gradients of those positions."""
  states, table, targets, weights = _chunk_data(seed=6)
  counted = weights != 0
  fn = lambda s, e: chunked_ce.chunked_ce_per_example(
      s, e, jnp.asarray(targets), jnp.asarray(weights), position_chunk=4, item_chunk=item_chunk)
  loss = _np_ce_and_grads(states, table, targets, weights)[0]
  other = np.arange(21, dtype=np.float32).reshape(3, 7) / 7  # Nonzero at weight-0 positions too.
  cotangents = (weights * np.float32(0.37), other)
  values, grads = _values_and_vjp(fn, states, table, *cotangents)
  np.testing.assert_allclose(np.asarray(values)[counted], loss[counted], **TOL)
  np.testing.assert_array_equal(np.asarray(values)[~counted], 0.0)
  for cotangent, got in zip(cotangents, grads):
    _, d_states, d_table = _np_ce_and_grads(states, table, targets, cotangent * counted)
    np.testing.assert_allclose(got[0], d_states, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], d_table, rtol=1e-5, atol=1e-6)


def test_chunked_ce_stays_exact_under_vmap():
  """Mapped over rows, inside a gradient (one table gradient for the batch) or around one
  (a table gradient per row), the chunked CE gives the float64 gradients."""
  states, table, targets, weights = _chunk_data(seed=7)
  s, e, t, w = (jnp.asarray(x) for x in (states, table, targets, weights))
  ce = lambda si, ti, wi: chunked_ce.chunked_ce_per_example(si, e, ti, wi, position_chunk=4,
                                                        item_chunk=4)
  grad_of_map = jax.jit(jax.grad(lambda s: jnp.sum(jax.vmap(ce)(s, t, w) * w)))(s)
  _, d_states, _ = _np_ce_and_grads(states, table, targets, weights)
  np.testing.assert_allclose(grad_of_map, d_states, rtol=1e-5, atol=1e-6)
  row_loss = lambda e, si, ti, wi: jnp.sum(chunked_ce.chunked_ce_per_example(
      si, e, ti, wi, position_chunk=4, item_chunk=4) * wi)
  per_row = jax.jit(jax.vmap(jax.grad(row_loss), (None, 0, 0, 0)))(e, s, t, w)
  for row in range(3):
    want = _np_ce_and_grads(states[row], table, targets[row], weights[row])[2]
    np.testing.assert_allclose(per_row[row], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='chunk sizes'):
    chunked_ce.chunked_ce_per_example(s, e, t, position_chunk=0)
