"""Serving: a trained workdir recommends, ranks new items from their text, and fails clearly.

One tiny AlphaFuse-SASRec run (synthetic interactions, MiniLM vectors of item texts, 1 epoch) is
trained per module. The oracles are float64 numpy: the reference SASRec block of test_sasrec, an
eigendecomposition of the catalogue's vectors (np.linalg.eigh) and the adapters written out.
"""

import csv
import dataclasses
import os
import pathlib
import subprocess
import sys
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from alphafuse_jax import builders
from alphafuse_jax import data as data_lib
from alphafuse_jax import inference_artifacts
from alphafuse_jax import serving
from alphafuse_jax import text as text_lib
from alphafuse_jax import train as train_lib
from alphafuse_jax.embeddings import registry
from tests import test_embeddings as emb_tests
from tests import test_sasrec as sas
from tests.cpu_env import cpu_env
from tests.test_metrics_chunked import _problem
from tests.test_train import make_config, make_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
GENRES = ('Drama', 'Comedy|Romance', 'Action|Thriller', 'Sci-Fi', 'Horror|Mystery')


def item_fields(i):
  title = 'American President, The' if i == 0 else f'Film {i}'
  return {'title': title, 'year': str(1990 + i % 7), 'genres': GENRES[i % 5].split('|')}


NEW_ITEMS = [('new-a', {'title': 'Space Opera', 'year': '2030', 'genres': ['Sci-Fi']}),
             ('new-b', {'title': 'A Quiet Drama', 'year': '2031', 'genres': ['Drama']}),
             ('new-c', {'title': 'Laugh Riot', 'year': '2032', 'genres': ['Comedy']}),
             ('new-d', {'title': 'Night Terror', 'year': '2033', 'genres': ['Horror']}),
             ('new-3', item_fields(3))]  # Film 3's exact text: its language row is Film 3's.


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('serving')
  overrides = make_dataset(root)
  with open(root / 'items.tsv', 'w') as f:
    f.write('item\ttitle\tyear\tgenres\n')
    for i in range(data_lib.load(make_config(overrides).data).num_items):
      fields = item_fields(i)
      f.write(f'{i}\t{fields["title"]}\t{fields["year"]}\t{"|".join(fields["genres"])}\n')
  overrides.update({'text.encoder': 'minilm', 'data.delimited.item_text_file': 'items.tsv',
                    'data.delimited.item_text_sep': '\t',
                    'data.delimited.item_text_item_column': 'item',
                    'data.delimited.item_text_columns': ('title', 'year', 'genres'),
                    'train.num_epochs': 1, 'tensorboard': False})
  config = make_config(overrides)
  workdir = root / 'workdir'
  train_lib.train_and_evaluate(config, str(workdir))
  recommender = serving.Recommender.from_workdir(str(workdir))
  with open(root / 'new.tsv', 'w') as f:
    f.write('item_id\ttitle\tyear\tgenres\n')
    for key, fields in NEW_ITEMS:
      f.write(f'{key}\t{fields["title"]}\t{fields["year"]}\t{"|".join(fields["genres"])}\n')
  extended = recommender.with_new_items(serving.read_new_items(root / 'new.tsv',
                                                               recommender.artifacts))
  # The oracle's vectors of the new items: the run's template and MiniLM, times its scale.
  texts = text_lib.format_item_texts([f for _, f in NEW_ITEMS], config.text.template)
  vectors = text_lib.encode_texts(texts, encoder=serving.new_items.minilm(), show_progress=False)
  new_vectors = 40.0 * vectors.astype(np.float64)
  return types.SimpleNamespace(root=root, workdir=workdir, config=config,
                               dataset=data_lib.load(config.data), rec=recommender,
                               extended=extended, new_vectors=new_vectors)


# ---- float64 numpy oracles ---------------------------------------------------------------------
def whitening(x, k):
  """(mean, P [d, k]) of the catalogue: (z - mean) @ P whitens; eigh, canonical signs."""
  mean = x.mean(0)
  values, vectors = np.linalg.eigh(np.cov(x - mean, rowvar=False))
  values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
  vectors = vectors * np.where(vectors[np.argmax(np.abs(vectors), 0), np.arange(k)] < 0, -1, 1)
  return mean, vectors / np.sqrt(values)


