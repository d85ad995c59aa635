"""Item-embedding pipelines: shapes, trainable leaves (counted by hand) and values vs numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alphafuse_jax import embeddings as emb
from alphafuse_jax.basic_layers import TorchDense
from configs import default

N, D_L, H, NULL = 40, 24, 8, 4
RNGS = {'params': jax.random.key(0), 'dropout': jax.random.key(1), 'gating': jax.random.key(2)}


def language(n=N, d=D_L, seed=0):
  """Scaled language vectors with a well-separated, full-rank spectrum (N > d)."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return 40 * (rng.normal(size=(n, d)) * np.geomspace(2.0, 0.2, d)) @ q.T + 0.3


def oracle_projection(x, k, weights=None, standardize=True):
  """numpy float64 (X - mu) U_k diag(S_k)^-1/2 with canonical signs (np.cov + svd)."""
  if weights is None:
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
  else:
    p = weights / weights.sum()
    mean = p @ x
    cov = ((x - mean) * p[:, None]).T @ (x - mean)
  u, s, _ = np.linalg.svd(cov)
  u = u * np.where(u[np.argmax(np.abs(u), 0), np.arange(u.shape[1])] < 0, -1.0, 1.0)
  p = u[:, :k] / np.sqrt(s[:k]) if standardize else u[:, :k]
  return (x - mean) @ p


def gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def config(pipeline, **overrides):
  c = default.get_config().embedding
  c.pipeline = pipeline
  c.hidden_dim = H
  c.null_dim = NULL
  for key, value in overrides.items():
    c[key] = value
  return c


def touch_all(module, ids):
  """Lookup, table and auxiliary loss (as `Recommender.init_all` does), so `init` creates every
  parameter: RLMRec's reconstructor exists only for its auxiliary loss."""
  module.table(deterministic=True)
  module.auxiliary_loss(deterministic=True)
  return module(ids, deterministic=True)


def build(pipeline, x=None, counts=None, **overrides):
  module = emb.make_item_embedding(config(pipeline, **overrides), num_items=N,
                                   language_embeddings=language() if x is None else x,
                                   item_counts=counts)
  ids = jnp.array([[0, 5, N], [N - 1, N, N]], jnp.int32)
  variables = module.init(RNGS, ids, method=touch_all)
  return module, variables, ids


def shapes(variables):
  return jax.tree.map(lambda a: a.shape, dict(variables.get('params', {})))


def count(variables):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables.get('params', {})))


# Lookups and the table are two float32 graphs. Pure gathers and element-wise sums agree to
# rounding (TOL); adapters reduce over d_l = 24 terms whose magnitudes sum to ~100 (the x40-scaled
# language vectors), so another summation order may move a value by up to ~24 * 6e-8 * 100
# = 1.4e-4 (ADAPTER_TOL). Rows of different items differ by O(1) either way.
TOL = dict(rtol=1e-5, atol=1e-6)
ADAPTER_TOL = dict(rtol=1e-5, atol=5e-4)


def check_interface(module, variables, ids, tol=TOL):
  """Shapes of the lookup and the table, and that lookups are table rows."""
  out = module.apply(variables, ids, deterministic=True)
  table = module.apply(variables, method='table')
  assert out.shape == ids.shape + (module.features,)
  assert table.shape == (N, module.features)
  np.testing.assert_allclose(out[0, :2], table[np.array([0, 5])], **tol)
  return np.asarray(table, np.float64)


# ---- one test per pipeline -------------------------------------------------------------------
def test_id():
  module, variables, ids = build('id', id_init='normal')
  # Trainable: the ID table (N + 1) * h = 41 * 8 = 328.
  assert shapes(variables) == {'id_table': (N + 1, H)} and count(variables) == 328
  table = check_interface(module, variables, ids)
  # The table and the lookups are copies of parameter rows (no arithmetic): exact.
  np.testing.assert_array_equal(table, variables['params']['id_table'][:N])
  pad = module.apply(variables, ids, deterministic=True)[0, 2]
  np.testing.assert_array_equal(pad, variables['params']['id_table'][N])
  assert 0.8 < np.std(variables['params']['id_table']) < 1.2  # N(0, 1) init.


