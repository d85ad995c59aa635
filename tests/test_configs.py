"""Every shipped config (and each pipeline argument) loads and passes the start-up checks."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alphafuse_jax import embeddings  # pylint: disable=g-import-not-at-top
from alphafuse_jax import experiments
from alphafuse_jax import train
from configs import dreamrec, reference_parity, suite

CONFIGS = (['configs/default.py', 'configs/tiny.py', 'configs/leave_one_out.py'] +
           [f'configs/reference_parity.py:{p}' for p in reference_parity.PIPELINES] +
           [f'configs/suite.py:{p}' for p in suite.PIPELINES] +
           [f'configs/dreamrec.py:{p}' for p in dreamrec.PIPELINES])


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