def oracle_table(run, new_vectors):
  """AlphaFuse's fused rows [N + M, k]: whitened language + ID in the last n dims (new: 0)."""
  x = run.rec.artifacts.language
  mean, projection = whitening(x, run.config.embedding.hidden_dim)
  language = (np.concatenate([x, new_vectors]) - mean) @ projection
  ids = np.asarray(run.rec.params['item_embedding']['id_table'], np.float64)[:len(x)]
  n = ids.shape[1]
  language[:len(x), -n:] += ids
  return language


def oracle_scores(params, table, history, pad):
  """Reference SASRec (test_sasrec's block) on a padded table, states @ table.T."""
  p = sas._np(params)
  m = (history != pad)[..., None]
  padded = np.concatenate([table, np.zeros((1, table.shape[1]))])
  x = (padded[history] + p['position_embedding']['embedding'][None]) * m
  x = sas._reference_block_np(p['blocks_0'], x * m, np.where(history == pad, sas.PAD, 0), 1)
  return x[:, -1] @ table.T


def assert_top_k(got_ids, got_scores, scores, k):
  """Top-k ids and scores against float64 scores [N]: the same items up to near-ties."""
  order = np.argsort(-scores, kind='stable')[:k]
  np.testing.assert_allclose(got_scores, scores[order], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(scores[got_ids], scores[order], rtol=1e-4, atol=1e-4)
  descending = np.append(-np.sort(-scores), -np.inf)[:k + 1]  # -inf: nothing after the last.
  with np.errstate(invalid='ignore'):
    gaps = np.abs(np.diff(descending)) > 1e-3
  separated = gaps[:k] & np.concatenate([[True], gaps[:k - 1]])
  np.testing.assert_array_equal(np.asarray(got_ids)[separated], order[separated])


# ---- the workdir ---------------------------------------------------------------------------------
def test_training_writes_inference_artifacts(run):
  art = inference_artifacts.load(str(run.workdir))
  names = sorted(os.listdir(run.workdir / 'inference'))
  assert names == ['catalogue.json', 'config.json', 'item_counts.npy', 'language.npy',
                   'manifest.json', 'text_map.npz']
  assert art.item_keys == list(run.dataset.item_keys)
  assert art.item_fields == run.dataset.item_fields
  assert art.config.embedding.to_dict() == run.config.embedding.to_dict()
  assert art.text['encoder'] == 'minilm' and art.text['scale'] == 40.0
  np.testing.assert_array_equal(art.train_item_counts, run.dataset.train_item_counts)
  np.testing.assert_array_equal(art.language, builders.load_language_embeddings(run.config,
                                                                                run.dataset))
  # The saved space: numpy's mean and descending eigenvalues of the catalogue's vectors.
  x = art.language
  np.testing.assert_allclose(art.text_map.space.mean, x.mean(0), rtol=1e-12, atol=1e-12)
  eigenvalues = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1]
  np.testing.assert_allclose(art.text_map.space.eigenvalues, eigenvalues, atol=1e-9)
  assert (art.text_map.width, art.text_map.nullity, art.text_map.cover) == (16, 8, False)
  # Its rows are exactly the frozen table the model was built with.
  np.testing.assert_array_equal(art.text_map.rows(x),
                                run.rec.model.item_embedding.language_table.values)


