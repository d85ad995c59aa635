"""cold_start_items end to end: new-item ranks in the evaluator, the text-only ranker, old-item
decomposition, the new items' ID rows, the random levels, and the ml1m_cold_items suite.

Oracles are float64 numpy on hand-built toy data; nothing here trains except the one loop test.
"""

import json
import math

import jax
import numpy as np
import pytest

from alphafuse_jax import builders
from alphafuse_jax import evaluation
from alphafuse_jax import experiments
from alphafuse_jax import inference_artifacts
from alphafuse_jax import losses
from alphafuse_jax import parallel
from alphafuse_jax.data import protocols
from alphafuse_jax.embeddings import registry
from alphafuse_jax.experiments import cold_items
from alphafuse_jax.experiments import text_ranker
from configs import cold_items as cold_items_config
from configs import tiny

NUM_ITEMS, L, DIM = 12, 3, 6
NEW = np.zeros(NUM_ITEMS, bool)
NEW[[9, 10, 11]] = True  # The three newest items.


def toy_dataset() -> protocols.PreparedDataset:
  """12 items (9, 10, 11 new), 12 test and 4 val examples whose targets are new items.

  Histories (pad id 12) hold old and new items; a target never repeats in its own history.
  """
  rng = np.random.default_rng(3)
  splits = {}
  for name, n in (('train', 4), ('val', 4), ('test', 12)):
    targets = rng.choice([9, 10, 11], n) if name != 'train' else rng.integers(0, 9, n)
    history = np.full((n, L), NUM_ITEMS, np.int32)
    for i, t in enumerate(targets):
      length = int(rng.integers(1, L + 1))
      pool = [j for j in range(NUM_ITEMS) if j != t and (name != 'train' or not NEW[j])]
      history[i, L - length:] = rng.choice(pool, length, replace=False)
    splits[name] = {'user_id': np.arange(n, dtype=np.int32),
                    'position': (history != NUM_ITEMS).sum(1).astype(np.int32),
                    'history': history, 'target': targets.astype(np.int32)}
  counts = np.where(NEW, 0, 5).astype(np.int64)
  return protocols.PreparedDataset(
      num_items=NUM_ITEMS, max_len=L, item_keys=list(range(NUM_ITEMS)),
      item_fields=[{'title': str(i), 'year': '', 'genres': []} for i in range(NUM_ITEMS)],
      user_keys=list(range(12)), train_item_counts=counts, splits=splits,
      user_sequences=(np.zeros(1, np.int64), np.zeros(0, np.int32)), new_items=NEW.copy())


def toy_config(pipeline: str = 'id'):
  config = tiny.get_config()
  config.embedding.pipeline = pipeline
  config.embedding.id_init = 'normal'
  config.embedding.hidden_dim = 4
  config.embedding.null_dim = 2
  config.eval.batch_size = 8  # Two batches for 12 test examples: the last one padded.
  config.eval.item_chunk_size = 2  # Several chunks over 12 items (and the 3 new ones).
  return config


