"""The sampled softmax (logQ, accidental hits, in-batch negatives) against float64 numpy oracles,
its alias sampler's distribution, its wiring into the models and its config checks."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import builders
from alphafuse_jax import errors
from alphafuse_jax import parallel
from alphafuse_jax import sampled_softmax as ss
from alphafuse_jax import train
from alphafuse_jax import losses
from alphafuse_jax.embeddings import IDEmbedding
from alphafuse_jax.models import base
from configs import default

N, H, K = 9, 4, 5
# Counts with zeros (add-one smoothing) and a popular item.
COUNTS = np.array([0, 1, 3, 10, 100, 0, 7, 2, 30])
# float32 values and gradients of O(1) against float64 oracles.
TOL = dict(rtol=1e-5, atol=1e-6)


# ---- float64 numpy oracles -----------------------------------------------------------------------
def _np_log_m(ids, sampler, alpha, num_batch=0):
  """log(K Q(i) + n_b P(i)) written out from the definitions (module docstring)."""
  smoothed = COUNTS.astype(np.float64) + 1.0
  q = np.full(N, 1.0 / N) if sampler == 'uniform' else smoothed ** alpha / np.sum(smoothed ** alpha)
  p = smoothed / smoothed.sum()
  return np.log(K * q[ids] + num_batch * p[ids])


def _np_loss_and_grads(states, positives, targets, weights, neg_ids, negatives, log_m,
                       batch=None):
  """sum_r w_r loss_r over rows r (positions flattened) and its gradients, by the chain rule.

  Each row's candidates: its positive, the K negatives and the valid in-batch items; a candidate
  that is the row's target (other than the positive itself) is left out (logit -inf).
  batch: (ids [c], items [c, h], valid [c]) or None.
  """
  states, positives = states.astype(np.float64), positives.astype(np.float64)
  negatives = negatives.astype(np.float64)
  grads = {'states': np.zeros_like(states), 'positives': np.zeros_like(positives),
           'negatives': np.zeros_like(negatives)}
  if batch is not None:
    batch_ids, batch_items, batch_valid = batch
    batch_items = batch_items.astype(np.float64)
    grads['batch'] = np.zeros_like(batch_items)
  total = 0.0
  for r in range(states.shape[0]):
    cands = [('positives', r, targets[r], positives[r])]
    cands += [('negatives', k, neg_ids[k], negatives[k]) for k in range(len(neg_ids))
              if neg_ids[k] != targets[r]]
    if batch is not None:
      cands += [('batch', c, batch_ids[c], batch_items[c]) for c in range(len(batch_ids))
                if batch_valid[c] and batch_ids[c] != targets[r]]
    z = np.array([states[r] @ e - log_m(np.array([i]))[0] for _, _, i, e in cands])
    lse = z.max() + np.log(np.sum(np.exp(z - z.max())))
    total += weights[r] * (lse - z[0])
    dz = np.exp(z - lse)
    dz[0] -= 1.0
    dz *= weights[r]
    for (name, index, _, e), d in zip(cands, dz):
      grads['states'][r] += d * e
      grads[name][index] += d * states[r]
  return total, grads


def _batch(seed=0, rows=6):
  rng = np.random.default_rng(seed)
  states = rng.normal(size=(rows, H)).astype(np.float32)
  positives = rng.normal(size=(rows, H)).astype(np.float32)
  negatives = rng.normal(size=(K, H)).astype(np.float32)
  # Row 1's and row 4's targets are among the negatives (accidental hits); rows 2 and 5 share
  # their target (a duplicate for the in-batch negatives).
  targets = np.array([0, 4, 6, 8, 3, 6][:rows], np.int32)
  neg_ids = np.array([4, 2, 3, 4, 5], np.int32)
  return states, positives, negatives, targets, neg_ids


def _objective(sampler='uniform', alpha=0.75, in_batch=False, per_position=False, counts=COUNTS):
  return ss.make_objective(num_negatives=K, per_position=per_position, sampler=sampler,
                           sampler_alpha=alpha, in_batch_negatives=in_batch, num_items=N,
                           counts=counts)


def _value_and_grads(objective, states, positives, negatives, targets, weights, neg_ids):
  """sum(batch_loss * weights) and its gradients in (states, positives, negatives)."""

  def total(states, positives, negatives):
    losses = objective.batch_loss(states, positives, jnp.asarray(targets), jnp.asarray(weights),
                                  {'ids': jnp.asarray(neg_ids), 'embeddings': negatives},
                                  num_items=N)
    return jnp.sum(losses * weights)

  return jax.value_and_grad(total, argnums=(0, 1, 2))(states, positives, negatives)


# ---- the loss --------------------------------------------------------------------------------
@pytest.mark.parametrize('sampler,alpha', [('uniform', 0.75), ('popularity', 0.75),
                                           ('popularity', 1.0)])
def test_loss_and_gradients_match_the_float64_oracle(sampler, alpha):
  states, positives, negatives, targets, neg_ids = _batch()
  weights = np.array([1, 1, 1, 0, 1, 1], np.float32)  # Row 3 does not count.
  objective = _objective(sampler, alpha)

  value, grads = _value_and_grads(objective, states, positives, negatives, targets, weights,
                                  neg_ids)
  expected, expected_grads = _np_loss_and_grads(
      states, positives, targets, weights, neg_ids, negatives,
      lambda i: _np_log_m(i, sampler, alpha))
  np.testing.assert_allclose(value, expected, **TOL)
  for got, name in zip(grads, ('states', 'positives', 'negatives')):
    np.testing.assert_allclose(got, expected_grads[name], **TOL, err_msg=name)


def test_uniform_logq_cancels_and_hits_are_removed():
  """Uniform Q, no in-batch: the plain softmax over [target, negatives other than the target]."""
  states, positives, negatives, targets, neg_ids = _batch(1)
  losses = _objective().batch_loss(states, positives, targets, np.ones(6, np.float32),
                                   {'ids': neg_ids, 'embeddings': negatives}, num_items=N)
  for r in range(6):
    logits = [float(states[r].astype(np.float64) @ positives[r])]
    logits += [float(states[r].astype(np.float64) @ negatives[k]) for k in range(K)
               if neg_ids[k] != targets[r]]
    logits = np.array(logits)
    np.testing.assert_allclose(losses[r], np.log(np.exp(logits).sum()) - logits[0], **TOL)
  # Row 1 (target 4) lost two of its five negatives to hits.
  assert np.sum(neg_ids == targets[1]) == 2


@pytest.mark.parametrize('sampler', ['uniform', 'popularity'])
def test_in_batch_negatives_match_the_oracle_with_a_duplicate_target(sampler):
  states, positives, negatives, targets, neg_ids = _batch(2)
  weights = np.array([1, 1, 1, 1, 0, 1], np.float32)  # Row 4 is padding: not a candidate.
  objective = _objective(sampler, in_batch=True)

  value, grads = _value_and_grads(objective, states, positives, negatives, targets, weights,
                                  neg_ids)
  valid = weights > 0
  n_b = int(valid.sum())
  expected, g = _np_loss_and_grads(
      states, positives, targets, weights, neg_ids, negatives,
      lambda i: _np_log_m(i, sampler, 0.75, n_b), batch=(targets, positives, valid))
  np.testing.assert_allclose(value, expected, **TOL)
  np.testing.assert_allclose(grads[0], g['states'], **TOL)
  # The positives are also the in-batch candidates: both paths of their gradient add up.
  np.testing.assert_allclose(grads[1], g['positives'] + g['batch'], **TOL)
  np.testing.assert_allclose(grads[2], g['negatives'], **TOL)


def test_per_position_losses_use_each_positions_target_and_the_rows_last_targets():
  rng = np.random.default_rng(3)
  b, length = 3, 4
  states = rng.normal(size=(b, length, H)).astype(np.float32)
  positives = rng.normal(size=(b, length, H)).astype(np.float32)
  negatives = rng.normal(size=(K, H)).astype(np.float32)
  targets = np.array([[1, 4, 2, 7], [0, 0, 3, 3], [0, 0, 0, 6]], np.int32)
  weights = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]], np.float32)
  neg_ids = np.array([3, 4, 6, 0, 8], np.int32)
  objective = _objective('popularity', in_batch=True, per_position=True)
  losses = objective.batch_loss(states, positives, targets, weights,
                                {'ids': neg_ids, 'embeddings': negatives}, num_items=N)
  assert losses.shape == (b, length)
  flat = lambda x: x.reshape((b * length,) + x.shape[2:])
  expected, _ = _np_loss_and_grads(
      flat(states), flat(positives), flat(targets), np.ones(b * length), neg_ids, negatives,
      lambda i: _np_log_m(i, 'popularity', 0.75, 3),
      batch=(targets[:, -1], positives[:, -1], np.ones(b, bool)))
  np.testing.assert_allclose(np.sum(losses), expected, **TOL)


# ---- the sampler -----------------------------------------------------------------------------
@pytest.mark.parametrize('weights', [np.array([5.0]), np.array([1.0, 1.0, 1.0]),
                                     np.array([1e-9, 3.0, 0.5, 2.0, 1e-3, 7.0, 1.0])])
def test_alias_tables_give_exactly_the_distribution(weights):
  prob, alias = ss.alias_table(weights)
  assert np.all((prob >= 0) & (prob <= 1)) and np.all((alias >= 0) & (alias < weights.size))
  np.testing.assert_allclose(ss.alias_distribution(prob, alias), weights / weights.sum(),
                             rtol=1e-12, atol=1e-15)


def test_popularity_sampler_draws_its_distribution_and_never_an_excluded_item():
  allowed = np.ones(N, bool)
  allowed[[2, 6]] = False
  tables = ss.ItemTables(N, 'popularity', 0.75, counts=COUNTS, allowed=allowed)
  q = (COUNTS + 1.0) ** 0.75 * allowed
  q /= q.sum()
  # The stored float32 tables describe Q to float32 precision, and log_q is log Q on the allowed.
  implied = ss.alias_distribution(tables.alias_prob, tables.alias_column, tables.column_items, N)
  np.testing.assert_allclose(implied, q, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(np.exp(tables.log_q[allowed]), q[allowed], rtol=1e-6)
  draws = 200_000
  ids = np.asarray(jax.jit(lambda k: tables.sample(k, draws))(jax.random.key(0)))
  assert ids.dtype == np.int32
  freq = np.bincount(ids, minlength=N) / draws
  assert np.all(freq[~allowed] == 0)
  # Fixed key: each frequency within 5 standard deviations of its probability (binomial).
  bound = 5 * np.sqrt(q * (1 - q) / draws)
  assert np.all(np.abs(freq - q) <= bound), (freq, q)


def test_uniform_sampler_without_tables_and_with_exclusions():
  ids = np.asarray(ss.ItemTables(N, 'uniform', 0.0).sample(jax.random.key(1), 90_000))
  freq = np.bincount(ids, minlength=N) / 90_000
  assert np.all(np.abs(freq - 1 / N) <= 5 * np.sqrt((1 / N) * (1 - 1 / N) / 90_000))
  allowed = np.arange(N) % 3 != 0
  tables = ss.ItemTables(N, 'uniform', 0.0, allowed=allowed)
  ids = np.asarray(tables.sample(jax.random.key(2), 60_000))
  freq = np.bincount(ids, minlength=N) / 60_000
  p = 1 / allowed.sum()
  assert np.all(freq[~allowed] == 0)
  assert np.all(np.abs(freq[allowed] - p) <= 5 * np.sqrt(p * (1 - p) / 60_000))


# ---- in the model ---------------------------------------------------------------------------
def _config(**train):
  config = default.get_config()
  config.embedding.pipeline = 'id'
  config.embedding.hidden_dim = H
  config.train.loss = 'sampled_softmax'
  config.train.num_negatives = K
  config.train.batch_size = 4
  for name, value in train.items():
    config.train[name] = value
  return config


class CumulativeSum(base.Recommender):
  """A toy backbone whose states have a numpy oracle: position i's state is the sum of the
  embeddings of the history's real items 0..i (its only parameters are the ID table)."""
  item_embedding: nn.Module
  objective: losses.Objective
  max_len: int = 3

  @property
  def num_items(self):
    return self.item_embedding.num_items

  def encode(self, history, *, deterministic):
    x = self.item_embedding(history, deterministic=deterministic)
    return jnp.cumsum(x * (history != self.num_items)[..., None], axis=1)

  def __call__(self, history, *, deterministic):
    return self.encode(history, deterministic=deterministic)[:, -1]


