"""Data parallelism: one per-device function, mapped with `jax.shard_map` or `jax.pmap`.

The train and eval steps are written once, for one device's slice of the batch, with collectives
over the axis named `'data'`. `DataParallel` maps them over every device of every process:

- `'shard_map'` (default): a 1-D `Mesh` over `jax.devices()`; replicated state is a global array
  with `PartitionSpec()`, batches are global arrays split on their leading axis. This is JAX's
  maintained successor to pmap.
- `'pmap'`: the same function through `jax.pmap` over the local devices; replicated state carries a
  leading device axis. Kept for users of pmap-era tooling; results are identical.

Batches arrive from the host as numpy with leading dims `[local_devices, per_device, ...]`
(`alphafuse_jax.data.batches`), the layout pmap consumes directly.

Item tables sharded along the item axis (`model_shards` = M > 1, shard_map only): the mesh is 2-D,
('data' D / M, 'model' M). The mapped functions are manual over 'data' only (`jax.shard_map` with
`axis_names={'data'}`): their per-device code and collectives are unchanged, while every array
placed with `place_state` (the ID tables and their optimizer moments, whose rows are padded to a
multiple of M) or `place_item_table` lives 1/M on each device of a 'model' group, and XLA's SPMD
partitioner makes the lookups and scores on them correct across shards. Code that must see its
own shard (the evaluation's per-shard rank counts) nests `over_items`, manual over 'model'.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import flax.jax_utils
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'
MODEL_AXIS = 'model'
MODES = ('shard_map', 'pmap')
# A state leaf is an item table (sharded along 'model') when a key on its path is one of these.
ITEM_TABLE_KEYS = ('id_table',)


def force_host_devices(count: int | None = None) -> None:
  """Asks XLA for `count` CPU devices (default: one per core); call before JAX starts.

  XLA's CPU runtime uses several cores poorly inside one device, so splitting the batch over one
  host device per core is the fast layout on CPU. No effect on GPU/TPU, nor when the user already
  set `--xla_force_host_platform_device_count` in `XLA_FLAGS`.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' in flags:
    return
  count = count or os.cpu_count() or 1
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={count}'.strip()


def needs_step_sync(backend: str | None = None, device_count: int | None = None) -> bool:
  """Whether the train loop must wait for every step (read its loss) before queuing the next.

  XLA's CPU runtime deadlocks when more than about 32 steps with cross-device collectives are
  queued at once (its per-device pacing semaphore waits while a peer waits in the all-reduce),
  so on a CPU backend with several devices the loop reads each step's loss, which bounds the
  queue to one step. One CPU device has no collectives to deadlock, and GPU/TPU runtimes are
  built to queue steps: there the loop keeps the losses on the device and reads them every
  `config.log_every_steps`. This is the one place that decides it (`config.sync_every_step`,
  when set, overrides it).
  """
  backend = backend or jax.default_backend()
  device_count = jax.device_count() if device_count is None else device_count
  return backend == 'cpu' and device_count > 1


def describe_devices() -> dict[str, Any]:
  """What a measurement ran on: backend ('cpu', 'gpu', 'tpu'), device kind and device count."""
  return {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'device_count': jax.device_count()}


MEMORY_KEYS = ('peak_bytes_in_use', 'bytes_in_use', 'largest_alloc_size', 'bytes_limit')


def memory_stats(devices: Sequence[Any] | None = None) -> dict[str, int] | None:
  """Device memory of this process's devices, or None where the backend reports none (CPU).

  Each of MEMORY_KEYS that every device reports: the largest value over the devices (the
  device closest to running out), except 'bytes_limit', the smallest.
  """
  stats = [d.memory_stats() for d in (jax.local_devices() if devices is None else devices)]
  if not stats or any(s is None for s in stats):
    return None
  out = {}
  for key in MEMORY_KEYS:
    if all(key in s for s in stats):
      out[key] = int((min if key == 'bytes_limit' else max)(s[key] for s in stats))
  return out or None


def over_items(fn: Callable, in_specs: Any, out_specs: Any) -> Callable:
  """`fn` manual over the 'model' axis too, inside a mapped function of a 2-D mesh: an argument
  with spec P('model') arrives as this device's shard of items (see `item_shard_offset`)."""
  return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                       out_specs=out_specs, axis_names={MODEL_AXIS}, check_vma=False)


def item_shard_offset(shard_rows: int) -> jax.Array:
  """Inside `over_items`: the global row of this device's first item row."""
  return jax.lax.axis_index(MODEL_AXIS) * shard_rows


