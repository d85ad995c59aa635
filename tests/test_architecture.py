"""The package's shape: rooms import only rooms below them in the flow, and no module is huge.

The flow (../shared/DESIGN.md): pure maths and file helpers at the bottom, then data, text,
item embeddings, backbones, the model factory, evaluation/checkpoints, the loop, and the entry
points and tools on top. A module may import its own room and any room below it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'alphafuse_jax'
LAYERS = (
    ('files', 'errors', 'basic_layers', 'decomposition', 'streaming_decomposition', 'diffusion',
     'losses', 'sampled_softmax', 'chunked_ce', 'metrics', 'parallel', 'precision',
     'sparse_updates'),
    ('data',),
    ('text',),
    ('embeddings',),
    ('models',),
    ('builders', 'config_checks'),
    ('evaluation', 'checkpointing', 'metric_writers', 'inference_artifacts', 'step_monitor'),
    ('train',),
    # Serving reads a finished workdir (never the training data); the entry points sit beside it.
    ('serving',),
    ('main', 'recommend', 'export', 'experiments', 'benchmarks', 'spectrum'),
)
LEVEL = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}
MAX_LINES = 450


def _modules():
  return sorted(p for p in PACKAGE.rglob('*.py'))


def _room(path: pathlib.Path) -> str:
  return path.relative_to(PACKAGE).with_suffix('').parts[0]


def _imported_rooms(path: pathlib.Path) -> set[str]:
  rooms = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('alphafuse_jax'):
      parts = node.module.split('.')
      rooms.update([a.name for a in node.names] if len(parts) == 1 else [parts[1]])
    elif isinstance(node, ast.Import):
      rooms.update(a.name.split('.')[1] for a in node.names
                   if a.name.startswith('alphafuse_jax.'))
  return rooms


def test_every_room_has_a_level():
  rooms = {_room(p) for p in _modules()} - {'__init__'}
  assert rooms <= set(LEVEL), f'rooms missing from LAYERS: {sorted(rooms - set(LEVEL))}'


@pytest.mark.parametrize('path', _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_room_above_it(path):
  room = _room(path)
  if room == '__init__':
    return
  above = sorted(r for r in _imported_rooms(path) - {room} if LEVEL[r] > LEVEL[room])
  assert not above, f'{path.name} ({room}, level {LEVEL[room]}) imports rooms above it: {above}'


@pytest.mark.parametrize('path', _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_the_size_limit(path):
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_LINES, f'{path.relative_to(PACKAGE)} has {lines} lines (limit {MAX_LINES})'


@pytest.mark.parametrize('name', ['train.py', 'evaluation.py'])
def test_the_steps_never_ask_what_model_they_hold(name):
  """The training contract (models/base.py) is the only interface the loop uses."""
  source = (PACKAGE / name).read_text()
  for probe in ('isinstance(', 'hasattr(', 'type(model)'):
    assert probe not in source, f'{name} contains {probe!r}'


def test_the_layer_check_catches_an_upward_import(tmp_path):
  """The check itself can fail: a data module importing the loop is reported."""
  bad = tmp_path / 'bad.py'
  bad.write_text('from alphafuse_jax import train\nimport alphafuse_jax.models.sasrec\n')
  assert _imported_rooms(bad) == {'train', 'models'}
  assert all(LEVEL[r] > LEVEL['data'] for r in _imported_rooms(bad))
