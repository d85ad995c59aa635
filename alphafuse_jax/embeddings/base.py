"""The item-embedding contract, frozen host tables and the ID-table initialisers.

Every pipeline maps item ids (pad id = N) to vectors and exposes its scoring table:

  module(ids, *, deterministic)           int [...] -> [..., features]
  module.table(*, deterministic=True)     [N, features], real items only (no padding row)
  module.auxiliary_loss(*, deterministic) scalar, already weighted; 0.0 unless a pipeline has one
  module.features, module.num_items       known without init

Frozen language tables are host constants (`FrozenTable` attributes), never params: they get no
gradients and no optimiser state, and `init` returns only the trainable leaves under 'params'.

Padding rows: the reference appends `np.random.rand(k)` to frozen tables and SI-initialised
tables; here they are zeros (the backbone masks padding positions, so the value never matters).
Frozen tables are embedded as constants in the compiled computations: fine for N x d tables of
tens of MB. A step that shards the item axis over a 'model' mesh axis (`config.model_shards` > 1)
passes them as sharded arguments instead: `bind_frozen` maps each `FrozenTable` to the traced array
that `constant` then returns (`frozen_tables` lists a model's tables in a fixed order).

Row padding (`row_multiple`): a table sharded over M devices needs a row count divisible by M, so
with `config.model_shards` = M the trainable ID tables hold round_up(N + 1, M) rows (and bound
frozen tables as many); rows past the pad row N are never looked up and stay zero. Their first
N + 1 rows are initialised exactly as an unpadded table's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable, ClassVar, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alphafuse_jax import sparse_updates

Array = jax.Array

ID_INITS = ('zeros', 'normal', 'normal_0.02', 'uniform', 'xavier', 'orthogonal', 'sparse')


class FrozenTable:
  """A read-only float32 host table [N + 1, d] (padding row last) held as a module constant.

  Compared and hashed by identity, so modules holding one stay hashable and cheap to compare;
  the repr shows only the shape.
  """
  __slots__ = ('padded',)

  def __init__(self, table: np.ndarray, *, has_padding_row: bool = False):
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 2:
      raise ValueError(f'A frozen table must be a matrix, got shape {table.shape}.')
    if not has_padding_row:
      table = np.concatenate([table, np.zeros((1, table.shape[1]), np.float32)], axis=0)
    table.setflags(write=False)
    self.padded = table

  @property
  def values(self) -> np.ndarray:
    """The N real rows [N, d] (a view, no copy)."""
    return self.padded[:-1]

  @property
  def num_items(self) -> int:
    return self.padded.shape[0] - 1

  @property
  def dim(self) -> int:
    return self.padded.shape[1]

  def __repr__(self) -> str:
    return f'FrozenTable(items={self.num_items}, dim={self.dim})'


_BOUND = threading.local()


def constant(table: FrozenTable) -> Array:
  """The frozen table [N + 1, d] as a gradient-free constant, or the array `bind_frozen` bound."""
  bound = getattr(_BOUND, 'tables', None)
  if bound is not None and id(table) in bound:
    return jax.lax.stop_gradient(bound[id(table)])
  return jax.lax.stop_gradient(jnp.asarray(table.padded))


@contextlib.contextmanager
def bind_frozen(arrays: Mapping[FrozenTable, Array] | None) -> Iterator[None]:
  """While tracing under it, `constant(t)` returns `arrays[t]` (each [>= N + 1, d], padded rows
  last) instead of embedding `t` in the computation; None binds nothing."""
  previous = getattr(_BOUND, 'tables', None)
  _BOUND.tables = {**(previous or {}), **{id(t): a for t, a in (arrays or {}).items()}}
  try:
    yield
  finally:
    _BOUND.tables = previous


def with_frozen_args(fn: Callable, tables: tuple[FrozenTable, ...]) -> Callable:
  """`fn(*args)` -> `g(frozen, *args)`: `fn` traced with `tables[i]` bound to `frozen[i]`."""
  def g(frozen, *args):
    with bind_frozen(dict(zip(tables, frozen))):
      return fn(*args)
  return g


def frozen_tables(module: Any) -> tuple[FrozenTable, ...]:
  """Every distinct `FrozenTable` a module tree holds, in field order (a stable order)."""
  found: dict[int, FrozenTable] = {}

  def visit(x):
    if isinstance(x, FrozenTable):
      found.setdefault(id(x), x)
    elif isinstance(x, nn.Module) or (dataclasses.is_dataclass(x) and not isinstance(x, type)):
      for f in dataclasses.fields(x):
        if f.name not in ('parent', 'name'):
          visit(getattr(x, f.name, None))
    elif isinstance(x, (tuple, list)):
      for y in x:
        visit(y)
    elif isinstance(x, dict):
      for y in x.values():
        visit(y)

  visit(module)
  return tuple(found.values())


def padded_rows(rows: int, multiple: int) -> int:
  """`rows` rounded up to a multiple of `multiple` (the model-shard count)."""
  return -(-rows // multiple) * multiple


def pad_rows(x: Any, multiple: int) -> Any:
  """[R, ...] -> [padded_rows(R, multiple), ...] with zero rows appended (numpy or jax)."""
  extra = padded_rows(x.shape[0], multiple) - x.shape[0]
  if not extra:
    return x
  pad = ((0, extra),) + ((0, 0),) * (x.ndim - 1)
  return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)


def padded_initializer(init: Callable[..., Array], multiple: int) -> Callable[..., Array]:
  """`init` at the table's true shape, then zero rows up to a multiple of `multiple`: the first
  rows equal the unpadded table's whatever the model-shard count."""
  if multiple == 1:
    return init

  def padded(key, shape, dtype=jnp.float32):
    return pad_rows(init(key, shape, dtype), multiple)

  return padded


