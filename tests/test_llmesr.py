"""Tests of the LLM-ESR backbone (models/llmesr.py) against float64 numpy oracles.

What they pin down: the exact parameter count; the ID table feeds the encoder in the dual view and
only the scores in the bug-compatible mode; the cross-attention fusion, the item contrastive term
and the self-distillation equal numpy re-implementations; padding never changes a result; the
similar-user retrieval equals a brute-force search; one short training run gives finite metrics.
"""

import math
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import embeddings as emb
from alphafuse_jax import losses
from alphafuse_jax import train as train_lib
from alphafuse_jax.models import llmesr
from configs import tiny

N, D_L, H, ADAPTER, L = 12, 8, 4, 6, 5
PAD = N


def make_model(bug_compatible=False, **kwargs):
  rng = np.random.default_rng(0)
  item_embedding = emb.LLMESREmbedding(
      N, emb.FrozenTable(rng.normal(size=(N, H))), emb.FrozenTable(rng.normal(size=(N, D_L))),
      ADAPTER)
  return llmesr.LLMESR(item_embedding, L, bug_compatible=bug_compatible, **kwargs)


HISTORY = jnp.array([[PAD, PAD, 3, 7, 1],
                     [0, 5, 5, 9, 11],
                     [PAD, PAD, PAD, PAD, 2]], jnp.int32)


def init(model):
  # As train.init_params: `init_all` touches the encoder, the scores and the auxiliary terms
  # (which add no parameters of their own).
  return model.init(jax.random.key(0), HISTORY, method='init_all')['params']


def states(model, params, history=HISTORY):
  return model.apply({'params': params}, history, deterministic=True)


def test_parameter_count():
  params = init(make_model())
  # ID table (N + 1) * h = 13 * 4 = 52; adapter Linear(8 -> 6) 48 + 6 = 54, Linear(6 -> 4)
  # 24 + 4 = 28; positions L * h = 20; two cross-attentions, each bias-free Q, K, V 3 * 16 = 48
  # plus an output Linear 16 + 4 = 20: 2 * 68 = 136; ONE shared reference block: ln_1, ln_2, ln_3
  # and the FFN's LayerNorm 4 * 8 = 32, Q, K, V 3 * 20 = 60, w_1 and w_2 2 * 20 = 40: 132.
  assert train_lib.count_params(params) == 52 + 54 + 28 + 20 + 136 + 132
  # The encoder is shared: one block for both views.
  assert sorted(k for k in params if k.startswith('blocks')) == ['blocks_0']


def test_state_shape_and_scores():
  model = make_model()
  params = init(model)
  s = states(model, params)
  assert s.shape == (3, 2 * H)
  table = model.apply({'params': params}, method='item_table')
  assert table.shape == (N, 2 * H)
  np.testing.assert_allclose(model.apply({'params': params}, s, method='score'),
                             np.asarray(s) @ np.asarray(table).T, rtol=1e-5, atol=1e-5)
  # The last position of `encode` is the user state (left-padded histories).
  full = model.apply({'params': params}, HISTORY, deterministic=True, method='encode')
  np.testing.assert_allclose(full[:, -1], s, rtol=1e-5, atol=1e-5)


# The standard-block variant is slow (about 9 s): `bash launch/test.sh -m slow` runs it.
@pytest.mark.parametrize('block', ['reference', pytest.param('standard', marks=pytest.mark.slow)])
def test_id_table_feeds_the_encoder_only_in_the_dual_view(block):
  for bug in (False, True):
    model = make_model(bug, block=block)
    params = init(model)
    forward = jax.jit(lambda p, m=model: states(m, p))  # One program: bitwise comparisons.
    grads = jax.grad(lambda p: jnp.sum(forward(p) ** 2))(params)
    id_grad = np.abs(np.asarray(grads['item_embedding']['id_table']))
    shifted = flax.core.copy(params, {})
    shifted['item_embedding'] = dict(params['item_embedding'],
                                     id_table=params['item_embedding']['id_table'] + 1.0)
    changed = np.abs(np.asarray(forward(shifted) - forward(params))).max()
    if bug:
      # The ID path is fed the text view: the encoder output ignores the ID table entirely.
      assert id_grad.max() == 0.0
      assert changed == 0.0
    else:
      seen = np.unique(np.asarray(HISTORY)[np.asarray(HISTORY) != PAD])
      assert np.all(id_grad[seen].sum(axis=1) > 0)
      assert changed > 1e-3
    # Either way the ID table reaches the loss through the scores.
    score_grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(
        {'params': p}, states(model, p), method='score') ** 2)))(params)
    assert np.abs(np.asarray(score_grad['item_embedding']['id_table'][:N])).min() > 0


