"""The spectrum command: its numbers against numpy, the plot, atomic outputs and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alphafuse_jax import spectrum


def vectors(n=60, d=10, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)) * np.geomspace(1.0, 0.01, d)).astype(np.float32)


def test_run_writes_numbers_matching_numpy(tmp_path):
  x = vectors()
  np.save(tmp_path / 'emb.npy', x)
  report = spectrum.run(str(tmp_path / 'emb.npy'), str(tmp_path / 'out'), hidden_dim=6,
                        null_dim=2, scale=40.0)
  s = np.linalg.svd(np.cov(x.astype(np.float64) * 40, rowvar=False), compute_uv=False)
  saved = json.loads((tmp_path / 'out' / 'spectrum.json').read_text())
  assert saved == json.loads(json.dumps(report))
  np.testing.assert_allclose(saved['eigenvalues'], s, rtol=1e-10)
  assert saved['kept_dim'] == 6 and saved['nullity'] == 2 and saved['id_dims'] == [4, 6]
  assert saved['explained_variance_kept'] == pytest.approx(s[:6].sum() / s.sum(), rel=1e-12)
  assert saved['explained_variance_semantic'] == pytest.approx(s[:4].sum() / s.sum(), rel=1e-12)
  assert saved['num_below_whitening_floor'] == 0
  png = (tmp_path / 'out' / 'spectrum.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
  # Atomic writes leave no temp files behind.
  assert sorted(os.listdir(tmp_path / 'out')) == ['spectrum.json', 'spectrum.png']


def test_threshold_wins_and_rank_deficiency_is_reported(tmp_path):
  x = vectors(n=8, d=10)  # rank 7: three numerically-zero eigenvalues.
  report = spectrum.spectrum_report(x * 40, hidden_dim=10, null_dim=64, null_threshold=1e-6)
  assert report['nullity'] == 3 and report['num_below_whitening_floor'] == 3
  assert report['null_dim'] is None and report['id_dims'] == [7, 10]
  with pytest.raises(ValueError, match='exceeds the 2 kept'):
    spectrum.spectrum_report(x * 40, hidden_dim=2, null_threshold=1e-6)


def test_cli(tmp_path):
  np.save(tmp_path / 'emb.npy', vectors())
  result = subprocess.run(
      [sys.executable, '-m', 'alphafuse_jax.spectrum', f'--embeddings={tmp_path / "emb.npy"}',
       f'--out_dir={tmp_path / "cli"}', '--hidden_dim=5', '--null_threshold=0.5'],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert 'kept=5' in result.stdout
  saved = json.loads((tmp_path / 'cli' / 'spectrum.json').read_text())
  assert saved['null_threshold'] == 0.5 and saved['scale'] == 40.0
  assert saved['nullity'] == int(np.sum(np.asarray(saved['eigenvalues']) <= 0.5))
  missing = subprocess.run(
      [sys.executable, '-m', 'alphafuse_jax.spectrum', f'--embeddings={tmp_path / "no.npy"}',
       f'--out_dir={tmp_path / "x"}'], capture_output=True, text=True, timeout=120, check=False)
  assert missing.returncode != 0 and 'not found' in missing.stderr
