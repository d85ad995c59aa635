"""Row-sparse ("lazy") updates of the item ID tables: a train step whose cost does not grow with N.

With the sampled softmax (`sampled_softmax.py`) the loss of a step reads only a few rows of the
trainable item tables, but a dense step still pays O(N) for them: the gradient of the lookups is a
dense [N + 1, d] cotangent, and the optimizer reads and writes every row of the table and its
moments. `config.train.sparse_item_updates` makes both O(U d), U the rows the step touches:

  1. `touched_ids`: the ids the global batch can look up (its histories and targets, over all
     devices, the K shared negatives, and item 0), sorted and unique, padded to a static size
     U = B L + B + K + 1 (at most the table's rows) with an out-of-range id;
  2. the loss sees each table as a `GatheredRows` (its rows at those ids, [U, d]) in place of the
     [N + 1, d] param, and `embeddings.base.lookup` finds an id's row by its position, so the
     gradient is [U, d];
  3. `lazy_update`: the step's optimizer (`train.make_optimizer`, which updates every other
     param densely) applied to the gathered rows and their gathered optimizer state, then
     scattered back in place (ids out of range dropped): TF Addons' LazyAdam semantics. For
     `train.make_optimizer`'s element-wise optimizers this is exactly the dense update
     restricted to the touched rows: coupled L2 (adam_l2, sgd) or decoupled decay (adamw) on
     them, Adam's moments mu[ids] = b1 mu[ids] + (1 - b1) g, nu[ids] likewise with g^2,
     bias-corrected by the global step (the optimizer state's count, which every step
     increments).

The semantic difference from the dense update: a row that no example of the step looks up keeps
its params and moments as they are (a dense Adam decays its moments and moves it by the
remaining momentum, and L2 decays it). When every row is touched, both updates agree.

Item 0 is always touched: `models.base.Recommender.training_states` points the rows and
positions that do not count at it, so the loss looks it up (with weight 0) in most steps.
"""

from __future__ import annotations

import math
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

from alphafuse_jax import parallel
from alphafuse_jax import precision

Array = jax.Array

# The trainable item-table params (`embeddings.pipelines`) that the step gathers: the leaves
# `parallel` also shards over a 'model' axis (one definition of what an item table is).
TABLE_KEYS = parallel.ITEM_TABLE_KEYS
# Placeholder target of rows and positions that do not count (`Recommender.training_states`).
PLACEHOLDER_ID = 0


class GatheredRows:
  """The rows of one item table at sorted ids, standing in for the [R, d] table in the loss.

  Lookups by item id go through the ids' positions; any other use of the table (slicing it for
  the whole catalogue, converting it to an array) raises, so a loss that needs the full table
  fails instead of silently reading a wrong one. An id not among `ids` looks up NaN (as an
  out-of-range id of a table does).

  It is deliberately one opaque leaf rather than a pytree: it replaces one param inside the
  loss, and Flax checks a param's leaves against the shape its module declares; `shape` is the
  full table's. The rows are differentiated as the loss function's own argument.

  Attributes:
    rows: [U, d] the table's rows at `ids` (zeros at the padding ids).
    ids: int [U] sorted; ids >= R are padding.
    shape: (R, d) of the table it stands for.
  """
  __slots__ = ('rows', 'ids', 'shape')

  def __init__(self, rows: Array, ids: Array, shape: tuple[int, ...]):
    self.rows, self.ids, self.shape = rows, ids, tuple(shape)

  @property
  def dtype(self):
    return self.rows.dtype

  def lookup(self, ids: Array) -> Array:
    """Rows [..., d] for int ids [...]; NaN rows for ids not gathered."""
    ids = jnp.asarray(ids)
    at = jnp.minimum(jnp.searchsorted(self.ids, ids), self.ids.shape[0] - 1)
    found = self.ids[at] == ids
    return jnp.where(found[..., None], jnp.take(self.rows, at, axis=0), jnp.nan)

  def _refuse(self, *args, **kwargs):
    raise TypeError(
        f'The item table {self.shape} is only gathered at the {self.ids.shape[0]} rows this step '
        'touches (config.train.sparse_item_updates): it can be looked up by id, not read whole. '
        'A loss that needs the whole table (full softmax, dense negative scoring, a loss over '
        'all items) cannot use sparse_item_updates; set --config.train.sparse_item_updates=false.')

  __getitem__ = __array__ = __jax_array__ = __iter__ = __len__ = _refuse

  def __repr__(self) -> str:
    return f'GatheredRows(rows={self.ids.shape[0]}, table={self.shape})'


