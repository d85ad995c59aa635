"""Diffusion for DreamRec: beta schedules, forward noising, DDIM and DDPM samplers with guidance.

A port of the authors' `models/diffusion.py` (reference-spec section 4.2). The denoiser predicts
x0 (not the noise), and classifier-free guidance mixes its conditional and unconditional
predictions: x0_hat = (1 + w) f(x_t, c, t) - w f(x_t, none, t).

Schedules are host constants computed in numpy float64 (the reference uses torch float32; our
values are the exact ones, cast to float32 where the model uses them). `Schedule` holds them.

DDIM (the reference's `sample_from_noise`, deterministic, eta = 0) visits the sub-sequence
n = S-1, ..., 0 of S = T // stride + 1 steps with alpha_bar index a_n = max(stride * n - 1, 0):
    x <- coef1[n] * x0_hat + coef2[n] * x,
    coef1 = sqrt(ab_prev) - sqrt(1 - ab_prev) / sqrt(1 / ab - 1),
    coef2 = sqrt(1 - ab_prev) / sqrt(1 - ab),
with ab = alpha_bar[a_n] and ab_prev = alpha_bar[a_{n-1}] (1 for n = 0), so the last step returns
x0_hat itself. The timestep fed to the denoiser is:
  * fixed (default): t_n = a_n, the same index as the coefficients, always within the trained
    range 0..T-1 (t = 1999 at the first step for T = 2000);
  * `reference_quirks=True`: t_n = stride * n as in the reference, i.e. t = 2000 at the first step
    (never seen in training, which draws t in 0..T-1) and off by one from the coefficient index
    everywhere else (reference-spec 7 #12). Only the fed t differs: the coefficients are the same.

Samplers take the denoiser as a function `denoise_fn(x_t [B, d], cond [B, c], t int32 [B]) ->
x0_hat [B, d]`, the condition and the "none" condition, an explicit key and run a
`jax.lax.fori_loop` with static shapes. Randomness is per row: a single key is split into one key
per row, or the caller passes the per-row keys [B] itself, so a row's sample does not depend on
the other rows of its batch (nor on how a batch is split over devices).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DenoiseFn = Callable[[Array, Array, Array], Array]

SCHEDULES = ('linear', 'cosine', 'exp', 'sqrt')
SAMPLERS = ('ddim', 'ddpm')
# Reference constants (reference-spec 4.2).
COSINE_OFFSET = 0.008
COSINE_CLIP = (1e-4, 0.9999)
EXP_BETA_MIN, EXP_BETA_MAX = 0.1, 10.0
SQRT_OFFSET, SQRT_MAX_BETA = 1e-4, 0.999


# ---- schedules -----------------------------------------------------------------------------
def beta_schedule(name: str = 'linear', timesteps: int = 2000, *, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> np.ndarray:
  """The reference's beta_t for t = 0..T-1, float64 [T].

  linear: torch.linspace(beta_start, beta_end, T).
  cosine: alpha_bar(x) = cos((x / T + s) / (1 + s) * pi / 2)^2 at x = 0..T (s = 0.008), normalised
    by alpha_bar(0); beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), clipped to [1e-4, 0.9999].
  exp: x = linspace(1, 2T + 1, T); beta = 1 - exp(-b_min / T - x (b_max - b_min) / (2 T^2)) with
    b_min 0.1, b_max 10 (beta_start/beta_end are ignored, as in the reference).
  sqrt: alpha_bar(u) = 1 - sqrt(u + 1e-4) at u = t / T; beta_t = min(1 - alpha_bar((t+1)/T) /
    alpha_bar(t/T), 0.999).
  """
  if name not in SCHEDULES:
    raise ValueError(f'Unknown beta schedule {name!r} (config.diffusion.beta_schedule); use one of '
                     f'{SCHEDULES}.')
  if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps < 2:
    raise ValueError(f'config.diffusion.timesteps={timesteps!r} must be an int >= 2.')
  t = int(timesteps)
  if name == 'linear':
    if not 0.0 < beta_start <= beta_end < 1.0:
      raise ValueError(f'Linear schedule needs 0 < beta_start <= beta_end < 1, got '
                       f'{beta_start}, {beta_end} (config.diffusion.beta_start/beta_end).')
    return np.linspace(beta_start, beta_end, t, dtype=np.float64)
  if name == 'cosine':
    x = np.linspace(0.0, t, t + 1, dtype=np.float64)
    alpha_bar = np.cos((x / t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], *COSINE_CLIP)
  if name == 'exp':
    x = np.linspace(1.0, 2 * t + 1, t, dtype=np.float64)
    return 1.0 - np.exp(-EXP_BETA_MIN / t - x * 0.5 * (EXP_BETA_MAX - EXP_BETA_MIN) / (t * t))
  u = np.arange(t + 1, dtype=np.float64) / t
  alpha_bar = 1.0 - np.sqrt(u + SQRT_OFFSET)
  return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], SQRT_MAX_BETA)


class Schedule(NamedTuple):
  """Per-timestep constants, float64 numpy [T] each (read-only).

  alphas_cumprod_prev[t] = alpha_bar[t-1] (1 at t = 0); the posterior q(x_{t-1} | x_t, x0) has mean
  posterior_mean_coef1 * x0 + posterior_mean_coef2 * x_t and variance posterior_variance.
  """
  betas: np.ndarray
  alphas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  posterior_variance: np.ndarray

  @property
  def timesteps(self) -> int:
    return self.betas.shape[0]


@functools.lru_cache(maxsize=16)
def make_schedule(name: str = 'linear', timesteps: int = 2000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> Schedule:
  """All constants of a schedule (cached: modules rebuild it on every `apply`)."""
  betas = beta_schedule(name, timesteps, beta_start=beta_start, beta_end=beta_end)
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
  fields = dict(
      betas=betas, alphas=alphas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
      posterior_variance=betas * (1.0 - prev) / (1.0 - alphas_cumprod))
  for value in fields.values():
    value.setflags(write=False)
  return Schedule(**fields)


class DDIMSteps(NamedTuple):
  """The DDIM sub-sequence, indexed by n = 0..S-1 (sampling runs n = S-1 down to 0).

  Attributes:
    timesteps: int32 [S] the t fed to the denoiser at step n.
    alpha_index: int32 [S] a_n = max(stride * n - 1, 0), the alpha_bar index of step n.
    coef1, coef2: float64 [S] x <- coef1[n] * x0_hat + coef2[n] * x.
  """
  timesteps: np.ndarray
  alpha_index: np.ndarray
  coef1: np.ndarray
  coef2: np.ndarray


def ddim_steps(schedule: Schedule, stride: int = 100, *,
               reference_quirks: bool = False) -> DDIMSteps:
  """The reference's DDIM indices and coefficients (`linespace` = stride); see the module doc."""
  t = schedule.timesteps
  if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride <= t:
    raise ValueError(f'config.diffusion.sampling_stride={stride!r} must be an int in 1..{t} '
                     '(the reference linespace is 100).')
  fed = np.arange(0, t + 1, int(stride), dtype=np.int64)  # [0, 100, ..., 2000]
  alpha_index = np.maximum(fed - 1, 0)
  alpha_bar = schedule.alphas_cumprod[alpha_index]
  alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
  coef1 = np.sqrt(alpha_bar_prev) - np.sqrt(1.0 - alpha_bar_prev) / np.sqrt(1.0 / alpha_bar - 1.0)
  coef2 = np.sqrt(1.0 - alpha_bar_prev) / np.sqrt(1.0 - alpha_bar)
  timesteps = fed if reference_quirks else alpha_index
  return DDIMSteps(timesteps.astype(np.int32), alpha_index.astype(np.int32), coef1, coef2)


