"""Export: the jax.export artefacts run in a fresh Python without alphafuse_jax and agree with the
in-process model.

The workdir is made without training (random params written to best/, inference artefacts
saved as training saves them): what is exported does not depend on how the params were found.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from alphafuse_jax import builders
from alphafuse_jax import checkpointing
from alphafuse_jax import inference_artifacts
from alphafuse_jax import serving
from alphafuse_jax import train as train_lib
from tests import test_embeddings as emb_tests
from tests.cpu_env import cpu_env
from tests.test_serving import assert_top_k
from tests.test_train import make_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
N, L, K = 40, 6, 5

LOADER = """
import sys
site, out_dir, histories, result = sys.argv[1:]
sys.path.append(site)  # jax and numpy only: python -I -S has no site-packages, no .pth files.
try:
  import alphafuse_jax
except ImportError:
  pass
else:
  raise SystemExit('alphafuse_jax is importable in the loader process')
import numpy as np
from jax import export
recommend = export.deserialize(open(f'{out_dir}/recommend.jax', 'rb').read())
user_states = export.deserialize(open(f'{out_dir}/user_states.jax', 'rb').read())
history = np.load(histories)
ids, scores = recommend.call(history)
ids1, scores1 = recommend.call(history[:1])  # Another batch size: the same artefact.
np.savez(result, ids=ids, scores=scores, ids1=ids1, scores1=scores1,
         states=user_states.call(history), table=np.load(f'{out_dir}/item_table.npy'),
         modules=np.array(sorted(m for m in sys.modules if m.startswith('alphafuse'))))
"""


@pytest.fixture(scope='module')
def recommender(tmp_path_factory):
  """A workdir as training leaves it (random params), loaded with two new items."""
  workdir = tmp_path_factory.mktemp('export')
  config = make_config({'embedding.hidden_dim': 8, 'embedding.null_dim': 4, 'data.max_len': L,
                        'text.encoder': 'file', 'text.embeddings_file': 'vectors.npy'})
  x = emb_tests.language()
  dataset = types.SimpleNamespace(
      num_items=N, max_len=L, item_keys=[f'item-{i}' for i in range(N)],
      item_fields=[{'title': f'Item {i}', 'year': '', 'genres': []} for i in range(N)],
      train_item_counts=np.ones(N, np.int64))
  model = builders.build_model(config, dataset, x, for_training=False)
  params = jax.jit(lambda key: train_lib.init_params(model, key))(jax.random.key(0))
  params['item_embedding']['id_table'] = jax.random.normal(jax.random.key(1), (N + 1, 4))
  ckpt = checkpointing.Checkpoints(str(workdir))
  ckpt.save_best(1, params)
  ckpt.close()
  inference_artifacts.save(str(workdir), config, dataset, language=x)
  rec = serving.Recommender.from_workdir(str(workdir), chunk_size=16)
  return rec.add_items_from_vectors(['new-0', 'new-1'], emb_tests.language(n=2, seed=4) / 40)


def test_exported_functions_run_without_the_package(recommender, tmp_path):
  out = tmp_path / 'exported'
  manifest = serving.export(recommender, str(out), k=K, exclude_seen=True)
  assert sorted(os.listdir(out)) == manifest['files']
  assert (manifest['pad_id'], manifest['max_len'], manifest['k']) == (N + 2, L, K)
  items = json.loads((out / 'items.json').read_text())
  assert items['keys'][-2:] == ['new-0', 'new-1'] and items['new'][-2:] == [True, True]
  rng = np.random.default_rng(0)
  history = rng.integers(0, N + 2, size=(3, L)).astype(np.int32)
  history[1, :3] = N + 2  # Left padding.
  np.save(tmp_path / 'history.npy', history)
  site = pathlib.Path(np.__file__).parents[1]
  proc = subprocess.run([sys.executable, '-I', '-S', '-c', LOADER, str(site), str(out),
                         str(tmp_path / 'history.npy'), str(tmp_path / 'got.npz')],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        env=cpu_env())
  assert proc.returncode == 0, proc.stderr
  got = np.load(tmp_path / 'got.npz')
  assert got['modules'].size == 0
  # The same artefact in this process: the same compiled program, bit for bit.
  exported = jax.export.deserialize((out / 'recommend.jax').read_bytes())
  ids, scores = exported.call(history)
  np.testing.assert_array_equal(got['ids'], ids)
  np.testing.assert_array_equal(got['scores'], scores)
  np.testing.assert_array_equal(got['ids1'], got['ids'][:1])
  np.testing.assert_allclose(got['scores1'], got['scores'][:1], rtol=1e-6, atol=1e-6)
  # And the in-process model: its table exactly, its states and top-K to float32 tolerance.
  np.testing.assert_array_equal(got['table'], np.asarray(recommender.item_table()))
  states = recommender.user_states(history)
  np.testing.assert_allclose(got['states'], states, rtol=1e-5, atol=1e-5)
  want_ids, want_scores = recommender.top_k_arrays(history, history, K)
  np.testing.assert_array_equal(got['ids'], want_ids)
  np.testing.assert_allclose(got['scores'], want_scores, rtol=1e-5, atol=1e-5)
  # Both against float64 scores with the history excluded.
  all_scores = states.astype(np.float64) @ got['table'].astype(np.float64).T
  for row in range(len(history)):
    all_scores[row, [i for i in history[row] if i < N + 2]] = -np.inf
    assert_top_k(got['ids'][row], got['scores'][row], all_scores[row], K)


def test_export_cli_refuses_to_overwrite(recommender, tmp_path):
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'keep.txt').write_text('mine')
  proc = subprocess.run(
      [sys.executable, '-m', 'alphafuse_jax.export', f'--workdir={recommender.workdir}',
       f'--out={tmp_path / "taken"}', '--k=3'], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=cpu_env())
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: ServingError: ')
  assert 'pass --overwrite' in proc.stderr
  assert os.listdir(tmp_path / 'taken') == ['keep.txt']
  with pytest.raises(serving.ServingError, match='k=50 must be an int in 1..42'):
    serving.export(recommender, str(tmp_path / 'other'), k=50)
  assert not (tmp_path / 'other').exists()


def test_a_failed_write_leaves_the_previous_directory_whole(tmp_path):
  target = tmp_path / 'exported'
  inference_artifacts.write_directory(str(target),
                                      lambda d: (pathlib.Path(d) / 'a').write_text('1'))

  def failing(directory):
    (pathlib.Path(directory) / 'a').write_text('2')
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    inference_artifacts.write_directory(str(target), failing)
  assert os.listdir(tmp_path) == ['exported'] and (target / 'a').read_text() == '1'
  assert oct(target.stat().st_mode & 0o777) == '0o755'