# ---- recommend -----------------------------------------------------------------------------------
@pytest.mark.parametrize('exclude_seen', [False, True])
def test_top_k_with_new_items_matches_float64_numpy(run, exclude_seen):
  rec = run.extended
  n, m = len(run.dataset.item_keys), len(NEW_ITEMS)
  assert rec.num_items == n + m and rec.catalogue.keys[n:] == [k for k, _ in NEW_ITEMS]
  table = oracle_table(run, run.new_vectors)
  got_table = np.asarray(rec.item_table())
  np.testing.assert_allclose(got_table, table, rtol=1e-4, atol=1e-4)
  # A new item with Film 3's text has Film 3's row less Film 3's ID (its ID part is zero).
  film3 = np.asarray(run.rec.item_table())[3]
  film3_id = np.asarray(rec.params['item_embedding']['id_table'])[3]
  null_dim = run.config.embedding.null_dim
  np.testing.assert_allclose(got_table[n + 4, :-null_dim], film3[:-null_dim], atol=1e-4)
  np.testing.assert_allclose(got_table[n + 4, -null_dim:], film3[-null_dim:] - film3_id,
                             atol=1e-4)
  assert np.abs(film3_id).max() > 1e-3  # Trained: the check above tells the parts apart.

  history = [0, 5, 'Film 6 (1996)', 'new-a', 9]
  got = rec.recommend(history, k=10, exclude_seen=exclude_seen)
  indices = [0, 5, 6, n, 9]
  padded = np.full((1, rec.max_len), n + m)
  padded[0, -len(indices):] = indices
  scores = oracle_scores(rec.params, table, padded, n + m)[0]
  if exclude_seen:
    scores[indices] = -np.inf
    assert not {r.index for r in got} & set(indices)
  assert_top_k([r.index for r in got], [r.score for r in got], scores, 10)
  first = got[0]
  assert (first.key, first.title) == (rec.catalogue.keys[first.index],
                                      rec.catalogue.titles[first.index])
  assert all(r.new == (r.index >= n) for r in got)
  if not exclude_seen:  # The whole catalogue ranked: every new item where numpy puts it.
    ids, ranked_scores = rec.top_k([indices], k=n + m)
    assert_top_k(ids[0], ranked_scores[0], scores, n + m)


def test_batched_top_k_excludes_seen_items_and_matches_the_scores(run):
  rec = run.rec
  # Two batches of 3 (the last padded); a history longer than L = 10 excludes all 20 items.
  histories = [[1, 2, 3], [4], list(range(20)), [7, 7, 8]]
  ids, scores = rec.top_k(histories, k=5, exclude_seen=True, batch_size=3)
  history, _ = rec.pad_histories(histories, exclude_seen=False)
  all_scores = rec.user_states(history).astype(np.float64) @ np.asarray(
      rec.item_table(), np.float64).T
  for row, items in enumerate(histories):
    all_scores[row, items] = -np.inf
    assert_top_k(ids[row], scores[row], all_scores[row], 5)
  one = rec.recommend(histories[0], k=5, exclude_seen=True)
  np.testing.assert_allclose([r.score for r in one], scores[0], rtol=1e-5, atol=1e-5)


def test_history_text_keys_titles_and_commas(run):
  cat = run.rec.catalogue
  # Item 0's title has a comma; '7' is a key, 'Film 8 (1991)' a title.
  assert cat.parse_history('American President, The (1990), 7,Film 8 (1991)') == [0, 7, 8]
  assert cat.indices([7, '7', 'Film 7 (1990)']) == [7, 7, 7]


@pytest.mark.parametrize('history, match', [
    (['Film 3 (1993)', 'Flim 4 (1994)'], r"Unknown item 'Flim 4 \(1994\)'.*closest: \['Film 4"),
    ([], 'history is empty'),
    ('  ', 'history is empty'),
    ('3,,4', 'Empty item name at position 2'),
    ('Toy Story (1995)', "Unknown item 'Toy Story"),
])
def test_bad_histories_fail_clearly(run, history, match):
  with pytest.raises(serving.ServingError, match=match):
    run.rec.recommend(history)


def test_bad_new_items_and_arguments_fail_clearly(run, tmp_path):
  rec, art = run.rec, run.rec.artifacts
  vectors = np.ones((2, 384), np.float32)
  with pytest.raises(serving.ServingError, match=r"key\(s\) \['3'\] already name catalogue"):
    rec.add_items_from_vectors(['x', '3'], vectors)
  with pytest.raises(serving.ServingError, match="'dup' appears twice"):
    rec.add_items_from_vectors(['dup', 'dup'], vectors)
  with pytest.raises(serving.ServingError, match='d_l=384'):
    rec.add_items_from_vectors(['x', 'y'], np.ones((2, 24), np.float32))
  np.save(tmp_path / 'v.npy', vectors)
  with pytest.raises(serving.ServingError, match='save an .npz'):
    serving.read_new_items(tmp_path / 'v.npy', art)
  (tmp_path / 'bad.csv').write_text('name,title\nx,y\n')
  with pytest.raises(serving.ServingError, match='no key column'):
    serving.read_new_items(tmp_path / 'bad.csv', art)
  file_run = dataclasses.replace(art, text=dict(art.text, encoder='file'))
  with pytest.raises(serving.ServingError, match='give the new items as vectors'):
    serving.new_items.from_fields(['x'], [{'title': 'x'}], file_run)
  with pytest.raises(serving.ServingError, match=r'History 1 has item indices outside 0\.\.39'):
    rec.top_k([[0], [3, 40]], k=3)
  for k in (0, rec.num_items + 1):
    with pytest.raises(serving.ServingError, match=f'k={k} must be an int in 1..40'):
      rec.recommend([1], k=k)
  with pytest.raises(inference_artifacts.ArtifactsError, match='has not finished'):
    serving.Recommender.from_workdir(str(tmp_path))


