"""DreamRec (guided diffusion) on MovieLens-1M cold-start users; the item pipeline is the argument.

Commands:
  python -m alphafuse_jax.main --config=configs/dreamrec.py:alphafuse --workdir=workdirs/dream_af
  python -m alphafuse_jax.main --config=configs/dreamrec.py:id --workdir=workdirs/dream_id
  python -m alphafuse_jax.main --config=configs/dreamrec.py:idreamrec --workdir=workdirs/dream_idr
  (also :morec, :whitenrec, :unisrec, :llminit, :rlmrec, :llmesr)
Measured on this 2-core CPU (loaded by other jobs), batch 256: a train step takes 108 ms at
h = 384 (3,146 steps, ~5.7 min per epoch) and 21 ms at h = 128 (~1.1 min per epoch); generating
and ranking 1,024 validation rows (21 DDIM steps, 42 denoiser calls) takes 0.82 s at h = 384
(~75 s per validation pass of 90,872 rows). A 400-step probe at lr 1e-3 reached val NDCG@20 0.026
(AlphaFuse, 4,096 val rows) against 0.006 at lr 1e-4.
Measured 2026-11-30, 1 epoch, seed 22 (BENCHMARKS.md): AlphaFuse (h = 384) test NDCG@20 0.0492
(not reproduced: 0.0639 on 2026-12-01 with the same command, at that commit and at today's);
'id' 0.0003 at h = 384 and 0.0001 at h = 128: a trainable ID table collapses through its own
diffusion target at lr 1e-3 (train loss 0.005 and val NDCG@20 0.0000 by epoch 5), and at lr 1e-4
it is still at the random level (0.0025) after one epoch.

AlphaFuse in the full language dimension (reference-spec 2.2, README DreamRec command):
  * hidden_dim = d_l (384 for MiniLM): every direction is kept and whitened; the ID is ADDED to
    the n smallest-eigenvalue directions, n = #{eigenvalues <= null_threshold}.
  * null_threshold 0.25, the authors' value for OpenAI text-embedding-3 vectors scaled by 40.
    MiniLM vectors, like OpenAI's, are unit-norm, so after the same x40 scaling every vector has
    squared norm 1600 and eigenvalues are in the same units for both encoders (a share of the
    per-item energy; the covariance trace is 1600 (1 - |mean|^2) = 982 for MiniLM on ML-1M).
    The same absolute level 0.25 = 1.6e-4 of the energy therefore carries over unchanged. On the
    ML-1M MiniLM spectrum (float64, lambda_max 59.6, mean 2.56, median 0.97) it gives nullity 111
    of 384 (29% of the directions, 1.2% of the variance). Matching the share of directions
    instead would need the OpenAI spectrum, which is not available offline; the alternatives
    measured here are 0.5 -> 146 (38%, 2.4% of the variance) and 1.0 -> 195 (51%, 6.0%).
  * eigenvalue_floor 1e-3: MiniLM on ML-1M has three numerically-zero eigenvalues (1.6e-15,
    1.6e-16, 4.7e-17, i.e. below 1 eps x lambda_max); whitening by them would blow pure round-off
    up by ~1e8 into unit-variance noise. The floor sits 14x below the smallest genuine eigenvalue
    (1.39e-2), so every genuine direction is whitened exactly, and 1e12x above the zeros, whose
    directions then come out with std <= 1.3e-6 (no language signal; measured): they lie in the
    null space, where the ID alone fills them. The same floor serves the fully-whitened tables
    of iDreamRec and WhitenRec.

Baselines: every language pipeline uses h = d_l = 384 as the reference does (its --hidden_dim is the
language width). 'id' uses h = 128 by default: 5x cheaper per step on this CPU, and the width of
the SASRec configs; pass --config.embedding.hidden_dim=384 for the like-for-like width. The
reference's DreamRec script never adds the RLMRec / LLM-ESR auxiliary losses (reference-spec 7
#17), so aux_weight is 0 here.
"""

import os
import sys

from ml_collections import config_dict

# Config files are loaded by path; make `configs` (and a checkout's `alphafuse_jax`) importable
# from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alphafuse_jax.embeddings import registry  # pylint: disable=g-import-not-at-top
from configs import default as _default  # pylint: disable=g-import-not-at-top

# The model types of the authors' train_diffusion.py (--model_type), by our pipeline names: the
# registry's DreamRec pipelines (the eight SASRec ones and 'idreamrec').
PIPELINES = registry.pipelines_for('dreamrec')
# d_l of the default text encoder (all-MiniLM-L6-v2).
MINILM_DIM = 384


