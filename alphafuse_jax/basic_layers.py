"""Layers shared by the item embeddings and the backbones: PyTorch-style Linear and a cheap Dropout.

A neutral room: `embeddings` and `models` both build on it, so neither imports the other for
these primitives.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# PyTorch's LayerNorm epsilon (Flax's default is 1e-6).
TORCH_LAYER_NORM_EPS = 1e-5


def torch_uniform_init(fan_in: int) -> nn.initializers.Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv1d weights and biases."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def layer_norm(name: str | None = None) -> nn.LayerNorm:
  """A LayerNorm with PyTorch's epsilon and scale 1 / bias 0 init."""
  return nn.LayerNorm(epsilon=TORCH_LAYER_NORM_EPS, name=name)


class TorchDense(nn.Module):
  """`torch.nn.Linear` (or a kernel-1 Conv1d): y = x W + b with W, b ~ U(±1/sqrt(fan_in)).

  Parameters are named like `nn.Dense` (`kernel` [in, out], `bias` [out]).
  """
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    init = torch_uniform_init(fan_in)
    kernel = self.param('kernel', init, (fan_in, self.features))
    y = jnp.matmul(x, kernel)
    if self.use_bias:
      y = y + self.param('bias', init, (self.features,))
    return y


class Dropout(nn.Module):
  """Inverted dropout whose mask costs half the random bits of `nn.Dropout`.

  `nn.Dropout` draws one 32-bit word per element, and JAX's (partitionable) threefry spends a
  whole threefry2x32 call on each; random bits were about 20% of the SASRec train step on CPU.
  Here each 32-bit word gives two 16-bit draws, so an element is dropped with probability
  q = round(rate * 2^16) / 2^16 (|q - rate| <= 7.7e-6) and kept values are scaled by 1 / (1 - q),
  which keeps the expectation exact. Same interface as `nn.Dropout` ('dropout' rng stream).
  """
  rate: float
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return inputs
    threshold = int(round(self.rate * 65536))
    if threshold >= 65536:
      return jnp.zeros_like(inputs)
    size = inputs.size
    words = jax.random.bits(self.make_rng(self.rng_collection), ((size + 1) // 2,), jnp.uint32)
    halves = jnp.concatenate([words & 0xFFFF, words >> 16])[:size].reshape(inputs.shape)
    keep = halves >= threshold
    # A multiply by a constant compiles identically in every program (a divide may be rewritten).
    scale = np.asarray(65536.0 / (65536 - threshold), inputs.dtype)
    return jnp.where(keep, inputs * scale, jnp.zeros_like(inputs))

