"""Tests for alphafuse_jax.decomposition against an independent float64 numpy oracle."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import decomposition as dc
from alphafuse_jax import streaming_decomposition as sd
from tests.cpu_env import cpu_env


# ---- the oracle: numpy float64, written independently of the library -----------------------
def oracle_space(x, weights=None, authors=False):
  """(mean, eigenvalues desc, eigenvectors with canonical signs) via np.cov + np.linalg.svd."""
  x = np.asarray(x, np.float64)
  if weights is None:
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
  else:
    p = (weights / weights.sum()).reshape(-1, 1)
    mean = np.sum(x * p, axis=0)
    if authors:
      cov = np.cov((x - mean) * np.sqrt(p), rowvar=False)
    else:
      cov = sum(pi * np.outer(xi - mean, xi - mean) for pi, xi in zip(p[:, 0], x))
  u, s, _ = np.linalg.svd(cov)
  return mean, s, oracle_signs(u)


def oracle_signs(u):
  pivot = u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])]
  return u * np.where(pivot < 0, -1.0, 1.0)


def oracle_decomposition(x, hidden, null_dim, cover, standardize=True):
  """The reference's semantic_space_decomposion + AlphaFuse fusion, in numpy float64."""
  mean, s, u = oracle_space(x)
  k = hidden - null_dim if cover else hidden
  p = u[:, :k]
  if standardize:
    p = p @ np.diag(np.sqrt(1 / s)[:k])
  return (x - mean) @ p