def get_diffusion_config() -> config_dict.ConfigDict:
  """The `diffusion` section: schedule, sampler and guidance (reference-spec 4.2)."""
  diffusion = config_dict.ConfigDict()
  # Diffusion steps T (reference --timesteps 2000); training draws t ~ U{0..T-1}.
  diffusion.timesteps = 2000
  # 'linear' (reference default), 'cosine' (s = 0.008), 'exp' (beta 0.1..10) or 'sqrt'.
  diffusion.beta_schedule = 'linear'
  # First beta of the linear schedule (reference --beta_start).
  diffusion.beta_start = 1e-4
  # Last beta of the linear schedule (reference --beta_end).
  diffusion.beta_end = 0.02
  # 'ddim' (the reference's deterministic sampler) or 'ddpm' (T ancestral steps; slow).
  diffusion.sampler = 'ddim'
  # DDIM stride (reference --linespace 100): T / stride + 1 = 21 steps, 42 denoiser calls.
  diffusion.sampling_stride = 100
  # Classifier-free guidance weight w: x0 = (1 + w) f(x, c, t) - w f(x, none, t) (reference 5).
  diffusion.guidance_weight = 5.0
  # True feeds the DDIM denoiser t = stride * n as the reference does (t = 2000, never trained,
  # at the first step, and off by one from the coefficients); False feeds the coefficient index.
  diffusion.reference_quirks = False
  # Seed of the FIXED evaluation key that draws x_T, folded with each row's index in the split,
  # so validation/test metrics are reproducible (the reference redraws x_T every evaluation).
  diffusion.eval_seed = 0
  return diffusion


def get_config(pipeline: str = 'alphafuse') -> config_dict.ConfigDict:
  """DreamRec (guided diffusion) with the item pipeline `pipeline`, the reference's settings.

  Command (PIPELINE: any of `PIPELINES`, e.g. alphafuse, id, idreamrec):
    python -m alphafuse_jax.main --config=configs/dreamrec.py:PIPELINE --workdir=workdirs/dream
  Expected (1 epoch): test NDCG@20 0.0656 +- 0.0018 over seeds 22-24 for AlphaFuse (h = 384;
  seed 22: 0.0639; measured 2026-12-01; the published 0.0492 of 2026-11-30 does not reproduce),
  0.0003 for 'id' (seed 22, 2026-11-30). Runtime on this 2-core CPU: ~5.7 minutes an epoch at h = 384 (~1.1 at h = 128)
  plus ~75 s per validation pass.

  Args:
    pipeline: config.embedding.pipeline; one of `PIPELINES`.
  """
  if pipeline not in PIPELINES:
    raise ValueError(f'dreamrec.py:{pipeline}: the pipeline must be one of {PIPELINES}.')
  config = _default.get_config()
  # The diffusion section exists only in DreamRec configs (get_diffusion_config).
  config.diffusion = get_diffusion_config()

  # Item embeddings: the pipeline of the argument.
  config.embedding.pipeline = pipeline
  # Width h = d_l for every language pipeline (reference); 128 for 'id' (see the docstring).
  config.embedding.hidden_dim = 128 if pipeline == 'id' else MINILM_DIM
  # The nullity comes from the threshold (it wins over null_dim, which is then unused).
  config.embedding.null_threshold = 0.25
  # Clamp for whitening the three numerically-zero MiniLM eigenvalues; see the docstring.
  config.embedding.eigenvalue_floor = 1e-3
  # The reference DreamRec's --ID_embs_init_type default (its README does not override it).
  config.embedding.id_init = 'normal'
  # LLM-ESR's DreamRec adapter: d_l -> (d_l + h) // 2 -> h.
  config.embedding.adapter_hidden_dim = (MINILM_DIM + config.embedding.hidden_dim) // 2
  # The reference DreamRec never adds the RLMRec / LLM-ESR auxiliary losses.
  config.embedding.aux_weight = 0.0

  # The DreamRec backbone.
  config.model.backbone = 'dreamrec'
  # The condition encoder is always the authors' reference block layout.
  config.model.block = 'reference'
  # One encoder block (the authors').
  config.model.num_blocks = 1
  # One attention head (the authors').
  config.model.num_heads = 1
  # Encoder dropout (embeddings, attention probabilities, FFN output).
  config.model.dropout_rate = 0.1
  # Denoiser: 'linear' (reference: one Linear(3h -> h) over [x_t, c, t_emb]) or 'mlp'.
  config.model.denoiser = 'linear'
  # Hidden width of the 'mlp' denoiser; None = 2h (upstream DreamRec's mlp2).
  config.model.mlp_hidden_dim = config_dict.placeholder(int)
  # Probability of training a row with the "none" condition (reference --dropout_prob 0.1).
  config.model.p_uncond = 0.1

  # Training (reference-spec 4.3): torch AdamW ...
  config.train.optimizer = 'adamw'
  # ... with weight decay 0, i.e. plain Adam.
  config.train.l2 = 0.0
  # lr 1e-3 is the reference flag default; its README's 1e-5 is for 3072-wide models trained up
  # to 1000 epochs, far beyond a CPU budget (see the probe in the docstring).
  config.train.learning_rate = 1e-3
  # The reference's batch size.
  config.train.batch_size = 256
  # No shuffling: the reference's DataLoader order.
  config.train.shuffle = False
  # A CPU budget (the reference trains up to 1000 epochs).
  config.train.num_epochs = 10
  # Evaluations without improvement of val NDCG@20 before stopping (reference: 50 evaluations
  # of every 5th epoch over up to 1000 epochs).
  config.train.patience = 5
  # Validate every this many epochs (reference 5); 1 here because runs are short.
  config.eval.every_epochs = 1
  # Generation is 42 denoiser calls per row: smaller eval batches bound the memory.
  config.eval.batch_size = 1024
  return config