@pytest.mark.parametrize('pipeline', ['id', 'rlmrec', 'llminit'])
def test_free_row_pipelines_refuse_new_items(pipeline):
  with pytest.raises(ValueError, match=f"Pipeline '{pipeline}' has free item rows") as error:
    registry.check_text_map(pipeline)
  assert ('initial_rows' in str(error.value)) == (pipeline == 'llminit')
  assert registry.check_text_map('llminit', initial_rows=True).name == 'llminit'


# ---- adapters: the new item's row is the trained map applied to its vector -----------------------
class Holder(nn.Module):
  """The part of a backbone that `extend_model` touches: its item embedding and table."""
  item_embedding: nn.Module

  def item_table(self):
    return self.item_embedding.table(deterministic=True)


@pytest.mark.parametrize('pipeline', ['morec', 'whitenrec', 'unisrec', 'llmesr', 'llminit',
                                      'alphafuse_anchor'])
def test_new_item_rows_of_adapter_pipelines_match_numpy(pipeline):
  x, x_new = emb_tests.language(), emb_tests.language(n=3, seed=5)
  module, variables, _ = emb_tests.build(pipeline, x)
  # Random values everywhere (UniSRec's gates and biases start at 0).
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = {'item_embedding': jax.tree.unflatten(
      tree, [v + 0.1 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])}
  text_map = registry.text_map(emb_tests.config(pipeline), language_embeddings=x,
                               item_counts=None, initial_rows=True)
  extended, new_params = serving.extend_model(Holder(module), params, text_map, x_new)
  assert extended.item_embedding.num_items == len(x) + 3
  table = np.asarray(extended.apply({'params': new_params}, method='item_table'), np.float64)
  old = np.asarray(Holder(module).apply({'params': params}, method='item_table'), np.float64)
  np.testing.assert_allclose(table[:len(x)], old, rtol=1e-5, atol=1e-5)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['item_embedding'])
  if pipeline in ('morec', 'whitenrec'):
    mean, projection = whitening(x, x.shape[1])
    z = x_new if pipeline == 'morec' else (x_new - mean) @ projection
    expected = emb_tests.gelu(z @ p['adapter']['kernel'] + p['adapter']['bias'])
  elif pipeline == 'unisrec':
    a = p['adaptor']
    logits = x_new @ a['gate_kernel']
    gates = np.exp(logits - logits.max(1, keepdims=True))
    gates /= gates.sum(1, keepdims=True)
    expected = sum(gates[:, e:e + 1] * ((x_new - a['expert_bias'][e]) @ a['expert_kernel'][e])
                   for e in range(a['gate_kernel'].shape[1]))
  elif pipeline == 'llmesr':  # A zero ID view beside the adapted text view.
    text = x_new @ p['adapter_in']['kernel'] + p['adapter_in']['bias']
    text = text @ p['adapter_out']['kernel'] + p['adapter_out']['bias']
    expected = np.concatenate([np.zeros_like(text), text], axis=1)
  else:  # LLMInit with initial rows: the new ID rows are the top-8 whitened projection; the
    # AlphaFuse-Anchor variant: the same text row with a zero offset and a zero ID.
    mean, projection = whitening(x, emb_tests.H)
    expected = (x_new - mean) @ projection
  np.testing.assert_allclose(table[len(x):], expected, rtol=1e-4, atol=1e-4)
  # The padding row stays last (pad id N + M) in every per-item parameter.
  for path, leaf in jax.tree_util.tree_leaves_with_path(new_params):
    if path[-1].key == 'id_table':
      np.testing.assert_array_equal(leaf[-1], params['item_embedding']['id_table'][-1])