def test_alphafuse_add():
  x = language()
  module, variables, ids = build('alphafuse', x, id_init='normal')
  # Trainable: only the ID table (N + 1) * n = 41 * 4 = 164; the language table is frozen.
  assert shapes(variables) == {'id_table': (N + 1, NULL)} and count(variables) == 164
  table = check_interface(module, variables, ids)
  expected = oracle_projection(x, H)
  expected[:, H - NULL:] += np.asarray(variables['params']['id_table'][:N])
  np.testing.assert_allclose(table, expected, atol=1e-4)


def test_alphafuse_cover_and_threshold():
  x = language()
  eigenvalues = np.linalg.svd(np.cov(x, rowvar=False), compute_uv=False)
  # Nullity 3 from the threshold (between the 3rd and 4th smallest); it wins over null_dim=4.
  threshold = float(np.sqrt(eigenvalues[-3] * eigenvalues[-4]))
  module, variables, ids = build('alphafuse', x, cover=True, null_threshold=threshold,
                                 id_init='uniform')
  assert module.null_dim == 3 and module.features == H
  assert shapes(variables) == {'id_table': (N + 1, 3)}  # 41 * 3 = 123 trainable.
  table = check_interface(module, variables, ids)
  ids_part = np.asarray(variables['params']['id_table'][:N])
  np.testing.assert_allclose(table, np.concatenate([oracle_projection(x, H - 3), ids_part], 1),
                             atol=1e-4)


def test_alphafuse_frequency_weighting():
  x = language()
  counts = np.random.default_rng(1).integers(1, 30, size=N).astype(float)
  module, variables, ids = build('alphafuse', x, counts, item_frequency_weighting=True)
  table = check_interface(module, variables, ids)  # id_init zeros: the table is the language part.
  np.testing.assert_allclose(table, oracle_projection(x, H, counts), atol=1e-4)
  # Properly weighted moments: the weighted covariance of the whitened table is the identity.
  p = counts / counts.sum()
  centred = table - p @ table
  np.testing.assert_allclose((centred * p[:, None]).T @ centred, np.eye(H), atol=1e-4)


def test_alphafuse_gradients_reach_only_the_id_table():
  module, variables, ids = build('alphafuse', id_init='zeros')
  assert list(variables) == ['params'] and list(variables['params']) == ['id_table']
  frozen_before = np.asarray(module.apply(variables, method='table'))
  weights = jax.random.normal(jax.random.key(3), (N, H))

  def loss(params):
    return jnp.sum(module.apply({'params': params}, method='table') * weights)

  grads = jax.grad(loss)(variables['params'])
  # d loss / d ID_i = weights_i[k - n:] (the ID is added to the last n dims): the gradient is a
  # copy of `weights` (times the cotangent 1.0), exact up to the tolerance on any CPU.
  np.testing.assert_allclose(grads['id_table'][:N], weights[:, H - NULL:], rtol=1e-6)
  assert np.all(np.asarray(grads['id_table'][N]) == 0)  # the pad row is not in the table.
  tx = optax.sgd(0.1)
  updates, _ = tx.update(grads, tx.init(variables['params']))
  after = np.asarray(module.apply({'params': optax.apply_updates(variables['params'], updates)},
                                  method='table'))
  # The same computation run twice on the same frozen columns: exact.
  np.testing.assert_array_equal(after[:, :H - NULL], frozen_before[:, :H - NULL])
  assert np.all(np.abs(after[:, H - NULL:] - frozen_before[:, H - NULL:]) > 0)