def separated_data(n=200, d=12, seed=0):
  """Random data whose covariance has well-separated eigenvalues (ratio ~1.3 apart)."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  z = rng.normal(size=(n, d))
  z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
  return 40 * (z * np.geomspace(3.0, 0.1, d)) @ q.T + rng.normal(size=d)


def low_rank_plus_noise(n=300, d=16, rank=4, seed=1):
  rng = np.random.default_rng(seed)
  basis = rng.normal(size=(rank, d))
  scores = rng.normal(size=(n, rank)) * np.array([8.0, 5.0, 3.0, 2.0])[:rank]
  return scores @ basis + 1e-3 * rng.normal(size=(n, d))


# ---- fit_semantic_space ----------------------------------------------------------------------
@pytest.mark.parametrize('make', [separated_data, low_rank_plus_noise])
def test_eigenvalues_match_oracle_in_x64(make):
  x = make()
  mean, s, u = oracle_space(x)
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(x)
    assert space.eigenvalues.dtype == jnp.float64
    np.testing.assert_allclose(space.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(space.eigenvalues, s, rtol=1e-10, atol=1e-12 * s[0])
    # Eigenvectors are determined where the spectrum is separated: all for separated data, the
    # signal directions for the low-rank data (its noise eigenvalues are nearly degenerate).
    top = x.shape[1] if make is separated_data else 4
    np.testing.assert_allclose(space.eigenvectors[:, :top], u[:, :top], atol=1e-8)


def test_eigenvalues_float32_within_1e4():
  x = separated_data()
  _, s, u = oracle_space(x)
  space = dc.fit_semantic_space(x)  # x64 is off for the pytest session.
  assert space.eigenvalues.dtype == jnp.float32
  np.testing.assert_allclose(space.eigenvalues, s, rtol=1e-4)
  np.testing.assert_allclose(space.eigenvectors, u, atol=1e-3)


def test_eigenvalues_descending_and_basis_orthonormal():
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(low_rank_plus_noise())
    values, vectors = np.asarray(space.eigenvalues), np.asarray(space.eigenvectors)
  assert np.all(np.diff(values) <= 0)
  np.testing.assert_allclose(vectors.T @ vectors, np.eye(16), atol=1e-12)
  np.testing.assert_allclose(vectors[:, :6].T @ vectors[:, :6], np.eye(6), atol=1e-12)


def test_signs_are_canonical():
  space = dc.fit_semantic_space(separated_data())
  v = np.asarray(space.eigenvectors)
  pivots = v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])]
  assert np.all(pivots > 0)
  # Flipping any column of the input basis does not change the canonical form.
  flipped = v * np.array([-1, 1] * 6)
  np.testing.assert_array_equal(np.asarray(dc.canonicalize_signs(jnp.asarray(flipped))), v)


def test_weighted_covariance_equals_direct_sum():
  x = separated_data(n=60, d=6)
  counts = np.random.default_rng(3).integers(0, 50, size=60).astype(float)
  mean, s, u = oracle_space(x, counts)
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(x, counts)
    v, lam = np.asarray(space.eigenvectors), np.asarray(space.eigenvalues)
  np.testing.assert_allclose(space.mean, mean, rtol=1e-12)
  p = counts / counts.sum()
  direct = sum(pi * np.outer(xi - mean, xi - mean) for pi, xi in zip(p, x))
  np.testing.assert_allclose(v @ np.diag(lam) @ v.T, direct, rtol=1e-10, atol=1e-10 * s[0])
  np.testing.assert_allclose(lam, s, rtol=1e-10)


def test_authors_weighting_matches_np_cov_of_sqrt_p_rows():
  x = separated_data(n=60, d=6)
  counts = np.random.default_rng(4).integers(1, 50, size=60).astype(float)
  _, s, u = oracle_space(x, counts, authors=True)
  _, s_true, _ = oracle_space(x, counts)
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(x, counts, weighting='authors')
    np.testing.assert_allclose(space.eigenvalues, s, rtol=1e-10)
    np.testing.assert_allclose(space.eigenvectors, u, atol=1e-8)
  # The quirk: about 1/(N-1) of the properly weighted covariance.
  assert 0.5 / 59 < s.sum() / s_true.sum() < 1.5 / 59


def test_fit_rejects_bad_inputs():
  with pytest.raises(ValueError, match='matrix'):
    dc.fit_semantic_space(np.zeros(5))
  with pytest.raises(ValueError, match='NaN'):
    dc.fit_semantic_space(np.array([[1.0, 2.0], [np.nan, 1.0], [0.0, 1.0]]))
  with pytest.raises(ValueError, match='one weight per'):
    dc.fit_semantic_space(np.ones((4, 2)), np.ones(3))
  with pytest.raises(ValueError, match='non-negative'):
    dc.fit_semantic_space(np.eye(3), np.array([1.0, -1.0, 1.0]))
  with pytest.raises(ValueError, match='weighting'):
    dc.fit_semantic_space(np.eye(3), np.ones(3), weighting='sqrt')


# ---- null_space_dim -------------------------------------------------------------------------
def test_null_space_dim_by_threshold_and_dim():
  values = np.array([5.0, 2.0, 1.0, 0.3, 0.25, 0.1])
  assert dc.null_space_dim(values, null_threshold=0.25) == 2  # <= counts the tie.
  assert dc.null_space_dim(values, null_dim=3) == 3
  # The threshold wins over null_dim, as in the reference.
  assert dc.null_space_dim(values, null_dim=1, null_threshold=1.0) == 4
  assert dc.null_space_dim(values, null_dim=4, kept_dim=4) == 4


def test_null_space_dim_errors():
  values = np.array([5.0, 2.0, 1.0, 0.3])
  with pytest.raises(ValueError, match='Nullity 0'):
    dc.null_space_dim(values, null_threshold=0.1)
  with pytest.raises(ValueError, match='>= 1'):
    dc.null_space_dim(values, null_dim=0)
  with pytest.raises(ValueError, match='exceeds the 2 kept'):
    dc.null_space_dim(values, null_threshold=2.0, kept_dim=2)
  with pytest.raises(ValueError, match='null_dim or null_threshold'):
    dc.null_space_dim(values)


# ---- project and fuse -----------------------------------------------------------------------
@pytest.mark.parametrize('make', [separated_data, low_rank_plus_noise])
def test_project_matches_oracle_and_whitens(make):
  x = make()
  hidden = 4
  expected = oracle_decomposition(x, hidden, null_dim=2, cover=False)
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(x)
    table = np.asarray(dc.project(x, space, hidden))
    raw = np.asarray(dc.project(x, space, hidden, standardize=False))
  np.testing.assert_allclose(table, expected, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(np.cov(table, rowvar=False), np.eye(hidden), atol=1e-9)
  _, s, _ = oracle_space(x)
  np.testing.assert_allclose(np.var(raw, axis=0, ddof=1), s[:hidden], rtol=1e-9)


def test_project_float32_close_to_oracle():
  x = separated_data()
  table = dc.project(x, dc.fit_semantic_space(x), 6)
  assert table.dtype == jnp.float32
  np.testing.assert_allclose(table, oracle_decomposition(x, 6, 2, False), atol=2e-3)


def test_project_refuses_near_zero_eigenvalues_unless_floored():
  # N - 1 = 9 < d = 16: seven eigenvalues are (numerically) zero.
  x = np.random.default_rng(5).normal(size=(10, 16)) * 40
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(x)
    assert np.asarray(dc.project(x, space, 9)).shape == (10, 9)  # the rank: accepted.
    with pytest.raises(ValueError, match='Refusing to whiten.*lambda_9'):
      dc.project(x, space, 16)
    floored = np.asarray(dc.project(x, space, 16, eigenvalue_floor=1e-3))
    assert np.all(np.isfinite(floored))
    # Unstandardised projection divides by nothing and is always allowed.
    assert np.all(np.isfinite(np.asarray(dc.project(x, space, 16, standardize=False))))
    with pytest.raises(ValueError, match='eigenvalue_floor'):
      dc.project(x, space, 16, eigenvalue_floor=0.0)
  # Float32 refuses too (its zero eigenvalues are roundoff of order 1e-7 * lambda_max).
  with pytest.raises(ValueError, match='Refusing to whiten'):
    dc.project(x, dc.fit_semantic_space(x), 16)


def test_project_rejects_bad_dim():
  space = dc.fit_semantic_space(separated_data())
  for dim in (0, 13, 2.0):
    with pytest.raises(ValueError, match='dim='):
      dc.project(separated_data(), space, dim)


@pytest.mark.parametrize('cover', [False, True])
def test_fused_table_matches_reference(cover):
  x = separated_data()
  hidden, null_dim = 6, 2
  ids = np.random.default_rng(6).normal(size=(x.shape[0], null_dim))
  base = oracle_decomposition(x, hidden, null_dim, cover)
  expected = np.concatenate([base, ids], 1) if cover else base.copy()
  if not cover:
    expected[:, -null_dim:] += ids
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(x)
    language = dc.project(x, space, hidden - null_dim if cover else hidden)
    fused = np.asarray(dc.fuse(language, jnp.asarray(ids), cover=cover))
  np.testing.assert_allclose(fused, expected, rtol=1e-9, atol=1e-9)
  assert fused.shape == (x.shape[0], hidden)


def test_cover_equals_replacing_the_last_null_dims():
  x = separated_data()
  ids = jnp.ones((x.shape[0], 2))
  space = dc.fit_semantic_space(x)
  full = dc.project(x, space, 6)
  covered = dc.fuse(dc.project(x, space, 4), ids, cover=True)
  np.testing.assert_allclose(covered, full.at[:, 4:].set(1.0), atol=1e-5)
  # Adding puts the ID only in the last n dims; the first k - n stay the language ones.
  added = dc.fuse(full, ids)
  np.testing.assert_array_equal(added[:, :4], full[:, :4])
  np.testing.assert_allclose(added[:, 4:], full[:, 4:] + 1.0, rtol=1e-6)


def test_fuse_shape_errors():
  with pytest.raises(ValueError, match='exceeds the language width'):
    dc.fuse(jnp.zeros((3, 2)), jnp.zeros((3, 4)))
  with pytest.raises(ValueError, match='agree'):
    dc.fuse(jnp.zeros((3, 4)), jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match='0 columns'):
    dc.fuse(jnp.zeros((3, 4)), jnp.zeros((3, 0)))


def test_explained_variance():
  assert dc.explained_variance(np.array([3.0, 1.0, -1e-12]), 1) == pytest.approx(0.75)


# ---- streaming (streaming_decomposition.py) ------------------------------------------------
UNEVEN = (0, 7, 150, 1, 0, 93, 64, 85)  # Chunk sizes of a 400-row stream (empty ones too).


def stream_data(n=400, d=12, seed=5):
  """Separated spectrum far from the origin (mean ~100): cancellation would show."""
  return separated_data(n=n, d=d, seed=seed) + 100.0


def chunks_of(x, sizes=UNEVEN):
  assert sum(sizes) == len(x)
  start = 0
  for size in sizes:
    yield x[start:start + size]
    start += size


def assert_same_space(got, want, top=None):
  """Equal to 1e-10: means and eigenvalues relative to their scale, separated eigenvectors."""
  lam = np.asarray(want.eigenvalues)
  np.testing.assert_allclose(got.mean, want.mean, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(got.eigenvalues, lam, rtol=1e-10, atol=1e-10 * lam[0])
  np.testing.assert_allclose(got.eigenvectors[:, :top], np.asarray(want.eigenvectors)[:, :top],
                             atol=1e-10)


@pytest.mark.parametrize('weights', [None, 'weighted', 'authors'])
def test_streamed_fit_equals_in_memory_for_uneven_chunks(weights):
  x = stream_data()
  counts = np.random.default_rng(6).integers(0, 30, size=400).astype(float)
  kwargs = {} if weights is None else {'item_weights': counts, 'weighting': weights}
  mean, s, u = oracle_space(x, *(() if weights is None else (counts, weights == 'authors')))
  with jax.enable_x64(True):
    want = dc.fit_semantic_space(x, **kwargs)
    streamed = dc.fit_semantic_space(chunks_of(x), **kwargs)  # An iterator: streamed.
    blocked = sd.fit_semantic_space_streaming(x, block_rows=48, **kwargs)  # 9 blocks, 1 partial.
  for got in (streamed, blocked):
    assert got.eigenvalues.dtype == jnp.float64
    assert_same_space(got, want)
  # And the float64 numpy oracle (np.cov + svd).
  np.testing.assert_allclose(streamed.eigenvalues, s, rtol=1e-10, atol=1e-10 * s[0])
  np.testing.assert_allclose(streamed.eigenvectors, u, atol=1e-8)
  np.testing.assert_allclose(streamed.mean, mean, rtol=1e-12)


def test_streamed_fit_from_a_memmapped_npy(tmp_path):
  x = stream_data().astype(np.float32)
  path = tmp_path / 'vectors.npy'
  np.save(path, x)
  with jax.enable_x64(True):
    want = dc.fit_semantic_space(x.astype(np.float64))
    for source in (path, str(path), np.load(path, mmap_mode='r')):
      assert_same_space(sd.fit_semantic_space_streaming(source, block_rows=64), want)
  # Outside x64 the result comes back in float32, accumulated in float64 all the same.
  space = dc.fit_semantic_space(path)
  assert space.eigenvalues.dtype == jnp.float32
  np.testing.assert_allclose(space.eigenvalues, np.asarray(want.eigenvalues), rtol=1e-6)


_DEVICES_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, 'tests')
from test_decomposition import chunks_of, stream_data
from alphafuse_jax import decomposition as dc, streaming_decomposition as sd
x = stream_data()
counts = np.random.default_rng(6).integers(0, 30, size=400).astype(float)
with jax.enable_x64(True):
  out = {'devices': len(jax.local_devices())}
  for name, kwargs in (('plain', {}), ('weighted', {'item_weights': counts})):
    space = sd.fit_semantic_space_streaming(chunks_of(x), block_rows=30, **kwargs)  # 32 rows.
    out[name] = [np.asarray(a).tolist() for a in space]
print(json.dumps(out))
"""