HISTORY = np.array([[N, 1, 2], [3, 4, 5], [N, N, 1], [7, 7, 2]], np.int32)
TARGET = np.array([3, 0, 3, 8], np.int32)  # Rows 0 and 2 share their target.


def _np_states(table, history):
  """The toy backbone's states [b, L, h] in float64."""
  x = table.astype(np.float64)[history] * (history != N)[..., None]
  return np.cumsum(x, axis=1)


def test_the_models_batch_loss_matches_the_oracle_and_touches_only_sampled_rows():
  """The loss of `Recommender.batch_example_loss` equals the oracle on the model's own states, and
  the ID table's gradient is zero outside the histories, targets and K negatives (no whole-table
  scoring)."""
  config = _config(sampler='popularity', in_batch_negatives=True)
  dataset = types.SimpleNamespace(num_items=N, max_len=3, train_item_counts=COUNTS)
  model = CumulativeSum(IDEmbedding(N, H, id_init='normal'), builders.objective(config, dataset))
  mask = np.array([True, True, True, False])
  params = {'item_embedding': {'id_table': np.random.default_rng(4).normal(
      size=(N + 1, H)).astype(np.float32)}}
  keys = jax.random.split(jax.random.key(1), 4)

  @jax.jit
  def value_and_grad(params):
    def total(params):
      table = model.apply({'params': params}, rngs=base.rng_streams(jax.random.key(2)),
                          method='train_table')
      losses, weights = model.batch_example_loss(params, HISTORY, TARGET, mask, keys, table)
      return jnp.sum(losses * weights), (table['ids'], weights)
    return jax.value_and_grad(total, has_aux=True)(params)

  (value, (neg_ids, weights)), grads = value_and_grad(params)
  neg_ids = np.asarray(neg_ids)
  np.testing.assert_array_equal(weights, mask)
  table = params['item_embedding']['id_table']
  expected, _ = _np_loss_and_grads(
      _np_states(table, HISTORY)[:, -1], table[TARGET], TARGET, mask.astype(float), neg_ids,
      table[neg_ids], lambda i: _np_log_m(i, 'popularity', 0.75, 3),
      batch=(TARGET, table[TARGET], mask))
  np.testing.assert_allclose(value, expected, **TOL)
  touched = np.zeros(N + 1, bool)
  touched[np.concatenate([HISTORY[mask].ravel(), TARGET[mask], neg_ids])] = True
  row_grads = np.abs(np.asarray(grads['item_embedding']['id_table'])).sum(axis=1)
  assert np.all(row_grads[~touched] == 0) and np.all(row_grads[TARGET[mask]] > 0)


