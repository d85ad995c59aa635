"""Entry point: export a trained run for serving without this package.

  python -m alphafuse_jax.export --workdir=W --out=DIR [--k=10] [--exclude_seen]

Writes `jax.export` artefacts (history ids [B, L] -> top-K ids and scores [B, K]; the user-state
function) and the item table as .npy; see `serving.exporting` for the files and how to load them
with jax and numpy alone. Flags only.
"""

from absl import app
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished training run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Directory to write (must be new or empty).',
                           required=True)
_K = flags.DEFINE_integer('k', 10, 'Items the exported function returns.')
_EXCLUDE_SEEN = flags.DEFINE_bool('exclude_seen', False, 'The exported function never returns an '
                                  'item of the history it is given.')
_NEW_ITEMS = flags.DEFINE_string('new_items', None, 'Items to add from their text alone (see '
                                 'alphafuse_jax.recommend --new_items).')
_INITIAL_ROWS = flags.DEFINE_bool('initial_rows', False, 'LLMInit: new items get initial rows.')
_PLATFORMS = flags.DEFINE_list('platforms', None, 'Lower for these platforms (cpu, cuda, tpu); '
                               'default: this machine\'s.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a non-empty --out.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from alphafuse_jax import serving  # pylint: disable=g-import-not-at-top
  try:
    recommender = serving.Recommender.from_workdir(
        _WORKDIR.value, new_items=_NEW_ITEMS.value, initial_rows=_INITIAL_ROWS.value)
    manifest = serving.export(recommender, _OUT.value, k=_K.value,
                              exclude_seen=_EXCLUDE_SEEN.value, platforms=_PLATFORMS.value,
                              overwrite=_OVERWRITE.value)
  except serving.USER_ERRORS as e:
    serving.exit_on_input_error(e)  # One line on stderr, exit code 2.
  print(f'exported {manifest["num_items"]} items (d={manifest["dim"]}, L={manifest["max_len"]}, '
        f'K={manifest["k"]}) -> {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
