"""A catalogue of malformed inputs: every reader, embeddings file, config field and workdir state.

Each case runs through `main.run` (what `python -m alphafuse_jax.main` calls) in-process and must
give exit code 2 and one stderr line 'error: <Class>: ...' that names the problem and the fix
(two expected fragments per case), leaving nothing partial: no workdir when it did not exist, no
`.incomplete-*` or half-prepared data cache. test_reliability.py runs one case as a subprocess
(the real exit code and stderr). Accepted inputs that once misled (a UTF-8 byte-order mark,
RFC-4180 quotes, exact duplicate rows) are tested there as documented acceptances.
"""

import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest

from alphafuse_jax import checkpointing
from alphafuse_jax import main as main_lib
from tests.test_train import make_config
from tests.test_train import make_dataset


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """The synthetic dataset (prepared once) and its config overrides; 40 items, 24-dim vectors."""
  root = tmp_path_factory.mktemp('bad_inputs')
  return root, make_dataset(root)


# ---- how a case builds its inputs ---------------------------------------------------------------
def config_case(**overrides):
  """Config fields only (dots as in --config.a.b), on the valid synthetic dataset."""
  return lambda case_dir, base_overrides: {k.replace('__', '.'): v for k, v in overrides.items()}


INTER = 'u,i,t\n1,10,1\n1,11,2\n1,12,3\n2,10,1\n2,12,2\n3,11,5\n3,10,6\n4,12,1\n4,11,2\n'
TEXTS = 'i,title\n10,Ten\n11,Eleven\n12,Twelve\n'


def csv_case(inter: str | bytes = INTER, texts: str | None = TEXTS, **overrides):
  """Interactions (and item texts) written into the case directory, read by the delimited source."""
  def setup(case_dir, base_overrides):
    del base_overrides
    data = inter if isinstance(inter, bytes) else inter.encode()
    (case_dir / 'inter.csv').write_bytes(data)
    if texts is not None:
      (case_dir / 'items.csv').write_text(texts)
    out = {'data.path': str(case_dir), 'data.data_dir': str(case_dir / 'cache'),
           'data.delimited.interactions_file': 'inter.csv', 'data.delimited.user_column': 'u',
           'data.delimited.item_column': 'i', 'data.delimited.time_column': 't',
           'data.delimited.item_text_file': 'items.csv' if texts is not None else '',
           'data.delimited.item_text_item_column': 'i', 'embedding.pipeline': 'id'}
    return dict(out, **{k.replace('__', '.'): v for k, v in overrides.items()})
  return setup


def vectors_case(make, suffix='.npy'):
  """An embeddings file for the synthetic dataset (40 items): make(n) -> what to write."""
  def setup(case_dir, base_overrides):
    del base_overrides
    path = case_dir / f'vectors{suffix}'
    content = make(40)
    if isinstance(content, bytes):
      path.write_bytes(content)
    elif suffix == '.npz':
      np.savez(path, **content)
    elif suffix == '.pickle':
      with open(path, 'wb') as f:
        pickle.dump(content, f)
    else:
      np.save(path, content)
    return {'text.embeddings_file': str(path)}
  return setup


class NotAVector:  # A class the embeddings unpickler must refuse.
  pass


def trained_workdir(files: dict[str, str], **overrides):
  """A workdir that holds a (fake) checkpoint and the given files, run with `overrides`."""
  def setup(case_dir, base_overrides):
    workdir = case_dir / 'workdir'
    (workdir / 'checkpoints' / '3' / 'state').mkdir(parents=True)
    (workdir / 'checkpoints' / '3' / 'state' / 'garbage').write_text('not a checkpoint')
    config = make_config(base_overrides)
    checkpointing.write_config_record(str(workdir), config)
    for name, text in files.items():
      (workdir / name).write_text(text)
    return dict({k.replace('__', '.'): v for k, v in overrides.items()}, _workdir=workdir)
  return setup