def test_the_loops_train_step_trains_every_position():
  """Leave-one-out (every position predicts its next item) through `train.make_train_step`, with
  negatives drawn from item 5 alone (so the oracle knows them): the step's loss is the mean over
  the counted positions of the oracle's losses; position (1, 1), whose next item is 5, has only
  its positive left."""
  allowed = np.arange(N) == 5
  objective = ss.make_objective(num_negatives=K, per_position=True, sampler='uniform',
                                sampler_alpha=0.75, in_batch_negatives=False, num_items=N,
                                allowed=allowed)
  model = CumulativeSum(IDEmbedding(N, H, id_init='normal'), objective)
  config = _config()
  state = train.create_train_state(model, config, jax.random.key(0))
  dp = parallel.DataParallel('shard_map')
  step = dp.map(train.make_train_step(model, jax.random.key(1)), ('replicated', 'sharded'),
                ('replicated', 'replicated'))
  batch = {'history': HISTORY[None], 'target': TARGET[None], 'mask': np.ones((1, 4), bool),
           'index': np.arange(4, dtype=np.int32)[None]}
  _, out = step(dp.replicate(state), dp.put_batch(batch))
  table = np.asarray(state.params['item_embedding']['id_table'])
  next_items = np.concatenate([HISTORY[:, 1:], TARGET[:, None]], axis=1)
  valid = ((HISTORY != N) & (next_items != N)).ravel()
  targets = np.where(valid, next_items.ravel(), 0)
  total, _ = _np_loss_and_grads(
      _np_states(table, HISTORY).reshape(-1, H), table[targets], targets, valid.astype(float),
      np.full(K, 5), table[[5] * K], lambda i: np.log(K * np.ones(len(i))))
  np.testing.assert_allclose(float(np.asarray(out['loss'])), total / valid.sum(), **TOL)