# ---- the touched rows ----------------------------------------------------------------------------
def num_touched(history_shape: tuple[int, ...], num_negatives: int, num_rows: int) -> int:
  """U: the static bound on the rows a step touches, B L + B + K + 1 (at most the R rows)."""
  return min(math.prod(history_shape) + history_shape[0] + num_negatives + 1, num_rows)


def touched_ids(history: Array, targets: Array, negative_ids: Array, num_rows: int) -> Array:
  """The sorted unique ids [U] a step can look up, padded with `num_rows` (out of range).

  Args:
    history: int [B, L] and targets: int [B] of the GLOBAL batch (every device computes the same
      ids: see `all_rows`); negative_ids: int [K] the step's shared negatives.
    num_rows: R, the table's rows (N + 1, or more when padded).
  Returns:
    int32 [U], U = `num_touched(...)`.
  """
  values = jnp.concatenate([jnp.ravel(history), jnp.ravel(targets), jnp.ravel(negative_ids),
                            jnp.full((1,), PLACEHOLDER_ID)]).astype(jnp.int32)
  size = num_touched(history.shape, negative_ids.size, num_rows)
  return jnp.unique(values, size=size, fill_value=num_rows)


def all_rows(x: Array) -> Array:
  """This device's batch rows [b, ...] -> the global batch's [B, ...] (inside the mapped step)."""
  return jax.lax.all_gather(x, parallel.AXIS, tiled=True)


# ---- params and optimizer state ------------------------------------------------------------------
def split_tables(params: Any) -> tuple[dict, dict]:
  """(the other params, the item tables): nested dicts with the keys of `params`."""
  flat = traverse_util.flatten_dict(params)
  tables = {k: v for k, v in flat.items() if k[-1] in TABLE_KEYS}
  if not tables:
    raise ValueError(f'No {TABLE_KEYS} param to update sparsely: the item pipeline has no '
                     'trainable item table; set --config.train.sparse_item_updates=false.')
  rest = {k: v for k, v in flat.items() if k[-1] not in TABLE_KEYS}
  return traverse_util.unflatten_dict(rest), traverse_util.unflatten_dict(tables)


def merge_tables(rest: dict, tables: dict) -> dict:
  """The inverse of `split_tables` (tables may be `GatheredRows`)."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(rest),
                                       **traverse_util.flatten_dict(tables)})


def init_state(tx: optax.GradientTransformation, params: Any) -> dict[str, Any]:
  """The optimizer state of a sparse step: {'dense': of the other params, 'items': of the
  tables}, both `tx`'s own state (the tables' moments are dense [R, d], updated at touched rows)."""
  rest, tables = split_tables(params)
  return {'dense': tx.init(rest), 'items': tx.init(tables)}


def table_rows(tables: dict) -> int:
  """R, the row count every table shares (they are indexed by the same item ids)."""
  rows = {x.shape[0] for x in jax.tree.leaves(tables)}
  if len(rows) != 1:
    raise ValueError(f'The item tables have different row counts {sorted(rows)}; a sparse step '
                     'gathers them at the same ids.')
  return rows.pop()


def _gather(x: Array, ids: Array) -> Array:
  return jnp.take(x, ids, axis=0, mode='fill', fill_value=0)


def gather_tables(tables: dict, ids: Array) -> dict:
  """Each table's rows [U, d] at `ids` (zeros at padding ids)."""
  return jax.tree.map(lambda x: _gather(x, ids), tables)


