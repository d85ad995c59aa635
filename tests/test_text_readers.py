"""Tests for precomputed-embedding readers (alphafuse_jax.text.readers.load_embeddings)."""

import collections
import pickle

import numpy as np
import pytest

from alphafuse_jax import text

VECTORS = np.arange(15, dtype=np.float64).reshape(5, 3) / 7.0


def _pickle(path, obj):
  with open(path, 'wb') as f:
    pickle.dump(obj, f)
  return path


@pytest.mark.parametrize('obj', [
    list(VECTORS),                         # The authors' format: a list of N numpy vectors.
    VECTORS,                               # A pickled array.
    [list(row) for row in VECTORS],        # Plain lists of floats.
    tuple(VECTORS.astype(np.float32)),
])
def test_pickle_of_vectors(tmp_path, obj):
  got = text.load_embeddings(_pickle(tmp_path / 'ml1m_emb.pickle', obj), num_items=5)
  assert got.dtype == np.float32 and got.shape == (5, 3)
  np.testing.assert_array_equal(got, VECTORS.astype(np.float32))


def test_npy_and_int_dtype(tmp_path):
  np.save(tmp_path / 'e.npy', np.arange(6).reshape(3, 2))
  got = text.load_embeddings(tmp_path / 'e.npy')
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [[0, 1], [2, 3], [4, 5]])


def test_npz_single_array_and_key(tmp_path):
  np.savez(tmp_path / 'one.npz', emb=VECTORS)
  np.testing.assert_allclose(text.load_embeddings(tmp_path / 'one.npz'), VECTORS, rtol=1e-7)
  np.savez(tmp_path / 'two.npz', a=VECTORS, b=VECTORS[:2] * 2)
  np.testing.assert_allclose(text.load_embeddings(tmp_path / 'two.npz', key='b'), VECTORS[:2] * 2,
                             rtol=1e-7)
  with pytest.raises(text.EmbeddingFileError, match=r"holds 2 arrays \['a', 'b'\]; keep one .* or pass key="):
    text.load_embeddings(tmp_path / 'two.npz')
  with pytest.raises(text.EmbeddingFileError, match=r"no array 'c'; it has \['a', 'b'\]"):
    text.load_embeddings(tmp_path / 'two.npz', key='c')


@pytest.mark.parametrize('bad_value, kind, item', [(np.nan, 'NaN', 3), (np.inf, 'inf', 1),
                                                   (-np.inf, 'inf', 4)])
def test_non_finite_names_first_bad_item(tmp_path, bad_value, kind, item):
  array = VECTORS.copy()
  array[item, 2] = bad_value
  array[4, 0] = np.nan if item != 4 else array[4, 0]  # A later bad item must not be reported first.
  np.save(tmp_path / 'e.npy', array)
  with pytest.raises(text.EmbeddingFileError, match=f'item {item} has {kind} \\(first at dim 2\\)'):
    text.load_embeddings(tmp_path / 'e.npy')


def test_float64_overflowing_float32_is_caught(tmp_path):
  array = VECTORS.copy()
  array[2, 1] = 1e300
  np.save(tmp_path / 'e.npy', array)
  with pytest.raises(text.EmbeddingFileError, match='item 2 has inf'):
    text.load_embeddings(tmp_path / 'e.npy')


def test_num_items_mismatch_gives_both_numbers(tmp_path):
  np.save(tmp_path / 'e.npy', VECTORS)
  with pytest.raises(text.EmbeddingFileError, match='5 vectors, but the dataset has 6 items'):
    text.load_embeddings(tmp_path / 'e.npy', num_items=6)


@pytest.mark.parametrize('array, match', [
    (np.zeros(4), r'2-D \[num_items, dim\] array, got shape \(4,\)'),
    (np.zeros((2, 3, 4)), r'got shape \(2, 3, 4\)'),
    (np.array([['a', 'b']]), 'dtype <U1 is not a real numeric type'),
    (np.zeros((2, 2), bool), 'dtype bool is not a real numeric type'),
    (np.zeros((2, 2), complex), 'dtype complex128 is not a real numeric type'),
    (np.zeros((0, 3)), 'the array is empty'),
])
def test_bad_shape_or_dtype(tmp_path, array, match):
  np.save(tmp_path / 'e.npy', array)
  with pytest.raises(text.EmbeddingFileError, match=match):
    text.load_embeddings(tmp_path / 'e.npy')


def test_ragged_pickle_names_the_item(tmp_path):
  rows = [np.zeros(3), np.zeros(3), np.zeros(4)]
  with pytest.raises(text.EmbeddingFileError, match='item 2 has 4 dims but item 0 has 3'):
    text.load_embeddings(_pickle(tmp_path / 'x_emb.pickle', rows))
  with pytest.raises(text.EmbeddingFileError, match=r'item 1 has shape \(2, 2\)'):
    text.load_embeddings(_pickle(tmp_path / 'y_emb.pickle', [np.zeros(4), np.zeros((2, 2))]))


def test_pickle_with_foreign_classes_is_refused(tmp_path):
  path = _pickle(tmp_path / 'x_emb.pickle', [collections.Counter({'a': 1})])
  with pytest.raises(text.EmbeddingFileError, match='references collections.Counter'):
    text.load_embeddings(path)
  with pytest.raises(text.EmbeddingFileError, match='expected a pickled list or array'):
    text.load_embeddings(_pickle(tmp_path / 'd_emb.pickle', {'0': [1.0]}))


def test_corrupt_files(tmp_path):
  (tmp_path / 'x_emb.pickle').write_bytes(b'\x80\x04garbage')
  with pytest.raises(text.EmbeddingFileError, match='not a readable pickle'):
    text.load_embeddings(tmp_path / 'x_emb.pickle')
  (tmp_path / 'x.npz').write_bytes(b'PK not a zip')
  with pytest.raises(text.EmbeddingFileError, match='not a readable .npz'):
    text.load_embeddings(tmp_path / 'x.npz')


def test_unknown_extension_and_missing_file(tmp_path):
  (tmp_path / 'e.csv').write_text('1,2\n')
  with pytest.raises(text.EmbeddingFileError, match=r"unknown embedding file type '.csv'; "
                                                    r'supported: .pickle, .pkl, .npy, .npz'):
    text.load_embeddings(tmp_path / 'e.csv')
  with pytest.raises(FileNotFoundError, match='embedding file not found'):
    text.load_embeddings(tmp_path / 'absent.npy')
