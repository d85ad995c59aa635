"""Data layer: sources -> protocol split -> TFDS cache -> numpy batches (no jax, no flax).

  ds = data.load(config.data)   # prepares into the cache once, then reads it
  for batch in data.batches(ds.splits['train'], 256, seed=0, epoch=0, shuffle=True): ...
"""

from alphafuse_jax.data.pipeline import batches
from alphafuse_jax.data.pipeline import epoch_order
from alphafuse_jax.data.pipeline import num_batches
from alphafuse_jax.data.pipeline import seen_items
from alphafuse_jax.data.protocols import PreparedDataset
from alphafuse_jax.data.sources import DataError
from alphafuse_jax.data.sources import DataFileNotFoundError
from alphafuse_jax.data.tfds_builder import build
from alphafuse_jax.data.tfds_builder import load

__all__ = ['batches', 'build', 'DataError', 'DataFileNotFoundError', 'epoch_order', 'load',
           'num_batches', 'PreparedDataset', 'seen_items']
