"""Checkpoints and the loop's progress: what a run needs to resume exactly and to test its best.

Two orbax managers in the workdir: `checkpoints/` holds the latest train state with its
`Progress` (resume), `best/` the params of the best validation epoch (model selection, test).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass
class Progress:
  """Loop state saved with every checkpoint (JSON)."""
  epochs_done: int = 0
  best_metric: float = -1.0
  best_epoch: int = -1
  evals_since_best: int = 0
  finished: bool = False
  train_seconds: float = 0.0
  train_sequences: int = 0


class Checkpoints:
  """Orbax managers for the latest train state (resume) and the best params (model selection)."""

  def __init__(self, workdir: str):
    def options(name):
      # Distinct barrier keys: in multi-process runs both managers save the same step, and
      # orbax names its barriers by step alone ('Barrier _async_write_complete.N is already
      # ongoing' otherwise).
      multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)
      return ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                          multiprocessing_options=multiprocessing)
    self.latest = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                        options=options('latest'))
    self.best = ocp.CheckpointManager(os.path.join(workdir, 'best'), options=options('best'))

  def save_latest(self, step: int, state: Any, progress: Progress) -> None:
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(dataclasses.asdict(progress))),
        force=True)

  def restore_latest(self, template: Any) -> tuple[Any, Progress] | None:
    step = self.latest.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
    return restored.state, Progress(**restored.progress)

  def save_best(self, step: int, params: Any) -> None:
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)

  def restore_best(self, template: Any) -> Any:
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError('no best checkpoint was written (no evaluation ran).')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract))).params

  def close(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()
