"""Multi-process training on one machine: 2 processes on 127.0.0.1 equal 1 process.

Two `python -m alphafuse_jax.main` processes (1 CPU device each, gloo collectives) train 20 steps
of plain SGD on the synthetic dataset of tests/test_train.py and save their latest checkpoint; the
parameters must equal a 1-process run with the same global batch. The 20 steps cross an epoch
boundary, so the run also exercises the cross-process validation (rank gather) and both
checkpoint managers; the validation metrics of the two runs must agree exactly.

Processes ignore SIGTERM once jax.distributed is initialised, so every process runs in its own
session and leftovers are stopped with SIGKILL on the process group.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_train import flag_args, make_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 20
TIMEOUT_S = 150


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(overrides: dict, workdir: pathlib.Path, extra: list[str]) -> subprocess.Popen:
  """One training process with 1 CPU device, in its own session (so killpg reaches it all)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  env.pop('ALPHAFUSE_CPU_DEVICES', None)
  cmd = [sys.executable, '-m', 'alphafuse_jax.main', '--config=configs/tiny.py',
         f'--workdir={workdir}', *flag_args(overrides), *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_all(procs: list[subprocess.Popen]) -> list[str]:
  """Waits for every process under one deadline; SIGKILLs the groups of any left over."""
  outputs = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=TIMEOUT_S)
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  return outputs


def params_at(workdir: pathlib.Path, step: int) -> list[tuple[str, np.ndarray]]:
  """The trained parameters of the latest checkpoint, as (path, array) in tree order."""
  manager = ocp.CheckpointManager(str(workdir / 'checkpoints'))
  try:
    assert manager.latest_step() == step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf
          in jax.tree_util.tree_leaves_with_path(restored.state['params'])]


@pytest.mark.xfail(strict=True, reason=(
    'train.py/main.py multi-process fixes pending: Evaluator.ranks gathers unequal shapes, both '
    'CheckpointManagers share orbax barrier keys, main.py prints results=None '
    '(see the performance-and-scale report); remove this marker once they are applied'))
def test_two_processes_equal_one(tmp_path):
  overrides = dict(make_dataset(tmp_path), **{
      'train.optimizer': 'sgd', 'train.learning_rate': 0.5, 'model.dropout_rate': 0.1,
      'train.stop_after_steps': STEPS})
  one = tmp_path / 'one'
  [out] = wait_all([reference := launch(overrides, one, [])])
  assert reference.returncode == 0, out
  port = free_port()
  two = tmp_path / 'two'
  procs = [launch(overrides, two, [
      '--config.distributed.enabled=true',
      f'--config.distributed.coordinator_address=127.0.0.1:{port}',
      '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'])
      for i in range(2)]
  outs = wait_all(procs)
  assert procs[0].returncode == 0 and procs[1].returncode == 0, '\n=====\n'.join(outs)

  expected, got = params_at(one, STEPS), params_at(two, STEPS)
  assert [name for name, _ in got] == [name for name, _ in expected]
  for (name, a), (_, b) in zip(expected, got):
    # SGD: a gradient summed instead of averaged over processes would double every update.
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
  # Epoch 1 ended at step 14 (about 830 train rows / 64): validation over both processes' rows
  # must count every example once and give the same ranks, hence identical metrics.
  records = [[json.loads(l) for l in (w / 'metrics.jsonl').read_text().splitlines()]
             for w in (one, two)]
  assert len(records[0]) == 1 and records[0][0]['epoch'] == 1
  for key in ('val/count', 'val/HR@10', 'val/NDCG@20', 'val/MRR@5'):
    assert records[1][0][key] == records[0][0][key], key
