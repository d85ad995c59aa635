"""The run's metric log: `metrics.jsonl` (one JSON record per epoch) and TensorBoard event files.

TensorBoard events go to `workdir/tensorboard` through tensorboardX, which needs no TensorFlow:
`tensorboard --logdir workdir/tensorboard` shows the epoch train loss, every validation metric
and the loss of every step ('train/loss', written when the loop reads the losses).
TensorBoard tags allow only [A-Za-z0-9_./-], so 'val/NDCG@20' is logged as 'val/NDCG_20'.
"""

from __future__ import annotations

import json
import os
from typing import Any

from alphafuse_jax import files


def tensorboard_tag(key: str) -> str:
  """A metric name as a TensorBoard tag: 'val/NDCG@20' -> 'val/NDCG_20'."""
  return key.replace('@', '_')


class MetricWriter:
  """Writes epoch records; on resume, drops what was logged after the restored step.

  Only process 0 should hold one (the workdir is shared by all processes).
  """

  def __init__(self, workdir: str, *, tensorboard: bool):
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    self._tensorboard = tensorboard
    self._writer = None

  def start(self, resumed_step: int | None) -> None:
    """A fresh run (None) forgets old records; a resumed one keeps those up to its step."""
    records = [] if resumed_step is None else [
        r for r in files.read_jsonl(self.jsonl_path) if r.get('step', 0) <= resumed_step]
    files.write_text(self.jsonl_path, ''.join(json.dumps(r) + '\n' for r in records))
    if self._tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # purge_step drops the events a killed run wrote after its checkpoint (they are redone).
      self._writer = SummaryWriter(self.tensorboard_dir, purge_step=(resumed_step or 0) + 1,
                                   flush_secs=30)

  def write(self, record: dict[str, Any]) -> None:
    """Appends `record` (with 'step') to metrics.jsonl and its numbers to TensorBoard."""
    files.append_jsonl(self.jsonl_path, record)
    if self._writer is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)):
          self._writer.add_scalar(tensorboard_tag(key), value, record['step'])
      self._writer.flush()

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    """TensorBoard only (e.g. the per-step 'train/loss'): flushed every 30 s, and by `write`."""
    if self._writer is not None:
      for key, value in scalars.items():
        self._writer.add_scalar(tensorboard_tag(key), value, step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