# ---- config checks --------------------------------------------------------------------------
@pytest.mark.parametrize('fields,match', [
    (dict(sampler='zipf'), 'config.train.sampler'),
    (dict(sampler_alpha=-0.5), 'config.train.sampler_alpha'),
    (dict(num_negatives=0), 'config.train.num_negatives'),
    (dict(in_batch_negatives=True, batch_size=2), 'in_batch_negatives needs >= 2 rows'),
    (dict(loss='ce', sampler='popularity'), "apply to loss='sampled_softmax' only"),
    (dict(loss='infonce', in_batch_negatives=True), "apply to loss='sampled_softmax' only"),
])
def test_bad_sampled_softmax_configs_fail_the_start_up_checks(fields, match):
  config = _config(**fields)
  with pytest.raises(errors.ConfigError, match=match):
    train.validate_config(config, 2)


def test_good_configs_pass_and_missing_counts_are_named():
  for fields in (dict(), dict(sampler='popularity', in_batch_negatives=True, sampler_alpha=0.0)):
    train.validate_config(_config(**fields), 2)
  objective = builders.objective(_config(sampler='popularity'))  # No dataset: no tables.
  assert objective.tables is None
  with pytest.raises(ValueError, match='needs the train item counts'):
    objective.shared_negatives(jax.random.key(0), lambda ids: ids, N)
  with pytest.raises(ValueError, match=r'train_item_counts must be \[9\]'):
    _objective('popularity', counts=COUNTS[:-1])
  with pytest.raises(ValueError, match='computed by Recommender.batch_example_loss'):
    objective.per_example(None, None, None, key=None, num_items=N)


def test_cold_start_items_are_never_drawn():
  new_items = np.zeros(N, bool)
  new_items[[0, 5]] = True
  dataset = types.SimpleNamespace(num_items=N, max_len=3, train_item_counts=COUNTS,
                                  new_items=new_items)
  objective = builders.objective(_config(), dataset)
  tables = objective.item_tables(N)
  implied = ss.alias_distribution(tables.alias_prob, tables.alias_column, tables.column_items, N)
  np.testing.assert_allclose(implied, np.where(new_items, 0.0, 1 / 7), rtol=1e-6, atol=1e-12)
