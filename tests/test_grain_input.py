"""The Grain input (data/grain_input.py) gives the numpy pipeline's batches and resumes exactly.

The oracle is `pipeline.batches`, today's numpy batches: for several (seed, epoch), shuffled or
not, with 2 devices and 2 processes, from a given start step, Grain's batches must equal them bit
for bit, whether its rows come from in-memory arrays or from a prepared TFDS split read chunk by
chunk (also with a chunk pool smaller than one batch needs). The iterator's state goes through a
checkpoint: the restored iterator yields the batches the uninterrupted one did, a damaged state is
refused, and checkpoints of either input resume with the other. Through the training loop: a run
stopped mid-epoch and resumed with the Grain input ends with the uninterrupted run's metrics.
The train split left on disk (`read(..., train_arrays=False)`) is never read into memory by the
Grain loop, which still ends with the in-memory numpy loop's metrics, and it gives read()'s
arrays when asked.
"""

import copy
import json
import pathlib

import grain
import numpy as np
import pytest

from alphafuse_jax import checkpointing
from alphafuse_jax import data
from alphafuse_jax import errors
from alphafuse_jax.data import grain_input
from alphafuse_jax.data import tfds_builder
from alphafuse_jax.data import pipeline
from tests.test_train import make_config
from tests.test_train import make_dataset


def _arrays(n=203, max_len=4, seed=0):
  """A split-like dict: rows stored in a scrambled (user_id, position) order."""
  rng = np.random.default_rng(seed)
  user_id = np.repeat(np.arange(40, dtype=np.int32), 6)[:n]
  position = np.tile(np.arange(1, 7, dtype=np.int32), 40)[:n]
  stored = rng.permutation(n)
  return {'user_id': user_id[stored], 'position': position[stored],
          'history': rng.integers(0, 50, (n, max_len)).astype(np.int32),
          'target': rng.integers(0, 50, n).astype(np.int32)}


def _assert_batches_equal(got, expected):
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    assert sorted(g) == sorted(e)
    for k in e:
      assert g[k].dtype == e[k].dtype and g[k].shape == e[k].shape, k
      np.testing.assert_array_equal(g[k], e[k], err_msg=k)


LAYOUTS = [dict(num_devices=1), dict(num_devices=2),
           dict(num_devices=2, process_index=0, process_count=2),
           dict(num_devices=1, process_index=1, process_count=2)]


@pytest.mark.parametrize('layout', LAYOUTS, ids=str)
@pytest.mark.parametrize('shuffle', [True, False])
def test_grain_batches_equal_numpy_batches(layout, shuffle):
  arrays = _arrays()
  batch_size, epochs = 16, 3  # 203 rows: 13 batches, the last one padded.
  steps = pipeline.num_batches(203, batch_size)
  for seed in (0, 22):
    expected = [b for e in range(epochs) for b in pipeline.batches(
        arrays, batch_size, seed=seed, epoch=e, shuffle=shuffle, **layout)]
    ds = grain_input.grain_batches(grain_input.ArraySource(arrays), batch_size, seed=seed,
                                   shuffle=shuffle, num_epochs=epochs, **layout)
    assert len(ds) == epochs * steps
    _assert_batches_equal(list(ds.to_iter_dataset()), expected)
  # The epochs differ (the test would pass trivially if the order ignored the epoch).
  first, second = list(ds[:steps]), list(ds[steps:2 * steps])
  assert shuffle == any((a['target'] != b['target']).any() for a, b in zip(first, second))


def _place(batch):
  return {k: v.copy() for k, v in batch.items()}


def _train_input(source, kind='grain', *, num_epochs=3, layout=None, arrays=None):
  layout = layout or dict(num_devices=2, process_index=1, process_count=2)
  return grain_input.TrainInput(kind, source, 16, seed=5, shuffle=True, num_epochs=num_epochs,
                                place=_place, arrays=arrays, **layout)


