"""Smoke test of the benchmark harness (`python -m alphafuse_jax.bench --quick`).

Timings are never asserted; the test checks that the harness measures the real train step on 2
forced host devices and the chunked ranking, and reports them as a table, JSON and a plot.
"""

import json
import os
import pathlib
import subprocess
import sys

from alphafuse_jax import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_full_sweep_covers_the_issue():
  points = bench.sweep_points(quick=False)
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


def test_quick_run_writes_table_json_and_plot(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-m', 'alphafuse_jax.bench', '--quick',
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
  # Ranking-only FLOPs are exactly 2 * B * N * h (no forward).
  assert ranking['eval_flops'] == 2 * ranking['eval_batch'] * ranking['num_items'] * 32
  assert ranking['eval_examples_per_s'] > 0 and 'train_step_s' not in ranking
  assert (tmp_path / 'bench.png').stat().st_size > 5000
