"""SASRec: parameter counts, float64 numpy oracles of the block styles, masking and gathering."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax.embeddings import IDEmbedding
from alphafuse_jax.models import SASRec, last_nonpad_index

N, H, L = 7, 8, 5
PAD = N
FILL = -(2.0**32) + 1.0

# Left-padded rows, a full row and an all-pad row (ids 0..N-1, pad N).
HISTORY = np.array([[PAD, PAD, 1, 2, 3],
                    [4, 0, 6, 6, 2],
                    [PAD, PAD, PAD, PAD, 5],
                    [PAD, PAD, PAD, PAD, PAD]], np.int32)


def _model(block, num_blocks=1, num_heads=2, pre_ln=True, dropout_rate=0.1):
  return SASRec(IDEmbedding(N, H, id_init='normal'), L, block=block, num_blocks=num_blocks,
                num_heads=num_heads, dropout_rate=dropout_rate, pre_ln=pre_ln)


def _random_params(model, seed=0):
  """Initialised params with every leaf (LayerNorms included) replaced by random values."""
  params = model.init(jax.random.key(seed), jnp.asarray(HISTORY), method='init_all')['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [0.5 * jax.random.normal(k, x.shape) + (1.0 if x.ndim == 1 else 0.0)
            for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(tree, leaves)


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_parameter_counts():
  n, h, seq_len, blocks = N, H, L, 2
  item = (n + 1) * h           # ID table with the pad row: 8 * 8 = 64
  position = seq_len * h       # learned positions: 5 * 8 = 40
  # Reference block: Q, K, V (3 (h^2 + h)), FFN w_1, w_2 (2 (h^2 + h)), LayerNorms ln_1, ln_2,
  # ln_3 and the FFN's own (4 * 2h): 5h^2 + 13h = 320 + 104 = 424. No output projection.
  reference_block = 5 * (h * h + h) + 4 * 2 * h
  assert reference_block == 424
  # Standard block: Q, K, V, O (4 (h^2 + h)), FFN (2 (h^2 + h)), two LayerNorms (2 * 2h):
  # 6h^2 + 10h = 384 + 80 = 464; plus one final LayerNorm (2h) for pre-LN.
  standard_block = 6 * (h * h + h) + 2 * 2 * h
  assert standard_block == 464
  init = lambda m: m.init(jax.random.key(0), jnp.asarray(HISTORY), method='init_all')['params']
  assert _count(init(_model('reference', 1))) == item + position + reference_block == 528
  assert _count(init(_model('reference', blocks))) == item + position + 2 * reference_block == 952
  assert (_count(init(_model('standard', blocks, pre_ln=True)))
          == item + position + 2 * standard_block + 2 * h == 1048)
  assert (_count(init(_model('standard', blocks, pre_ln=False)))
          == item + position + 2 * standard_block == 1032)
  # Kang's code block has the standard block's weights (its FFN residual is LN2's output).
  assert (_count(init(_model('kang_code', blocks)))
          == item + position + 2 * standard_block + 2 * h == 1048)


# ---------------------------------------------------------------- float64 numpy oracles


def _np(params):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def _ln(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _lin(x, p):
  return x @ p['kernel'] + p['bias']


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  return np.exp(x) / np.exp(x).sum(-1, keepdims=True)


def _torch_split_heads(x, heads):
  """torch.cat(torch.split(x, h // heads, dim=2), dim=0): [B, L, h] -> [heads * B, L, h / heads]."""
  return np.concatenate(np.split(x, heads, axis=2), axis=0)


def _reference_block_np(p, queries_in, ids, heads):
  """The authors' block, literally (reference-spec §3.1 steps 3-6, modules.py masking included)."""
  batch, seq_len, h = queries_in.shape
  m = (ids != PAD)[..., None].astype(np.float64)
  e = queries_in
  q = _ln(e, p['ln_1'])
  att = p['attention']
  Q_ = _torch_split_heads(_lin(q, att['query']), heads)
  K_ = _torch_split_heads(_lin(e, att['key']), heads)
  V_ = _torch_split_heads(_lin(e, att['value']), heads)
  scores = Q_ @ K_.transpose(0, 2, 1) / h ** 0.5        # 1/sqrt(h), NOT 1/sqrt(h / heads)
  key_mask = np.tile(np.sign(np.abs(e.sum(-1))), (heads, 1))[:, None, :]
  scores = np.where(key_mask == 0, FILL, scores)
  tril = np.tril(np.ones((seq_len, seq_len)))[None]
  scores = np.where(tril == 0, FILL, scores)
  weights = _softmax(scores)
  query_mask = np.tile(np.sign(np.abs(q.sum(-1))), (heads, 1))[:, :, None]
  out = (weights * query_mask) @ V_
  out = np.concatenate(np.split(out, heads, axis=0), axis=2)  # Heads back along channels.
  a = out + q                                                  # Residual on the normalised q.
  x = _ln(a, p['ln_2'])
  ffn = p['feed_forward']
  y = _lin(np.maximum(_lin(x, ffn['w_1']), 0.0), ffn['w_2'])
  f = _ln(y + x, ffn['layer_norm'])
  return _ln(f * m, p['ln_3'])


def _reference_np(params, ids, heads, blocks):
  p = _np(params)
  m = (ids != PAD)[..., None].astype(np.float64)
  e = p['item_embedding']['id_table'][ids] + p['position_embedding']['embedding'][None]
  x = e * m  # No sqrt(h) scaling.
  for b in range(blocks):
    x = _reference_block_np(p[f'blocks_{b}'], x * m, ids, heads)
  return x


def _standard_attention_np(p, x, ids, heads, keys=None):
  """Multi-head attention of queries from x over keys and values from `keys` (default x)."""
  batch, seq_len, h = x.shape
  d = h // heads
  keys = x if keys is None else keys
  q, k, v = _lin(x, p['query']), _lin(keys, p['key']), _lin(keys, p['value'])
  allowed = np.tril(np.ones((seq_len, seq_len), bool))[None] & (ids != PAD)[:, None, :]
  outs = []
  for head in range(heads):
    cols = slice(head * d, (head + 1) * d)
    scores = q[..., cols] @ k[..., cols].transpose(0, 2, 1) / math.sqrt(d)
    outs.append(_softmax(np.where(allowed, scores, FILL)) @ v[..., cols])
  return _lin(np.concatenate(outs, axis=-1), p['out'])


def _scaled_input_np(p, ids):
  """Kang & McAuley's input: item rows x sqrt(h) + positions, padding rows zeroed; and the mask."""
  m = (ids != PAD)[..., None].astype(np.float64)
  x = p['item_embedding']['id_table'][ids] * math.sqrt(H) + p['position_embedding']['embedding']
  return x * m, m


def _standard_np(params, ids, heads, blocks, pre_ln):
  p = _np(params)
  x, m = _scaled_input_np(p, ids)
  for b in range(blocks):
    bp = p[f'blocks_{b}']
    ffn = lambda y: _lin(np.maximum(_lin(y, bp['w_1']), 0.0), bp['w_2'])
    attention = lambda y: _standard_attention_np(bp['attention'], y, ids, heads)
    if pre_ln:
      x = x + attention(_ln(x, bp['ln_1']))
      x = x + ffn(_ln(x, bp['ln_2']))
    else:
      x = _ln(x + attention(x), bp['ln_1'])
      x = _ln(x + ffn(x), bp['ln_2'])
    x = x * m
  return _ln(x, p['final_ln']) if pre_ln else x


def _kang_code_np(params, ids, heads, blocks):
  """SASRec.pytorch's forward (Kang & McAuley's code) at eval: Q = LN(x); x = Q + MHA(Q, x, x);
  x = LN(x); x = FFN(x) + x; x *= mask; then the last LayerNorm. LayerNorm eps 1e-8."""
  p = _np(params)
  x, m = _scaled_input_np(p, ids)
  for b in range(blocks):
    bp = p[f'blocks_{b}']
    q = _ln(x, bp['ln_1'], 1e-8)
    x = q + _standard_attention_np(bp['attention'], q, ids, heads, keys=x)
    x = _ln(x, bp['ln_2'], 1e-8)
    x = (_lin(np.maximum(_lin(x, bp['w_1']), 0.0), bp['w_2']) + x) * m
  return _ln(x, p['final_ln'], 1e-8)


def test_kang_code_forward_matches_numpy_float64():
  model = _model('kang_code', 2, num_heads=2)
  params = _random_params(model, seed=5)
  got = model.apply({'params': params}, jnp.asarray(HISTORY), deterministic=True,
                    method=SASRec.encode)
  expected = _kang_code_np(params, HISTORY, heads=2, blocks=2)
  # Rows 0-2 only: the all-pad row 3 is zero before the last LayerNorm, whose output there is
  # its bias plus eps-amplified float32 rounding (never scored: no real item there).
  np.testing.assert_allclose(np.asarray(got)[:3], expected[:3], rtol=1e-4, atol=1e-4)
  # Not the paper's formula: the standard pre-LN block on the same weights differs by O(1).
  standard = _standard_np(params, HISTORY, heads=2, blocks=2, pre_ln=True)
  assert np.abs(standard[:3] - expected[:3]).max() > 0.1


def test_position_init_std():
  for std in (1.0, 0.02):
    model = SASRec(IDEmbedding(N, 64, id_init='normal_0.02'), 200, block='kang_code',
                   position_init_std=std)
    params = model.init(jax.random.key(0), jnp.full((2, 200), N, jnp.int32),
                        deterministic=True)['params']
    positions = np.asarray(params['position_embedding']['embedding'])
    table = np.asarray(params['item_embedding']['id_table'])
    # 12,800 draws: the sample std is within 5% of the true one (about 8 standard errors).
    assert abs(positions.std() / std - 1) < 0.05
    assert abs(table.std() / 0.02 - 1) < 0.1  # 8 * 64 = 512 draws (the pad row included).
  for bad in (0.0, float('inf'), float('nan')):
    with pytest.raises(ValueError, match='position_init_std must be a finite number > 0'):
      SASRec(IDEmbedding(N, H), L, position_init_std=bad).init(
          jax.random.key(0), jnp.asarray(HISTORY), deterministic=True)


@pytest.mark.parametrize('blocks', [1, 2])
def test_reference_forward_matches_numpy_float64(blocks):
  model = _model('reference', blocks, num_heads=2)
  params = _random_params(model)
  got = model.apply({'params': params}, jnp.asarray(HISTORY), deterministic=True,
                    method=SASRec.encode)
  expected = _reference_np(params, HISTORY, heads=2, blocks=blocks)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  states = model.apply({'params': params}, jnp.asarray(HISTORY), deterministic=True)
  np.testing.assert_allclose(np.asarray(states), expected[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('pre_ln', [True, False])
def test_standard_forward_matches_numpy_float64(pre_ln):
  model = _model('standard', 2, num_heads=2, pre_ln=pre_ln)
  params = _random_params(model, seed=3)
  got = model.apply({'params': params}, jnp.asarray(HISTORY), deterministic=True,
                    method=SASRec.encode)
  expected = _standard_np(params, HISTORY, heads=2, blocks=2, pre_ln=pre_ln)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- behaviour


def test_state_is_taken_at_the_last_non_pad_position():
  right_padded = np.array([[1, 2, 3, PAD, PAD],
                           [4, PAD, PAD, PAD, PAD],
                           [PAD, PAD, PAD, PAD, PAD],
                           [PAD, 1, 2, 3, 4]], np.int32)
  np.testing.assert_array_equal(last_nonpad_index(jnp.asarray(right_padded == PAD)), [2, 0, 4, 4])
  for block in ('reference', 'standard', 'kang_code'):
    model = _model(block)
    params = _random_params(model)
    encoded = model.apply({'params': params}, jnp.asarray(right_padded), deterministic=True,
                          method=SASRec.encode)
    states = model.apply({'params': params}, jnp.asarray(right_padded), deterministic=True)
    # Two differently fused graphs (the last block at one position vs at all): a float32
    # tolerance, far below the O(1) gaps between positions.
    np.testing.assert_allclose(states, encoded[jnp.arange(4), jnp.array([2, 0, 4, 4])],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('block', ['reference', 'standard', 'kang_code'])
def test_causal_and_pad_row_invariance(block):
  model = _model(block, num_blocks=2)
  params = _random_params(model)
  encode = lambda p, x: model.apply({'params': p}, jnp.asarray(x), deterministic=True,
                                    method=SASRec.encode)
  base = np.asarray(encode(params, HISTORY))
  # Changing the item at position 3 leaves positions 0..2 untouched, and changes position 3.
  changed = HISTORY.copy()
  changed[:, 3] = np.where(changed[:, 3] == PAD, PAD, (changed[:, 3] + 1) % N)
  out = np.asarray(encode(params, changed))
  # Exact: the same computation run twice, and a masked-out key adds exact zeros
  # (exp(MASK_FILL - max) underflows to 0), so positions 0..2 cannot differ by a single bit.
  np.testing.assert_array_equal(out[:, :3], base[:, :3])
  assert np.abs(out[:2, 3] - base[:2, 3]).max() > 1e-3
  # The pad row's embedding never matters.
  moved = jax.tree.map(lambda x: x, params)
  moved['item_embedding']['id_table'] = moved['item_embedding']['id_table'].at[PAD].set(100.0)
  np.testing.assert_allclose(np.asarray(encode(moved, HISTORY)), base, atol=1e-6)


def test_dropout_only_in_training_mode_and_scores():
  model = _model('reference', dropout_rate=0.5)
  variables = {'params': _random_params(model)}
  x = jnp.asarray(HISTORY)
  eval_a = model.apply(variables, x, deterministic=True)
  eval_b = jax.jit(lambda v, x: model.apply(v, x, deterministic=True))(variables, x)
  np.testing.assert_allclose(eval_a, eval_b, rtol=1e-5, atol=1e-6)  # eager vs jit: two graphs.
  train = [model.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(i)})
           for i in range(2)]
  assert np.abs(np.asarray(train[0] - train[1])).max() > 1e-3
  scores = model.apply(variables, eval_a, method=SASRec.score)
  table = variables['params']['item_embedding']['id_table'][:N]
  assert scores.shape == (HISTORY.shape[0], N)
  np.testing.assert_allclose(scores, np.asarray(eval_a) @ np.asarray(table).T, rtol=1e-5,
                             atol=1e-5)


def test_bad_configuration_raises():
  x = jnp.asarray(HISTORY)
  with pytest.raises(ValueError, match='block style'):
    _model('transformer').init(jax.random.key(0), x, deterministic=True)
  with pytest.raises(ValueError, match='divisible'):
    _model('reference', num_heads=3).init(jax.random.key(0), x, deterministic=True)
  with pytest.raises(ValueError, match='num_blocks'):
    _model('standard', num_blocks=0).init(jax.random.key(0), x, deterministic=True)
  with pytest.raises(ValueError, match=r'\[batch, 5\]'):
    _model('reference').init(jax.random.key(0), x[:, 1:], deterministic=True)


@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_dropout_rate_scaling_and_determinism(rate):
  from alphafuse_jax.models import layers
  x = jnp.ones((301, 333))  # An odd element count exercises the half-word split.
  module = layers.Dropout(rate)
  y = np.asarray(module.apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(3)}))
  q = round(rate * 65536) / 65536
  dropped = float(np.mean(y == 0))
  # Binomial(100233, q): 5 standard deviations.
  assert abs(dropped - q) < 5 * math.sqrt(q * (1 - q) / y.size)
  # Kept values are 1.0 times a float32 constant: one rounding of 1 / (1 - q) (<= 6e-8 relative)
  # on any CPU; the tolerance stays far below the 6.8e-5 gap to 1 / (1 - rate) at rate 0.1.
  np.testing.assert_allclose(y[y != 0], 1.0 / (1.0 - q), rtol=1e-6)
  assert abs(float(np.mean(y)) - 1.0) < 5 * math.sqrt(q / (1 - q) / y.size)
  # Neighbouring elements are independent: the two halves of a word do not agree more than chance.
  pairs = (y.reshape(-1)[:-1] == 0) & (y.reshape(-1)[1:] == 0)
  assert abs(float(np.mean(pairs)) - q * q) < 6 * math.sqrt(q * q / pairs.size)
  again = module.apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(3)})
  # The same computation run twice, and the identity in eval mode: exact.
  np.testing.assert_array_equal(np.asarray(again), y)
  np.testing.assert_array_equal(np.asarray(module.apply({}, x, deterministic=True)), np.asarray(x))