# ---- the variant AlphaFuse-Anchor ---------------------------------------------------------------
def test_alphafuse_anchor_starts_as_alphafuse_and_its_anchor_matches_numpy():
  x = language()
  anchor, a_vars, ids = build('alphafuse_anchor', x, id_init='normal', anchor_weight=0.5)
  fused, f_vars, _ = build('alphafuse', x, id_init='normal')
  # Trainable: one [N + 1, k] table (41 * 8 = 328): k - n offsets and AlphaFuse's n ID columns.
  assert shapes(a_vars) == {'id_table': (N + 1, H)} and anchor.features == H
  table = check_interface(anchor, a_vars, ids)
  # At initialisation: zero offsets, and the ID columns are exactly AlphaFuse's draw from the
  # same key (the same initialiser on the same key: equal bits); the two tables come from
  # differently compiled graphs, so they agree to float32 rounding.
  np.testing.assert_array_equal(a_vars['params']['id_table'][:, :H - NULL], 0.0)
  np.testing.assert_array_equal(a_vars['params']['id_table'][:, H - NULL:],
                                f_vars['params']['id_table'])
  np.testing.assert_allclose(table, fused.apply(f_vars, method='table'), rtol=1e-6, atol=1e-6)
  assert float(anchor.apply(a_vars, deterministic=True, method='auxiliary_loss')) == 0.0
  # Random offsets: the table is L + T and the anchor 0.5 x mean_i ||T_i[:k - n]||^2 over the
  # N items (the pad row not counted), against float64 numpy.
  t = np.asarray(jax.random.normal(jax.random.key(4), (N + 1, H)), np.float64)
  params = {'id_table': jnp.asarray(t, jnp.float32)}
  expected = oracle_projection(x, H) + t[:N]
  got = np.asarray(anchor.apply({'params': params}, method='table'), np.float64)
  np.testing.assert_allclose(got, expected, atol=1e-4)
  aux = float(anchor.apply({'params': params}, deterministic=True, method='auxiliary_loss'))
  expected_aux = 0.5 * np.mean(np.sum(t[:N, :H - NULL] ** 2, axis=1))
  assert aux == pytest.approx(expected_aux, rel=1e-5)
  # Its gradient reaches the offsets only (2 x 0.5 x T / N), never the ID columns or the pad row.
  grads = jax.grad(lambda p: anchor.apply({'params': p}, deterministic=True,
                                          method='auxiliary_loss'))(params)['id_table']
  np.testing.assert_allclose(grads[:N, :H - NULL], t[:N, :H - NULL] / N, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(grads[:, H - NULL:]) == 0) and np.all(np.asarray(grads[N]) == 0)


def test_alphafuse_anchor_config_errors_and_registry():
  for weight in (-1.0, float('nan')):
    with pytest.raises(ValueError, match='anchor_weight'):
      emb.make_item_embedding(config('alphafuse_anchor', anchor_weight=weight), num_items=N,
                              language_embeddings=language(), item_counts=None)
  with pytest.raises(ValueError, match='cover=True only applies'):
    emb.make_item_embedding(config('alphafuse_anchor', cover=True), num_items=N,
                            language_embeddings=language(), item_counts=None)
  with pytest.raises(ValueError, match='null_dim=8 must be < hidden_dim=8'):
    emb.make_item_embedding(config('alphafuse_anchor', null_dim=H), num_items=N,
                            language_embeddings=language(), item_counts=None)
  # A variant, in no paper suite, and a text map (a new item gets its text row).
  assert 'alphafuse_anchor' not in emb.pipelines_for('sasrec')
  assert 'alphafuse_anchor' not in emb.pipelines_for('dreamrec')
  assert emb.get_pipeline('alphafuse_anchor').text_map


def test_llminit():
  x = language()
  module, variables, ids = build('llminit', x)
  # Trainable: the SI table (N + 1) * h = 328, initialised from the top-h whitened projection.
  assert shapes(variables) == {'id_table': (N + 1, H)} and count(variables) == 328
  table = check_interface(module, variables, ids)
  np.testing.assert_allclose(table, oracle_projection(x, H), atol=1e-4)
  np.testing.assert_array_equal(variables['params']['id_table'][N], np.zeros(H))
  # d_l == hidden_dim: the raw scaled vectors themselves, rounded once to float32 (<= 6e-8
  # relative on any CPU).
  module, variables, _ = build('llminit', x, hidden_dim=D_L)
  np.testing.assert_allclose(module.apply(variables, method='table'), x, rtol=1e-6)


