"""Entry point: the top-K items of a trained run for a history, or for every user of a file.

  python -m alphafuse_jax.recommend --workdir=W --history="Toy Story (1995),Heat (1995)" --k=10
  python -m alphafuse_jax.recommend --workdir=W --histories=users.csv --out=top10.jsonl
  python -m alphafuse_jax.recommend --workdir=W --history=... --new_items=new_films.csv

Flags only; the work is `serving.Recommender`. Items are named by their original key (or title);
an unknown one is an error that lists the closest names.
"""

from absl import app
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished training run.', required=True)
_HISTORY = flags.DEFINE_string('history', None,
                               'Comma-separated item keys or titles, oldest first.')
_HISTORIES = flags.DEFINE_string(
    'histories', None, 'Interactions file (header; user, item, timestamp columns): top-K for '
    'every user, written to --out.')
_OUT = flags.DEFINE_string('out', None, 'With --histories: the output, .csv or .jsonl.')
_COLUMNS = flags.DEFINE_list('histories_columns', None,
                             'user,item,timestamp header names (default: the run\'s '
                             'data.delimited names).')
_SEP = flags.DEFINE_string('histories_sep', None, 'Field separator of --histories (default: the '
                           'run\'s data.delimited.sep).')
_K = flags.DEFINE_integer('k', 10, 'How many items to return.')
_EXCLUDE_SEEN = flags.DEFINE_bool('exclude_seen', False, 'Never return an item of the history.')
_NEW_ITEMS = flags.DEFINE_string(
    'new_items', None, 'Items to rank beside the catalogue, from their text alone: a CSV/TSV of '
    'item_id and text fields (title, year, genres), or an .npz of keys and vectors.')
_INITIAL_ROWS = flags.DEFINE_bool('initial_rows', False, 'LLMInit: give new items the rows its '
                                  'ID table started from.')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Histories per compiled batch.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (_HISTORY.value is None) == (_HISTORIES.value is None):
    raise app.UsageError('give exactly one of --history="key1,key2" and --histories=FILE.')
  if _HISTORIES.value and not _OUT.value:
    raise app.UsageError('--histories needs --out=FILE.csv or FILE.jsonl.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  from alphafuse_jax import serving  # pylint: disable=g-import-not-at-top
  try:
    recommender = serving.Recommender.from_workdir(
        _WORKDIR.value, new_items=_NEW_ITEMS.value, initial_rows=_INITIAL_ROWS.value)
    if _HISTORY.value is not None:
      items = recommender.recommend(_HISTORY.value, k=_K.value, exclude_seen=_EXCLUDE_SEEN.value)
      # ML-1M's keys are their titles: the title column only when it says more.
      titled = any(item.title not in ('', str(item.key)) for item in items)
      print('| rank | item |' + (' title |' if titled else '') + ' score | new |')
      print('|---|---|' + ('---|' if titled else '') + '---|---|')
      for rank, item in enumerate(items, start=1):
        title = f' {item.title or "-"} |' if titled else ''
        print(f'| {rank} | {item.key} |{title} {item.score:.4f} | {"yes" if item.new else ""} |')
      return
    columns = tuple(_COLUMNS.value) if _COLUMNS.value else None
    if columns is not None and len(columns) != 3:
      raise serving.ServingError(f'--histories_columns={",".join(columns)}: give three names, '
                                 'user,item,timestamp.')
    users, histories = serving.read_histories(_HISTORIES.value, recommender, sep=_SEP.value,
                                              columns=columns)
    ids, scores = recommender.top_k(histories, _K.value, exclude_seen=_EXCLUDE_SEEN.value,
                                    batch_size=_BATCH.value, progress=True)
    serving.write_recommendations(_OUT.value, recommender, users, ids, scores)
    print(f'top-{_K.value} of {len(users)} users -> {_OUT.value}')
  except serving.USER_ERRORS as e:
    serving.exit_on_input_error(e)  # One line on stderr, exit code 2.


if __name__ == '__main__':
  app.run(main)