def test_streamed_fit_is_data_parallel_over_local_devices():
  """4 host devices each take a quarter of every block; one psum; same space as 1 device."""
  env = cpu_env(4)
  result = subprocess.run([sys.executable, '-c', _DEVICES_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 4
  x = stream_data()
  counts = np.random.default_rng(6).integers(0, 30, size=400).astype(float)
  with jax.enable_x64(True):
    for name, kwargs in (('plain', {}), ('weighted', {'item_weights': counts})):
      got = dc.SemanticSpace(*(np.asarray(a) for a in report[name]))
      assert_same_space(got, dc.fit_semantic_space(x, **kwargs))


def test_streamed_fit_rejects_bad_input_with_the_row():
  x = stream_data()
  bad = x.copy()
  bad[201, 3] = np.nan
  with pytest.raises(ValueError, match='row 201 is the first bad one'):
    dc.fit_semantic_space(chunks_of(bad))
  with pytest.raises(ValueError, match=r'must be a numeric \[n, 12\] matrix'):
    dc.fit_semantic_space(iter([x[:5], x[5:9, :4]]))
  with pytest.raises(ValueError, match='the source gave 400 rows'):
    dc.fit_semantic_space(chunks_of(x), np.ones(401))
  with pytest.raises(ValueError, match='but the source has more rows'):
    dc.fit_semantic_space(chunks_of(x), np.ones(399))
  with pytest.raises(ValueError, match='at least 2 items'):
    dc.fit_semantic_space(iter([x[:1], x[:0]]))
  with pytest.raises(ValueError, match='not an existing .npy file'):
    dc.fit_semantic_space('no/such/file.npy')


def test_streamed_fit_rejects_a_truncated_file(tmp_path):
  path = tmp_path / 'vectors.npy'
  np.save(path, stream_data())
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size - 5 * 12 * 8)  # The last 5 rows.
  with pytest.raises(ValueError, match='truncated: row 395 of 400 is missing'):
    sd.fit_semantic_space_streaming(path, block_rows=64)


def test_project_to_file_equals_project(tmp_path):
  x = stream_data()
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(x)
    want = np.asarray(dc.project(x, space, 8))
    path = sd.project_to_file(chunks_of(x), space, 8, tmp_path / 'table.npy', num_rows=400,
                              block_rows=64)
    np.save(tmp_path / 'x.npy', x)
    from_file = sd.project_to_file(tmp_path / 'x.npy', space, 8, tmp_path / 't2.npy',
                                   dtype=np.float32)
  table = np.load(path)
  assert table.shape == (400, 8) and table.dtype == np.float64
  np.testing.assert_allclose(table, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.load(from_file), want.astype(np.float32), rtol=1e-6)
  # Whitened: unit variance per kept direction (independent of the library's maths).
  np.testing.assert_allclose(np.var(table, axis=0, ddof=1), np.ones(8), rtol=1e-10)


def test_project_to_file_errors_leave_no_file(tmp_path):
  x = low_rank_plus_noise(n=100, d=16, rank=4)
  with jax.enable_x64(True):
    space = dc.fit_semantic_space(x)
    with pytest.raises(ValueError, match='needs num_rows'):
      sd.project_to_file(iter([x]), space, 4, tmp_path / 'a.npy')
    with pytest.raises(ValueError, match='gave 100 rows, not num_rows=120'):
      sd.project_to_file(iter([x]), space, 4, tmp_path / 'a.npy', num_rows=120)
    flat = x[:, :4] @ np.random.default_rng(0).normal(size=(4, 16))  # Rank 4 in 16 dims.
    with pytest.raises(ValueError, match='Refusing to whiten'):
      sd.project_to_file(iter([flat]), dc.fit_semantic_space(flat), 8, tmp_path / 'a.npy',
                         num_rows=100)
  assert list(tmp_path.iterdir()) == []