def locked_workdir(case_dir, base_overrides):
  del base_overrides
  workdir = case_dir / 'workdir'
  workdir.mkdir()
  return {'_workdir': workdir, '_lock': checkpointing.WorkdirLock(str(workdir))}


def workdir_under_a_file(case_dir, base_overrides):
  del base_overrides
  (case_dir / 'file').write_text('x')
  return {'_workdir': case_dir / 'file' / 'run'}


def dup(n):
  return np.repeat(np.eye(8, dtype=np.float32)[:3], -(-n // 3), axis=0)[:n]


# (id, setup, [problem fragment, fix fragment]); about 60 cases.
CASES = [
    # Config fields: refused before anything is created.
    ('pipeline', config_case(embedding__pipeline='alphafusion'), ["'alphafusion'", 'valid:']),
    ('backbone', config_case(model__backbone='bert'), ["backbone='bert'", 'not one of']),
    ('optimizer', config_case(train__optimizer='adagrad'), ["optimizer='adagrad'", 'not one of']),
    ('loss', config_case(train__loss='mse'), ["config.train.loss='mse'", 'one of']),
    ('batch_zero', config_case(train__batch_size=0),
     ['batch_size=0', '--config.train.batch_size=']),
    ('eval_batch', config_case(eval__batch_size=-4), ['eval.batch_size=-4', 'positive multiple']),
    ('epochs_zero', config_case(train__num_epochs=0), ['num_epochs=0', '>= 1']),
    ('lr_zero', config_case(train__learning_rate=0.0), ['learning_rate=0.0', '> 0']),
    ('lr_nan', config_case(train__learning_rate=float('nan')), ['learning_rate=nan', '> 0']),
    ('l2_negative', config_case(train__l2=-1.0), ['l2=-1.0', '>= 0']),
    ('patience', config_case(train__patience=-1), ['patience=-1', '0 = off']),
    ('ckpt_every', config_case(train__checkpoint_every_steps=-5), ['every_steps=-5', '0 = off']),
    ('every_epochs', config_case(eval__every_epochs=0), ['every_epochs=0', '>= 1']),
    ('chunk', config_case(eval__item_chunk_size=0), ['item_chunk_size=0', '>= 1']),
    ('ks_without_20', config_case(eval__ks=(1, 5, 10)), ['including 20', '--config.eval.ks=']),
    ('ks_zero', config_case(eval__ks=(0, 20)), ['ks=(0, 20)', 'cut-offs >= 1']),
    ('ties', config_case(eval__ties='random'), ["ties='random'", 'expected']),
    ('head_fraction', config_case(eval__head_fraction=1.5), ['head_fraction=1.5', '(0, 1)']),
    ('sampled', config_case(eval__sampled_negatives=-1), ['sampled_negatives=-1', '>= 0']),
    ('dropout', config_case(model__dropout_rate=1.0), ['dropout_rate=1.0', '[0, 1)']),
    ('parallelism', config_case(parallelism='vmap'), ["parallelism='vmap'", 'shard_map']),
    ('hidden_zero', config_case(embedding__hidden_dim=0), ['hidden_dim=0', '>= 1']),
    ('negatives', config_case(train__loss='infonce', train__num_negatives=0),
     ['num_negatives=0', '>= 1']),
    ('temperature', config_case(train__loss='infonce', train__temperature=0.0),
     ['temperature=0.0', '> 0']),
    ('dreamrec_loo', config_case(model__backbone='dreamrec', data__protocol='leave_one_out'),
     ['DreamRec trains on the last position', "protocol='cold_start_users'"]),
    ('encoder', config_case(text__encoder='bert'), ["encoder='bert'", "'minilm' or 'file'"]),
    ('scale', config_case(text__scale=0.0), ['text.scale=0.0', '> 0']),
    ('no_vectors_file', config_case(text__embeddings_file=''),
     ['needs config.text.embeddings_file', '.npy']),
    ('vectors_missing', config_case(text__embeddings_file='/nonexistent/vectors.npy'),
     ["'/nonexistent/vectors.npy' does not exist", 'fix the path']),
    ('no_item_texts', config_case(embedding__pipeline='morec', text__encoder='minilm'),
     ['item_text_file is empty', '--config.embedding.pipeline=id']),
    ('authors_texts', config_case(data__source='authors', text__encoder='minilm'),
     ['no item texts', '--config.text.encoder=file']),
    ('duplicates_policy', config_case(data__delimited__duplicates='maybe'),
     ["duplicates='maybe'", "'drop' or 'keep'"]),
    ('encoding', config_case(data__delimited__encoding='utf-9'), ["'utf-9'", 'utf-8 or latin-1']),
    # Config that does not fit the data: refused when the model is built.
    ('hidden_over_dl', config_case(embedding__hidden_dim=64, embedding__null_dim=8),
     ['hidden_dim=64 exceeds', 'd_l=24']),
    ('null_dim', config_case(embedding__null_dim=16), ['null_dim=16 must be < hidden_dim=16',
                                                       'null_dim']),
    ('k_core', config_case(data__protocol='leave_one_out', data__min_interactions=1000),
     ['no interactions survive', 'Lower config.data.min_interactions']),
    ('fractions', config_case(data__train_fraction=1.5),
     ['train_fraction=1.5', 'train + val < 1']),
    ('max_len', config_case(data__max_len=0), ['max_len must be an integer >= 1', 'max_len']),
    # Readers.
    ('source', config_case(data__source='nosuch'), ["source='nosuch'", 'use one of']),
    ('grouplens_no_path', config_case(data__source='grouplens', data__path=''),
     ['config.data.path is empty', 'grouplens']),
    ('grouplens_no_files', config_case(data__source='grouplens', data__path='/'),
     ['ratings.dat', 'Set config.data.path']),
    ('inter_missing', csv_case(data__delimited__interactions_file='nope.csv'),
     ['nope.csv', 'interactions_file']),
    ('inter_empty_name', csv_case(data__delimited__interactions_file=''),
     ['interactions_file is empty', 'set it to']),
    ('texts_missing', csv_case(data__delimited__item_text_file='nope.csv'),
     ['nope.csv', 'item_text_file']),
    ('column', csv_case(data__delimited__user_column='user'), ["no column 'user'", 'user_column']),
    ('timestamp', csv_case(INTER + '5,10,soon\n'), ["field 't' must be numeric", 'Fix that value']),
    ('field_count', csv_case(INTER + '5,10,7,extra\n'), ['line 11: malformed row',
                                                        'Fix or delete that line']),
    ('open_quote', csv_case(INTER + '5,"10,7\n'), ['inter.csv, line', 'close the quoted field']),
    ('ambiguous_ids', csv_case(INTER + '01,10,9\n'), ["id '01' in column 'u'", 'write each id']),
    ('empty_id', csv_case('u,i,t\nx,10,1\n,11,2\n'), ['empty user id', 'Fill it in']),
    ('undecodable', csv_case(INTER.encode() + 'é,10,1\n'.encode('latin-1')),
     ['cannot decode as utf-8', 'config.data.delimited.encoding']),
    ('empty_file', csv_case(''), ['the file is empty', 'header row']),
    ('header_only', csv_case('u,i,t\n'), ['no data rows', 'Point the config']),
    ('text_twice', csv_case(texts=TEXTS + '11,Again\n'), ["second text row for item 11",
                                                          'keep one row per item']),
    ('text_unknown', csv_case(texts=TEXTS + '99,Ninety\n'),
     ['unknown item id 99', 'Delete that row']),
    ('text_missing_row', csv_case(texts='i,title\n10,Ten\n'),
     ['no text row for item id(s) [11, 12]', 'Add rows']),
    ('empty_split', csv_case('u,i,t\n1,10,1\n1,11,2\n', None), ['split is empty', 'Use more data']),
    # Embeddings files.
    ('vectors_rows', vectors_case(lambda n: np.ones((n + 1, 8), np.float32)),
     ['41 vectors, but the dataset has 40 items', 'row i must be item i']),
    ('vectors_1d', vectors_case(lambda n: np.ones(n, np.float32)),
     ['expected a 2-D', 'one row per item']),
    ('vectors_nan', vectors_case(lambda n: np.where(np.eye(n, 8) > 0, np.nan, 1.0)),
     ['item 0 has NaN', 'Recompute']),
    ('vectors_identical', vectors_case(lambda n: np.ones((n, 8), np.float32)),
     ['all 40 item vectors are identical', '--config.embedding.pipeline=id']),
    ('vectors_duplicated', vectors_case(dup), ['37 of 40 item vectors (92.5%) repeat',
                                               'check the item texts']),
    ('vectors_suffix', vectors_case(lambda n: b'1 2 3', suffix='.txt'),
     ["unknown embedding file type '.txt'", 'supported']),
    ('vectors_npz_two', vectors_case(lambda n: {'a': np.eye(n, 8), 'b': np.eye(n, 8)}, '.npz'),
     ['holds 2 arrays', 'keep one']),
    ('vectors_garbage', vectors_case(lambda n: b'\x93NUMPY garbage'), ['not a plain numeric .npy',
                                                                      're-save']),
    ('vectors_strings', vectors_case(lambda n: np.full((n, 8), 'x')), ['dtype <U1', 'float32']),
    ('vectors_class', vectors_case(lambda n: [NotAVector()], '.pickle'),
     ['the pickle references', 'np.save']),
    ('vectors_ragged', vectors_case(lambda n: [np.ones(8), np.ones(7)], '.pickle'),
     ['item 1 has 7 dims but item 0 has 8', 'same length']),
    # The workdir.
    ('workdir_file', workdir_under_a_file, ['is not writable', '--workdir=']),
    ('workdir_locked', locked_workdir, ['in use by another run (pid', 'pass another --workdir']),
    ('config_changed', trained_workdir({}, train__learning_rate=0.5),
     ['config.train.learning_rate: 0.001 -> 0.5', '--config.allow_config_change=true']),
    ('config_record_garbled', trained_workdir({'config.json': '{"train": '}),
     ['config.json is unreadable', 'delete it']),
    ('checkpoint_damaged', trained_workdir({}), ['can be restored', 'remove the workdir']),
]


@pytest.mark.parametrize('name, setup, fragments', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_with_exit_code_2(base, tmp_path, capsys, name, setup, fragments):
  root, base_overrides = base
  overrides = setup(tmp_path, base_overrides)
  workdir = overrides.pop('_workdir', tmp_path / 'run')
  lock = overrides.pop('_lock', None)
  existed = workdir.exists()
  listing = lambda: sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*')
                           if p.name != '.lock')  # The lock file is a fixture of a workdir.
  before = listing() if existed else None
  config = make_config(dict(base_overrides, **overrides))
  capsys.readouterr()
  try:
    code = main_lib.run(config, str(workdir))
  finally:
    if lock is not None:
      lock.release()
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert code == 2, (name, err)
  assert len(lines) == 1, err
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  # Nothing partial: no new workdir (an existing one unchanged), no scratch or half cache.
  if existed:
    assert listing() == before
  else:
    assert not workdir.exists(), sorted(workdir.rglob('*'))
  data_dir = pathlib.Path(config.data.data_dir)
  if data_dir.exists():
    assert not list(data_dir.glob('.incomplete-*'))
    if data_dir != root / 'prepared':  # The case's own cache: failing data is never prepared.
      assert not list(data_dir.glob('alphafuse_sequences/*'))


def test_the_catalogue_is_large_and_covers_every_kind():
  assert len(CASES) >= 40
  kinds = {c[1].__qualname__.split('.')[0] for c in CASES}
  assert {'config_case', 'csv_case', 'vectors_case', 'trained_workdir'} <= kinds


def test_debug_shows_the_traceback(base, tmp_path):
  _, base_overrides = base
  config = make_config(dict(base_overrides, **{'eval.ks': (1, 5)}))
  with pytest.raises(main_lib.errors.ConfigError):
    main_lib.run(config, str(tmp_path / 'run'), debug=True)
