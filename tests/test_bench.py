"""Smoke test of the benchmark harness (`python -m alphafuse_jax.benchmarks.sweep --quick`).

Timings are never asserted; the test checks that the harness measures the training loop's own
train step on 2 forced host devices and its eval step's chunked ranking, and reports them as a
table, JSON and a plot.
"""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from alphafuse_jax import builders
from alphafuse_jax import evaluation
from alphafuse_jax import train
from alphafuse_jax.benchmarks import sweep
from tests.cpu_env import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_full_sweep_covers_the_issue():
  points = sweep.sweep_points(quick=False)
  trained = [p for p in points if p['train']]
  assert {p['model'] for p in trained} == {'reference', 'standard'}
  for model in ('reference', 'standard'):
    mine = [p for p in trained if p['model'] == model]
    assert {p['num_items'] for p in mine if p['max_len'] == 10 and p['devices'] == 1} == {
        1_000, 3706, 10_000, 100_000}
    assert {p['max_len'] for p in mine if p['devices'] == 1 and p['num_items'] == 3706} == {
        10, 50, 200}
    assert {p['devices'] for p in mine if p['max_len'] == 10 and p['num_items'] == 3706} == {
        1, 2, 8}
  # The reference configuration of configs/default.py for every SASRec and ranking point.
  sasrec = [p for p in points if p['model'] != 'dreamrec']
  assert all(p['hidden'] == 128 and p['batch'] == 256 and p['negatives'] == 64 for p in sasrec)
  # DreamRec: sampling only (no train step), at h = d_l of MiniLM, on ML-1M's catalogue.
  dream = [p for p in points if p['model'] == 'dreamrec']
  assert {p['devices'] for p in dream} == {1, 2}
  assert all(p['hidden'] == 384 and p['num_items'] == 3706 and not p['train'] for p in dream)
  # 10^6 items: evaluation of the ranking only, never a train step.
  million = [p for p in points if p['num_items'] == 1_000_000]
  assert million and not any(p['train'] for p in million)
  assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points)


def test_worker_times_the_training_loops_own_steps(monkeypatch):
  """A point builds its model, train step and eval step with the loop's own functions."""
  calls = []
  for module, name in ((builders, 'build_model'), (train, 'make_train_step'),
                       (evaluation, 'make_eval_step')):
    def spy(*args, _real=getattr(module, name), _name=name, **kwargs):
      calls.append((_name, kwargs.get('chunk_size')))
      return _real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
  devices = jax.device_count()
  point = dict(hidden=16, batch=8 * devices, eval_batch=8 * devices, negatives=2, steps=1,
               model='reference', num_items=50, max_len=5, devices=devices, train=True,
               eval='model')
  out = sweep.run_point(point, 0.0, chunk_size=16)
  assert calls == [('build_model', None), ('make_train_step', None), ('make_eval_step', 16)]
  assert out['chunk_size'] == 16 and out['train_steps_timed'] >= 1
  assert out['train_seq_per_s'] > 0 and out['eval_examples_per_s'] > 0 and out['params'] > 0


# Slow (about 13 s): the bench CLI end to end; test_worker_times_the_training_loops_own_steps
# checks that it times the loop's own steps. `bash launch/test.sh -m slow` runs it.
@pytest.mark.slow
def test_quick_run_writes_table_json_and_plot(tmp_path):
  env = cpu_env()
  proc = subprocess.run([sys.executable, '-m', 'alphafuse_jax.benchmarks.sweep', '--quick',
                         f'--out_dir={tmp_path}'], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=240)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = [l for l in proc.stdout.splitlines() if l.startswith('| reference') or
          l.startswith('| ranking')]
  assert len(rows) == 2, proc.stdout
  record = json.loads((tmp_path / 'bench.json').read_text())
  assert record['matmul_flop_per_s'] > 0
  train_point, ranking = record['results']
  assert 'error' not in train_point and 'error' not in ranking
  # The train step really ran on 2 devices; XLA counted its FLOPs (both devices).
  assert train_point['devices'] == 2 and train_point['train_steps_timed'] >= 2
  assert train_point['train_seq_per_s'] > 0 and train_point['train_flops'] > 0
  assert train_point['params'] > 0
  # The eval step ranks in chunks of min(--chunk_size, N), as the loop's config sets them.
  assert train_point['chunk_size'] == train_point['num_items'] == 300
  assert ranking['chunk_size'] == 1024
  # Ranking-only FLOPs are exactly 2 * B * N * h (no forward).
  assert ranking['eval_flops'] == 2 * ranking['eval_batch'] * ranking['num_items'] * 32
  assert ranking['eval_examples_per_s'] > 0 and 'train_step_s' not in ranking
  assert (tmp_path / 'bench.png').stat().st_size > 5000
