"""Checkpoints, the loop's progress and the workdir's guards: what a run needs to resume exactly.

Two orbax managers in the workdir: `checkpoints/` holds the latest train states (the newest
`KEEP_LATEST`) with their `Progress` (resume), `best/` the params of the best validation epoch
(model selection, test). With the Grain input, a latest checkpoint also holds the data iterator's
state (item 'data', grain's orbax handler: one JSON per process), so the resumed run reads on
from the same batch. Every checkpoint carries a sha256 of its arrays (and of the iterator state);
a restore recomputes it, so a truncated or altered checkpoint is found. A damaged newest
checkpoint is deleted with a warning and the run resumes from the one before it; when none can be
restored the error names the workdir to remove.

The workdir itself: a `WorkdirLock` keeps a second run out while one is alive, and `config.json`
records the config a state was trained with (`check_config_record` refuses a rerun that changes
what the state depends on).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from alphafuse_jax import files
from alphafuse_jax.errors import CheckpointError
from alphafuse_jax.errors import ConfigError
from alphafuse_jax.errors import WorkdirError

# Latest states kept: the newest may be damaged (a disk fault, a half-copied workdir).
KEEP_LATEST = 2
_DIGEST = '_sha256'  # The key of the digest in the saved JSON.
_DATA_DIGEST = '_data_sha256'  # The digest of the data iterator's state, when it is saved.
_DATA = 'data'  # The item of the data iterator.


@dataclasses.dataclass
class Progress:
  """Loop state saved with every checkpoint (JSON).

  `epoch_loss_sum` and `epoch_steps` are the current epoch's running train loss and step count,
  so an epoch resumed mid-way logs the same mean loss as an uninterrupted one. `train_seconds`
  (the steps' time) and `elapsed_seconds` (wall time from each process's start, setup included)
  add up over every process of a resumed run, each counted to its last checkpoint;
  `elapsed_seconds` is None in a run resumed from a checkpoint written before it was kept.
  """
  epochs_done: int = 0
  best_metric: float = -1.0
  best_epoch: int = -1
  evals_since_best: int = 0
  finished: bool = False
  train_seconds: float = 0.0
  train_sequences: int = 0
  epoch_loss_sum: float = 0.0
  epoch_steps: int = 0
  elapsed_seconds: float | None = 0.0

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> 'Progress':
    """From a checkpoint's JSON; a record without `elapsed_seconds` leaves the count unknown."""
    return cls(**dict({'elapsed_seconds': None}, **record))


def _host(x: Any) -> np.ndarray:
  """One host copy of a (replicated) array, also when it spans several processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def digest(tree: Any) -> str:
  """sha256 over every leaf's shape and bytes, in tree order.

  Integer leaves count as int64: a restored step counter may come back as a Python int.
  """
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    array = _host(leaf)
    if array.dtype.kind in 'biu':
      array = array.astype(np.int64)
    h.update(f'{array.dtype.str}{array.shape}'.encode())
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()


def _grain_checkpoint():
  """grain's orbax handler args, imported only by runs that checkpoint a Grain iterator."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint


def data_digest(iterator: Any) -> str:
  """sha256 of a Grain iterator's state (the same on every process: it is a global step)."""
  return hashlib.sha256(json.dumps(iterator.get_state(), sort_keys=True).encode()).hexdigest()


def _one_line(error: BaseException) -> str:
  return f'{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ""}'