@pytest.mark.parametrize('pipeline', ['alphafuse', 'llminit'])
def test_new_item_rows_follow_the_language_scale(pipeline):
  x, x_new = emb_tests.language(), emb_tests.language(n=3, seed=5)
  module, variables, _ = emb_tests.build(pipeline, x, language_scale=0.5)
  params = {'item_embedding': variables['params']}
  text_map = registry.text_map(emb_tests.config(pipeline, language_scale=0.5),
                               language_embeddings=x, item_counts=None, initial_rows=True)
  extended, new_params = serving.extend_model(Holder(module), params, text_map, x_new)
  table = np.asarray(extended.apply({'params': new_params}, method='item_table'), np.float64)
  mean, projection = whitening(x, emb_tests.H)
  # AlphaFuse: 0.5 x the text row and a zero ID; LLMInit: its initial row, 0.5 x the text row.
  np.testing.assert_allclose(table[len(x):], 0.5 * (x_new - mean) @ projection, rtol=1e-4,
                             atol=1e-4)


# ---- chunked top-k -------------------------------------------------------------------------------
@pytest.mark.parametrize('chunk_size, k, group_size', [
    (8, 5, 128), (5, 9, 128), (64, 37, 128),  # One top-k per chunk.
    (64, 5, 4), (36, 3, 3)])                  # Two stages: the best groups, then their items.
def test_top_k_chunked_matches_sorted_scores(chunk_size, k, group_size):
  # Small-integer vectors: exact float32 scores, many ties, exclusions, padding rows.
  states, table, _, exclude = _problem(2)
  n = table.shape[0]
  scores = states.astype(np.float64) @ table.astype(np.float64).T
  for row, items in enumerate(exclude):
    scores[row, [e for e in items if 0 <= e < n]] = -np.inf
  # Descending score, lower id first on ties (lax.top_k on the full scores).
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  got_scores, got_ids = serving.top_k_chunked(states, table, k, exclude, chunk_size=chunk_size,
                                              group_size=group_size)
  expected = np.take_along_axis(scores, order, 1)
  finite = np.isfinite(expected)
  np.testing.assert_array_equal(np.asarray(got_ids)[finite], order[finite])
  np.testing.assert_array_equal(np.asarray(got_ids)[~finite], n)
  np.testing.assert_array_equal(np.asarray(got_scores), expected)
  with pytest.raises(ValueError, match='k=38'):
    serving.top_k_chunked(states, table, n + 1, chunk_size=chunk_size)


# ---- the command line ----------------------------------------------------------------------------
def _cli(*args):
  env = cpu_env()
  return subprocess.run([sys.executable, '-m', 'alphafuse_jax.recommend', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_batch_file_with_new_item_vectors(run, tmp_path):
  lines = (run.root / 'interactions.csv').read_text().splitlines()
  users = {'0', '1', '2', '3'}
  (tmp_path / 'h.csv').write_text('\n'.join([lines[0]] + [l for l in lines[1:]
                                                          if l.split(',')[0] in users]) + '\n')
  vectors = emb_tests.language(n=2, d=384, seed=3).astype(np.float32) / 40
  np.savez(tmp_path / 'new.npz', keys=np.array(['v1', 'v2']), vectors=vectors)
  out = tmp_path / 'top.csv'
  proc = _cli(f'--workdir={run.workdir}', f'--histories={tmp_path / "h.csv"}', f'--out={out}',
              f'--new_items={tmp_path / "new.npz"}', '--k=4', '--exclude_seen', '--batch_size=8')
  assert proc.returncode == 0, proc.stderr
  rec = run.rec.add_items_from_vectors(['v1', 'v2'], vectors)
  keys, histories = serving.read_histories(str(tmp_path / 'h.csv'), rec)
  assert keys == [0, 1, 2, 3]
  ids, scores = rec.top_k(histories, k=4, exclude_seen=True, batch_size=8)
  rows = list(csv.reader(out.read_text().splitlines()))
  assert rows[0] == ['user', 'rank', 'item', 'title', 'score', 'new']
  assert [r[2] for r in rows[1:]] == [str(rec.catalogue.keys[i]) for i in ids.reshape(-1)]
  np.testing.assert_allclose([float(r[4]) for r in rows[1:]], scores.reshape(-1), rtol=1e-5)
