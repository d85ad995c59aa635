"""What the train loop watches between steps without waiting for them: losses and a profile.

On GPU and TPU a step is queued while earlier ones still run; reading a loss every step would
make the host wait for the device each time. `StepLosses` keeps the per-step losses on the
device and reads them in one transfer per interval (`config.log_every_steps`, checkpoints,
epoch ends); a NaN or inf among them still names the exact step it happened at. Whether the loop
must instead read every step (XLA's CPU runtime with several devices) is decided in one place,
`parallel.needs_step_sync`. `StepProfile` traces a window of steps with `jax.profiler`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax

from alphafuse_jax import errors


class NonFiniteLossError(errors.AlphafuseError, FloatingPointError):
  """The training loss became NaN or inf."""


class StepLosses:
  """The losses of the steps queued since the last read, kept on the device until `read`.

  `progress` (a `checkpointing.Progress`) receives, at each read, the losses' running sum for the
  epoch (added in step order, as a per-step read would) and the interval's seconds and sequences
  for the throughput.
  """

  def __init__(self, progress: Any, *, pmap: bool):
    self._progress = progress
    self._pmap = pmap  # pmap returns replicated values with a leading device axis.
    self._pending: list[jax.Array] = []
    self._sequences = 0
    self._started = 0.0

  def __len__(self) -> int:
    return len(self._pending)

  def add(self, loss: jax.Array, sequences: int, started: float) -> None:
    """Queues one step's loss (no transfer); `started`: perf_counter() before it was queued."""
    if not self._pending:
      self._started = started
    self._pending.append(loss)
    self._sequences += sequences

  def read(self, step: int, epoch: int, *, timed: bool = True) -> list[float]:
    """Fetches the queued losses of steps step - len + 1 .. step (waiting for them to finish).

    Raises NonFiniteLossError naming the first step whose loss is NaN or inf. `timed=False`
    leaves the interval out of the throughput (a step that compiled).
    """
    values = [float(v[0] if self._pmap else v) for v in jax.device_get(self._pending)]
    first = step - len(values) + 1
    for offset, value in enumerate(values):
      if not math.isfinite(value):
        raise NonFiniteLossError(
            f'training loss is {value} at step {first + offset} (epoch {epoch}); lower '
            f'config.train.learning_rate or check the embeddings for NaN/inf.')
    progress = self._progress
    if values and timed:
      progress.train_seconds += time.perf_counter() - self._started
      progress.train_sequences += self._sequences
    for value in values:
      progress.epoch_loss_sum += value
      progress.epoch_steps += 1
    self._pending, self._sequences = [], 0
    return values


class StepProfile:
  """A `jax.profiler` trace of global steps first..first+count-1 into `<workdir>/profile`.

  TensorBoard's profile plugin (`tensorboard --logdir <workdir>/profile`) or Perfetto (the
  .trace.json.gz beside the .xplane.pb) shows it. A run resumed past `first` traces nothing.
  """

  def __init__(self, workdir: str, steps: tuple[int, ...]):
    self.log_dir = os.path.join(workdir, 'profile')
    self._first, self._count = tuple(steps) if steps else (0, 0)
    self._active = False

  def before_step(self, step: int) -> None:
    """Call before queuing global step `step` (1 = the first update)."""
    if self._count and step == self._first:
      jax.profiler.start_trace(self.log_dir)
      self._active = True

  def after_step(self, step: int, state: Any) -> None:
    """Call after queuing step `step`; ends the trace once the window's last step has run."""
    if self._active and step >= self._first + self._count - 1:
      jax.block_until_ready(state)  # The trace must hold the device work, not just its queuing.
      self.stop()

  def stop(self) -> None:
    if self._active:
      self._active = False
      jax.profiler.stop_trace()
