"""Tests for the DreamRec backbone (alphafuse_jax.models.dreamrec)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import builders
from alphafuse_jax import diffusion
from alphafuse_jax import embeddings
from alphafuse_jax.embeddings import IDEmbedding
from alphafuse_jax.models.dreamrec import DreamRec, TimestepEmbedder
from alphafuse_jax.models.sasrec import SASRec
from configs import dreamrec as dreamrec_config

N, H, L = 10, 8, 5
PAD = N
HISTORY = jnp.array([[PAD, PAD, 1, 2, 3], [PAD, PAD, PAD, PAD, 4], [5, 6, 7, 8, 9]])
TARGETS = jnp.array([4, 0, 1])


def id_embedding(hidden=H):
  return IDEmbedding(N, hidden, id_init='normal')


def make(**kw):
  model = DreamRec(id_embedding(), max_len=L, timesteps=kw.pop('timesteps', 50),
                   sampling_stride=kw.pop('sampling_stride', 10), **kw)
  # jit: one compilation instead of hundreds of eager ops.
  params = jax.jit(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                      HISTORY, method='init_all')['params'])()
  return model, params


@pytest.fixture(scope='module')
def default():
  """The default tiny model and its params, built once for the module."""
  return make()


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_count(default):
  _, params = default
  # ID table (N+1)h = 11*8 = 88; positions L*h = 40;
  # reference block: q, k, v 3*(h*h + h) = 216, FFN w_1, w_2 2*(h*h + h) = 144,
  #   4 LayerNorms 4*2h = 64 -> 424; none embedding h = 8;
  # timestep embedder 256h + h + h*h + h = 2048 + 8 + 64 + 8 = 2128;
  # linear denoiser 3h*h + h = 192 + 8 = 200.  88 + 40 + 424 + 8 + 2128 + 200 = 2888.
  assert count(params) == 2888
  assert set(params) == {'item_embedding', 'encoder', 'none_embedding', 'step_embedder',
                         'denoise_net'}
  mlp = DreamRec(id_embedding(), max_len=L, denoiser='mlp')
  mlp_params = jax.eval_shape(lambda: mlp.init({'params': jax.random.key(0)}, HISTORY,
                                               method='init_all'))['params']
  # mlp denoiser: Linear(3h -> 2h) 24*16 + 16 = 400, Linear(2h -> h) 16*8 + 8 = 136;
  # 536 = 200 + 336.
  assert count(mlp_params) == 2888 + 336


def test_condition_is_sasrec_reference_state(default):
  model, params = default
  sasrec = SASRec(id_embedding(), max_len=L, block='reference')
  sas_params = {'item_embedding': params['item_embedding'], **params['encoder']}
  want = sasrec.apply({'params': sas_params}, HISTORY, deterministic=True)
  got = model.apply({'params': params}, HISTORY, deterministic=True, method=DreamRec.condition)
  # Two compilations of the same maths: float32 agrees to a few ulps of O(1) states.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_timestep_embedder_and_linear_denoiser_match_numpy(default):
  model, params = default
  x, c = np.random.default_rng(0).normal(size=(2, 3, H)).astype(np.float32)
  t = np.array([0, 7, 49])
  got = model.apply({'params': params}, jnp.asarray(x), jnp.asarray(c), jnp.asarray(t),
                    method=DreamRec.denoise)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  half = 128
  args = t[:, None] * np.exp(-math.log(1e4) * np.arange(half) / (half - 1))[None]
  feats = np.concatenate([np.sin(args), np.cos(args)], -1)
  y = feats @ p['step_embedder']['linear_1']['kernel'] + p['step_embedder']['linear_1']['bias']
  y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))  # exact GELU
  t_emb = y @ p['step_embedder']['linear_2']['kernel'] + p['step_embedder']['linear_2']['bias']
  want = (np.concatenate([x, c, t_emb], -1) @ p['denoise_net']['linear']['kernel']
          + p['denoise_net']['linear']['bias'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_loss_is_per_example_mse_with_reference_key_use(default):
  model, params = default
  model = model.clone(p_uncond=0.5)
  key = jax.random.key(3)
  got = model.apply({'params': params}, HISTORY, TARGETS, key, deterministic=True,
                    method=DreamRec.loss)
  assert got.shape == (3,)
  # Rebuild it from the public pieces: split(key, 3) draws (t, noise, guidance mask).
  t_key, noise_key, mask_key = jax.random.split(key, 3)
  t = diffusion.sample_timesteps(t_key, 3, 50)
  x0 = np.asarray(params['item_embedding']['id_table'])[np.asarray(TARGETS)]
  noise = jax.random.normal(noise_key, x0.shape)
  ab = model.apply({'params': params}, method=lambda m: m.schedule.alphas_cumprod)[np.asarray(t)]
  x_t = np.sqrt(ab)[:, None] * x0 + np.sqrt(1 - ab)[:, None] * np.asarray(noise)
  keep = np.asarray(diffusion.guidance_keep_mask(mask_key, 3, 0.5))[:, None]
  cond = np.asarray(model.apply({'params': params}, HISTORY, deterministic=True,
                                method=DreamRec.condition))
  cond = cond * keep + np.asarray(params['none_embedding'])[None] * (1 - keep)
  pred = model.apply({'params': params}, jnp.asarray(x_t, jnp.float32), jnp.asarray(cond), t,
                     method=DreamRec.denoise)
  np.testing.assert_allclose(got, np.mean((x0 - np.asarray(pred)) ** 2, -1), rtol=1e-4,
                             atol=1e-6)


def test_unconditional_training_ignores_history(default):
  model, params = default
  model = model.clone(p_uncond=1.0)
  key = jax.random.key(4)
  loss = lambda h: model.apply({'params': params}, h, TARGETS, key, deterministic=True,
                               method=DreamRec.loss)
  np.testing.assert_allclose(loss(HISTORY), loss(jnp.full_like(HISTORY, PAD)), rtol=1e-5,
                             atol=1e-6)
  model0 = model.clone(p_uncond=0.0)
  loss0 = lambda h: model0.apply({'params': params}, h, TARGETS, key, deterministic=True,
                                 method=DreamRec.loss)
  assert not np.allclose(loss0(HISTORY), loss0(jnp.full_like(HISTORY, PAD)))


def test_gradients_reach_id_table_through_target():
  """History all padding: the only path to the ID table is the diffusion target x0."""
  history = jnp.full((3, L), PAD)
  # AlphaFuse: a frozen language table with the trainable ID added to its last 3 dimensions.
  item_embedding = embeddings.AlphaFuseEmbedding(N, embeddings.FrozenTable(
      np.random.default_rng(0).normal(size=(N, H))), null_dim=3, id_init='normal')
  model = DreamRec(item_embedding, max_len=L, timesteps=50, sampling_stride=10)
  params = jax.jit(lambda: model.init({'params': jax.random.key(0)}, history,
                                      method='init_all')['params'])()
  grads = jax.jit(jax.grad(lambda p: model.apply(
      {'params': p}, history, TARGETS, jax.random.key(1), deterministic=True,
      method=DreamRec.loss).mean()))(params)
  row_norms = np.linalg.norm(np.asarray(grads['item_embedding']['id_table']), axis=1)
  is_target = np.isin(np.arange(N + 1), np.asarray(TARGETS))
  assert np.all(row_norms[is_target] > 0)
  assert np.all(row_norms[~is_target] == 0)


def test_few_sgd_steps_lower_the_loss(default):
  model, params = default
  history = jnp.tile(HISTORY, (4, 1))
  targets = jnp.tile(TARGETS, 4)
  eval_keys = jax.random.split(jax.random.key(100), 16)

  @jax.jit
  def expected_loss(p):  # A fixed Monte-Carlo estimate over 16 keys.
    per_key = jax.vmap(lambda k: model.apply({'params': p}, history, targets, k,
                                             deterministic=True, method=DreamRec.loss).mean())
    return per_key(eval_keys).mean()

  @jax.jit
  def step(p, key):
    g = jax.grad(lambda q: model.apply({'params': q}, history, targets, key, deterministic=True,
                                       method=DreamRec.loss).mean())(p)
    return jax.tree.map(lambda a, b: a - 0.05 * b, p, g)

  before = float(expected_loss(params))
  for i in range(30):
    params = step(params, jax.random.key(i))
  after = float(expected_loss(params))
  assert after < 0.8 * before, (before, after)


def test_generate_and_score(default):
  model, params = default
  gen = jax.jit(lambda p, k, w: model.apply({'params': p}, HISTORY, k, w=w,
                                            method=DreamRec.generate))
  a = gen(params, jax.random.key(9), 5.0)
  assert a.shape == (3, H) and np.all(np.isfinite(np.asarray(a)))
  np.testing.assert_array_equal(a, gen(params, jax.random.key(9), 5.0))  # Fixed eval key.
  assert not np.allclose(a, gen(params, jax.random.key(10), 5.0))
  assert not np.allclose(a, gen(params, jax.random.key(9), 0.0))
  scores = model.apply({'params': params}, a, method=DreamRec.score)
  table = np.asarray(params['item_embedding']['id_table'])[:N]
  np.testing.assert_allclose(scores, np.asarray(a) @ table.T, rtol=1e-5, atol=1e-5)
  ddpm = model.apply({'params': params}, HISTORY, jax.random.key(9), sampler='ddpm',
                     method=DreamRec.generate)
  assert ddpm.shape == (3, H)


def test_example_loss_is_the_row_loss_weighted_by_its_mask(default):
  """The training contract's per-row loss is `loss` on the row alone, weighted by its mask."""
  model, params = default
  key = jax.random.key(7)
  rngs, loss_key = model.split_example_key(key)
  # The row key splits as the train step always split it: (model key -> dropout, diffusion).
  model_key, _ = jax.random.split(key)
  dropout_key, diffusion_key = jax.random.split(model_key)
  np.testing.assert_array_equal(jax.random.key_data(loss_key),
                                jax.random.key_data(diffusion_key))
  np.testing.assert_array_equal(jax.random.key_data(rngs['dropout']),
                                jax.random.key_data(jax.random.split(dropout_key)[0]))
  assert model.apply({'params': params}, method='train_table') is None
  example = jax.jit(lambda h, t, m: model.apply({'params': params}, h, t, m, loss_key, None,
                                                rngs=rngs, method='example_loss'))
  direct = jax.jit(lambda h, t: model.apply({'params': params}, h[None], t[None], loss_key,
                                            deterministic=False, rngs=rngs,
                                            method=DreamRec.loss)[0])
  for row in range(len(TARGETS)):
    loss, weight = example(HISTORY[row], TARGETS[row], jnp.asarray(True))
    assert loss.shape == () and weight.shape == ()
    # Two compiled programs of the same maths: a float32 tolerance, not bitwise equality.
    np.testing.assert_allclose(loss, direct(HISTORY[row], TARGETS[row]), rtol=1e-5, atol=1e-6)
    assert float(weight) == 1.0
  # A padding row of the last batch (its target is the pad id): weight 0, a finite loss, the
  # target pointed at item 0 (the pad id would look up NaN).
  loss, weight = example(HISTORY[0], jnp.asarray(PAD), jnp.asarray(False))
  assert float(weight) == 0.0 and np.isfinite(float(loss))
  np.testing.assert_allclose(loss, direct(HISTORY[0], jnp.asarray(0)), rtol=1e-5, atol=1e-6)