# ---------------------------------------------------------------- leave-one-out, a batch at once
def test_dropout_masks_are_jax_random_bits_halves():
  """basic_layers.Dropout's mask is the 16-bit halves of jax.random.bits(rng, ((size + 1) // 2,))
  (low halves first) against 0.3 * 2^16, for typed and raw keys; `threefry_words` is
  jax.random.bits word for word (all words, or a subset by counters); and a trailing block with
  `full_shape` gets the full input's mask there."""
  from alphafuse_jax import basic_layers
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7, 5)), jnp.float32)
  threshold = round(0.3 * 65536)
  for key in (jax.random.key(4), jax.random.PRNGKey(4)):
    got = jax.jit(lambda k: basic_layers.Dropout(0.3).apply({}, x, False, rngs={'dropout': k}))(key)
    # The oracle: the rng the module draws from, and the words of jax.random.bits (numpy halves).
    module_rng = jax.jit(lambda k: basic_layers.Dropout(0.3).apply(
        {}, rngs={'dropout': k}, method=lambda m: m.make_rng('dropout')))(key)
    words = np.asarray(jax.random.bits(module_rng, (53,), jnp.uint32))  # ceil(105 / 2)
    halves = np.concatenate([words & 0xFFFF, words >> 16])[:105].reshape(x.shape)
    want = np.where(halves >= threshold, np.asarray(x) * (65536 / (65536 - threshold)), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(got) == 0, halves < threshold)
    words_all = jax.jit(lambda k: basic_layers.threefry_words(k, 53))(module_rng)
    np.testing.assert_array_equal(words_all, words)
    counters = jnp.asarray([[52, 0], [7, 31]], jnp.uint32)
    np.testing.assert_array_equal(
        jax.jit(lambda k: basic_layers.threefry_words(k, 53, counters))(module_rng),
        words[np.asarray(counters)])
    block = jax.jit(lambda k: basic_layers.Dropout(0.3).apply(
        {}, x[1:, 4:], False, full_shape=x.shape, rngs={'dropout': k}))(key)
    np.testing.assert_allclose(block, np.asarray(got)[1:, 4:], rtol=1e-6, atol=0)