def gathered(tables: dict, rows: dict, ids: Array) -> dict:
  """The tables as `GatheredRows` of `rows` (what the loss sees)."""
  return jax.tree.map(lambda x, r: GatheredRows(r, ids, x.shape), tables, rows)


def lazy_update(tx: optax.GradientTransformation, tables: dict, state: Any, ids: Array,
                rows: dict, grads: dict) -> tuple[dict, Any]:
  """`tx` applied to the touched rows only, scattered back in place.

  Args:
    tx: an element-wise optimizer (`train.make_optimizer`'s): its state leaves are per-element
      [R, d] arrays beside scalars (the step count).
    tables: the [R, d] tables; state: `tx`'s state of them (`init_state(...)['items']`).
    ids: [U] from `touched_ids`; rows: the tables at ids (`gather_tables`); grads: [U, d] each.
  Returns:
    (tables, state) with the touched rows updated; ids >= R are dropped.
  """
  num_rows = table_rows(tables)

  def gather_state(x):
    if jnp.ndim(x) == 0:
      return x
    if x.shape[0] != num_rows:
      raise ValueError(f'An optimizer state leaf of shape {x.shape} is not per table row '
                       f'({num_rows} rows): the optimizer cannot be applied to gathered rows.')
    return _gather(x, ids)

  updates, touched_state = tx.update(grads, jax.tree.map(gather_state, state), rows)
  new_rows = optax.apply_updates(rows, updates)
  scatter = lambda x, v: v if jnp.ndim(x) == 0 else x.at[ids].set(v.astype(x.dtype), mode='drop')
  return jax.tree.map(scatter, tables, new_rows), jax.tree.map(scatter, state, touched_state)


# ---- the step ------------------------------------------------------------------------------------
def train_step(state: Any, batch: dict[str, Array], negatives: Array, model_loss,
               compute_dtype: Any) -> tuple[Any, dict[str, Array]]:
  """`train.make_train_step`'s step with row-sparse item-table updates (per device).

  The rows the global batch touches are gathered once; the loss sees the tables as those rows,
  so their gradient is [U, d], and `lazy_update` applies the state's optimizer to them alone.
  Every other param gets the dense step's update.

  Args:
    state: a flax TrainState whose opt_state is `init_state`'s.
    batch: this device's rows: history int [b, L], target int [b], ...
    negatives: int [K] the step's shared negatives (`Recommender.shared_negative_ids` with the
      rngs of `train_table`).
    model_loss: params in the compute dtype -> this device's loss (the dense step's).
    compute_dtype: the layers' dtype (config.train.compute_dtype).
  Returns:
    (the new state, {'loss': the mean loss over the devices}).
  """
  rest, tables = split_tables(state.params)
  ids = touched_ids(all_rows(batch['history']), all_rows(batch['target']), negatives,
                    table_rows(tables))
  rows = gather_tables(tables, ids)

  def loss_fn(rest, rows):
    # float32 grads flow through the casts.
    cast = lambda tree: precision.cast_floating(tree, compute_dtype)
    return model_loss(merge_tables(cast(rest), gathered(tables, cast(rows), ids)))

  with precision.compute_in(compute_dtype):
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(rest, rows)
  (rest_grads, row_grads), loss = jax.lax.pmean((grads, loss), parallel.AXIS)
  updates, dense_state = state.tx.update(rest_grads, state.opt_state['dense'], rest)
  tables, items_state = lazy_update(state.tx, tables, state.opt_state['items'], ids, rows,
                                    row_grads)
  params = merge_tables(optax.apply_updates(rest, updates), tables)
  return state.replace(step=state.step + 1, params=params,
                       opt_state={'dense': dense_state, 'items': items_state}), {'loss': loss}
