"""Resumable streaming decomposition: an interrupted fit (or projection) continued from its
checkpoint equals the uninterrupted one; a checkpoint of another request is refused.

An interruption is a KeyboardInterrupt raised between blocks (what a kill leaves behind is what
was saved before it: the saves are atomic). The oracle is float64 numpy (mean, covariance, eigh).
"""

import json
import logging

import jax
import numpy as np
import pytest

from alphafuse_jax import decomposition as dc
from alphafuse_jax import errors
from alphafuse_jax import streaming_decomposition as sd

N, D, B = 400, 12, 32  # 13 blocks, the last one partial (400 = 12 * 32 + 16).


def data(n=N, d=D, seed=0):
  """Rows with separated variances far from the origin (cancellation would show)."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (rng.normal(size=(n, d)) * np.geomspace(30.0, 0.3, d)) @ q.T + 100.0


def counts(n=N, seed=1):
  return np.random.default_rng(seed).integers(0, 30, size=n).astype(float)


def oracle(x, weights=None, authors=False):
  """(mean, eigenvalues descending) in float64 numpy, written independently of the library."""
  p = np.full(len(x), 1.0 / len(x)) if weights is None else weights / weights.sum()
  mean = p @ x
  centred = x - mean
  if weights is None:
    cov = centred.T @ centred / (len(x) - 1)
  elif authors:
    cov = np.cov(centred * np.sqrt(p)[:, None], rowvar=False)
  else:
    cov = centred.T @ (centred * p[:, None])
  return mean, np.linalg.eigvalsh(cov)[::-1]


def kwargs_for(weighting):
  return {} if weighting is None else {'item_weights': counts(), 'weighting': weighting}


def interrupt_after(monkeypatch, blocks):
  """The next streaming loop stops with KeyboardInterrupt after `blocks` blocks."""
  original = sd._blocks

  def interrupted(*args, **kwargs):
    for i, item in enumerate(original(*args, **kwargs)):
      if i == blocks:
        raise KeyboardInterrupt
      yield item

  monkeypatch.setattr(sd, '_blocks', interrupted)


def spy_starts(monkeypatch):
  """Records the first row of every block the module reads."""
  starts, original = [], sd._blocks

  def spied(*args, **kwargs):
    for item in original(*args, **kwargs):
      starts.append(item[2])
      yield item

  monkeypatch.setattr(sd, '_blocks', spied)
  return starts


def assert_equal_spaces(got, want, rtol=1e-12):
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol,
                               atol=rtol * np.abs(np.asarray(b)).max())


@pytest.mark.parametrize('weighting', [None, 'weighted', 'authors'])
def test_resumed_npy_fit_equals_uninterrupted(tmp_path, monkeypatch, caplog, weighting):
  x, source, ckpt = data(), tmp_path / 'x.npy', tmp_path / 'fit.npz'
  np.save(source, x)
  kwargs = dict(kwargs_for(weighting), block_rows=B, checkpoint_every_rows=2 * B)
  with jax.enable_x64(True):
    want = sd.fit_semantic_space_streaming(source, **kwargs)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
      interrupt_after(m, 5)  # Saves after blocks 2 and 4; block 5 is lost.
      sd.fit_semantic_space_streaming(source, checkpoint=ckpt, **kwargs)
    assert sd.checkpoint_progress(ckpt)[0] == 4 * B
    with monkeypatch.context() as m, caplog.at_level(logging.INFO):
      starts = spy_starts(m)
      got = sd.fit_semantic_space_streaming(source, checkpoint=ckpt, **kwargs)
    # The first block once (is it the same data?), then on from row 128: nothing else re-read.
    assert starts == [0] + list(range(4 * B, N, B))
    assert 'rows/s' in caplog.text and f'of {N}' in caplog.text and 'ETA' in caplog.text
    assert sd.checkpoint_progress(ckpt)[0] == N  # Saved at the end too: a rerun only decomposes.
    with monkeypatch.context() as m:
      starts = spy_starts(m)
      again = sd.fit_semantic_space_streaming(source, checkpoint=ckpt, **kwargs)
    assert starts == []
  assert_equal_spaces(got, want)
  assert_equal_spaces(again, want)
  mean, eigenvalues = oracle(x, *(() if weighting is None else (counts(), weighting == 'authors')))
  np.testing.assert_allclose(got.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(got.eigenvalues, eigenvalues, rtol=1e-10, atol=1e-10 * eigenvalues[0])


def chunks_of(x, start=0, size=37):
  """x[start:] in chunks of `size` rows (not aligned with the blocks)."""
  return (x[i:i + size] for i in range(start, len(x), size))


def killed_after(chunks, rows):
  """`chunks`, then a KeyboardInterrupt once more than `rows` rows were handed out."""
  handed = 0
  for chunk in chunks:
    if handed > rows:
      raise KeyboardInterrupt
    handed += len(chunk)
    yield chunk


@pytest.mark.parametrize('weighting,iterator_start', [(None, 'checkpoint'), (None, 'beginning'),
                                                      ('weighted', 'checkpoint'),
                                                      ('authors', 'beginning')])
def test_resumed_iterator_fit_equals_uninterrupted(tmp_path, weighting, iterator_start):
  x, ckpt = data(), tmp_path / 'fit.npz'
  kwargs = dict(kwargs_for(weighting), block_rows=B, checkpoint_every_rows=3 * B)
  with jax.enable_x64(True):
    want = sd.fit_semantic_space_streaming(chunks_of(x), **kwargs)
    with pytest.raises(KeyboardInterrupt):
      sd.fit_semantic_space_streaming(killed_after(chunks_of(x), 250), checkpoint=ckpt, **kwargs)
    rows, seconds = sd.checkpoint_progress(ckpt)
    assert rows == 6 * B and seconds > 0
    with pytest.raises(errors.CheckpointError, match="pass iterator_start='checkpoint'"):
      sd.fit_semantic_space_streaming(chunks_of(x, rows), checkpoint=ckpt, **kwargs)
    rest = chunks_of(x, rows if iterator_start == 'checkpoint' else 0)
    got = sd.fit_semantic_space_streaming(rest, checkpoint=ckpt, iterator_start=iterator_start,
                                          **kwargs)
    assert sd.checkpoint_progress(ckpt)[1] >= seconds  # Seconds add up over the runs.
  assert_equal_spaces(got, want)
  mean, eigenvalues = oracle(x, *(() if weighting is None else (counts(), weighting == 'authors')))
  np.testing.assert_allclose(got.eigenvalues, eigenvalues, rtol=1e-10, atol=1e-10 * eigenvalues[0])
  np.testing.assert_allclose(got.mean, mean, rtol=1e-12)


def test_a_checkpoint_of_another_request_is_refused(tmp_path, monkeypatch):
  x, source, ckpt = data(), tmp_path / 'x.npy', tmp_path / 'fit.npz'
  np.save(source, x)
  with jax.enable_x64(True):
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
      interrupt_after(m, 3)
      sd.fit_semantic_space_streaming(source, counts(), block_rows=B, checkpoint=ckpt,
                                      checkpoint_every_rows=B)
    saved = ckpt.read_bytes()

    def resume(src=source, weights=counts(), **kwargs):
      sd.fit_semantic_space_streaming(src, weights, checkpoint=ckpt, **dict(
          {'block_rows': B, 'iterator_start': 'checkpoint'}, **kwargs))

    for path, rows in (('other_n.npy', data(n=300)), ('other_d.npy', data(d=10)),
                       ('float32.npy', x.astype(np.float32)), ('other_data.npy', data(seed=5))):
      np.save(tmp_path / path, rows)
    cases = [
        (dict(block_rows=64), 'written with block_rows=32, this call has block_rows=64'),
        (dict(weights=None), 'weighting=weighted, this call has weighting=unweighted'),
        (dict(weighting='authors'), 'this call has weighting=authors'),
        (dict(weights=counts(seed=2)), 'written with item_weights=[0-9a-f]{64}, this call'),
        (dict(src=tmp_path / 'other_n.npy', weights=None),
         'written with num_rows=400, this call has num_rows=300'),
        (dict(src=tmp_path / 'other_d.npy'), 'written with d=12, this call has d=10'),
        (dict(src=iter([data(d=10)]), weights=counts()), 'written with d=12, this call has d=10'),
        (dict(src=tmp_path / 'float32.npy'), 'dtype=float64, this call has dtype=float32'),
        (dict(src=tmp_path / 'other_data.npy'), 'other data .the first block differs.'),
    ]
    for kwargs, message in cases:
      with pytest.raises(errors.CheckpointError, match=message) as caught:
        resume(**kwargs)
      assert f'remove {ckpt}' in str(caught.value)  # The fix is named.
      assert ckpt.read_bytes() == saved  # A refused resume leaves the checkpoint as it was.
    ckpt.write_bytes(b'not a checkpoint')
    with pytest.raises(errors.CheckpointError, match='not a streaming-fit checkpoint.*remove it'):
      resume()


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  x, source, ckpt = data(), tmp_path / 'x.npy', tmp_path / 'fit.npz'
  np.save(source, x)
  kwargs = dict(block_rows=B, checkpoint_every_rows=4 * B)
  real_savez, calls = np.savez, []

  def crashing_savez(f, **arrays):  # The second save dies half-way through its bytes.
    calls.append(int(arrays['rows']))
    if len(calls) == 2:
      f.write(b'PK\x03\x04 half a zip')
      raise KeyboardInterrupt
    real_savez(f, **arrays)

  with jax.enable_x64(True):
    want = sd.fit_semantic_space_streaming(source, **kwargs)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
      m.setattr(np, 'savez', crashing_savez)
      sd.fit_semantic_space_streaming(source, checkpoint=ckpt, **kwargs)
    assert calls == [4 * B, 8 * B]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['fit.npz', 'x.npy']  # No stray temp.
    assert sd.checkpoint_progress(ckpt)[0] == 4 * B  # The first save, whole.
    got = sd.fit_semantic_space_streaming(source, checkpoint=ckpt, **kwargs)
  assert_equal_spaces(got, want)


def whitened(x, space, k=8):
  """The projection in numpy: (x - mean) onto the top k eigenvectors, over sqrt(eigenvalue)."""
  vectors, values = np.asarray(space.eigenvectors), np.asarray(space.eigenvalues)
  return (x - np.asarray(space.mean)) @ (vectors[:, :k] / np.sqrt(values[:k]))


def test_project_to_file_resumes_after_the_last_durable_block(tmp_path, monkeypatch):
  x, source, out = data(), tmp_path / 'x.npy', tmp_path / 'table.npy'
  np.save(source, x)
  partial, sidecar = tmp_path / '.table.npy.partial', tmp_path / '.table.npy.partial.json'
  kwargs = dict(block_rows=B, checkpoint_every_rows=2 * B, resume=True)
  with jax.enable_x64(True):
    space = sd.fit_semantic_space_streaming(source, block_rows=B)
    want = whitened(x, space)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
      interrupt_after(m, 5)  # Synced after blocks 2 and 4; block 5's rows are dropped.
      sd.project_to_file(source, space, 8, out, **kwargs)
    assert not out.exists() and partial.exists()
    assert json.loads(sidecar.read_text())['rows'] == 4 * B
    with monkeypatch.context() as m:
      starts = spy_starts(m)
      sd.project_to_file(source, space, 8, out, **kwargs)
    assert starts == [0] + list(range(4 * B, N, B))  # The first block for the hash, then row 128.
    assert not partial.exists() and not sidecar.exists()
    np.testing.assert_allclose(np.load(out), want, rtol=1e-12, atol=1e-12)
    # A partial file of another request (here another space) is not continued: it starts over.
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
      interrupt_after(m, 5)
      sd.project_to_file(source, space, 8, out, **kwargs)
    other = dc.SemanticSpace(space.mean + 1.0, space.eigenvalues, space.eigenvectors)
    with monkeypatch.context() as m:
      starts = spy_starts(m)
      sd.project_to_file(source, other, 8, out, **kwargs)
    assert starts == [0] + list(range(0, N, B))
    np.testing.assert_allclose(np.load(out), whitened(x, other), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('first_row', [0, 64, 100, 250])
def test_the_benchmark_generator_starts_at_any_row(first_row):
  """`--checkpoint` resumes the generator source at the saved row: the same rows from there."""
  from alphafuse_jax.benchmarks import decomposition as bench  # pylint: disable=g-import-not-at-top
  whole = np.concatenate(list(bench.synthetic_chunks(250, 6, 3, 7, 32)))
  rest = list(bench.synthetic_chunks(250, 6, 3, 7, 32, first_row=first_row))
  assert sum(len(c) for c in rest) == 250 - first_row
  np.testing.assert_array_equal(np.concatenate(rest or [whole[:0]]), whole[first_row:])