# ---- training-side pieces ---------------------------------------------------------------------
def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """Forward noising x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

  Args:
    schedule: the schedule constants.
    x0: [B, d] clean vectors.
    t: int [B] timesteps in 0..T-1.
    noise: [B, d] standard normal noise.
  Returns:
    [B, d] in x0's dtype.
  """
  a = jnp.asarray(schedule.sqrt_alphas_cumprod, x0.dtype)[t][:, None]
  b = jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod, x0.dtype)[t][:, None]
  return a * x0 + b * noise


def sample_timesteps(key: Array, batch: int, timesteps: int) -> Array:
  """t ~ U{0..T-1} per example, int32 [batch] (the reference's torch.randint(0, T))."""
  return jax.random.randint(key, (batch,), 0, timesteps, dtype=jnp.int32)


def guidance_keep_mask(key: Array, batch: int, p_uncond: float) -> Array:
  """The reference's classifier-free-guidance mask (sign(U(0,1) - p) + 1) / 2, float32 [batch].

  1 keeps the condition (probability 1 - p), 0 replaces it by the "none" embedding.
  """
  u = jax.random.uniform(key, (batch,), jnp.float32)
  return (jnp.sign(u - p_uncond) + 1.0) / 2.0


def guided_x0(x0_cond: Array, x0_uncond: Array, w: float | Array) -> Array:
  """Classifier-free guidance: (1 + w) f(x, c, t) - w f(x, none, t)."""
  return (1.0 + w) * x0_cond - w * x0_uncond


