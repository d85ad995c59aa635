"""The synthetic source: determinism, the statistics it promises, real signal, both protocols.

Every check is against numpy computed here from the written files (no call back into the
generator's helpers), on a catalogue small enough to generate in well under a second but cut
into several item and user chunks.
"""

import json
import types

import numpy as np
import pytest

from alphafuse_jax import data
from alphafuse_jax.data import synthetic
from configs import default


def options(**overrides):
  base = dict(num_items=1500, num_users=2000, mean_length=12, text_dim=64, rank=8, noise=0.5,
              zipf_exponent=1.0, num_clusters=30, stay_probability=0.8, seed=0)
  return types.SimpleNamespace(**{**base, **overrides})


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
  # Several chunks even at this size: 3 item chunks (the last partial), 4 user chunks.
  monkeypatch.setattr(synthetic, 'ITEM_CHUNK', 512)
  monkeypatch.setattr(synthetic, 'USER_CHUNK', 600)


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(synthetic, 'ITEM_CHUNK', 512)
    patch.setattr(synthetic, 'USER_CHUNK', 600)
    directory = synthetic.generate(options(), tmp_path_factory.mktemp('synthetic'))
  arrays = {name: np.load(directory / f'{name}.npy') for name in synthetic.ARRAYS}
  return directory, arrays, np.load(directory / 'item_clusters.npy')


def test_files_are_deterministic_for_a_seed(tmp_path, generated):
  directory, _, _ = generated
  again = synthetic.generate(options(), tmp_path / 'again')
  other = synthetic.generate(options(seed=1), tmp_path / 'other')
  for name in ('item_vectors.npy', 'users.npy', 'items.npy', 'timestamps.npy', 'manifest.json'):
    assert (directory / name).read_bytes() == (again / name).read_bytes(), name
  assert (directory / 'items.npy').read_bytes() != (other / 'items.npy').read_bytes()
  assert synthetic.generate(options(), tmp_path / 'again') == again  # Present: not regenerated.


def test_interactions_are_well_formed(generated):
  directory, arrays, _ = generated
  users, items, times = arrays['users'], arrays['items'], arrays['timestamps']
  manifest = json.loads((directory / 'manifest.json').read_text())
  assert users.size == items.size == times.size == manifest['interactions']
  assert np.all(np.diff(users) >= 0) and np.unique(users).size == 2000  # Grouped by user.
  same_user = users[1:] == users[:-1]
  assert np.all(np.diff(times)[same_user] >= 0)  # Chronological within a user.
  lengths = np.bincount(users)
  assert lengths.min() >= 2 and abs(lengths.mean() - 12) < 0.5  # 1 + geometric, mean 12.
  counts = np.bincount(items, minlength=1500)
  assert counts.size == 1500 and counts.min() >= 1  # Every item interacted with.


def test_popularity_is_zipf(generated):
  _, arrays, _ = generated
  counts = np.sort(np.bincount(arrays['items']))[::-1]
  ranks = np.arange(1, 101)
  slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
  assert -1.25 < slope < -0.75  # zipf_exponent 1.


def test_vectors_are_low_rank_plus_noise(generated):
  directory, _, _ = generated
  vectors = np.load(directory / 'item_vectors.npy', mmap_mode='r')
  assert vectors.shape == (1500, 64) and vectors.dtype == np.float32
  x = np.asarray(vectors, np.float64)
  # E|signal|^2 = 1 and E|noise|^2 = noise^2 = 0.25.
  assert abs(np.mean(np.sum(x ** 2, axis=1)) - 1.25) < 0.1
  eigenvalues = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]
  # Past the rank-8 signal only isotropic noise remains: 0.25 / 64 per direction.
  np.testing.assert_allclose(np.mean(eigenvalues[8:]), 0.25 / 64, rtol=0.1)
  assert eigenvalues[7] > 1.5 * eigenvalues[8]
  assert eigenvalues[:8].sum() / eigenvalues.sum() > 0.78  # Signal 1 of 1.25, plus its noise.


def test_text_vectors_reveal_the_cluster(generated):
  directory, _, clusters = generated
  x = np.load(directory / 'item_vectors.npy').astype(np.float64)
  fit, held = np.arange(0, 1500, 2), np.arange(1, 1500, 2)
  centroids = np.stack([x[fit][clusters[fit] == c].mean(axis=0) for c in range(30)])
  nearest = np.argmin(((x[held, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
  assert np.mean(nearest == clusters[held]) > 0.6  # Chance: 1 / 30.


def test_histories_predict_the_next_item_far_better_than_popularity(generated):
  _, arrays, clusters = generated
  users, items = arrays['users'], arrays['items']
  pairs = users[1:] == users[:-1]
  previous, following = items[:-1][pairs], items[1:][pairs]
  assert abs(np.mean(clusters[previous] == clusters[following]) - 0.8) < 0.02  # stay_probability.
  counts = np.bincount(items, minlength=1500)
  popular = np.argsort(-counts, kind='stable')[:20]
  popularity_hit = np.mean(np.isin(following, popular))
  # Top 20 of the previous item's cluster by count: a model of the history can learn this.
  top_in_cluster = {c: np.flatnonzero(clusters == c)[np.argsort(
      -counts[clusters == c], kind='stable')[:20]] for c in range(30)}
  cluster_hit = np.mean([f in top_in_cluster[clusters[p]] for p, f in zip(previous, following)])
  assert cluster_hit > popularity_hit + 0.3, (cluster_hit, popularity_hit)


def test_bad_settings_are_one_clear_error(tmp_path):
  with pytest.raises(data.DataError, match='rank <= text_dim'):
    synthetic.generate(options(rank=65), tmp_path)
  with pytest.raises(data.DataError, match='raise num_users or mean_length'):
    synthetic.generate(options(num_users=100, mean_length=3), tmp_path)
  assert not (tmp_path / 'synthetic').exists()


def test_a_failed_generation_leaves_nothing(tmp_path, monkeypatch):
  def fail(*args):
    raise RuntimeError('disk full')
  monkeypatch.setattr(synthetic, '_cover_every_item', fail)
  with pytest.raises(RuntimeError, match='disk full'):
    synthetic.generate(options(), tmp_path)
  assert list((tmp_path / 'synthetic').iterdir()) == []


def data_config(tmp_path, protocol):
  config = default.get_data_config()
  config.source, config.protocol, config.data_dir = 'synthetic', protocol, str(tmp_path)
  config.min_interactions = 5
  config.synthetic.update(vars(options()))
  return config


def test_both_protocols_prepare_and_vectors_align(tmp_path):
  users = data.load(data_config(tmp_path, 'cold_start_users'))
  assert users.num_items == 1500 and users.item_keys == list(range(1500))
  full = synthetic.embeddings_file(data_config(tmp_path, 'x').synthetic, tmp_path,
                                   users.item_keys)
  assert full.name == 'item_vectors.npy'
  loo = data.load(data_config(tmp_path, 'leave_one_out'))
  assert loo.num_items < 1500  # The 5-core drops rare items...
  subset = synthetic.embeddings_file(data_config(tmp_path, 'x').synthetic, tmp_path,
                                     loo.item_keys)
  # ...and their own vectors file keeps row i = dataset item i.
  np.testing.assert_array_equal(np.load(subset), np.load(full)[np.asarray(loo.item_keys)])
  assert loo.stats()['splits']['test']['examples'] == loo.stats()['splits']['train']['examples']