@pytest.mark.parametrize('block', ['reference', 'standard', 'kang_code'])
def test_encode_suffix_is_encode_at_the_last_positions(block):
  """Rows whose first L - S positions are padding: `encode_suffix` of their last S positions is
  `encode` there, in train mode with the same rngs (dropout masks of the full length)."""
  model = _model(block, num_blocks=1, dropout_rate=0.3)
  params = _random_params(model)
  rows = HISTORY[[0, 2, 3]]  # At most 3 real items: S = 3 covers them.
  run = lambda x, method: model.apply({'params': params}, x, deterministic=False,
                                     rngs={'dropout': jax.random.key(8)}, method=method)
  full, suffix = jax.jit(lambda x: (run(x, 'encode'), run(x[:, 2:], 'encode_suffix')))(
      jnp.asarray(rows))
  np.testing.assert_allclose(suffix, full[:, 2:], rtol=1e-5, atol=1e-5)


def test_batch_example_loss_is_the_per_row_loss(monkeypatch):
  """Leave-one-out CE computed a batch at once (rows sorted, grouped, encoded at bucketed
  lengths) = the per-row `example_loss` path: weights exactly; losses, the weighted mean's
  gradient (scaled in the backward pass) and a non-proportional cotangent's (recomputed)."""
  from alphafuse_jax import losses
  from alphafuse_jax.models import base
  monkeypatch.setattr(SASRec, 'GROUP_ROWS', 2)
  monkeypatch.setattr(SASRec, 'NUM_LENGTHS', 2)  # Lengths 3 and 5.
  monkeypatch.setattr(SASRec, 'MIN_LENGTH_STEP', 1)
  model = SASRec(IDEmbedding(N, H, id_init='normal'), L, block='standard', num_blocks=1,
                 num_heads=2, dropout_rate=0.3, objective=losses.Objective('ce', per_position=True))
  params = _random_params(model)
  history = jnp.asarray(np.concatenate([HISTORY, HISTORY[:1]]))  # 5 rows: a group is padded.
  target = jnp.asarray([3, 5, 1, 2, 6], jnp.int32)
  mask = jnp.asarray([True, True, True, True, False])
  keys = jax.random.split(jax.random.key(2), 5)
  table = params['item_embedding']['id_table'][:N]
  other = jnp.arange(5 * L, dtype=jnp.float32).reshape(5, L) / 9

  @jax.jit
  def run(params, table):
    out = {}
    for name, fn in (('batch', model.batch_example_loss),
                     ('rows', lambda *a: base.Recommender.batch_example_loss(model, *a))):
      (per_position, weights), vjp = jax.vjp(
          lambda p, e: fn(p, history, target, mask, keys, e), params, table)
      counted = weights != 0
      cotangents = jnp.stack([weights * 0.25, other * counted])
      out[name] = (per_position * counted, weights,
                   jax.vmap(lambda g: vjp((g, jnp.zeros_like(g))))(cotangents))
    return out

  out = run(params, table)
  np.testing.assert_array_equal(out['batch'][1], out['rows'][1])
  assert int(np.sum(np.asarray(out['rows'][1]))) == 3 + 5 + 1  # Row 4 is batch padding.
  for got, want in zip(jax.tree.leaves((out['batch'][0], out['batch'][2])),
                       jax.tree.leaves((out['rows'][0], out['rows'][2]))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