def numpy_cross_attention(p, x, y, pad, heads):
  """Multi_CrossAttention in float64: x queries, y keys/values, pad [B, S] masked to -1e9."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  w = {k: np.asarray(v['kernel'], np.float64) for k, v in p.items()}
  q, k, v = x @ w['query'], y @ w['key'], y @ w['value']
  b, lq, h = q.shape
  d = h // heads
  out = np.zeros_like(q)
  for i in range(b):
    for head in range(heads):
      sl = slice(head * d, (head + 1) * d)
      scores = q[i, :, sl] @ k[i, :, sl].T
      scores[:, pad[i]] = -1e9
      scores = scores / math.sqrt(d)
      probs = np.exp(scores - scores.max(axis=1, keepdims=True))
      probs /= probs.sum(axis=1, keepdims=True)
      out[i, :, sl] = probs @ v[i, :, sl]
  return out @ w['output'] + np.asarray(p['output']['bias'], np.float64)


def test_cross_attention_matches_numpy_and_ignores_padded_keys():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 6)).astype(np.float32)
  y = rng.normal(size=(2, 5, 6)).astype(np.float32)
  pad = np.array([[True, True, False, False, False], [False] * 5])
  module = llmesr.LLMESRCrossAttention(6, 2)
  params = module.init(jax.random.key(2), x, y, pad)['params']
  # One compiled function for both calls below, so the padding check can be bitwise.
  attend = jax.jit(lambda y_: module.apply({'params': params}, x, y_, pad))
  out = attend(y)
  np.testing.assert_allclose(out, numpy_cross_attention(params, x, y, pad, 2), rtol=1e-5,
                             atol=1e-5)
  # Any value at a padded key/value position changes nothing.
  y2 = y.copy()
  y2[0, :2] = 100.0 * rng.normal(size=(2, 6))
  np.testing.assert_array_equal(attend(y2), out)


def numpy_contrastive_loss2(x, y, tau=1.0):
  """Transcription of the reference's Contrastive_Loss2 in numpy (float64)."""
  def log_softmax(a):
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))
  logits = x @ y.T / tau
  sim = (y @ y.T + x @ x.T) / 2 * tau
  targets = np.exp(log_softmax(sim))
  x_loss = -(targets * log_softmax(logits)).sum(1)
  y_loss = -(targets.T * log_softmax(logits.T)).sum(1)
  return ((x_loss + y_loss) / 2).mean()


def test_contrastive_loss2_matches_reference_and_mask():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  for tau in (1.0, 0.5):
    np.testing.assert_allclose(llmesr.contrastive_loss2(jnp.asarray(x), jnp.asarray(y),
                                                        temperature=tau),
                               numpy_contrastive_loss2(x, y, tau), rtol=1e-5)
  # Masked rows of a padded batch are left out entirely.
  mask = np.array([True, False, True, True, False, True])
  np.testing.assert_allclose(llmesr.contrastive_loss2(jnp.asarray(x), jnp.asarray(y),
                                                      mask=jnp.asarray(mask)),
                             numpy_contrastive_loss2(x[mask], y[mask]), rtol=1e-5)


def test_item_contrastive_term_matches_numpy():
  model = make_model(item_reg_weight=0.1)
  params = init(model)
  p = jax.tree.map(lambda t: np.asarray(t, np.float64), params['item_embedding'])
  language = model.item_embedding.language_table.padded.astype(np.float64)
  row_mask = np.array([True, True, False])  # Row 2 is padding of a last batch: left out.
  history = np.asarray(HISTORY)
  items = history[row_mask][history[row_mask] != PAD]  # torch.masked_select order.
  id_view = p['id_table'][items]
  text_view = (language[items] @ p['adapter_in']['kernel'] + p['adapter_in']['bias']
               ) @ p['adapter_out']['kernel'] + p['adapter_out']['bias']
  expected = numpy_contrastive_loss2(id_view, text_view)
  got = model.apply({'params': params}, HISTORY, jnp.asarray(row_mask),
                    method='item_contrastive_loss')
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  weighted = model.apply({'params': params}, HISTORY, None, jnp.asarray(row_mask),
                         deterministic=True, method='batch_loss')
  np.testing.assert_allclose(weighted, 0.1 * expected, rtol=1e-5)


def test_padding_changes_nothing():
  model = make_model()
  params = init(model)
  base = states(model, params)
  table = dict(params['item_embedding'])
  # The ID table's padding row (id N) may hold anything.
  table['id_table'] = table['id_table'].at[PAD].set(1e3)
  changed = dict(params, item_embedding=table)
  np.testing.assert_allclose(states(model, changed), base, rtol=1e-6, atol=1e-6)
  # Items before the kept window's padding do not exist: a row equals its unpadded content,
  # whatever the other rows of the batch hold.
  alone = states(model, params, HISTORY[2:])
  # Batches of 1 and 3 rows compile differently: a float32 tolerance for O(1) states.
  np.testing.assert_allclose(alone[0], base[2], rtol=1e-5, atol=1e-5)


