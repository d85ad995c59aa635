"""Mixed precision for the train step: float32 parameters, a lower-precision compute dtype inside.

`config.train.compute_dtype='bfloat16'` keeps the parameters, the optimiser state, the gradients
and the loss in float32 and runs the model's layers in bfloat16, with no change to the models:

  * the step casts the float32 parameters to the compute dtype inside its loss function
    (`cast_floating`), so the gradients flow back to float32 through the cast;
  * `compute_in(dtype)` intercepts every Flax module method while the step is traced: a
    submodule's floating inputs and outputs are cast to the compute dtype (so a frozen float32
    language table enters the layers in bfloat16 too), and every method of the top-level model
    returns float32, so the loss (softmax, log-sum-exp, means) is computed in float32 from
    bfloat16-rounded states and tables. Methods named `*loss` keep their float32 result in
    submodules as well (an auxiliary loss is a sum that bfloat16 would round).

LayerNorm statistics stay float32 (Flax computes them in at least float32). Evaluation and
serving use the float32 parameters as they are.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

COMPUTE_DTYPES = ('float32', 'bfloat16')


def compute_dtype(name: str) -> jnp.dtype:
  """'float32' or 'bfloat16' (`config.train.compute_dtype`) -> the dtype."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'config.train.compute_dtype={name!r} is not one of {COMPUTE_DTYPES}.')
  return jnp.dtype(name)


def _is_floating(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """`tree` with every floating array cast to `dtype` (integers, keys and the rest unchanged)."""
  return jax.tree.map(lambda x: x.astype(dtype) if _is_floating(x) else x, tree)


def _is_top_level(module: nn.Module) -> bool:
  """The model `apply` was called on (its parent is a scope, not another module)."""
  return not isinstance(module.parent, nn.Module)


def _interceptor(dtype: Any):
  """The Flax method interceptor of `compute_in` (see the module docstring)."""

  def intercept(next_fun, args, kwargs, context):
    if _is_top_level(context.module):
      return cast_floating(next_fun(*args, **kwargs), jnp.float32)
    out = next_fun(*cast_floating(args, dtype), **cast_floating(kwargs, dtype))
    return cast_floating(out, jnp.float32 if context.method_name.endswith('loss') else dtype)

  return intercept


@contextlib.contextmanager
def compute_in(dtype: Any) -> Iterator[None]:
  """Runs the Flax modules called (or traced) inside in `dtype`; float32 changes nothing."""
  if jnp.dtype(dtype) == jnp.float32:
    yield
    return
  with nn.intercept_methods(_interceptor(dtype)):
    yield