def is_item_table(path: Sequence[Any]) -> bool:
  """Whether a pytree path (of params or optimizer state) leads to an item table."""
  return any(getattr(k, 'key', getattr(k, 'name', None)) in ITEM_TABLE_KEYS for k in path)


class DataParallel:
  """Maps per-device functions over all devices, replicates state and places batches.

  `model_shards` M > 1 (shard_map only) shards the item tables over a 'model' mesh axis of M
  devices; batches are split over the D / M groups of the 'data' axis (module docstring).
  """

  def __init__(self, mode: str = 'shard_map', model_shards: int = 1):
    if mode not in MODES:
      raise ValueError(f'config.parallelism={mode!r} is not one of {MODES}.')
    self.mode = mode
    self.local_devices = jax.local_devices()
    self.num_local_devices = len(self.local_devices)
    self.num_devices = jax.device_count()
    self.model_shards = int(model_shards)
    if self.model_shards > 1 and mode != 'shard_map':
      raise ValueError(f'config.model_shards={model_shards} needs config.parallelism='
                       "'shard_map' (pmap replicates every parameter on every device).")
    if self.model_shards < 1 or self.num_devices % self.model_shards:
      raise ValueError(f'config.model_shards={model_shards} must be >= 1 and divide the '
                       f'{self.num_devices} devices.')
    if self.model_shards > 1:
      devices = np.asarray(jax.devices()).reshape(-1, self.model_shards)
      self.mesh = Mesh(devices, (AXIS, MODEL_AXIS))
    else:
      self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
    self._replicated = NamedSharding(self.mesh, P())
    self._sharded = NamedSharding(self.mesh, P(AXIS))
    # Item-axis arrays: rows over 'model'; replicated without one.
    self._items = NamedSharding(self.mesh, P(MODEL_AXIS) if self.model_shards > 1 else P())
    # pmap's replicated state: stacked over the local devices on an axis named AXIS, the
    # placement jax.pmap gives its outputs (`replicate`).
    self._stacked = NamedSharding(Mesh(np.asarray(self.local_devices), (AXIS,)), P(AXIS))
    self._item_constants: dict[Any, jax.Array] = {}  # item_constant's placed arrays.

  @property
  def sharded_items(self) -> bool:
    """Whether item tables are sharded over a 'model' axis (model_shards > 1)."""
    return self.model_shards > 1

  # ---- state -------------------------------------------------------------------------------
  def replicate(self, tree: Any) -> Any:
    """Puts an identical copy of `tree` on every device."""
    if self.mode == 'pmap':
      if jax.process_count() > 1:  # pmap's outputs then span every process's devices.
        return flax.jax_utils.replicate(tree, devices=self.local_devices)
      # Placed as pmap places its outputs, so a step's first call runs the program every later
      # call runs. (flax's `replicate` names its mesh axis '_device_put_sharded': pmap compiled
      # each step twice.)
      def stack(x):
        # A device array is copied device to device (an evaluation's item table), never via host.
        one = x[None] if isinstance(x, jax.Array) else np.asarray(x)[None]
        return jax.make_array_from_single_device_arrays(
            (len(self.local_devices),) + one.shape[1:], self._stacked,
            [jax.device_put(one, d) for d in self.local_devices])
      return jax.tree.map(stack, tree)
    return jax.tree.map(lambda x: self._put(x, self._replicated), tree)

  def _put(self, x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` placed with `sharding`: as it is when it already has exactly that sharding
    (`builder`'s arrays: a [10^7, d] table and its moments are not duplicated; the caller
    then owns them, and a donating step consumes them), else a copy via host numpy (restored
    checkpoints are arrays committed to one local device, and device_put of those onto a
    multi-process mesh is an unsupported cross-host transfer)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    return jax.device_put(np.asarray(x), sharding)

  def _placement(self, path: Any, x: Any) -> NamedSharding:
    """Item tables (`is_item_table`) over 'model' when model_shards > 1 (their rows are a
    multiple of it); everything else replicated."""
    item = (self.sharded_items and is_item_table(path) and len(x.shape) >= 1
            and x.shape[0] % self.model_shards == 0)
    return self._items if item else self._replicated

  def place_state(self, tree: Any) -> Any:
    """`replicate`, except that item tables (`is_item_table`) are sharded along their rows over
    the 'model' axis when model_shards > 1 (their rows are a multiple of it)."""
    if self.mode == 'pmap':
      return self.replicate(tree)
    return jax.tree_util.tree_map_with_path(lambda p, x: self._put(x, self._placement(p, x)),
                                            tree)

  def builder(self, in_place: bool | None = None) -> Callable[..., Any]:
    """`build(fn, *args)` -> `fn(*args)`, a part of a state for `place_state`.

    In place (the default with item tables sharded) `fn` runs under `jit` with that placement as
    its out_shardings: every device computes and holds only its 1/M of the tables and their
    moments, no device ever holds them whole (a 10^7-row table's init), and `place_state` keeps
    those arrays as they are. Otherwise (the default without) `fn` runs eagerly, as it always
    has, and `place_state` copies the result.
    """
    if not (self.sharded_items if in_place is None else in_place) or self.mode == 'pmap':
      return lambda fn, *args: fn(*args)

    def build(fn, *args):
      shapes = jax.eval_shape(fn, *args)
      return jax.jit(fn, out_shardings=jax.tree_util.tree_map_with_path(self._placement,
                                                                        shapes))(*args)
    return build

  def place_item_table(self, x: Any) -> Any:
    """A [R, ...] item-axis array (R a multiple of model_shards) sharded over 'model'."""
    return jax.device_put(np.asarray(x), self._items)

  def item_constant(self, key: Any, make: Callable[[], np.ndarray]) -> jax.Array:
    """`place_item_table(make())`, placed once per `key` and shared (a frozen table that the
    train and eval steps both read)."""
    if key not in self._item_constants:
      self._item_constants[key] = self.place_item_table(make())
    return self._item_constants[key]

  def item_table_sharding(self) -> NamedSharding:
    """The sharding of item-axis arrays (rows over 'model'; replicated when M = 1)."""
    return self._items

  def unreplicate(self, tree: Any) -> Any:
    """One host copy (numpy) of replicated (or item-sharded) state."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: np.asarray(x[0]), tree)

    def host(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(x)

    return jax.tree.map(host, tree)

  # ---- batches -----------------------------------------------------------------------------
  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Host batch `[local_devices, per_device, ...]` -> device arrays for the mapped step."""
    if self.mode == 'pmap':
      return batch  # pmap splits the leading axis over local devices itself.
    def put(x):
      x = np.asarray(x)
      local = x.reshape((-1,) + x.shape[2:])
      return jax.make_array_from_process_local_data(self._sharded, local)
    return jax.tree.map(put, batch)

  def get_sharded(self, x: Any) -> np.ndarray:
    """A per-example output (sharded on the device axis) -> this process's rows as numpy."""
    if self.mode == 'pmap':
      x = np.asarray(x)
      return x.reshape((-1,) + x.shape[2:])
    # One copy of each row block: with a 'model' axis every block sits on M devices.
    shards = sorted((s for s in x.addressable_shards if s.replica_id == 0),
                    key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=0)

  # ---- mapping -----------------------------------------------------------------------------
  def map(self, fn: Callable, in_kinds: Sequence[str], out_kinds: Any,
          donate_argnums: Sequence[int] = ()) -> Callable:
    """Maps per-device `fn` over devices.

    Args:
      fn: the per-device function; may use collectives over axis `'data'`.
      in_kinds: per positional argument, 'replicated' (same on every device; with a 'model'
        axis, item tables in it keep their row sharding) or 'sharded' (split on the leading
        axis over 'data').
      out_kinds: a pytree prefix of the outputs with the same two words.
      donate_argnums: arguments whose buffers the step may reuse (the train state).
    """
    if self.mode == 'pmap':
      in_axes = tuple(0 for _ in in_kinds)
      return jax.pmap(fn, axis_name=AXIS, in_axes=in_axes,
                      donate_argnums=tuple(donate_argnums))
    spec = lambda kind: P() if kind == 'replicated' else P(AXIS)
    in_specs = tuple(spec(k) for k in in_kinds)
    out_specs = jax.tree.map(spec, out_kinds)
    # check_vma=False gives pmap semantics: gradients of replicated inputs stay per-device
    # (no implicit psum), so the step's explicit pmean is the one reduction in both modes.
    # With a 'model' axis, only 'data' is manual: XLA partitions the item-sharded arrays.
    manual = {AXIS} if self.sharded_items else set(self.mesh.axis_names)
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                           axis_names=manual, check_vma=False)
    return jax.jit(mapped, donate_argnums=tuple(donate_argnums))
