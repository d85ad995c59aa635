"""Prepares the config's dataset and prints its split statistics as one JSON line.

  python -m alphafuse_jax.data --config=configs/default.py [--config.data.source=ml-100k ...]

Stdout carries exactly the JSON line; TFDS messages and logging go to stderr.
"""

import json
import sys

from absl import app
from ml_collections import config_flags
import tensorflow_datasets as tfds

from alphafuse_jax import data
from alphafuse_jax import errors

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (its data section).',
                                          lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('Pass --config=configs/<name>.py')
  tfds.disable_progress_bar()
  try:
    ds = data.load(_CONFIG.value.data)  # TFDS messages and logging go to stderr.
  except errors.AlphafuseError as error:  # Data and config errors (e.g. train_user_fraction).
    sys.exit(f'alphafuse_jax.data: {error}')  # The message names the problem and the fix.
  print(json.dumps(ds.stats()), flush=True)


if __name__ == '__main__':
  app.run(main)
