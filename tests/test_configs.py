"""Every shipped config (and each pipeline argument) loads and passes the start-up checks.

Also the configs' own documentation: every field that default.py (or dreamrec.py, which adds the
DreamRec fields) sets has a comment directly above it, and every config function a docstring.
"""

import ast
import os
import pathlib
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alphafuse_jax import embeddings  # pylint: disable=g-import-not-at-top
from alphafuse_jax import experiments
from alphafuse_jax import train
from alphafuse_jax.embeddings import registry
from configs import dreamrec, reference_parity, suite

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
CONFIGS = (['configs/default.py', 'configs/tiny.py', 'configs/leave_one_out.py'] +
           [f'configs/reference_parity.py:{p}' for p in reference_parity.PIPELINES] +
           [f'configs/suite.py:{p}' for p in suite.PIPELINES] +
           [f'configs/dreamrec.py:{p}' for p in dreamrec.PIPELINES])
# Files whose get_* functions define fields (not only override them): every assignment there
# must be documented by a comment directly above it.
FIELD_DEFINING = ('default.py', 'dreamrec.py')


@pytest.mark.parametrize('name', CONFIGS)
def test_config_passes_start_up_checks(name):
  config = experiments.load_config(name)
  for devices in (1, 2):
    train.validate_config(config, devices)
  embeddings.id_initializer(config.embedding.id_init)  # Raises on an unknown initialiser.


def test_a_typo_fails_the_checks():
  config = experiments.load_config('configs/leave_one_out.py')
  config.train.loss = 'cross_entropy'
  with pytest.raises(ValueError, match='config.train.loss'):
    train.validate_config(config, 1)


def test_pipeline_lists_come_from_the_registry():
  sasrec = ('alphafuse', 'id', 'llminit', 'morec', 'whitenrec', 'unisrec', 'rlmrec', 'llmesr')
  assert suite.PIPELINES == reference_parity.PIPELINES == registry.pipelines_for('sasrec') == sasrec
  assert dreamrec.PIPELINES == registry.pipelines_for('dreamrec') == sasrec + ('idreamrec',)


@pytest.mark.parametrize('module', [suite, reference_parity, dreamrec])
def test_an_unknown_pipeline_names_the_valid_ones(module):
  with pytest.raises(ValueError, match='alphafuse.*llmesr'):
    module.get_config('sasrec_typo')


def test_new_fields_have_their_defaults():
  config = experiments.load_config('configs/default.py')
  assert config.eval.item_chunk_size == 8192
  assert config.tensorboard is True
  assert 'diffusion' not in config


def test_dreamrec_defines_every_field_its_model_reads():
  config = dreamrec.get_config('alphafuse')
  for field in ('p_uncond', 'denoiser', 'mlp_hidden_dim'):
    assert field in config.model, field
  for field in ('timesteps', 'beta_schedule', 'beta_start', 'beta_end', 'sampler',
                'sampling_stride', 'guidance_weight', 'reference_quirks', 'eval_seed'):
    assert field in config.diffusion, field


def test_default_defines_every_field_llmesr_reads():
  config = experiments.load_config('configs/default.py')
  for field in ('llmesr_distill_weight', 'llmesr_num_similar_users', 'llmesr_cross_heads',
                'llmesr_bug_compatible', 'llmesr_distill_loss', 'aux_weight'):
    assert field in config.embedding, field
  assert 'pre_ln' in config.model


def undocumented_fields(source: str) -> list[str]:
  """Field assignments (`a.b = ...`, `a.b.c = ...`) inside functions with no comment just above.

  The rule is strict: the line right above the assignment's first line must be a comment line
  (blank lines and other assignments do not count), so every field carries its own comment.
  """
  lines = source.splitlines()
  missing = []
  for func in ast.walk(ast.parse(source)):
    if not isinstance(func, ast.FunctionDef):
      continue
    for node in ast.walk(func):
      if not isinstance(node, (ast.Assign, ast.AnnAssign)):
        continue
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      if not any(isinstance(t, ast.Attribute) for t in targets):
        continue
      above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ''
      if not above.startswith('#'):
        missing.append(f'line {node.lineno}: {lines[node.lineno - 1].strip()}')
  return missing


@pytest.mark.parametrize('filename', FIELD_DEFINING)
def test_every_field_has_a_comment_above_it(filename):
  missing = undocumented_fields((CONFIG_DIR / filename).read_text())
  assert not missing, f'configs/{filename}: fields without a comment directly above:\n' + (
      '\n'.join(missing))


def test_the_comment_rule_catches_a_deleted_comment():
  source = (CONFIG_DIR / 'default.py').read_text()
  comment = ("  # 'reference' (the authors' single block), 'standard' (Kang & McAuley's paper) or "
             "'kang_code'\n  # (the block their code computes: residuals on the normalised inputs; "
             "models/layers.py).\n")
  assert comment in source
  missing = undocumented_fields(source.replace(comment, '', 1))
  assert len(missing) == 1 and "config.model.block = 'reference'" in missing[0], missing


@pytest.mark.parametrize('path', sorted(CONFIG_DIR.glob('*.py')), ids=lambda p: p.name)
def test_every_config_function_has_a_docstring(path):
  tree = ast.parse(path.read_text())
  functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
  for func in functions:
    assert ast.get_docstring(func), f'configs/{path.name}: {func.name} has no docstring'
    if func.name == 'get_config':
      # The exact command names this config file.
      assert f'configs/{path.name}' in ast.get_docstring(func), (
          f'configs/{path.name}: get_config docstring lacks the command')
  if path.name != '__init__.py':
    assert any(f.name == 'get_config' for f in functions), path.name