def test_language_scale_scales_the_language_rows_only():
  x = language()
  # AlphaFuse and its variant: 0.25 x the whitened projection, the ID (and offsets) unscaled.
  for pipeline in ('alphafuse', 'alphafuse_anchor'):
    module, variables, ids = build(pipeline, x, id_init='normal', language_scale=0.25)
    table = check_interface(module, variables, ids)
    expected = 0.25 * oracle_projection(x, H)
    expected[:, H - NULL:] += np.asarray(variables['params']['id_table'][:N, -NULL:])
    np.testing.assert_allclose(table, expected, atol=1e-5)
  # LLMInit starts at 0.25 x its table; the padding row at zero.
  module, variables, ids = build('llminit', x, language_scale=0.25)
  np.testing.assert_allclose(check_interface(module, variables, ids),
                             0.25 * oracle_projection(x, H), atol=1e-5)
  np.testing.assert_array_equal(variables['params']['id_table'][N], np.zeros(H))
  for bad in (0.0, -1.0, float('inf')):
    with pytest.raises(ValueError, match='language_scale=.* must be a finite number > 0'):
      build('alphafuse', x, language_scale=bad)
  with pytest.raises(ValueError, match="language_scale=2.0 only applies to .* not 'morec'"):
    build('morec', x, language_scale=2.0)


def test_morec():
  x = language()
  module, variables, ids = build('morec', x)
  # Trainable: Linear(d_l -> h) = 24 * 8 + 8 = 200.
  assert shapes(variables) == {'adapter': {'bias': (H,), 'kernel': (D_L, H)}}
  assert count(variables) == 200
  p = variables['params']['adapter']
  assert np.max(np.abs(p['kernel'])) <= 1 / math.sqrt(D_L)  # torch U(+-1/sqrt(fan_in)).
  table = check_interface(module, variables, ids, ADAPTER_TOL)
  np.testing.assert_allclose(table, gelu(x @ np.asarray(p['kernel'], np.float64) + p['bias']),
                             rtol=1e-4, atol=1e-4)


def test_whitenrec():
  x = language()
  module, variables, ids = build('whitenrec', x)
  assert count(variables) == 200  # Linear(24 -> 8): 24 * 8 + 8.
  p = variables['params']['adapter']
  table = check_interface(module, variables, ids, ADAPTER_TOL)
  whitened = oracle_projection(x, D_L)  # Full d_l whitening (WAP).
  expected = gelu(whitened @ np.asarray(p['kernel'], np.float64) + p['bias'])
  np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-4)


def test_unisrec():
  x = language()
  module, variables, ids = build('unisrec', x)
  # Trainable: 8 experts x (bias 24 + kernel 24 * 8) + gate and noise kernels 2 * 24 * 8
  # = 192 + 1536 + 384 = 2112.
  assert shapes(variables) == {'adaptor': {'expert_bias': (8, D_L), 'expert_kernel': (8, D_L, H),
                                           'gate_kernel': (D_L, 8), 'noise_kernel': (D_L, 8)}}
  assert count(variables) == 2112
  # Random values everywhere, so gates and biases matter in the value check.
  params = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape) * 0.1,
                        variables['params'])
  table = check_interface(module, {'params': params}, ids, ADAPTER_TOL)
  a = jax.tree.map(lambda t: np.asarray(t, np.float64), params['adaptor'])
  logits = x @ a['gate_kernel']
  gates = np.exp(logits - logits.max(1, keepdims=True))
  gates /= gates.sum(1, keepdims=True)
  expected = sum(gates[:, e:e + 1] * ((x - a['expert_bias'][e]) @ a['expert_kernel'][e])
                 for e in range(8))
  np.testing.assert_allclose(table, expected, rtol=1e-4, atol=1e-3)
  # Train mode: dropout and gating noise from the rngs; reproducible for a fixed key (the same
  # computation run twice: exact).
  train = lambda key: module.apply({'params': params}, ids, deterministic=False,
                                   rngs={'dropout': key, 'gating': key})
  np.testing.assert_array_equal(train(jax.random.key(7)), train(jax.random.key(7)))
  assert not np.allclose(train(jax.random.key(7)), module.apply({'params': params}, ids,
                                                                deterministic=True))
  with pytest.raises(Exception, match='dropout|gating'):
    module.apply({'params': params}, ids, deterministic=False)


