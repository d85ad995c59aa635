"""Export for serving without this package: `jax.export` artefacts (StableHLO) and the item table.

`export(recommender, out_dir)` writes

  recommend.jax     history int32 [B, L] -> (top-K ids int32 [B, K], scores float32 [B, K]);
                    B is symbolic, the params and item table are constants inside
  user_states.jax   history int32 [B, L] -> ranking states float32 [B, d]
  item_table.npy    float32 [N, d]: scores are states @ item_table.T (for a nearest-neighbour index)
  items.json        index -> key, title, new (whether it was added from its text after training)
  manifest.json     L, the pad id (N), K, exclude_seen, shapes, jax version, platforms

and loads with jax and numpy alone:

  from jax import export
  recommend = export.deserialize(open('recommend.jax', 'rb').read())
  ids, scores = recommend.call(history)          # history: int32 [B, L], left-padded with N

Serialization needs the `flatbuffers` package (requirements.txt). The directory is written under
a temporary name and renamed, so it is whole or absent.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alphafuse_jax import files
from alphafuse_jax import inference_artifacts
from alphafuse_jax.serving.catalogue import ServingError
from alphafuse_jax.serving.recommender import Recommender
from alphafuse_jax.serving.recommender import ranked

FORMAT_VERSION = 1


def export_functions(recommender: Recommender, *, k: int, exclude_seen: bool,
                     platforms: Sequence[str] | None = None) -> tuple[Any, Any]:
  """(recommend, user_states) as `jax.export.Exported` with a symbolic batch size."""
  k = recommender.check_k(k)
  params, (chunks, starts) = recommender.params, recommender.scoring_table()
  model = recommender.model

  def recommend(history):
    return ranked(model, params, chunks, starts, history, history if exclude_seen else None,
                  k=k)

  def user_states(history):
    index = jnp.arange(history.shape[0], dtype=jnp.int32)
    return model.apply({'params': params}, history, index, method='ranking_states')

  batch, = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, recommender.max_len), jnp.int32)
  kwargs = {} if platforms is None else {'platforms': tuple(platforms)}
  return (jax.export.export(jax.jit(recommend), **kwargs)(spec),
          jax.export.export(jax.jit(user_states), **kwargs)(spec))


def _serialize(exported) -> bytes:
  try:
    return exported.serialize()
  except ImportError as e:
    raise ServingError(f'{e}: jax.export needs flatbuffers; pip install -r requirements.txt '
                       '(it pins flatbuffers).') from None


def export(recommender: Recommender, out_dir: str, *, k: int = 10, exclude_seen: bool = False,
           platforms: Sequence[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes the serving artefacts into `out_dir` (see the module docstring); returns the
  manifest. An existing non-empty `out_dir` is an error unless `overwrite`."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ServingError(f'{out_dir} exists and is not empty; choose another --out or pass '
                       '--overwrite to replace it.')
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ServingError(f'{out_dir} is a file; --out must name a directory.')
  recommend_fn, states_fn = export_functions(recommender, k=k, exclude_seen=exclude_seen,
                                             platforms=platforms)
  blobs = {'recommend.jax': _serialize(recommend_fn), 'user_states.jax': _serialize(states_fn)}
  table = np.asarray(recommender.item_table(), np.float32)
  catalogue = recommender.catalogue
  manifest = {
      'format_version': FORMAT_VERSION, 'max_len': recommender.max_len,
      'pad_id': recommender.num_items, 'num_items': recommender.num_items,
      'dim': int(table.shape[1]), 'k': int(k), 'exclude_seen': bool(exclude_seen),
      'platforms': list(recommend_fn.platforms), 'jax_version': jax.__version__,
      'workdir': recommender.workdir,
      'files': sorted(list(blobs) + ['item_table.npy', 'items.json', 'manifest.json']),
  }
  items = {'keys': catalogue.keys, 'titles': catalogue.titles,
           'new': [catalogue.is_new(i) for i in range(len(catalogue))]}

  def write(tmp: str) -> None:
    for name, blob in blobs.items():
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(blob)
    np.save(os.path.join(tmp, 'item_table.npy'), table)
    files.write_json(os.path.join(tmp, 'items.json'), items)
    files.write_json(os.path.join(tmp, 'manifest.json'), manifest)

  inference_artifacts.write_directory(out_dir, write)
  return manifest

