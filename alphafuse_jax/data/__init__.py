"""Data layer: sources -> protocol split -> TFDS cache -> numpy batches (no jax, no flax).

  ds = data.load(config.data)   # prepares into the cache once (atomically), then reads it
  ds.num_items, ds.max_len      # N (pad id = N, items 0..N-1) and L
  ds.item_keys, ds.item_fields  # index -> original key / {'title', 'year', 'genres'}
  ds.user_keys                  # user_id -> original user key (sorted keys, see protocols)
  ds.train_item_counts          # int64 [N], interactions per item in the train split
  ds.splits[split]              # {'user_id', 'position', 'target': int32 [n], 'history': [n, L]}
  ds.user_sequences             # (indptr int64 [U+1], items int32 [nnz]), chronological
  ds.stats()                    # {'num_items', 'splits': {split: {'users', 'examples'}}}
  data.seen_items(ds, split)    # CSR (indptr, items) of sequence[:position] per example row
  for batch in data.batches(ds.splits['train'], 256, seed=0, epoch=0, shuffle=True): ...

Readers live in sources.py, the cold-start and leave-one-out splits in protocols.py, the TFDS
builder and cache in tfds_builder.py, batching in pipeline.py.
"""

from alphafuse_jax.data import synthetic
from alphafuse_jax.data.pipeline import batches
from alphafuse_jax.data.pipeline import epoch_order
from alphafuse_jax.data.pipeline import num_batches
from alphafuse_jax.data.pipeline import seen_items
from alphafuse_jax.data.protocols import PreparedDataset
from alphafuse_jax.data.sources import DataError
from alphafuse_jax.data.sources import DataFileNotFoundError
from alphafuse_jax.data.tfds_builder import build
from alphafuse_jax.data.tfds_builder import load
from alphafuse_jax.data.tfds_builder import resolve_data_dir

__all__ = ['batches', 'build', 'DataError', 'DataFileNotFoundError', 'epoch_order', 'load',
           'num_batches', 'PreparedDataset', 'resolve_data_dir', 'seen_items']
