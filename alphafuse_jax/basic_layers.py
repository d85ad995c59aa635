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


def layer_norm(name: str | None = None, epsilon: float = TORCH_LAYER_NORM_EPS) -> nn.LayerNorm:
  """A LayerNorm with PyTorch's epsilon (unless given) and scale 1 / bias 0 init."""
  return nn.LayerNorm(epsilon=epsilon, name=name)


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


# ---- Dropout: jax.random.bits' words, hashed in one fusible pass ----------------------------
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _unrolled_threefry(key: Array, count: int) -> bool:
  """Whether `threefry_words` can compute jax.random.bits' words for `count` words of `key`."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
  return (jax.config.jax_threefry_partitionable and count < 2**32 and impl == 'threefry2x32'
          and (typed or key.shape == (2,)))


def threefry_words(key: Array, count: int, counters: Array | None = None) -> Array:
  """`jax.random.bits(key, (count,), uint32)`, bit for bit, as one fusible jnp expression; with
  `counters` (uint32, any shape), those words of it only.

  JAX's partitionable threefry gives word i = x0 ^ x1 of threefry2x32(key, (0, i)); on CPU it
  lowers that hash to a rolled loop (five passes over the words in memory). Unrolled here, XLA
  fuses it with its consumer. Other PRNG settings fall back to jax.random.bits.
  """
  if not _unrolled_threefry(key, count):
    words = jax.random.bits(key, (count,), jnp.uint32)
    return words if counters is None else words[counters]
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  k0, k1 = data[0], data[1]
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x1 = (jnp.arange(count, dtype=jnp.uint32) if counters is None else counters) + ks[1]
  x0 = jnp.zeros_like(x1) + ks[0]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0 ^ x1


class Dropout(nn.Module):
  """Inverted dropout whose mask costs half the random bits of `nn.Dropout`.

  `nn.Dropout` draws one 32-bit word per element, and JAX's (partitionable) threefry spends a
  whole threefry2x32 call on each; random bits were about 20% of the SASRec train step on CPU.
  Here each 32-bit word gives two 16-bit draws, so an element is dropped with probability
  q = round(rate * 2^16) / 2^16 (|q - rate| <= 7.7e-6) and kept values are scaled by 1 / (1 - q),
  which keeps the expectation exact. The words are `jax.random.bits(rng, ((size + 1) // 2,))`,
  computed by `threefry_words` so that the hash fuses with the mask. Same interface as
  `nn.Dropout` ('dropout' rng stream), plus `full_shape`.
  """
  rate: float
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool,
               full_shape: tuple[int, ...] | None = None) -> Array:
    """Dropout of inputs; with `full_shape`, inputs are the trailing block (the last
    inputs.shape[a] entries of every axis a) of an input of that shape, and get its mask there
    (leave-one-out training encodes only the last positions of a row; see models/layers.py)."""
    if deterministic or self.rate == 0.0:
      return inputs
    threshold = int(round(self.rate * 65536))
    if threshold >= 65536:
      return jnp.zeros_like(inputs)
    full_shape = tuple(full_shape or inputs.shape)
    size = math.prod(full_shape)
    key, words = self.make_rng(self.rng_collection), (size + 1) // 2
    if full_shape != inputs.shape and 2 * inputs.size < size and _unrolled_threefry(key, words):
      # A small block: one hash per element it holds (the full mask needs one per two elements).
      index = sum(jnp.arange(n - m, n, dtype=jnp.uint32).reshape(
          (-1,) + (1,) * (len(full_shape) - a - 1)) * np.uint32(math.prod(full_shape[a + 1:]))
                  for a, (n, m) in enumerate(zip(full_shape, inputs.shape)))
      low = index < words
      bits = threefry_words(key, words, jnp.where(low, index, index - np.uint32(words)))
      halves = jnp.where(low, bits & 0xFFFF, bits >> 16)
    else:
      bits = threefry_words(key, words)
      halves = jnp.concatenate([bits & 0xFFFF, bits >> 16])[:size].reshape(full_shape)
      halves = halves[tuple(slice(n - m, None) for n, m in zip(full_shape, inputs.shape))]
    # A multiply by a constant compiles identically in every program (a divide may be rewritten).
    scale = np.asarray(65536.0 / (65536 - threshold), inputs.dtype)
    return jnp.where(halves >= threshold, inputs * scale, jnp.zeros_like(inputs))