@pytest.mark.parametrize('alignment,expected_count', [
    # ID 41 * 8 = 328; hidden (24 + 8) // 2 = 16.
    ('con', 328 + (24 * 16 + 16) + (16 * 8 + 8)),  # 328 + 400 + 136 = 864
    ('gen', 328 + (8 * 16 + 16) + (16 * 24 + 24)),  # 328 + 144 + 408 = 880
])
def test_rlmrec(alignment, expected_count):
  x = language()
  module, variables, ids = build('rlmrec', x, rlmrec_alignment=alignment, id_init='normal',
                                 aux_weight=0.3)
  assert count(variables) == expected_count
  assert set(variables['params']) == {'id_table', 'reconstructor'}
  table = check_interface(module, variables, ids)
  # Copies of parameter rows: exact.
  np.testing.assert_array_equal(table, variables['params']['id_table'][:N])
  r = jax.tree.map(lambda t: np.asarray(t, np.float64), variables['params']['reconstructor'])

  def rec(v):
    hidden = v @ r['TorchDense_0']['kernel'] + r['TorchDense_0']['bias']
    hidden = np.where(hidden > 0, hidden, 0.01 * hidden)
    return hidden @ r['TorchDense_1']['kernel'] + r['TorchDense_1']['bias']

  pred, target = (rec(x), table) if alignment == 'con' else (rec(table), x)
  cos = np.sum(pred * target, 1) / np.linalg.norm(pred, axis=1) / np.linalg.norm(target, axis=1)
  loss = module.apply(variables, deterministic=True, method='auxiliary_loss')
  # The module owns its weight: config.embedding.aux_weight x (1 - mean cosine).
  np.testing.assert_allclose(loss, 0.3 * (1 - cos.mean()), **TOL)
  grads = jax.grad(lambda p: module.apply({'params': p}, deterministic=True,
                                          method='auxiliary_loss'))(variables['params'])
  assert np.any(np.asarray(grads['id_table']) != 0)


def test_llmesr():
  x = language()
  module, variables, ids = build('llmesr', x)
  # Trainable: SI ID table 41 * 8 = 328; adapter Linear(24 -> 12) 300 + Linear(12 -> 8) 104.
  assert count(variables) == 328 + 300 + 104
  assert module.features == 2 * H
  table = check_interface(module, variables, ids, ADAPTER_TOL)
  p = jax.tree.map(lambda t: np.asarray(t, np.float64), variables['params'])
  text = (x @ p['adapter_in']['kernel'] + p['adapter_in']['bias']) @ p['adapter_out']['kernel']
  text += p['adapter_out']['bias']
  np.testing.assert_allclose(table, np.concatenate([oracle_projection(x, H), text], 1), rtol=1e-5,
                             atol=1e-4)
  id_view = module.apply(variables, ids, method='id_view')
  text_view = module.apply(variables, ids, method='text_view')
  np.testing.assert_allclose(jnp.concatenate([id_view, text_view], -1),
                             module.apply(variables, ids, deterministic=True), **ADAPTER_TOL)


def test_idreamrec():
  x = language()
  module, variables, ids = build('idreamrec', x, hidden_dim=D_L)
  assert count(variables) == 0  # Nothing trainable: the whitened table is the embedding.
  table = check_interface(module, variables, ids)
  np.testing.assert_allclose(table, oracle_projection(x, D_L), atol=1e-4)
  np.testing.assert_allclose(np.cov(table, rowvar=False), np.eye(D_L), atol=1e-4)


def test_auxiliary_loss_is_zero_without_one():
  for pipeline in ('id', 'alphafuse', 'morec', 'llmesr'):
    module, variables, _ = build(pipeline)
    assert float(module.apply(variables, deterministic=False, method='auxiliary_loss',
                              rngs=RNGS)) == 0.0


# ---- full whitening on rank-deficient embeddings ----------------------------------------------
def test_full_whitening_refused_on_rank_deficient_embeddings_unless_floored():
  # N = 40 items in d = 48 dims: the covariance has rank 39, so nine eigenvalues are ~0.
  x = np.random.default_rng(2).normal(size=(N, 48)) * 40
  for pipeline, extra in (('whitenrec', {}), ('idreamrec', {'hidden_dim': 48})):
    with pytest.raises(ValueError, match='Refusing to whiten.*eigenvalue_floor'):
      emb.make_item_embedding(config(pipeline, **extra), num_items=N, language_embeddings=x,
                              item_counts=None)
    module = emb.make_item_embedding(config(pipeline, eigenvalue_floor=1e-3, **extra),
                                     num_items=N, language_embeddings=x, item_counts=None)
    table = module.language_table.values
    assert table.shape == (N, 48) and np.all(np.isfinite(table))
    # Clamped near-null directions stay near zero instead of being blown up to unit variance.
    assert np.max(np.abs(table[:, 39:])) < 1e-3 and np.allclose(np.var(table[:, :39], 0, ddof=1), 1)