def test_retrieval_matches_brute_force():
  rng = np.random.default_rng(3)
  num_users, num_items, max_len, k = 7, 9, 3, 2
  language = rng.normal(size=(num_items, 5))
  seqs = [rng.integers(0, num_items, size=int(rng.integers(2, 6))) for _ in range(num_users)]
  indptr = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
  items = np.concatenate(seqs)
  train_users = [0, 1, 2, 4, 5, 6]  # User 3 is a val/test user: never a candidate.
  rows = {'user_id': [], 'position': [], 'history': []}
  for u in train_users:
    for pos in range(1, len(seqs[u])):
      hist = list(seqs[u][max(0, pos - max_len):pos])
      rows['user_id'].append(u)
      rows['position'].append(pos)
      rows['history'].append([num_items] * (max_len - len(hist)) + hist)
  split = {key: np.asarray(v) for key, v in rows.items()}
  got = llmesr.retrieve_similar_users(split, (indptr, items), language, num_users=num_users,
                                      num_items=num_items, num_similar=k, chunk=4)
  means = {u: language[seqs[u]].mean(0) for u in train_users}
  for u in train_users:
    cos = {v: means[u] @ means[v] / np.linalg.norm(means[u]) / np.linalg.norm(means[v])
           for v in train_users if v != u}
    expected = sorted(cos, key=lambda v: (-cos[v], v))[:k]
    assert list(got.similar[u]) == expected
    # The teacher sequence: all but the last train item, truncated to L, left-padded.
    tail = list(seqs[u][:-1][-max_len:])
    assert list(got.histories[u]) == [num_items] * (max_len - len(tail)) + tail
  assert list(got.histories[3]) == [num_items] * max_len
  with pytest.raises(ValueError, match='llmesr_num_similar_users'):
    llmesr.retrieve_similar_users(split, (indptr, items), language, num_users=num_users,
                                  num_items=num_items, num_similar=6)


def test_bad_encoder_configuration_raises():
  # The encoder checks shared with SASRec (layers.encoder_blocks) also guard LLM-ESR.
  for kwargs, message in (({'block': 'transformer'}, 'block style'),
                          ({'block': 'standard', 'num_blocks': 0}, 'num_blocks'),
                          ({'dropout_rate': 1.0}, 'dropout_rate'),
                          ({'num_heads': 3}, 'num_heads=3 must divide')):
    with pytest.raises(ValueError, match=message):
      init(make_model(**kwargs))


# The 'cl' variant is slow (about 15 s): `bash launch/test.sh -m slow` runs it.
@pytest.mark.parametrize('loss', ['kd', pytest.param('cl', marks=pytest.mark.slow)])
def test_distillation_matches_numpy(loss):
  similar = np.array([[1, 2], [0, 2], [0, 1]], np.int32)
  teacher_histories = np.asarray(HISTORY)[::-1]  # User u's teacher sequence.
  bank = llmesr.SimilarUsers(similar, teacher_histories)
  model = make_model(distill_weight=0.5, distill_loss=loss, item_reg_weight=0.0,
                     similar_users=bank)
  params = init(model)
  user_id = jnp.array([2, 0, 1], jnp.int32)
  row_mask = jnp.array([True, False, True])
  forward = jax.jit(lambda p, h: states(model, p, h))
  student = np.asarray(forward(params, HISTORY), np.float64)
  teacher_states = np.asarray(forward(params, jnp.asarray(teacher_histories)), np.float64)
  teacher = teacher_states[similar[np.asarray(user_id)]].mean(axis=1)
  keep = np.asarray(row_mask)
  if loss == 'kd':
    expected = np.mean((student[keep] - teacher[keep]) ** 2)
  else:
    expected = numpy_contrastive_loss2(student[keep], teacher[keep])
  batch_loss = jax.jit(lambda p, h, u, m: model.apply({'params': p}, h, u, m, deterministic=True,
                                                      method='batch_loss'))
  got = batch_loss(params, HISTORY, user_id, row_mask)
  np.testing.assert_allclose(got, 0.5 * expected, rtol=1e-4)
  # The teacher is a constant: its sequences get no gradient through the distillation.
  # (Two rows: a one-row Contrastive_Loss2 is constant.)
  grads = jax.jit(jax.grad(batch_loss))(params, HISTORY[:2], user_id[:2], jnp.array([True, True]))
  id_grad = np.abs(np.asarray(grads['item_embedding']['id_table'])).sum(axis=1)
  only_teacher = np.setdiff1d(teacher_histories[similar[[2, 0]]].ravel(),
                              np.asarray(HISTORY[:2]))
  assert list(only_teacher) == [2]  # The pad id is in HISTORY[:2] too.
  assert np.all(id_grad[2] == 0)
  assert np.all(id_grad[[3, 7, 1, 0, 5, 9, 11]] > 0)


