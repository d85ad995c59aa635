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
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import flax.jax_utils
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'
MODES = ('shard_map', 'pmap')


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


class DataParallel:
  """Maps per-device functions over all devices, replicates state and places batches."""

  def __init__(self, mode: str = 'shard_map'):
    if mode not in MODES:
      raise ValueError(f'config.parallelism={mode!r} is not one of {MODES}.')
    self.mode = mode
    self.local_devices = jax.local_devices()
    self.num_local_devices = len(self.local_devices)
    self.num_devices = jax.device_count()
    self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
    self._replicated = NamedSharding(self.mesh, P())
    self._sharded = NamedSharding(self.mesh, P(AXIS))

  # ---- state -------------------------------------------------------------------------------
  def replicate(self, tree: Any) -> Any:
    """Puts an identical copy of `tree` on every device."""
    if self.mode == 'pmap':
      # jax.device_put_replicated was removed in JAX 0.10; flax's helper still does this.
      return flax.jax_utils.replicate(tree, devices=self.local_devices)
    # Via host numpy: restored checkpoints are arrays committed to one local device, and
    # device_put of those onto a multi-process mesh is an (unsupported) cross-host transfer.
    return jax.device_put(jax.tree.map(np.asarray, tree), self._replicated)

  def unreplicate(self, tree: Any) -> Any:
    """One host copy (numpy) of replicated state."""
    if self.mode == 'pmap':
      return jax.tree.map(lambda x: np.asarray(x[0]), tree)
    return jax.tree.map(np.asarray, tree)

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
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], axis=0)

  # ---- mapping -----------------------------------------------------------------------------
  def map(self, fn: Callable, in_kinds: Sequence[str], out_kinds: Any,
          donate_argnums: Sequence[int] = ()) -> Callable:
    """Maps per-device `fn` over devices.

    Args:
      fn: the per-device function; may use collectives over axis `'data'`.
      in_kinds: per positional argument, 'replicated' (same on every device) or 'sharded'
        (split on the leading axis).
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
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=tuple(donate_argnums))
