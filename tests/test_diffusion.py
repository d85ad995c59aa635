"""Tests for alphafuse_jax.diffusion against float64 numpy transcriptions of the reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import diffusion


# ---- float64 numpy oracles: the reference's models/diffusion.py, loop by loop -------------------
def oracle_betas(name, timesteps, beta_start=1e-4, beta_end=0.02):
  t = timesteps
  if name == 'linear':
    return np.array([beta_start + (beta_end - beta_start) * i / (t - 1) for i in range(t)])
  if name == 'cosine':
    s = 0.008
    ab = [math.cos(((x / t) + s) / (1 + s) * math.pi * 0.5) ** 2 for x in range(t + 1)]
    ab = [a / ab[0] for a in ab]
    return np.array([min(max(1 - ab[i + 1] / ab[i], 1e-4), 0.9999) for i in range(t)])
  if name == 'exp':
    beta_min, beta_max = 0.1, 10.0
    xs = [1 + (2 * t) * i / (t - 1) for i in range(t)]
    return np.array([1 - math.exp(-beta_min / t - x * 0.5 * (beta_max - beta_min) / (t * t))
                     for x in xs])
  assert name == 'sqrt'
  alpha_bar = lambda u: 1 - math.sqrt(u + 0.0001)
  return np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)])


def oracle_ddim(alphas_cumprod, stride):
  """(fed t as in the reference, coef1, coef2) for n = 0..S-1."""
  indices = list(range(0, len(alphas_cumprod) + 1, stride))
  now = [max(i - 1, 0) for i in indices]
  ab = [alphas_cumprod[i] for i in now]
  prev = [1.0] + ab[:-1]
  coef1 = [math.sqrt(p) - math.sqrt(1 - p) / math.sqrt(1 / a - 1) for a, p in zip(ab, prev)]
  coef2 = [math.sqrt(1 - p) / math.sqrt(1 - a) for a, p in zip(ab, prev)]
  return np.array(indices), np.array(coef1), np.array(coef2)


@pytest.mark.parametrize('name', diffusion.SCHEDULES)
@pytest.mark.parametrize('timesteps', [2000, 37])
def test_schedules_match_numpy_transcription(name, timesteps):
  betas = diffusion.beta_schedule(name, timesteps)
  assert betas.shape == (timesteps,) and betas.dtype == np.float64
  np.testing.assert_allclose(betas, oracle_betas(name, timesteps), rtol=1e-12, atol=1e-15)
  s = diffusion.make_schedule(name, timesteps)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - oracle_betas(name, timesteps)),
                             rtol=1e-10)
  assert np.all((betas > 0) & (betas < 1))


def test_linear_alpha_bar_values_from_reference_spec():
  ab = diffusion.make_schedule('linear', 2000).alphas_cumprod
  assert ab[0] == pytest.approx(0.9999, rel=1e-12)
  assert ab[999] == pytest.approx(6.16e-3, rel=2e-3)
  assert ab[1999] == pytest.approx(1.63e-9, rel=2e-3)


def test_ddim_coefficients_from_reference_spec():
  s = diffusion.make_schedule('linear', 2000)
  steps = diffusion.ddim_steps(s, 100, reference_quirks=True)
  assert len(steps.coef1) == 21
  assert steps.coef1[20] == pytest.approx(6.8e-5, rel=1e-2)
  assert steps.coef2[20] == pytest.approx(1.0, abs=1e-6)
  assert steps.coef1[10] == pytest.approx(0.0487, rel=1e-3)
  assert steps.coef2[10] == pytest.approx(0.995, rel=1e-3)
  # The last step returns x0_hat itself.
  assert steps.coef1[0] == 1.0 and steps.coef2[0] == 0.0
  fed, coef1, coef2 = oracle_ddim(s.alphas_cumprod, 100)
  np.testing.assert_allclose(steps.coef1, coef1, rtol=1e-10)
  np.testing.assert_allclose(steps.coef2, coef2, rtol=1e-10)
  np.testing.assert_array_equal(steps.timesteps, fed)  # 0, 100, ..., 2000 (2000 never trained)


def test_ddim_fixed_timesteps_match_coefficient_index():
  s = diffusion.make_schedule('linear', 2000)
  fixed = diffusion.ddim_steps(s, 100)
  quirky = diffusion.ddim_steps(s, 100, reference_quirks=True)
  np.testing.assert_array_equal(fixed.timesteps, [0] + [100 * n - 1 for n in range(1, 21)])
  assert fixed.timesteps.max() == 1999  # Within the trained range.
  np.testing.assert_array_equal(fixed.timesteps, fixed.alpha_index)
  np.testing.assert_array_equal(fixed.coef1, quirky.coef1)  # Only the fed t differs.


def test_bad_schedule_arguments_raise():
  with pytest.raises(ValueError, match='beta_schedule'):
    diffusion.beta_schedule('quadratic')
  with pytest.raises(ValueError, match='timesteps'):
    diffusion.beta_schedule('linear', 1)
  with pytest.raises(ValueError, match='sampling_stride'):
    diffusion.ddim_steps(diffusion.make_schedule('linear', 100), 0)


def test_q_sample_formula():
  s = diffusion.make_schedule('linear', 2000)
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  t = np.array([0, 999, 1999])
  got = diffusion.q_sample(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                           jnp.asarray(noise, jnp.float32))
  ab = s.alphas_cumprod[t][:, None]
  np.testing.assert_allclose(got, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise, rtol=1e-5,
                             atol=1e-6)


def test_guidance_formula_and_mask():
  c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
  np.testing.assert_allclose(diffusion.guided_x0(c, u, 5.0), 6 * np.array([1, 2]) - 5 * np.array(
      [0.5, -1.0]))
  key = jax.random.key(0)
  assert float(diffusion.guidance_keep_mask(key, 64, 0.0).min()) == 1.0
  assert float(diffusion.guidance_keep_mask(key, 64, 1.0).max()) == 0.0
  keep = diffusion.guidance_keep_mask(key, 20000, 0.1)
  assert set(np.unique(np.asarray(keep))) <= {0.0, 1.0}
  assert float(keep.mean()) == pytest.approx(0.9, abs=0.01)


# ---- samplers ------------------------------------------------------------------------------
S_SMALL = diffusion.make_schedule('linear', 40)


def toy_denoiser(x, cond, t):
  """A denoiser that depends on x, c and t (so every input of the sampler matters)."""
  return 0.5 * x + cond - 0.01 * t[:, None].astype(x.dtype)


def oracle_ddim_sample(x_t, cond, uncond, w, schedule, stride, quirks):
  """float64 numpy DDIM loop with guidance."""
  fed, coef1, coef2 = oracle_ddim(schedule.alphas_cumprod, stride)
  if not quirks:
    fed = np.maximum(fed - 1, 0)
  x = np.asarray(x_t, np.float64)
  for n in reversed(range(len(fed))):
    f = lambda c: 0.5 * x + c - 0.01 * fed[n]
    x0 = (1 + w) * f(cond) - w * f(uncond)
    x = coef1[n] * x0 + coef2[n] * x
  return x


@pytest.mark.parametrize('quirks', [False, True])
@pytest.mark.parametrize('w', [0.0, 2.0])
def test_ddim_sample_matches_numpy_loop(quirks, w):
  cond = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
  uncond = jnp.array([0.3, -0.2, 0.1, 0.0])
  key = jax.random.key(7)
  steps = diffusion.ddim_steps(S_SMALL, 10, reference_quirks=quirks)
  got = diffusion.ddim_sample(toy_denoiser, cond, uncond, key, steps, w=w)
  x_t = diffusion.initial_noise(key, (3, 4))
  want = oracle_ddim_sample(x_t, np.asarray(cond), np.asarray(uncond), w, S_SMALL, 10, quirks)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ddim_with_fixed_x0_returns_it_exactly():
  x0 = jnp.array([[0.5, -1.25, 3.0], [2.0, 0.0, -0.75]])  # dyadic: guidance is exact.
  fixed = lambda x, c, t: jnp.tile(x0, (x.shape[0] // 2, 1))  # 2 rows, or 4 with guidance.
  steps = diffusion.ddim_steps(diffusion.make_schedule('linear', 2000), 100)
  for w in (0.0, 5.0):
    out = diffusion.ddim_sample(fixed, jnp.zeros((2, 3)), jnp.zeros((3,)), jax.random.key(3),
                                steps, w=w)
    np.testing.assert_array_equal(out, x0)


def test_guidance_inside_sampler():
  """With f = c, the sample is (1 + w) c - w none regardless of the noise."""
  cond = jnp.array([[1.0, 2.0], [-1.0, 0.5]])
  none = jnp.array([0.25, -0.5])
  steps = diffusion.ddim_steps(S_SMALL, 10)
  out = diffusion.ddim_sample(lambda x, c, t: c, cond, none, jax.random.key(0), steps, w=3.0)
  np.testing.assert_allclose(out, 4 * np.asarray(cond) - 3 * np.asarray(none), rtol=1e-6)


@pytest.mark.parametrize('sampler', ['ddim', 'ddpm'])
def test_sampler_determinism(sampler):
  cond = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)
  none = jnp.zeros((3,))

  def run(key, rows=None):
    c = cond if rows is None else cond[rows]
    if sampler == 'ddim':
      return diffusion.ddim_sample(toy_denoiser, c, none, key,
                                   diffusion.ddim_steps(S_SMALL, 10), w=1.0)
    return diffusion.ddpm_sample(toy_denoiser, c, none, key, S_SMALL, w=1.0)

  a, b = run(jax.random.key(11)), run(jax.random.key(11))
  np.testing.assert_array_equal(a, b)
  c = run(jax.random.key(12))
  assert np.all(np.abs(np.asarray(a) - np.asarray(c)) > 1e-6)
  # Per-row keys: a row's sample does not depend on the other rows of its batch.
  keys = jax.random.split(jax.random.key(11), 4)
  np.testing.assert_allclose(run(keys[2:], rows=slice(2, None)), a[2:], rtol=1e-6)


def test_ddpm_with_fixed_x0_converges_to_it():
  """The posterior mean at t = 0 is x0 exactly (variance 0), so a constant denoiser wins."""
  x0 = jnp.array([[0.5, -1.0]])
  out = diffusion.ddpm_sample(lambda x, c, t: jnp.broadcast_to(x0, x.shape), jnp.zeros((1, 2)),
                              jnp.zeros((2,)), jax.random.key(0), S_SMALL, w=0.0)
  np.testing.assert_allclose(out, x0, rtol=1e-6)


def test_row_keys_reject_wrong_count():
  with pytest.raises(ValueError, match='per-row keys'):
    diffusion.row_keys(jax.random.split(jax.random.key(0), 3), 4)


def test_timestep_features_reference_formula():
  t = np.array([0, 1, 1999])
  got = diffusion.timestep_features(jnp.asarray(t), 256)
  half = 128
  freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
  args = t[:, None] * freqs[None]
  np.testing.assert_allclose(got, np.concatenate([np.sin(args), np.cos(args)], -1), atol=2e-4)
  assert freqs[-1] == pytest.approx(1e-4)  # half - 1 in the denominator: the last freq is 1e-4.