class Checkpoints:
  """Orbax managers for the latest train state (resume) and the best params (model selection)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.latest = self._manager('checkpoints', 'latest', KEEP_LATEST)
    self._best = None  # Opened on first use: a run that fails before it creates no best/.

  def _manager(self, directory: str, name: str, keep: int) -> ocp.CheckpointManager:
    # Distinct barrier keys: in multi-process runs both managers save the same step, and
    # orbax names its barriers by step alone ('Barrier _async_write_complete.N is already
    # ongoing' otherwise).
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           multiprocessing_options=multiprocessing)
    return ocp.CheckpointManager(os.path.join(self.workdir, directory), options=options)

  @property
  def best(self) -> ocp.CheckpointManager:
    if self._best is None:
      self._best = self._manager('best', 'best', 1)
    return self._best

  @staticmethod
  def _replace(manager: ocp.CheckpointManager, step: int) -> None:
    """Deletes `step` if it exists: a resumed run redoes the steps after its checkpoint."""
    manager.wait_until_finished()
    if step in manager.all_steps():
      manager.delete(step)

  def save_latest(self, step: int, state: Any, progress: Progress,
                  data_iterator: Any = None) -> None:
    """Saves (state, progress) and, when given, the Grain iterator (positioned after `step`)."""
    self._replace(self.latest, step)
    record = dict(dataclasses.asdict(progress), **{_DIGEST: digest(state)})
    items = {}
    if data_iterator is not None:
      record[_DATA_DIGEST] = data_digest(data_iterator)
      # A synchronous item: the state is written before save() returns, whatever comes next.
      items[_DATA] = _grain_checkpoint().CheckpointSave(data_iterator)
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(record), **items),
                     force=True)

  def _restore_step(self, step: int, abstract: Any, data_iterator: Any) -> tuple[Any, Progress]:
    items = {}
    if data_iterator is not None and os.path.isdir(
        os.path.join(str(self.latest.directory), str(step), _DATA)):
      items[_DATA] = _grain_checkpoint().CheckpointRestore(data_iterator)  # Sets its state.
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore(), **items))
    record = dict(restored.progress)
    expected = record.pop(_DIGEST, None)  # None: written before digests were kept.
    if expected is not None and digest(restored.state) != expected:
      raise CheckpointError(f'the arrays of step {step} do not match their sha256')
    expected = record.pop(_DATA_DIGEST, None)  # None: saved without the Grain iterator.
    if items and expected is not None and data_digest(data_iterator) != expected:
      raise CheckpointError(f'the data iterator state of step {step} does not match its sha256')
    return restored.state, Progress.from_record(record)

  def restore_latest(self, template: Any,
                     data_iterator: Any = None) -> tuple[Any, Progress] | None:
    """The newest intact (state, progress), or None for a fresh workdir.

    A checkpoint that fails to restore or to verify is deleted with a warning and the next
    older one is tried; when none is intact, a `CheckpointError` names the workdir to remove.
    `data_iterator` (a Grain iterator) takes the state saved with the restored checkpoint, or
    keeps its initial state when that checkpoint has none (saved by the numpy input).
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    if not steps:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    initial = None if data_iterator is None else data_iterator.get_state()
    failures = {}
    for step in steps:
      try:
        if initial is not None:
          data_iterator.set_state(initial)  # Undo a failed attempt's restore.
        restored = self._restore_step(step, abstract, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        # Any failure (truncated files, a missing item, other shapes) makes it unusable.
        failures[step] = _one_line(e)
        continue
      for bad, why in failures.items():
        logging.warning('checkpoint step %d in %s cannot be restored (%s); deleted it and '
                        'resuming from step %d.', bad, self.latest.directory, why, step)
        self.latest.delete(bad)
      return restored
    why = '; '.join(f'step {s}: {w}' for s, w in failures.items())
    raise CheckpointError(f'no checkpoint in {self.latest.directory} can be restored ({why}); '
                          f'remove the workdir {self.workdir} to start over, or pass another '
                          '--workdir.')

  def save_best(self, step: int, params: Any) -> None:
    self._replace(self.best, step)
    self.best.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        digest=ocp.args.JsonSave({_DIGEST: digest(params)})), force=True)

  def restore_best(self, template: Any) -> Any:
    step = self.best.latest_step()
    if step is None:
      raise CheckpointError(f'no best checkpoint in {self.best.directory} (no evaluation ran); '
                            f'remove the workdir {self.workdir} to start over.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    # Best checkpoints written before digests were kept have no 'digest' item.
    items = {'params': ocp.args.StandardRestore(abstract)}
    if os.path.isdir(os.path.join(str(self.best.directory), str(step), 'digest')):
      items['digest'] = ocp.args.JsonRestore()
    try:
      restored = self.best.restore(step, args=ocp.args.Composite(**items))
      if 'digest' in items and digest(restored.params) != restored.digest[_DIGEST]:
        raise CheckpointError('the arrays do not match their sha256')
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'the best checkpoint {self.best.directory}/{step} cannot be restored ({_one_line(e)});'
          f' remove the workdir {self.workdir} to train again, or pass another --workdir.') from e
    return restored.params

  def close(self) -> None:
    for manager in (self.latest, self._best):
      if manager is not None:
        manager.wait_until_finished()
        manager.close()


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a saved train state (a step directory in checkpoints/)."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


