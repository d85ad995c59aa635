"""What inference needs, saved beside `best/` when training ends (`<workdir>/inference/`).

Serving (`alphafuse_jax.serving`) rebuilds the model from these files and the best params and
never reads the training data:

  manifest.json    format version, pipeline, backbone, the text settings (encoder, model, template,
                   scale) and, for text-map pipelines, the semantic space's widths
  config.json      the resolved config
  catalogue.json   item keys (original), item fields ({'title', 'year', 'genres'}), max_len
  item_counts.npy  int64 [N] train interactions per item (frequency-weighted moments read them)
  language.npy     float64 [N, d_l] the scaled language vectors the model was built from
                   (pipelines that read text)
  text_map.npz     the fitted semantic space: mean [d_l], eigenvalues [d_l], eigenvectors
                   [d_l, d_l] (columns; the first `width` are the basis) (text-map pipelines
                   that project)

The directory is written under a temporary name and renamed, so it is whole or absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import ml_collections
import numpy as np

from alphafuse_jax import builders
from alphafuse_jax import data as data_lib
from alphafuse_jax import decomposition
from alphafuse_jax import errors
from alphafuse_jax import files
from alphafuse_jax.embeddings import registry

DIRNAME = 'inference'
FORMAT_VERSION = 1


class ArtifactsError(errors.AlphafuseError):
  """A workdir has no usable inference artifacts: the message says how to make them."""


@dataclasses.dataclass
class Artifacts:
  """A trained run's inference metadata; quacks like `PreparedDataset` for `build_model`.

  Attributes:
    config: the run's resolved config.
    num_items: N (pad id N); max_len: L.
    item_keys: index -> original item key; item_fields: index -> {'title', 'year', 'genres'}.
    train_item_counts: int64 [N].
    language: float64 [N, d_l] scaled language vectors, or None (the ID pipeline).
    text_map: the `registry.TextMap` of a text-map pipeline, else None.
    text: {'encoder', 'model', 'template', 'scale', 'embeddings_file'}.
  """
  config: ml_collections.ConfigDict
  num_items: int
  max_len: int
  item_keys: list[Any]
  item_fields: list[dict[str, Any]]
  train_item_counts: np.ndarray
  language: np.ndarray | None
  text_map: registry.TextMap | None
  text: dict[str, Any]


def _python(value: Any) -> Any:
  """numpy scalars (item keys) as JSON-ready Python values."""
  return value.item() if isinstance(value, np.generic) else value


def _text_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  t = config.text
  model = t.embeddings_file
  if t.encoder == 'minilm':
    from alphafuse_jax.text import encoder  # pylint: disable=g-import-not-at-top
    model = encoder.MODEL_NAME
  return {'encoder': t.encoder, 'model': model, 'template': t.template, 'scale': float(t.scale),
          'embeddings_file': t.embeddings_file}


def save(workdir: str, config: ml_collections.ConfigDict, dataset: data_lib.PreparedDataset,
         language: np.ndarray | None = None) -> str:
  """Writes `<workdir>/inference/` (replacing an older one); returns its path.

  Args:
    workdir: the run's workdir.
    config: the run's config.
    dataset: its data (only metadata is read: keys, fields, counts, N, L).
    language: the scaled language vectors the model was built from; None loads them again
      (`builders.load_language_embeddings`: the embedding cache or file), as training did.
  """
  pipeline = registry.get_pipeline(config.embedding.pipeline)
  if language is None and pipeline.needs_text:
    language = builders.load_language_embeddings(config, dataset)
  counts = np.asarray(dataset.train_item_counts, np.int64)
  manifest = {'format_version': FORMAT_VERSION, 'pipeline': pipeline.name,
              'backbone': config.model.backbone, 'num_items': int(dataset.num_items),
              'text': _text_settings(config), 'text_map': None}
  arrays = {'item_counts.npy': counts}
  if language is not None:
    arrays['language.npy'] = np.asarray(language, np.float64)
  if pipeline.text_map or pipeline.name in registry.INITIAL_ROW_PIPELINES:
    # Fitted as in training: on the old items only under cold_start_items.
    text_map = registry.text_map(config.embedding, language_embeddings=language,
                                 item_counts=counts, initial_rows=True,
                                 fit_items=builders.old_items(dataset))
    manifest['text_map'] = {'width': text_map.width, 'standardize': text_map.standardize,
                            'eigenvalue_floor': text_map.eigenvalue_floor,
                            'nullity': text_map.nullity, 'cover': text_map.cover,
                            'projected': text_map.space is not None}
    if text_map.space is not None:
      arrays['text_map.npz'] = text_map.space._asdict()
  catalogue = {'max_len': int(dataset.max_len),
               'item_keys': [_python(k) for k in dataset.item_keys],
               'item_fields': [dict(f) for f in dataset.item_fields]}

  def write(tmp: str) -> None:
    files.write_json(os.path.join(tmp, 'manifest.json'), manifest)
    files.write_text(os.path.join(tmp, 'config.json'), config.to_json_best_effort(indent=2))
    files.write_json(os.path.join(tmp, 'catalogue.json'), catalogue)
    for name, value in arrays.items():
      path = os.path.join(tmp, name)
      if name.endswith('.npz'):
        np.savez(path, **{k: np.asarray(v, np.float64) for k, v in value.items()})
      else:
        np.save(path, value)

  final = os.path.join(os.path.abspath(workdir), DIRNAME)
  write_directory(final, write)
  return final


def write_directory(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp)` to fill a temporary directory beside `path`, then puts it in place of
  `path` (replacing an older one), so readers find the whole directory or none of it."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.')
  old = None
  try:
    write(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; artefacts are meant to be shared.
    if os.path.exists(path):
      old = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.old.')
      os.replace(path, os.path.join(old, 'replaced'))
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


def load(workdir: str) -> Artifacts:
  """Reads `<workdir>/inference/`; a missing or foreign-format directory says how to make one."""
  root = os.path.join(os.path.abspath(os.path.expanduser(workdir)), DIRNAME)
  manifest_path = os.path.join(root, 'manifest.json')
  if not os.path.isfile(manifest_path):
    raise ArtifactsError(
        f'{root} has no manifest.json: the run in {workdir} has not finished, or it predates '
        'inference artifacts. Run `python -m alphafuse_jax.main --config=<its config> '
        f'--workdir={workdir}` to finish it (a finished run only re-tests and writes them).')
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get('format_version') != FORMAT_VERSION:
    raise ArtifactsError(
        f'{manifest_path} has format version {manifest.get("format_version")}, this code reads '
        f'{FORMAT_VERSION}; re-run training on the workdir with this version to rewrite it.')
  with open(os.path.join(root, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(root, 'catalogue.json')) as f:
    catalogue = json.load(f)
  language_path = os.path.join(root, 'language.npy')
  language = np.load(language_path) if os.path.exists(language_path) else None
  text_map = None
  if manifest['text_map'] is not None:
    meta = manifest['text_map']
    space = None
    if meta['projected']:
      with np.load(os.path.join(root, 'text_map.npz')) as archive:
        space = decomposition.SemanticSpace(**{k: archive[k] for k in archive.files})
    text_map = registry.TextMap(manifest['pipeline'], space, meta['width'], meta['standardize'],
                                meta['eigenvalue_floor'], meta['nullity'], meta['cover'])
  keys = catalogue['item_keys']
  return Artifacts(config=config, num_items=len(keys), max_len=catalogue['max_len'],
                   item_keys=keys, item_fields=catalogue['item_fields'],
                   train_item_counts=np.load(os.path.join(root, 'item_counts.npy')),
                   language=language, text_map=text_map, text=manifest['text'])