# ---- samplers ------------------------------------------------------------------------------
def row_keys(key: Array, batch: int) -> Array:
  """One key per row: split a single key, or pass per-row keys [batch] through."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  single = key.ndim == (0 if typed else 1)
  if single:
    return jax.random.split(key, batch)
  if key.shape[0] != batch:
    raise ValueError(f'Got {key.shape[0]} per-row keys for a batch of {batch} rows; pass one key '
                     'or exactly one key per row.')
  return key


def initial_noise(key: Array, shape: tuple[int, int], dtype=jnp.float32) -> Array:
  """x_T ~ N(0, I) [B, d], row b drawn from row_keys(key, B)[b] (what the samplers start from)."""
  keys = row_keys(key, shape[0])
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


def _guided_denoiser(denoise_fn: DenoiseFn, cond: Array, uncond: Array,
                     w: float | Array) -> Callable[[Array, Array], Array]:
  """x0_hat(x, t) with guidance; both branches run as one denoiser call on 2B rows."""
  batch = cond.shape[0]
  uncond = jnp.broadcast_to(uncond, cond.shape).astype(cond.dtype)
  skip_uncond = isinstance(w, (int, float)) and w == 0

  def x0_hat(x: Array, t: Array) -> Array:
    t = jnp.broadcast_to(t, (batch,)).astype(jnp.int32)
    if skip_uncond:  # w = 0: plain conditional prediction, half the work.
      return denoise_fn(x, cond, t)
    both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([cond, uncond]),
                      jnp.concatenate([t, t]))
    return guided_x0(both[:batch], both[batch:], w)

  return x0_hat


def ddim_sample(denoise_fn: DenoiseFn, cond: Array, uncond: Array, key: Array, steps: DDIMSteps,
                *, w: float | Array = 5.0, dim: int | None = None) -> Array:
  """Deterministic DDIM from x_T ~ N(0, I) with classifier-free guidance (the reference sampler).

  Args:
    denoise_fn: (x_t [B, d], cond [B, c], t int32 [B]) -> x0_hat [B, d].
    cond: [B, c] conditions.
    uncond: [c] or [B, c] the "none" condition.
    key: one key, or per-row keys [B]; only x_T is random.
    steps: from `ddim_steps` (fixed or reference-compatible timesteps).
    w: guidance weight (reference 5.0); 0 disables the unconditional branch.
    dim: width d of x (default c).
  Returns:
    [B, d] the generated x0.
  """
  batch = cond.shape[0]
  x = initial_noise(key, (batch, dim or cond.shape[-1]), cond.dtype)
  x0_hat = _guided_denoiser(denoise_fn, cond, uncond, w)
  timesteps = jnp.asarray(steps.timesteps)
  coef1 = jnp.asarray(steps.coef1, x.dtype)
  coef2 = jnp.asarray(steps.coef2, x.dtype)
  last = len(steps.timesteps) - 1

  def body(i, x):
    n = last - i
    return coef1[n] * x0_hat(x, timesteps[n]) + coef2[n] * x

  return jax.lax.fori_loop(0, last + 1, body, x)


def ddpm_sample(denoise_fn: DenoiseFn, cond: Array, uncond: Array, key: Array,
                schedule: Schedule, *, w: float | Array = 5.0, dim: int | None = None) -> Array:
  """Ancestral DDPM sampling over all T steps (the reference's unused `p_sample`).

  x <- posterior_mean_coef1[t] x0_hat + posterior_mean_coef2[t] x + sqrt(posterior_variance[t]) z
  for t = T-1..0 (the variance is exactly 0 at t = 0). Row b's x_T and its noise z at step t come
  from row_keys(key, B)[b] (x_T as in `initial_noise`, z from fold_in(fold_in(row key, 1), t)).
  Args and returns as `ddim_sample`.
  """
  batch = cond.shape[0]
  keys = row_keys(key, batch)
  d = dim or cond.shape[-1]
  x = initial_noise(keys, (batch, d), cond.dtype)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
  x0_hat = _guided_denoiser(denoise_fn, cond, uncond, w)
  c1 = jnp.asarray(schedule.posterior_mean_coef1, x.dtype)
  c2 = jnp.asarray(schedule.posterior_mean_coef2, x.dtype)
  sigma = jnp.asarray(np.sqrt(schedule.posterior_variance), x.dtype)
  total = schedule.timesteps

  def body(i, x):
    t = total - 1 - i
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), (d,), x.dtype))(step_keys)
    return c1[t] * x0_hat(x, t) + c2[t] * x + sigma[t] * z

  return jax.lax.fori_loop(0, total, body, x)


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """The reference's sinusoidal timestep features [..., dim] for t [...].

  half = dim // 2, freqs_k = exp(-ln(max_period) k / (half - 1)) for k = 0..half-1 (note half - 1,
  not half as in DiT), features [sin(t f), cos(t f)], a zero column appended when dim is odd.
  """
  half = dim // 2
  if half < 2:
    raise ValueError(f'Timestep feature size {dim} must be >= 4.')
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  features = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    features = jnp.concatenate([features, jnp.zeros_like(features[..., :1])], axis=-1)
  return features
