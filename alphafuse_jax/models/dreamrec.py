"""DreamRec: a guided diffusion model that generates the next item's embedding from a history.

The authors' `models/backbone_DreamRec.py` (reference-spec section 4.1):
  * condition c [B, h]: the SASRec reference encoder (item embedding + N(0,1) positions, dropout,
    pad mask, one reference block) at the last non-pad position; we reuse `SASRec` itself, so
    the preprocessing is exactly SASRec's reference path;
  * classifier-free guidance: in training each row's c is replaced, with probability p_uncond,
    by a learned "none" embedding (N(0, 1) init), using the reference mask (sign(U - p) + 1) / 2;
  * timestep embedder: 256 sinusoidal features -> Linear(256, h) -> exact GELU -> Linear(h, h);
  * denoiser f(x_t, c, t) predicting x0: 'linear' = the reference's single Linear(3h -> h) over
    concat[x_t, c, t_emb]; 'mlp' = upstream DreamRec's Linear(3h -> 2h) -> GELU -> Linear(2h -> h);
  * loss: per-example MSE(x0, f(x_t, c, t)) averaged over h, with x0 = item_embedding(target),
    so gradients reach the ID table (and adapters) through the target (reference-spec 7 #14);
  * generation: DDIM from x_T ~ N(0, I) with guidance weight w; scores = x0_hat . item table.

Randomness is explicit: `loss` and `generate` take a key. `generate`'s key only draws x_T, so a
FIXED evaluation key (passed by the caller, e.g. fold_in(eval_key, global row index) per row)
makes validation metrics reproducible, unlike the reference's fresh randn per evaluation
(reference-spec 7 #13). Dropout uses the usual 'dropout' rng stream.

The item embedding is any module with the interface described in `sasrec.py`; its width
h = item_embedding.features is the model width (x, c and t_emb all have width h; for LLM-ESR
that is 2h, so its timestep embedding is 2h wide where the reference's is h).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from alphafuse_jax import diffusion
from alphafuse_jax.models import base
from alphafuse_jax.models import layers
from alphafuse_jax.models.sasrec import SASRec

Array = jax.Array

DENOISERS = ('linear', 'mlp')


class TimestepEmbedder(nn.Module):
  """Sinusoidal features of t -> Linear -> exact GELU -> Linear (the reference's step_mlp).

  Attributes:
    features: output width h.
    frequency_size: number of sinusoidal features (reference 256).
  """
  features: int
  frequency_size: int = 256

  @nn.compact
  def __call__(self, t: Array) -> Array:
    """t int [B] -> [B, features]."""
    x = diffusion.timestep_features(t, self.frequency_size)
    x = layers.TorchDense(self.features, name='linear_1')(x)
    x = nn.gelu(x, approximate=False)  # torch nn.GELU(): exact erf.
    return layers.TorchDense(self.features, name='linear_2')(x)


class Denoiser(nn.Module):
  """x0_hat = f(concat[x_t, c, t_emb]) [B, h].

  Attributes:
    features: output width h.
    kind: 'linear' (reference FinalLayer: Linear(3h -> h)) or 'mlp' (Linear(3h -> hidden) ->
      exact GELU -> Linear(hidden -> h)).
    mlp_hidden_dim: hidden width of 'mlp' (None: 2h, upstream DreamRec's 'mlp2').
  """
  features: int
  kind: str = 'linear'
  mlp_hidden_dim: int | None = None

  @nn.compact
  def __call__(self, x_t: Array, cond: Array, t_emb: Array) -> Array:
    y = jnp.concatenate([x_t, cond, t_emb], axis=-1)
    if self.kind == 'linear':
      return layers.TorchDense(self.features, name='linear')(y)
    hidden = self.mlp_hidden_dim or 2 * self.features
    y = nn.gelu(layers.TorchDense(hidden, name='mlp_1')(y), approximate=False)
    return layers.TorchDense(self.features, name='mlp_2')(y)


class DreamRec(base.Recommender):
  """DreamRec over an item-embedding submodule.

  Attributes:
    item_embedding: the item-embedding module (pad id = item_embedding.num_items = N).
    max_len: history length L; inputs must be exactly [batch, L].
    num_blocks: reference blocks in the condition encoder (the authors always use 1).
    num_heads: attention heads (h must be divisible by it).
    dropout_rate: encoder dropout (embeddings, attention probabilities, FFN output).
    p_uncond: probability of training a row unconditionally (reference --dropout_prob 0.1).
    denoiser: 'linear' (reference) or 'mlp'.
    mlp_hidden_dim: hidden width of the 'mlp' denoiser (None: 2h).
    timesteps: T (reference 2000).
    beta_schedule: 'linear', 'cosine', 'exp' or 'sqrt'.
    beta_start, beta_end: linear schedule ends (reference 1e-4, 0.02).
    sampling_stride: DDIM stride (reference --linespace 100: 21 steps for T = 2000).
    guidance_weight: default w of `generate` (reference 5.0).
    sampler: default sampler of `generate`: 'ddim' (reference) or 'ddpm' (T ancestral steps).
    reference_quirks: feed the DDIM denoiser t = stride * n (t = T at the first step, off by one
      from the coefficients) as the reference does; False feeds the coefficient index.
    frequency_size: sinusoidal timestep features (reference 256).
    eval_seed: seed of the evaluation noise: row r of a split always starts from the x_T of
      fold_in(key(eval_seed), r), so every evaluation of a row draws the same noise.
  """
  item_embedding: nn.Module
  max_len: int
  num_blocks: int = 1
  num_heads: int = 1
  dropout_rate: float = 0.1
  p_uncond: float = 0.1
  denoiser: str = 'linear'
  mlp_hidden_dim: int | None = None
  timesteps: int = 2000
  beta_schedule: str = 'linear'
  beta_start: float = 1e-4
  beta_end: float = 0.02
  sampling_stride: int = 100
  guidance_weight: float = 5.0
  sampler: str = 'ddim'
  reference_quirks: bool = False
  frequency_size: int = 256
  eval_seed: int = 0

  def setup(self):
    hidden = self.item_embedding.features
    if self.denoiser not in DENOISERS:
      raise ValueError(f'Unknown denoiser {self.denoiser!r} (config.model.denoiser); use one of '
                       f'{DENOISERS}.')
    if self.sampler not in diffusion.SAMPLERS:
      raise ValueError(f'Unknown sampler {self.sampler!r} (config.diffusion.sampler); use one of '
                       f'{diffusion.SAMPLERS}.')
    if not 0.0 <= self.p_uncond <= 1.0:
      raise ValueError(f'config.model.p_uncond must be in [0, 1], got {self.p_uncond}.')
    # Validates the schedule and stride at construction, with the config field in the message.
    self.schedule = diffusion.make_schedule(self.beta_schedule, self.timesteps, self.beta_start,
                                            self.beta_end)
    self.ddim = diffusion.ddim_steps(self.schedule, self.sampling_stride,
                                     reference_quirks=self.reference_quirks)
    # The condition encoder: SASRec's reference path (it validates heads, dropout and max_len).
    self.encoder = SASRec(self.item_embedding, self.max_len, block='reference',
                          num_blocks=self.num_blocks, num_heads=self.num_heads,
                          dropout_rate=self.dropout_rate)
    # torch nn.Embedding(1, h) with nn.init.normal_(0, 1).
    self.none_embedding = self.param('none_embedding', nn.initializers.normal(1.0), (hidden,))
    self.step_embedder = TimestepEmbedder(hidden, self.frequency_size)
    self.denoise_net = Denoiser(hidden, self.denoiser, self.mlp_hidden_dim)

  @property
  def num_items(self) -> int:
    return self.item_embedding.num_items

  @property
  def features(self) -> int:
    return self.item_embedding.features

  def condition(self, history: Array, *, deterministic: bool) -> Array:
    """The guidance condition c [B, h]: the encoder state at the last non-pad position."""
    return self.encoder(history, deterministic=deterministic)

  def __call__(self, history: Array, *, deterministic: bool) -> Array:
    """The condition c [B, h] (like SASRec's user state)."""
    return self.condition(history, deterministic=deterministic)

  # ---- the training contract (models/base.py) ---------------------------------------------------
  def init_all(self, history: Array) -> Array:
    """The base's `init_all` plus one denoiser call, so `init` creates every parameter."""
    cond = self(history, deterministic=True)
    self.denoise(jnp.zeros_like(cond), cond, jnp.zeros(cond.shape[:1], jnp.int32))
    return super().init_all(history)

  @staticmethod
  def split_example_key(key: Array) -> tuple[dict[str, Array], Array]:
    """The row's model key splits into its dropout streams and its diffusion key (t, noise, mask)."""
    model_key, _ = jax.random.split(key)
    dropout_key, diffusion_key = jax.random.split(model_key)
    return base.rng_streams(dropout_key), diffusion_key

  def train_table(self) -> Array | None:
    return None  # x0 is the target's own embedding: no table in the loss.

  def example_loss(self, history: Array, target: Array, mask: Array, key: Array,
                   table: Array | None) -> tuple[Array, Array]:
    """The diffusion loss of one row (see `loss`); gradients reach the table through x0."""
    del table
    target = jnp.where(mask, target, 0)  # A padding row points at item 0 (weight 0).
    loss = self.loss(history[None], target[None], key, deterministic=False)[0]
    return loss, mask.astype(jnp.float32)

  def ranking_states(self, history: Array, index: Array) -> Array:
    """The generated next-item embeddings [B, h], each row's noise from its split index."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(self.eval_seed), index)
    return self.generate(history, keys)

  def denoise(self, x_t: Array, cond: Array, t: Array) -> Array:
    """f(x_t, c, t): the predicted x0 [B, h] for x_t [B, h], c [B, h] and int t [B]."""
    return self.denoise_net(x_t, cond, self.step_embedder(t))

  def loss(self, history: Array, targets: Array, key: Array, *, deterministic: bool) -> Array:
    """Per-example diffusion loss [B]: mean over h of (x0 - f(x_t, c~, t))^2.

    x0 = item_embedding(targets); t ~ U{0..T-1}; x_t = q_sample(x0, t, eps); c~ is c with each
    row replaced by the none embedding with probability p_uncond (always applied here: it is
    the objective, not a regulariser). `key` draws t, eps and the guidance mask; dropout uses
    the 'dropout' rng stream when deterministic=False.

    Args:
      history: int [B, L] item ids, pad = N.
      targets: int [B] target item ids in 0..N-1.
      key: a PRNG key.
    Returns:
      float32 [B]; the reference's loss is its mean.
    """
    t_key, noise_key, mask_key = jax.random.split(key, 3)
    batch = history.shape[0]
    cond = self.condition(history, deterministic=deterministic)
    keep = diffusion.guidance_keep_mask(mask_key, batch, self.p_uncond)[:, None]
    cond = cond * keep + self.none_embedding[None, :] * (1.0 - keep)
    x0 = self.item_embedding(targets, deterministic=deterministic)
    t = diffusion.sample_timesteps(t_key, batch, self.timesteps)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(self.schedule, x0, t, noise)
    return jnp.mean(jnp.square(x0 - self.denoise(x_t, cond, t)), axis=-1)

  def generate(self, history: Array, key: Array, *, w: float | Array | None = None,
               sampler: str | None = None) -> Array:
    """The generated next-item embedding x0_hat [B, h] (eval mode: no dropout, no masking).

    Args:
      history: int [B, L] item ids, pad = N.
      key: one key or per-row keys [B]; it draws x_T (and DDPM's noise) only. Pass a fixed key
        for reproducible evaluation.
      w: guidance weight (default `guidance_weight`).
      sampler: 'ddim' (default `sampler`) or 'ddpm'.
    """
    w = self.guidance_weight if w is None else w
    sampler = sampler or self.sampler
    cond = self.condition(history, deterministic=True)
    if sampler == 'ddim':
      return diffusion.ddim_sample(self.denoise, cond, self.none_embedding, key, self.ddim, w=w)
    if sampler == 'ddpm':
      return diffusion.ddpm_sample(self.denoise, cond, self.none_embedding, key, self.schedule,
                                   w=w)
    raise ValueError(f'Unknown sampler {sampler!r}; use one of {diffusion.SAMPLERS}.')