@pytest.mark.parametrize('kind', ['grain', 'numpy'])
def test_train_input_adds_the_global_row_index_and_starts_mid_epoch(kind):
  arrays = _arrays()
  train_input = _train_input(grain_input.ArraySource(arrays), kind, arrays=arrays)
  layout = dict(num_devices=2, process_index=1, process_count=2)
  got = list(train_input.epoch(1, start_step=4))
  expected = list(pipeline.batches(arrays, 16, seed=5, epoch=1, shuffle=True, start_step=4,
                                   **layout))
  _assert_batches_equal([{k: v for k, v in b.items() if k != 'index'} for b, _ in got], expected)
  for (batch, rows), e in zip(got, expected):
    # Process 1 holds rows 8..15 of each global batch of 16, 4 per device.
    np.testing.assert_array_equal(batch['index'], np.arange(8, 16).reshape(2, 4))
    assert rows == 2 * e['mask'].sum()
  assert [rows for _, rows in got][-1] == 2 * (203 - 12 * 16 - 8)  # 11 real rows, 3 here.
  train_input.close()


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A delimited dataset prepared into TFDS with 37-row chunks (many chunks, a short last one)."""
  root = tmp_path_factory.mktemp('grain_tfds')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds_builder, 'CHUNK_SIZE', 37)
    config = make_config(make_dataset(root))  # Prepares the data.
  dataset = data.load(config.data)
  return config, dataset, tfds_builder.prepared_directory(config.data)


@pytest.mark.parametrize('cache_mb', [64.0, 0.001], ids=['all_chunks', 'one_chunk'])
def test_tfds_source_reads_the_prepared_split(prepared, cache_mb):
  config, dataset, directory = prepared
  arrays = dataset.splits['train']  # Read by tfds_builder.read: every chunk, sorted.
  source = grain_input.TfdsSplitSource(directory, 'train', cache_mb=cache_mb)
  n = len(arrays['target'])
  assert len(source) == n > 5 * 37
  rows = np.random.default_rng(1).integers(0, n, 300)
  for k, v in source.read(rows).items():
    np.testing.assert_array_equal(v, arrays[k][rows], err_msg=k)
  assert source[n - 1]['target'] == arrays['target'][n - 1]
  for k in ('user_id', 'position'):
    np.testing.assert_array_equal(source.keys()[k], arrays[k])
  with pytest.raises(IndexError, match='rows outside'):
    source.read(np.asarray([n]))
  layout = dict(num_devices=2, process_index=0, process_count=2)
  expected = [b for e in range(2) for b in pipeline.batches(
      arrays, 16, seed=config.train.seed, epoch=e, shuffle=True, **layout)]
  got = grain_input.grain_batches(source, 16, seed=config.train.seed, shuffle=True,
                                  num_epochs=2, **layout)
  _assert_batches_equal(list(got.to_iter_dataset()), expected)


def test_train_input_reads_the_tfds_split_and_refuses_an_unknown_input(prepared):
  config, dataset, _ = prepared
  config = make_config({'data.input': 'grain'}, base=config)
  train_input = grain_input.train_input(config, dataset, num_devices=1, process_index=0,
                                        process_count=1, place=_place)
  assert isinstance(train_input.source, grain_input.TfdsSplitSource)
  batch, _ = next(train_input.epoch(0))
  first = next(pipeline.batches(dataset.splits['train'], config.train.batch_size,
                                seed=config.train.seed, epoch=0, shuffle=True))
  np.testing.assert_array_equal(batch['history'], first['history'])
  train_input.close()
  with pytest.raises(errors.ConfigError, match="config.data.input='tf.data'.*numpy, grain"):
    grain_input.train_input(make_config({'data.input': 'tf.data'}, base=config), dataset,
                            num_devices=1, process_index=0, process_count=1, place=_place)


def test_read_leaves_the_train_split_on_disk_until_its_arrays_are_asked_for(prepared):
  _, _, directory = prepared
  full = tfds_builder.read(directory)  # The oracle: every split in memory.
  lazy = tfds_builder.read(directory, train_arrays=False)
  train = lazy.splits['train']
  assert isinstance(train, tfds_builder.LazySplit) and train.directory == directory
  # Field names and membership need no read.
  assert list(train) == list(full.splits['train']) and 'history' in train and 'x' not in train
  assert train.loads == 0
  for name in ('val', 'test'):
    for k, v in full.splits[name].items():
      np.testing.assert_array_equal(lazy.splits[name][k], v, err_msg=f'{name}/{k}')
  np.testing.assert_array_equal(lazy.train_item_counts, full.train_item_counts)
  for a, b in zip(lazy.user_sequences, full.user_sequences):
    np.testing.assert_array_equal(a, b)
  assert (lazy.num_items, lazy.max_len, lazy.item_keys, lazy.user_keys) == (
      full.num_items, full.max_len, full.item_keys, full.user_keys)
  # Asked for, the arrays are read()'s (history [n, L], int32), read once.
  for k, v in full.splits['train'].items():
    assert train[k].dtype == v.dtype and train[k].shape == v.shape, k
    np.testing.assert_array_equal(train[k], v, err_msg=k)
  assert train.loads == 1 and lazy.stats() == full.stats() and train.loads == 1
  with pytest.raises(KeyError):
    train['seen']
  # A split that fails read()'s checks is a DataError naming the directory, when read.
  meta = json.loads((directory / tfds_builder.META_JSON).read_text())
  damaged = tfds_builder.LazySplit(directory, 'train', dict(meta, num_items=2))
  with pytest.raises(errors.DataError, match='item ids beyond N; delete that directory'):
    damaged['target']


def test_train_input_over_a_split_on_disk_reads_only_what_batches_need(prepared):
  config, dataset, directory = prepared
  lazy = data.load(config.data, train_arrays=False)  # The loop's call.
  assert lazy.splits['train'].directory == directory
  grain_in = grain_input.train_input(make_config({'data.input': 'grain'}, base=copy.deepcopy(
      config)), lazy, num_devices=1, process_index=0, process_count=1, place=_place)
  assert isinstance(grain_in.source, grain_input.TfdsSplitSource)
  got = [b for b, _ in grain_in.epoch(0)]
  grain_in.close()
  assert lazy.splits['train'].loads == 0
  numpy_in = grain_input.train_input(make_config({'data.input': 'numpy'}, base=copy.deepcopy(
      config)), lazy, num_devices=1, process_index=0, process_count=1, place=_place)
  assert lazy.splits['train'].loads == 1  # The numpy input needs the arrays: read on demand.
  expected = list(pipeline.batches(dataset.splits['train'], config.train.batch_size,
                                   seed=config.train.seed, epoch=0, shuffle=True))
  _assert_batches_equal([{k: v for k, v in b.items() if k != 'index'} for b in got], expected)
  _assert_batches_equal([{k: v for k, v in b.items() if k != 'index'}
                         for b, _ in numpy_in.epoch(0)], expected)


# Through the loop (two short trainings, ~20 s on 2 busy cores); the fast form is the
# train_input test above (the loop's batches from a LazySplit, never read).
@pytest.mark.slow
def test_grain_loop_leaves_the_train_split_on_disk_with_the_numpy_loops_results(prepared,
                                                                                 tmp_path,
                                                                                 monkeypatch):
  from alphafuse_jax import train  # pylint: disable=g-import-not-at-top
  config = prepared[0]
  loaded = []

  def load(data_config, train_arrays=True):
    loaded.append(tfds_builder.load(data_config, train_arrays=train_arrays))
    return loaded[-1]

  monkeypatch.setattr(data, 'load', load)
  results = {}
  for kind in ('numpy', 'grain'):
    run = make_config({'data.input': kind, 'train.num_epochs': 2},
                      base=copy.deepcopy(config))
    train.train_and_evaluate(run, str(tmp_path / kind))
    results[kind] = json.loads((tmp_path / kind / 'results.json').read_text())
  numpy_ds, grain_ds = loaded
  assert isinstance(numpy_ds.splits['train'], dict)  # The numpy loop holds the arrays.
  assert isinstance(grain_ds.splits['train'], tfds_builder.LazySplit)
  assert grain_ds.splits['train'].loads == 0  # Trained and evaluated without reading them.
  for key in ('val', 'test', 'test_groups', 'best_epoch'):
    assert results['grain'][key] == results['numpy'][key], key
  assert ((tmp_path / 'grain' / 'metrics.jsonl').read_text() ==
          (tmp_path / 'numpy' / 'metrics.jsonl').read_text())  # Both epochs.


def _state():
  return {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'step': np.asarray(7)}


def test_iterator_state_round_trips_through_the_checkpoint(tmp_path):
  arrays = _arrays()
  source = grain_input.ArraySource(arrays)
  straight = _train_input(source)
  expected = list(straight.epoch(0)) + list(straight.epoch(1))  # 13 steps an epoch.
  straight.close()

  first = _train_input(source)
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  for step, _ in enumerate(first.epoch(0), start=1):
    if step in (5, 9):
      ckpt.save_latest(step, _state(), checkpointing.Progress(epoch_steps=step),
                       first.iterator)
  next(first.iterator)  # Moves on after the save: the checkpoint keeps step 9's state.
  ckpt.close()
  first.close()
  saved = json.loads((tmp_path / 'checkpoints' / '9' / 'data' / 'process_0-of-1.json').read_text())
  assert saved == {'next_index': 9}

  resumed = _train_input(source)
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  state, progress = ckpt.restore_latest(_state(), data_iterator=resumed.iterator)
  assert progress.epoch_steps == 9
  assert grain.experimental.get_next_index(resumed.iterator) == 9
  got = list(resumed.epoch(0, start_step=9)) + list(resumed.epoch(1))
  _assert_batches_equal([b for b, _ in got], [b for b, _ in expected[9:]])
  # Grain's iterator was restored: asking for another position is a mismatch, not a silent skip.
  with pytest.raises(errors.CheckpointError, match='at step 26, the train state at step 3'):
    next(resumed.epoch(0, start_step=3))
  resumed.close()

  # An altered iterator state fails its sha256: the run resumes from the older checkpoint.
  (tmp_path / 'checkpoints' / '9' / 'data' / 'process_0-of-1.json').write_text(
      '{"next_index": 3}')
  again = _train_input(source)
  _, progress = ckpt.restore_latest(_state(), data_iterator=again.iterator)
  assert progress.epoch_steps == 5 and grain.experimental.get_next_index(again.iterator) == 5
  ckpt.close()
  again.close()


def test_checkpoints_of_either_input_resume_with_the_other(tmp_path):
  arrays = _arrays()
  source = grain_input.ArraySource(arrays)
  expected = list(_train_input(source, 'numpy', arrays=arrays).epoch(0))
  # Saved by the numpy input (no iterator): the Grain input starts at the train state's step.
  ckpt = checkpointing.Checkpoints(str(tmp_path / 'numpy'))
  ckpt.save_latest(6, _state(), checkpointing.Progress())
  grain_in = _train_input(source)
  assert ckpt.restore_latest(_state(), data_iterator=grain_in.iterator) is not None
  _assert_batches_equal([b for b, _ in grain_in.epoch(0, start_step=6)],
                        [b for b, _ in expected[6:]])
  grain_in.close()
  ckpt.close()
  # Saved with the iterator: the numpy input restores the state and ignores the iterator.
  ckpt = checkpointing.Checkpoints(str(tmp_path / 'grain'))
  grain_in = _train_input(source)
  for _ in range(4):
    next(grain_in.iterator)
  ckpt.save_latest(4, _state(), checkpointing.Progress(epoch_steps=4), grain_in.iterator)
  grain_in.close()
  _, progress = ckpt.restore_latest(_state())
  assert progress.epoch_steps == 4
  ckpt.close()


# Through the loop (about 30 s: three short trainings); the batch tests above are the fast form.
@pytest.mark.slow
def test_stopped_grain_run_resumes_to_the_numpy_runs_metrics(tmp_path):
  overrides = dict(make_dataset(tmp_path), **{'train.checkpoint_every_steps': 3,
                                             'train.num_epochs': 2, 'train.patience': 0,
                                             'progress_bar': False})
  from alphafuse_jax import train  # pylint: disable=g-import-not-at-top
  straight = train.train_and_evaluate(make_config(dict(overrides, **{'data.input': 'numpy'})),
                                      str(tmp_path / 'straight'))
  grain_run = dict(overrides, **{'data.input': 'grain'})
  workdir = str(tmp_path / 'stopped')
  assert train.train_and_evaluate(make_config(dict(grain_run, **{'train.stop_after_steps': 17})),
                                  workdir) is None  # 14 steps an epoch: stopped in epoch 2.
  assert (pathlib.Path(workdir) / 'checkpoints' / '17' / 'data').is_dir()
  resumed = train.train_and_evaluate(make_config(grain_run), workdir)
  for key in ('val', 'test', 'best_epoch'):
    assert resumed[key] == straight[key], key
  assert ((tmp_path / 'stopped' / 'metrics.jsonl').read_text() ==
          (tmp_path / 'straight' / 'metrics.jsonl').read_text())