def lookup(table: Array | sparse_updates.GatheredRows, ids: Array) -> Array:
  """Rows of table [N + 1, d] for int ids [...] -> [..., d]; out-of-range ids give NaN.

  In a sparse train step (config.train.sparse_item_updates) a trainable table is a
  `sparse_updates.GatheredRows`, looked up through its gathered ids.
  """
  if isinstance(table, sparse_updates.GatheredRows):
    return table.lookup(ids)
  return jnp.take(table, jnp.asarray(ids), axis=0, mode='fill', fill_value=jnp.nan)


def scaled(x: Array, scale: float) -> Array:
  """x times a static scale (config.embedding.language_scale); the graph is unchanged at 1."""
  return x if scale == 1.0 else x * scale


def zero_loss() -> Array:
  return jnp.zeros((), jnp.float32)


class ItemEmbedding(nn.Module):
  """The base of every pipeline: subclasses define `num_items`, `features`, lookups and `table`.

  It carries the default auxiliary loss (none); a pipeline with one (RLMRec) overrides it and
  returns it already multiplied by its weight, so the train step adds it as it is.

  `random_lookup`: whether a train-mode lookup draws random numbers (dropout, noise) of the ids'
  shape. A backbone that looks up only part of a history (SASRec's leave-one-out batch path)
  would draw different numbers for it, so it keeps the per-row path for such a pipeline.
  """
  random_lookup: ClassVar[bool] = False

  @property
  def features(self) -> int:
    raise NotImplementedError

  def table(self, *, deterministic: bool = True) -> Array:
    """The N real items' vectors [N, features]."""
    raise NotImplementedError

  def auxiliary_loss(self, *, deterministic: bool) -> Array:
    """The pipeline's own weighted extra loss (a scalar); none by default."""
    del deterministic
    return zero_loss()


# ---- initialisers ------------------------------------------------------------------------------
def _uniform(low: float, high: float) -> Callable[..., Array]:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, low, high)
  return init


def sparse_init(sparsity: float = 0.01, std: float = 1.0) -> Callable[..., Array]:
  """torch.nn.init.sparse_: N(0, std), then ceil(sparsity * rows) random zeros per column."""
  def init(key, shape, dtype=jnp.float32):
    rows, cols = shape
    normal_key, perm_key = jax.random.split(key)
    values = std * jax.random.normal(normal_key, shape, dtype)
    num_zeros = int(math.ceil(sparsity * rows))
    # Per column: a random permutation of the rows, its first num_zeros entries zeroed.
    ranks = jax.vmap(lambda k: jax.random.permutation(k, rows))(jax.random.split(perm_key, cols))
    zero = jnp.zeros((cols, rows), bool)
    zero = zero.at[jnp.arange(cols)[:, None], ranks[:, :num_zeros]].set(True)
    return jnp.where(zero.T, jnp.zeros((), dtype), values)
  return init


def id_initializer(name: str) -> Callable[..., Array]:
  """The reference's `--ID_embs_init_type` initialisers (reference-spec section 2.2)."""
  if name == 'zeros':
    return nn.initializers.zeros
  if name == 'normal':
    return nn.initializers.normal(stddev=1.0)
  if name == 'normal_0.02':
    # BERT's and GPT-2's initializer_range; the SASRec+ code's item table.
    return nn.initializers.normal(stddev=0.02)
  if name == 'uniform':
    return _uniform(0.0, 1.0)
  if name == 'xavier':
    # bound sqrt(6 / (rows + cols)) in both torch and Flax.
    return nn.initializers.xavier_uniform()
  if name in ('orthogonal', 'ortho'):
    return nn.initializers.orthogonal(scale=1.0)
  if name == 'sparse':
    return sparse_init(0.01, 1.0)
  raise ValueError(f'Unknown ID init {name!r} (config.embedding.id_init); use one of {ID_INITS}.')