def test_train_mode_loss_uses_dropout_stream(default):
  model, params = default
  # One compiled function: running it twice on the same inputs is bitwise reproducible.
  run = jax.jit(lambda r: model.apply({'params': params}, HISTORY, TARGETS, jax.random.key(2),
                                      deterministic=False, rngs={'dropout': jax.random.key(r)},
                                      method=DreamRec.loss))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))


@pytest.mark.parametrize('kw, field', [
    ({'denoiser': 'transformer'}, 'config.model.denoiser'),
    ({'p_uncond': 1.5}, 'config.model.p_uncond'),
    ({'beta_schedule': 'quad'}, 'config.diffusion.beta_schedule'),
    ({'sampler': 'euler'}, 'config.diffusion.sampler')])
def test_bad_settings_name_the_config_field(kw, field):
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    make(**kw)


def test_timestep_embedder_width():
  out = TimestepEmbedder(6).init_with_output(jax.random.key(0), jnp.array([0, 1999]))[0]
  assert out.shape == (2, 6)


@pytest.mark.parametrize('pipeline', ['alphafuse', 'id', 'idreamrec', 'llmesr'])
def test_config_builds_the_reference_settings(pipeline):
  config = dreamrec_config.get_config(pipeline)
  # pylint: disable-next=protected-access
  model = builders._dreamrec(config, id_embedding(config.embedding.hidden_dim), L)
  assert (model.timesteps, model.beta_schedule, model.sampling_stride) == (2000, 'linear', 100)
  assert (model.guidance_weight, model.p_uncond, model.denoiser) == (5.0, 0.1, 'linear')
  assert model.reference_quirks is False
  assert config.embedding.hidden_dim == (128 if pipeline == 'id' else 384)
  assert config.train.l2 == 0.0 and config.embedding.aux_weight == 0.0
  with pytest.raises(ValueError, match='pipeline'):
    dreamrec_config.get_config('sasrec')


def test_reference_quirks_flag_changes_only_the_fed_timesteps(default):
  model, params = default  # T = 50, stride 10.
  fed = lambda m: m.apply({'params': params}, method=lambda mod: mod.ddim.timesteps)
  quirky = model.clone(reference_quirks=True)
  np.testing.assert_array_equal(fed(model), [0, 9, 19, 29, 39, 49])
  np.testing.assert_array_equal(fed(quirky), [0, 10, 20, 30, 40, 50])  # t = T: never trained.
  gen = lambda m: m.apply({'params': params}, HISTORY, jax.random.key(0), method=DreamRec.generate)
  assert not np.allclose(gen(model), gen(quirky))