# ---- factory errors ----------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,match', [
    ({'pipeline': 'alpha'}, 'valid: alphafuse, id, llminit'),
    ({'null_dim': H}, 'null_dim=8 must be < hidden_dim=8'),
    ({'hidden_dim': 32}, 'exceeds the language dimension'),
    ({'cover': True, 'pipeline': 'llminit'}, 'cover=True only applies'),
    ({'item_frequency_weighting': True}, 'item_counts'),
    ({'id_init': 'he'}, 'Unknown ID init'),
    ({'null_dim': None, 'null_threshold': 1e-9}, 'Nullity 0'),
    ({'pipeline': 'idreamrec'}, 'must equal d_l'),
    ({'pipeline': 'rlmrec', 'rlmrec_alignment': 'both'}, 'rlmrec_alignment'),
])
def test_factory_errors(overrides, match):
  c = config('alphafuse')
  for key, value in overrides.items():
    c[key] = value
  with pytest.raises(ValueError, match=match):
    emb.make_item_embedding(c, num_items=N, language_embeddings=language(), item_counts=None)


def test_factory_rejects_bad_embeddings():
  with pytest.raises(ValueError, match='expected \\[num_items=40'):
    emb.make_item_embedding(config('morec'), num_items=N, language_embeddings=language(n=30),
                            item_counts=None)
  bad = language()
  bad[7, 3] = np.nan
  with pytest.raises(ValueError, match='row 7'):
    emb.make_item_embedding(config('morec'), num_items=N, language_embeddings=bad, item_counts=None)
  with pytest.raises(ValueError, match='needs language embeddings'):
    emb.make_item_embedding(config('alphafuse'), num_items=N, language_embeddings=None,
                            item_counts=None)
  # The ID pipeline needs none.
  assert isinstance(emb.make_item_embedding(config('id'), num_items=N, language_embeddings=None,
                                            item_counts=None), emb.IDEmbedding)


# ---- initialisers (LLM-ESR's cross-attention and contrastive loss: tests/test_llmesr.py) ----
def test_initialisers():
  key = jax.random.key(0)
  rows, cols = 200, 16
  ortho = np.asarray(emb.id_initializer('orthogonal')(key, (rows, cols)))
  np.testing.assert_allclose(ortho.T @ ortho, np.eye(cols), atol=1e-5)
  xavier = np.asarray(emb.id_initializer('xavier')(key, (rows, cols)))
  assert np.max(np.abs(xavier)) <= math.sqrt(6 / (rows + cols))
  uniform = np.asarray(emb.id_initializer('uniform')(key, (rows, cols)))
  assert uniform.min() >= 0 and uniform.max() < 1
  sparse = np.asarray(emb.id_initializer('sparse')(key, (rows, cols)))
  # torch sparse_(0.01): ceil(0.01 * 200) = 2 zeros in every column, N(0, 1) elsewhere.
  np.testing.assert_array_equal((sparse == 0).sum(0), np.full(cols, 2))
  assert not np.any(emb.id_initializer('zeros')(key, (3, 2)))
  dense = TorchDense(5)
  p = dense.init(key, jnp.ones((1, 100)))['params']
  assert np.max(np.abs(p['kernel'])) <= 0.1 and np.max(np.abs(p['bias'])) <= 0.1
  assert np.max(np.abs(p['kernel'])) > 0.09  # U(+-1/sqrt(100)) fills its range.


def test_modules_are_hashable_and_jittable():
  module, variables, ids = build('alphafuse')
  hash(module)
  assert 'items=40' in repr(module.language_table)
  jitted = jax.jit(lambda v, i: module.apply(v, i, deterministic=True))
  np.testing.assert_allclose(jitted(variables, ids), module.apply(variables, ids,
                                                                  deterministic=True), **TOL)
  # Out-of-range ids are not silently clamped to a real item.
  assert np.all(np.isnan(module.apply(variables, jnp.array([N + 1]), deterministic=True)))