# ---- the workdir: one run at a time, and the config it was trained with ----------------------
class WorkdirLock:
  """An exclusive `flock` on `<workdir>/.lock` for the life of the run (the OS drops it when the
  process dies, even by SIGKILL); the file holds the holder's pid for the error message."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, '.lock')
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 32, 0).decode(errors='replace').strip() or 'unknown'
      os.close(self._fd)
      raise WorkdirError(f'workdir {workdir} is in use by another run (pid {holder}); wait for '
                         'it to finish (or stop it), or pass another --workdir.') from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, str(os.getpid()).encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


# Fields that may change between runs on one workdir: they do not shape the trained state.
# Everything else (data, text, embedding, model, optimizer, seed, loss, diffusion) must match.
MUTABLE_FIELDS = ('train.num_epochs', 'train.patience', 'train.checkpoint_every_steps',
                  'train.stop_after_steps', 'eval.', 'progress_bar', 'tensorboard',
                  'parallelism', 'distributed.', 'data.data_dir', 'data.input',
                  'data.grain_cache_mb', 'text.batch_size', 'log_every_steps',
                  'sync_every_step', 'profile_steps',
                  'allow_config_change', 'diffusion.sampling_stride', 'diffusion.guidance_weight',
                  'diffusion.sampler', 'diffusion.eval_seed')
CONFIG_RECORD = 'config.json'


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; values as JSON gives them back (tuples become lists)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_dict(config: Any) -> dict[str, Any]:
  """The config as plain JSON values (what `config.json` holds)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'field: old -> new' for each field outside MUTABLE_FIELDS that differs or is gone.

  A field the record lacks is not a change: newer code added it, with the old behaviour as its
  default.
  """
  old, new = _flatten(recorded), _flatten(current)
  changed = []
  for key in sorted(old):
    if key.startswith(MUTABLE_FIELDS) or old[key] == new.get(key, '<absent>'):
      continue
    changed.append(f'config.{key}: {old[key]!r} -> {new.get(key, "<absent>")!r}')
  return changed


def check_config_record(workdir: str, config: Any) -> None:
  """Refuses a config that differs from `<workdir>/config.json` in what the state depends on.

  Only a workdir holding a checkpoint is protected (before that there is no state to keep).
  With `config.allow_config_change` the differences are logged and the run continues.
  """
  path = os.path.join(workdir, CONFIG_RECORD)
  if not (os.path.isfile(path) and has_checkpoint(workdir)):
    return
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f'{path} is unreadable ({e}); delete it to accept the current config for '
                      'this workdir, or pass another --workdir.') from e
  changes = config_changes(recorded, config_dict(config))
  if not changes:
    return
  shown = '; '.join(changes[:3]) + (f'; and {len(changes) - 3} more' if len(changes) > 3 else '')
  if config.allow_config_change:
    logging.warning('continuing %s with a changed config (allow_config_change): %s', workdir,
                    shown)
    return
  raise ConfigError(f'workdir {workdir} was trained with another config ({shown}); pass a new '
                    '--workdir for this config, or --config.allow_config_change=true to continue '
                    'the saved state with it.')


def write_config_record(workdir: str, config: Any) -> None:
  files.write_json(os.path.join(workdir, CONFIG_RECORD), config_dict(config))
