"""The decomposition on real data: MiniLM embeddings of 1,000 MovieLens-1M titles.

MiniLM vectors are L2-normalised, so their covariance (384-d) is rank-deficient by construction:
three eigenvalues are numerically zero (~1e-15), for the whole 3,706-item catalogue and for any
500 or more of its titles alike (measured), so 1,000 of them show it at a quarter of the cost.
Full-dimension whitening must be refused unless floored; nullity by dim and by threshold must
match a float64 numpy oracle. Costs ~10 s: reads the raw ML-1M source and encodes 1,000 titles.
"""

import jax
import numpy as np
import pytest

from alphafuse_jax import decomposition
from alphafuse_jax import text
from alphafuse_jax.data import sources
from configs import default

SCALE = 40.0  # config.text.scale, the reference's language_embs_scale
NUM_TITLES = 1000


@pytest.fixture(scope='module')
def ml1m_vectors(tmp_path_factory):
  raw = sources.read_recbole('ml-1m')  # The raw source: no split to prepare.
  keys = sorted(set(raw.items.tolist()))[:NUM_TITLES]
  vectors = text.embed_items([raw.item_fields[k] for k in keys],
                             template=default.get_config().text.template,
                             cache_dir=tmp_path_factory.mktemp('ml1m'), show_progress=False)
  assert vectors.shape == (NUM_TITLES, 384)
  return np.asarray(vectors, np.float64) * SCALE


def test_spectrum_and_nullity_match_numpy_float64(ml1m_vectors):
  oracle = np.sort(np.linalg.eigvalsh(np.cov(ml1m_vectors, rowvar=False)))[::-1]
  with jax.enable_x64(True):
    space = decomposition.fit_semantic_space(ml1m_vectors)
    eigenvalues = np.asarray(space.eigenvalues)
  np.testing.assert_allclose(eigenvalues[:300], oracle[:300], rtol=1e-10)
  # Three directions carry nothing: L2-normalised vectors lose a degree of freedom, and more.
  assert np.sum(oracle < 1e-10 * oracle[0]) == 3
  # By dim (the SASRec setting: top 128 kept, the last 64 of them for IDs) and by threshold
  # (counted over the whole spectrum, as the reference does).
  assert decomposition.null_space_dim(eigenvalues, null_dim=64, kept_dim=128) == 64
  expected = int(np.sum(oracle <= 0.25))
  assert decomposition.null_space_dim(eigenvalues, null_threshold=0.25, kept_dim=384) == expected
  with pytest.raises(ValueError, match='null'):
    decomposition.null_space_dim(eigenvalues, null_threshold=0.25, kept_dim=64)


def test_full_dimension_whitening_refused_unless_floored(ml1m_vectors):
  with jax.enable_x64(True):
    space = decomposition.fit_semantic_space(ml1m_vectors)
    with pytest.raises(ValueError, match='floor'):
      decomposition.project(ml1m_vectors, space, 384)
    floor = 1e-6 * float(space.eigenvalues[0])
    table = np.asarray(decomposition.project(ml1m_vectors, space, 384, eigenvalue_floor=floor))
    kept = np.asarray(decomposition.project(ml1m_vectors, space, 128))
  assert np.all(np.isfinite(table))
  # Floored null directions stay tiny instead of being blown up to unit variance.
  assert np.abs(table[:, -3:]).max() < 1e-3
  # The top 128 whiten to identity covariance.
  np.testing.assert_allclose(np.cov(kept, rowvar=False), np.eye(128), atol=1e-8)
