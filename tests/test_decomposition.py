"""Tests for alphafuse_jax.decomposition against an independent float64 numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphafuse_jax import decomposition as dc


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
