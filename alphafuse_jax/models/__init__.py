"""Sequence backbones behind one training contract (`base.Recommender`).

  base.py      the contract: scores, per-row loss, auxiliary terms, init_all
  layers.py    transformer blocks (the authors' reference block and Kang & McAuley's standard one)
  sasrec.py    SASRec; llmesr.py LLM-ESR's dual-view SASRec; dreamrec.py DreamRec
"""

from alphafuse_jax.models.base import Recommender
from alphafuse_jax.models.base import rng_streams
from alphafuse_jax.models.sasrec import BLOCK_STYLES
from alphafuse_jax.models.sasrec import SASRec
from alphafuse_jax.models.sasrec import last_nonpad_index

__all__ = ['BLOCK_STYLES', 'Recommender', 'SASRec', 'last_nonpad_index', 'rng_streams']