@pytest.mark.parametrize('objective', [
    losses.Objective('ce'),
    losses.Objective('infonce', num_negatives=4, temperature=0.1),
    losses.Objective('bce', num_negatives=3, negative_scoring='gather'),
    losses.Objective('ce', per_position=True)])
def test_example_loss_is_the_row_loss_weighted_by_its_mask(objective):
  """`example_loss` on one row = the old train step's computation: the train-mode state (every
  position's with per_position) scored by `losses.per_example_loss`, weighted by the mask."""
  model = make_model(objective=objective)
  params = init(model)
  variables = {'params': params}
  rngs, loss_key = model.split_example_key(jax.random.key(5))
  table_rngs = {'dropout': jax.random.key(6), 'gating': jax.random.key(7)}
  train_table = model.apply(variables, rngs=table_rngs, method='train_table')
  assert (train_table is None) == objective.gathers
  example = jax.jit(lambda h, t, m: model.apply(variables, h, t, m, loss_key, train_table,
                                                rngs=rngs, method='example_loss'))

  @jax.jit
  def direct(history, target, mask):
    table = model.apply(variables, deterministic=False, rngs=table_rngs, method='item_table')
    if objective.per_position:
      states = model.apply(variables, history[None], deterministic=False, rngs=rngs,
                           method='encode')[0]
      targets, valid = losses.positional_targets(history[None], target[None], N)
      targets, weights = targets[0], valid[0].astype(jnp.float32) * mask
    else:
      states = model.apply(variables, history[None], deterministic=False, rngs=rngs)[0]
      targets, weights = target, mask.astype(jnp.float32)
    targets = jnp.where(weights > 0, targets, 0)
    loss = losses.per_example_loss(
        objective.kind, states, targets, table, num_items=N, key=loss_key,
        num_negatives=objective.num_negatives, temperature=objective.temperature,
        dense=objective.negative_scoring == 'dense')
    return loss, weights

  for row in range(HISTORY.shape[0]):
    for target, mask in ((jnp.asarray(row + 4), True), (jnp.asarray(PAD), False)):
      got_loss, got_weight = example(HISTORY[row], target, jnp.asarray(mask))
      want_loss, want_weight = direct(HISTORY[row], target, jnp.asarray(mask))
      assert got_loss.shape == got_weight.shape == ((L,) if objective.per_position else ())
      # Weights are 0/1 flags: exact. Losses: two programs, a float32 tolerance.
      np.testing.assert_array_equal(got_weight, want_weight)
      np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, atol=1e-6)
      assert np.all(np.isfinite(np.asarray(got_loss)))
      if not mask:  # A padding row of the last batch counts nowhere.
        assert not np.any(np.asarray(got_weight))


def make_synthetic(root: pathlib.Path) -> dict:
  """A small delimited dataset with random text vectors; returns config overrides."""
  rng = np.random.default_rng(0)
  rows = ['user,item,ts']
  for user in range(40):
    start = int(rng.integers(0, 30))
    for t in range(int(rng.integers(6, 12))):
      rows.append(f'{user},{(start + t + int(rng.integers(0, 3))) % 30},{1000 + t}')
  (root / 'interactions.csv').write_text('\n'.join(rows) + '\n')
  np.save(root / 'vectors.npy', rng.normal(size=(30, 12)).astype(np.float32))
  return {
      'data.source': 'delimited', 'data.path': str(root),
      'data.data_dir': str(root / 'prepared'),
      'data.delimited.interactions_file': 'interactions.csv',
      'data.delimited.user_column': 'user', 'data.delimited.item_column': 'item',
      'data.delimited.time_column': 'ts',
      'text.encoder': 'file', 'text.embeddings_file': str(root / 'vectors.npy'),
      'embedding.pipeline': 'llmesr', 'embedding.hidden_dim': 8,
      'embedding.llmesr_num_similar_users': 3,
      # One step: the whole train split is one batch.
      'train.batch_size': 1024, 'train.num_epochs': 1, 'eval.batch_size': 256,
  }


# Slow (about 20 s): LLM-ESR through the whole loop; its terms are checked one by one above.
@pytest.mark.slow
def test_one_training_step_gives_finite_metrics(tmp_path):
  config = tiny.get_config()
  for key, value in make_synthetic(tmp_path).items():
    node = config
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  results = train_lib.train_and_evaluate(config, str(tmp_path / 'work'))
  for split in ('val', 'test'):
    assert results[split]['count'] > 0
    for name in ('HR@10', 'NDCG@20', 'MRR@5'):
      assert math.isfinite(results[split][name]) and 0.0 <= results[split][name] <= 1.0