def oracle_ranks(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 full-catalogue and new-items-only ranks (1 + strictly higher), no near-ties."""
  target_scores = scores[np.arange(len(targets)), targets]
  gaps = np.abs(scores - target_scores[:, None])
  gaps[np.arange(len(targets)), targets] = np.inf
  assert gaps.min() > 1e-4, 'toy scores too close for a float32 comparison'
  full = 1 + np.sum(scores > target_scores[:, None], axis=1)
  above, ties = protocols.new_item_rank_counts(scores, targets, NEW)
  assert not ties.any()
  return full, 1 + above


def test_text_ranker_ranks_match_a_float64_oracle():
  dataset = toy_dataset()
  vectors = np.random.default_rng(0).normal(size=(NUM_ITEMS, DIM))
  model = text_ranker.TextRanker(text_ranker.FrozenTable(vectors), L)
  evaluator = evaluation.Evaluator(parallel.DataParallel('shard_map'), model,
                                   toy_config('morec'), dataset, 'test')
  ranks = evaluator.ranks({})
  assert evaluator.columns == ('rank', 'ties', 'new_rank', 'new_ties')
  test = dataset.splits['test']
  # Oracle: cosine of the mean history vector (pad rows left out) and each item's vector.
  states = np.stack([vectors[h[h != NUM_ITEMS]].mean(0) for h in test['history']])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  full, new = oracle_ranks(unit(states) @ unit(vectors).T, test['target'])
  np.testing.assert_array_equal(ranks[:, 0], full)
  np.testing.assert_array_equal(ranks[:, 2], new)
  assert not ranks[:, [1, 3]].any()
  result = evaluator.evaluate({}, groups=True)
  # The new-items group summarises the new-item ranks of every example.
  new_ndcg = np.mean(np.where(new <= 20, 1 / np.log2(new + 1), 0))
  assert result['new_items']['NDCG@20'] == pytest.approx(new_ndcg, abs=1e-12)
  assert result['new_items']['count'] == 12


def test_evaluator_refuses_old_targets_on_a_dataset_with_new_items():
  dataset = toy_dataset()
  model = text_ranker.TextRanker(text_ranker.FrozenTable(np.eye(NUM_ITEMS, DIM)), L)
  with pytest.raises(ValueError, match='old-item targets'):
    evaluation.Evaluator(parallel.DataParallel('shard_map'), model, toy_config('morec'),
                         dataset, 'train')


def test_new_item_params_reset_only_new_id_rows():
  rows = NUM_ITEMS + 1
  params = {'item_embedding': {'id_table': np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)},
            'dense': {'kernel': np.ones((rows, 2), np.float32)}}
  initial = jax.tree.map(lambda x: -np.ones_like(x), params)
  zeroed = evaluation.new_item_params(params, NEW)
  reset = evaluation.new_item_params(params, NEW, initial)
  table = params['item_embedding']['id_table']
  for out, fill in ((zeroed, 0.0), (reset, -1.0)):
    got = np.asarray(out['item_embedding']['id_table'])
    np.testing.assert_array_equal(got[~np.append(NEW, False)], table[~np.append(NEW, False)])
    assert (got[:-1][NEW] == fill).all()  # New rows; the pad row (last) is kept.
    np.testing.assert_array_equal(np.asarray(out['dense']['kernel']), params['dense']['kernel'])


def test_initial_params_are_the_loops_initialisation():
  from alphafuse_jax import train  # pylint: disable=g-import-not-at-top
  config = toy_config('id')
  model = builders.build_model(config, toy_dataset(), None)
  init_key, _ = jax.random.split(jax.random.key(config.train.seed))
  expected = train.init_params(model, init_key)
  got = evaluation.initial_params(model, config)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


@pytest.mark.parametrize('mode', parallel.MODES)
def test_untrained_id_rows_of_new_items_are_their_initial_rows_at_evaluation(mode):
  """SASRec-ID ranks new items by their initial rows; old rows stay as trained."""
  config = toy_config('id')
  dataset = toy_dataset()
  model = builders.build_model(config, dataset, None)
  initial = evaluation.initial_params(model, config)
  # 'Trained' params: every ID row moved; the evaluator must restore the new ones.
  trained = jax.tree.map(lambda x: x + 0.5, initial)
  dp = parallel.DataParallel(mode)
  evaluator = evaluation.Evaluator(dp, model, config, dataset, 'test')
  ranks = evaluator.ranks(trained if mode == 'shard_map' else dp.replicate(trained))
  expected_params = evaluation.new_item_params(trained, NEW, initial)
  test = dataset.splits['test']
  states = np.asarray(model.apply({'params': expected_params}, test['history'],
                                  deterministic=True), np.float64)
  table = np.asarray(expected_params['item_embedding']['id_table'][:NUM_ITEMS], np.float64)
  np.testing.assert_array_equal(table[NEW], np.asarray(
      initial['item_embedding']['id_table'][:NUM_ITEMS][NEW]))
  scores = states @ table.T
  target_scores = scores[np.arange(12), test['target']]
  np.testing.assert_array_equal(ranks[:, 0], 1 + np.sum(scores > target_scores[:, None], 1))
  above, _ = protocols.new_item_rank_counts(scores, test['target'], NEW)
  np.testing.assert_array_equal(ranks[:, 2], 1 + above)


# ---- the decomposition sees only old items -------------------------------------------------
def numpy_semantic_table(x: np.ndarray, fit: np.ndarray, k: int) -> np.ndarray:
  """Oracle: mean/covariance (1/(n-1)) of the fit rows, eigh, canonical signs, whiten all rows."""
  rows = x[fit]
  mean = rows.mean(0)
  values, vectors = np.linalg.eigh(np.cov(rows, rowvar=False))
  values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
  pivot = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(k)]
  vectors = vectors * np.where(pivot < 0, -1.0, 1.0)
  return (x - mean) @ vectors / np.sqrt(values)


def test_decomposition_is_fitted_on_old_items_only(tmp_path):
  dataset = toy_dataset()
  x = np.random.default_rng(1).normal(size=(NUM_ITEMS, 5)) * 40
  x[NEW] += 100.0  # New items far away: fitting on them would move the mean a lot.
  config = toy_config('alphafuse')
  model = builders.build_model(config, dataset, x)
  table = model.item_embedding.language_table.values
  np.testing.assert_allclose(table, numpy_semantic_table(x, ~NEW, 4), rtol=1e-5, atol=1e-5)
  assert not np.allclose(table, numpy_semantic_table(x, np.ones(NUM_ITEMS, bool), 4), atol=1e-2)
  # The text map built with the same rows reproduces the frozen table (serving's new items).
  text_map = registry.text_map(config.embedding, language_embeddings=x,
                               item_counts=dataset.train_item_counts,
                               fit_items=builders.old_items(dataset))
  np.testing.assert_array_equal(text_map.rows(x), table)
  # What a run saves for serving is that space too, not one refitted on every item.
  inference_artifacts.save(str(tmp_path), config, dataset, language=x)
  saved = inference_artifacts.load(str(tmp_path)).text_map
  np.testing.assert_allclose(saved.rows(x), table, rtol=1e-5, atol=1e-5)
  # WhitenRec's full whitening and LLMInit's initial rows use the same old-item space.
  whiten = builders.build_model(toy_config('whitenrec'), dataset, x)
  np.testing.assert_allclose(whiten.item_embedding.language_table.values,
                             numpy_semantic_table(x, ~NEW, 5), rtol=1e-5, atol=1e-5)
  llminit = builders.build_model(toy_config('llminit'), dataset, x)
  np.testing.assert_allclose(llminit.item_embedding.initial_table.values,
                             numpy_semantic_table(x, ~NEW, 4), rtol=1e-5, atol=1e-5)


def test_fit_items_must_be_a_mask_of_enough_items():
  x = np.random.default_rng(1).normal(size=(NUM_ITEMS, 5))
  config = toy_config('alphafuse')
  one = np.zeros(NUM_ITEMS, bool)
  one[0] = True
  for bad in (one, np.ones(NUM_ITEMS - 1, bool), np.ones(NUM_ITEMS, int)):
    with pytest.raises(ValueError, match='fit_items'):
      registry.make_item_embedding(config.embedding, num_items=NUM_ITEMS, language_embeddings=x,
                                   item_counts=None, fit_items=bad)


# ---- random levels, by hand ------------------------------------------------------------------
def test_uniform_random_levels_by_hand():
  # Among 4 items, the top 2 ranks each with probability 1/4.
  level = cold_items.uniform_level(4, 2)
  assert level['HR@2'] == 0.5
  assert level['NDCG@2'] == pytest.approx((1 + 1 / math.log2(3)) / 4, abs=1e-15)
  # k beyond m: every rank counts.
  assert cold_items.uniform_level(3, 20)['HR@20'] == 1.0
  # ML-1M: 370 new items, sum_{r<=20} 1/log2(r+1) = 7.0413...
  gains = sum(1 / math.log2(r + 1) for r in range(1, 21))
  assert cold_items.uniform_level(370, 20)['NDCG@20'] == pytest.approx(gains / 370, abs=1e-15)


def test_history_on_top_level_by_hand():
  new = np.array([False, True, True, True, True])  # 4 new items; pad id 5.
  history = np.array([[5, 5, 0], [1, 2, 0], [3, 5, 3]])
  target = np.array([1, 3, 4])
  level = cold_items.history_on_top_level(history, target, new, k=2)
  # h = 0 (ranks 1-4), 2 (ranks 3-4), 1 (item 3 twice: ranks 2-4).
  hr = (2 / 4 + 0 + 1 / 3) / 3
  ndcg = ((1 + 1 / math.log2(3)) / 4 + 0 + (1 / math.log2(3)) / 3) / 3
  assert level['HR@2'] == pytest.approx(hr, abs=1e-15)
  assert level['NDCG@2'] == pytest.approx(ndcg, abs=1e-15)


# ---- the suite -------------------------------------------------------------------------------
def test_suite_cells_and_commands():
  suite = experiments.make_suite('ml1m_cold_items')
  assert suite.variants == cold_items_config.ROWS
  assert len(suite.cells) == 8 * 3 and suite.seeds == (22, 23, 24)
  text = [c for c in suite.cells if c.variant == 'text_only']
  assert {c.module for c in text} == {'alphafuse_jax.experiments.text_ranker'}
  assert {c.module for c in suite.cells if c.variant != 'text_only'} == {'alphafuse_jax.main'}
  argv = experiments.cell_command(text[0], experiments.REPO_ROOT / 'w')
  assert argv[1:3] == ['-m', 'alphafuse_jax.experiments.text_ranker']
  assert argv[3].endswith('configs/cold_items.py:text_only')


@pytest.mark.parametrize('row', cold_items_config.ROWS)
def test_cold_items_configs_pass_the_start_up_checks(row):
  from alphafuse_jax import train  # pylint: disable=g-import-not-at-top
  config = experiments.load_config(f'configs/cold_items.py:{row}')
  assert config.data.protocol == 'cold_start_items' and config.data.val_fraction == 0.5
  assert config.train.num_epochs == cold_items_config.NUM_EPOCHS
  for devices in (1, 2):
    train.validate_config(config, devices)


def test_cold_items_config_fields_are_commented():
  import pathlib  # pylint: disable=g-import-not-at-top
  from test_configs import undocumented_fields  # pylint: disable=g-import-not-at-top
  source = (pathlib.Path(cold_items_config.__file__)).read_text()
  assert not undocumented_fields(source)
  with pytest.raises(ValueError, match='text_only'):
    cold_items_config.get_config('sasrec')


def test_report_has_the_headline_table_and_plot(tmp_path):
  suite = experiments.make_suite('ml1m_cold_items', variants=['alphafuse', 'id'], seeds=[22, 23])
  runs = tmp_path / 'results' / 'ml1m_cold_items' / 'runs'
  # Two test examples, targets 6 and 7 (new); new-item ranks per seed.
  new_ranks = {('alphafuse', 22): [1, 3], ('alphafuse', 23): [1, 1], ('id', 22): [2, 100],
               ('id', 23): [100, 100]}
  for (variant, seed), new in new_ranks.items():
    run = runs / f'{variant}_s{seed}'
    run.mkdir(parents=True)
    np.savez(run / 'test_ranks.npz', rank=np.array([5, 50], np.int32),
             target=np.array([6, 7], np.int32), position=np.array([3, 12], np.int32),
             new_rank=np.asarray(new, np.int32), new_ties=np.zeros(2, np.int32))
    (run / 'results.json').write_text(json.dumps({'test': {'NDCG@20': -1.0}}))
  levels = cold_items.random_levels(toy_dataset())
  summary = experiments.build_report(suite, str(tmp_path / 'results'),
                                     train_item_counts=toy_dataset().train_item_counts,
                                     random_levels=levels)
  new = summary['tables']['new_items']
  # alphafuse: (1 + 1/log2(4)) / 2 = 0.75 and 1.0; id: (1/log2(3)) / 2 and 0.
  assert new['alphafuse']['NDCG@20']['values'] == pytest.approx([0.75, 1.0], abs=1e-12)
  assert new['id']['NDCG@20']['values'] == pytest.approx([0.5 / math.log2(3), 0.0], abs=1e-12)
  readme = (tmp_path / 'results' / 'ml1m_cold_items' / 'README.md').read_text()
  assert '## New items (cold_start_items): the headline' in readme
  assert '| alphafuse | 22,23 | ' in readme and 'sanity check' in readme
  assert f'{levels["new_items"]["NDCG@20"]:.4f}' in readme
  assert (tmp_path / 'results' / 'ml1m_cold_items' / 'cold_items.png').stat().st_size > 1000
  assert 'cold_start_users' not in readme


# ---- new items never enter training ---------------------------------------------------------
def excluding(kind: str, **kwargs):
  return losses.Objective(kind=kind, num_negatives=kwargs.pop('k', 5),
                          excluded_items=(9, 10, 11), **kwargs)


def test_full_softmax_leaves_new_items_out_and_gives_their_rows_no_gradient():
  rng = np.random.default_rng(0)
  states = rng.normal(size=(4, 3)).astype(np.float32)
  table = rng.normal(size=(NUM_ITEMS, 3)).astype(np.float32)
  targets = np.array([0, 3, 8, 5])
  objective = excluding('ce')
  loss = lambda e: objective.per_example(states, targets, e, key=None, num_items=NUM_ITEMS)
  # Oracle: float64 softmax over the 9 old items only.
  logits = states.astype(np.float64) @ table[:9].T.astype(np.float64)
  expected = np.log(np.exp(logits).sum(1)) - logits[np.arange(4), targets]
  np.testing.assert_allclose(loss(table), expected, rtol=1e-5, atol=1e-6)
  grad = np.asarray(jax.grad(lambda e: loss(e).sum())(table))
  assert np.isfinite(grad).all() and (grad[NEW] == 0).all() and (grad[~NEW] != 0).any()


@pytest.mark.parametrize('scoring', ['dense', 'gather'])
def test_sampled_negatives_are_old_items_other_than_the_target(scoring, monkeypatch):
  drawn = []
  real = builders.losses.sampled_loss_dense
  monkeypatch.setattr(builders.losses, 'sampled_loss_dense',
                      lambda kind, s, t, negatives, *a: drawn.append(negatives) or real(
                          kind, s, t, negatives, *a))
  targets = np.repeat(np.arange(9), 200)
  states = np.ones((targets.size, 3), np.float32)
  table = np.ones((NUM_ITEMS + 1, 3), np.float32)
  objective = excluding('bce', k=4, negative_scoring=scoring)
  items = table if scoring == 'dense' else (lambda ids: drawn.append(ids) or table[ids])
  out = objective.per_example(states, targets, items, key=jax.random.key(0),
                              num_items=NUM_ITEMS)
  assert np.isfinite(np.asarray(out)).all()
  negatives = np.asarray(drawn[-1])
  assert negatives.shape == (targets.size, 4)
  assert (negatives < 9).all() and (negatives != targets[:, None]).all()
  # Uniform over the 8 other old items: each target's 800 draws hit each about 100 times.
  for t in range(9):
    counts = np.bincount(negatives[targets == t].ravel(), minlength=9)
    assert counts[t] == 0 and counts[np.arange(9) != t].min() > 50, counts


def test_objective_of_a_cold_start_items_dataset_excludes_its_new_items():
  config = toy_config('alphafuse')
  objective = builders.objective(config, toy_dataset())
  assert objective.excluded_items == (9, 10, 11)
  assert type(builders.objective(config)) is builders.losses.Objective
  config.data.protocol = 'leave_one_out'
  with pytest.raises(ValueError, match='last-position'):
    builders.objective(config, toy_dataset())


@pytest.mark.slow
def test_training_loop_never_touches_new_items_and_reports_their_ranks(tmp_path):
  """Through `train_and_evaluate` on a synthetic cold_start_items split (SASRec-ID, CE, AdamW
  without decay): the new items' ID rows end exactly as initialised (no gradient ever reached
  them), and the saved new-item ranks match a float64 oracle from the best params."""
  from alphafuse_jax import checkpointing, data, train  # pylint: disable=g-import-not-at-top
  from test_train import make_config, make_dataset  # pylint: disable=g-import-not-at-top
  overrides = dict(make_dataset(tmp_path), **{
      'data.protocol': 'cold_start_items', 'data.new_item_fraction': 0.2,
      'data.val_fraction': 0.5, 'embedding.pipeline': 'id', 'embedding.id_init': 'normal',
      'train.loss': 'ce', 'train.num_epochs': 1, 'train.optimizer': 'adamw', 'train.l2': 0.0})
  config = make_config(overrides)
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  dataset = data.load(config.data)
  new = dataset.new_items
  assert results['test_groups']['new_items']['count'] == results['test']['count'] > 0
  assert 'new_items/NDCG@20' in results['val']
  model = builders.build_model(config, dataset, None)
  initial = evaluation.initial_params(model, config)
  best = checkpointing.Checkpoints(str(tmp_path / 'run')).restore_best(initial)
  rows, start = np.asarray(best['item_embedding']['id_table']), np.asarray(
      initial['item_embedding']['id_table'])
  np.testing.assert_array_equal(rows[:-1][new], start[:-1][new])
  assert not np.allclose(rows[:-1][~new], start[:-1][~new])
  test = dataset.splits['test']
  states = np.asarray(model.apply({'params': best}, test['history'], deterministic=True),
                      np.float64)
  scores = states @ rows[:-1].T.astype(np.float64)
  above, _ = protocols.new_item_rank_counts(scores, test['target'], new)
  saved = np.load(tmp_path / 'run' / 'test_ranks.npz')
  target_scores = scores[np.arange(len(scores)), test['target']]
  gaps = np.abs(scores - target_scores[:, None])[:, new]
  gaps[gaps == 0] = np.inf  # The target's own column.
  clear = gaps.min(1) > 1e-4 * (1 + np.abs(target_scores))  # Float32 near-ties left out.
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(saved['new_rank'][clear], (1 + above)[clear])


def test_text_ranker_writes_a_cells_results(tmp_path):
  """The text-only cell's workdir has what the report reads: results.json and test_ranks.npz."""
  from test_train import make_config, make_dataset  # pylint: disable=g-import-not-at-top
  overrides = dict(make_dataset(tmp_path), **{
      'data.protocol': 'cold_start_items', 'data.new_item_fraction': 0.2,
      'data.val_fraction': 0.5, 'embedding.pipeline': 'morec'})
  results = text_ranker.evaluate(make_config(overrides), str(tmp_path / 'run'))
  stored = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert stored['test']['NDCG@20'] == pytest.approx(results['test']['NDCG@20'], abs=1e-15)
  assert stored['best_epoch'] == 0 and 'new_items' in stored['test_groups']
  ranks = experiments.read_test_ranks(tmp_path / 'run' / 'test_ranks.npz')
  assert (ranks['new_rank'] <= ranks['rank']).all()  # Fewer items compete among new ones.
  assert cold_items.new_item_group(ranks)['NDCG@20'] == pytest.approx(
      stored['test_groups']['new_items']['NDCG@20'], abs=1e-12)


def test_position_init_std_reaches_sasrec_and_is_refused_elsewhere():
  config = toy_config('id')
  config.model.position_init_std = 0.02
  assert builders.build_model(config, toy_dataset(), None).position_init_std == 0.02
  config.model.backbone = 'dreamrec'
  with pytest.raises(ValueError, match='position_init_std=0.02 applies to SASRec only'):
    builders.build_model(config, toy_dataset(), None)
