"""The TFDS builder and the prepared-data cache.

One builder config per (source, protocol, L, split seed, fractions, train user fraction, min
count, source fingerprint); the config name carries all of them, so a changed source file or
setting never reads a stale cache. Layout:

  <data_dir>/alphafuse_sequences/<config name>/<VERSION>/
      dataset_info.json, features.json, alphafuse_sequences-{train,val,test}.array_record-*
      alphafuse_meta.json    num_items, max_len, item keys and texts, user keys, description
      alphafuse_arrays.npz   train_item_counts, user_sequences (indptr, items)

Examples are stored in chunks of CHUNK_SIZE rows per ArrayRecord record: reading 800k single
rows through `as_data_source()` decodes one proto per row (tens of seconds on 2 cores), while
chunks decode in well under a second. Records come back in shuffled order, so each carries its
chunk index. Everything is prepared into a temporary directory under <data_dir>
(`.incomplete-<pid>-<host>-*`) and renamed into place on success, so a failed preparation leaves no
partial cache; the directories of killed preparations (their pid is gone) are removed by the next
`load`. A cache that fails to read back (a truncated or edited file) is deleted and prepared again.

`load(config, train_arrays=False)` reads val, test and the metadata files but leaves the train
split on disk (`LazySplit`: read whole only if something asks for its arrays), for a loop
that reads training rows chunk by chunk (grain_input.TfdsSplitSource).

The fingerprint is the sha256 of the source files' bytes (about 0.2 s for ML-1M's 45 MB), plus
the protocol settings and FORMAT_VERSION; touching a file without changing it keeps the cache.
"""

from __future__ import annotations

import collections.abc
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from alphafuse_jax.data import authors
from alphafuse_jax.data import protocols
from alphafuse_jax.data import sources
from alphafuse_jax.data import synthetic

VERSION = '1.0.0'
# Bump when the prepared form changes without a change of VERSION's meaning.
# 2: cold-start rows list users in the split's permutation order (1 sorted them by user_id).
FORMAT_VERSION = 2
CHUNK_SIZE = 1024
DATASET_NAME = 'alphafuse_sequences'
META_JSON = 'alphafuse_meta.json'
META_ARRAYS = 'alphafuse_arrays.npz'
# Prefix of a preparation's scratch directory in <data_dir>, followed by the preparing pid.
INCOMPLETE = '.incomplete-'


def resolve_data_dir(data_dir: str) -> pathlib.Path:
  """config.data.data_dir, or $ALPHAFUSE_DATA_DIR, or ./data relative to the cwd."""
  return pathlib.Path(data_dir or os.environ.get('ALPHAFUSE_DATA_DIR') or 'data').absolute()


def source_files(config: Any) -> list[pathlib.Path]:
  """The files a config reads, checked to exist (the fingerprint covers their bytes)."""
  if config.source in ('ml-1m', 'ml-100k'):
    return list(sources.packaged_files(config.source))
  if config.source == 'grouplens':
    _require_path(config)
    return sources.read_grouplens_files(config.path)
  if config.source == 'delimited':
    return sources.delimited_files(config.delimited, config.path)
  if config.source == 'authors':
    _require_path(config)
    return authors.authors_files(config.path)
  if config.source == 'synthetic':
    generated = resolve_data_dir(config.data_dir) / 'synthetic'
    if generated.is_dir():
      clean_orphans(generated)  # Scratch directories of killed generations.
    return synthetic.source_files(config.synthetic, generated.parent)
  raise sources.DataError(
      f'config.data.source={config.source!r} is unknown; use one of ml-1m, ml-100k, grouplens, '
      'delimited, authors, synthetic.')


def _require_path(config: Any) -> None:
  if not config.path:
    raise sources.DataError(f'config.data.path is empty; source {config.source!r} reads its '
                            'files from that directory.')


def settings(config: Any) -> dict[str, Any]:
  """The config fields that change the prepared data (the cache key besides the files)."""
  out = {'source': config.source, 'max_len': int(config.max_len), 'format': FORMAT_VERSION}
  # Below 1 only for cold_start_users; at 1 the key (and so every existing cache) is unchanged.
  user_fraction = protocols.check_train_user_fraction(
      getattr(config, 'train_user_fraction', 1.0),
      'authors' if config.source == 'authors' else config.protocol)
  if config.source != 'authors':
    out['protocol'] = config.protocol
    if config.protocol == 'cold_start_users':
      out.update(split_seed=int(config.split_seed), train_fraction=float(config.train_fraction),
                 val_fraction=float(config.val_fraction))
      if user_fraction < 1:
        out['train_user_fraction'] = user_fraction
    elif config.protocol == 'leave_one_out':
      out['min_interactions'] = int(config.min_interactions)
    elif config.protocol == 'cold_start_items':
      out.update(split_seed=int(config.split_seed), val_fraction=float(config.val_fraction),
                 new_item_fraction=float(config.new_item_fraction))
    else:
      raise sources.DataError(f'config.data.protocol={config.protocol!r} is unknown; use '
                              'cold_start_users, leave_one_out or cold_start_items.')
  if config.source == 'delimited':
    out['delimited'] = {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in config.delimited.items()}
  if config.source == 'synthetic':
    out['synthetic'] = synthetic.dataset_name(config.synthetic)
  return out


def fingerprint(files: list[pathlib.Path], config_settings: dict[str, Any]) -> str:
  """sha256 over the settings and every source file's bytes."""
  digest = hashlib.sha256(json.dumps(config_settings, sort_keys=True).encode())
  for path in files:
    digest.update(path.name.encode())
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 22), b''):
        digest.update(block)
  return digest.hexdigest()


def config_name(config_settings: dict[str, Any], digest: str) -> str:
  """A readable builder-config name: source, protocol, L, seed, fractions, min count, hash."""
  s = config_settings
  parts = [s['source'], s.get('protocol', 'given'), f"L{s['max_len']}"]
  if s.get('protocol') == 'cold_start_users':
    parts += [f"seed{s['split_seed']}", f"tr{s['train_fraction']:g}", f"va{s['val_fraction']:g}"]
    if 'train_user_fraction' in s:
      parts.append(f"tu{s['train_user_fraction']:g}")
  elif s.get('protocol') == 'leave_one_out':
    parts.append(f"k{s['min_interactions']}")
  elif s.get('protocol') == 'cold_start_items':
    parts += [f"seed{s['split_seed']}", f"va{s['val_fraction']:g}",
              f"new{s['new_item_fraction']:g}"]
  return '.'.join(parts + [digest[:16]])


def build(config: Any) -> protocols.PreparedDataset:
  """Reads the sources and applies the protocol (no caching)."""
  protocols._check_max_len(config.max_len)
  user_fraction = protocols.check_train_user_fraction(
      getattr(config, 'train_user_fraction', 1.0),
      'authors' if config.source == 'authors' else config.protocol)
  if config.source == 'authors':
    return protocols.from_authors(config.path, max_len=config.max_len)
  if config.source in ('ml-1m', 'ml-100k'):
    raw = sources.read_recbole(config.source)
  elif config.source == 'grouplens':
    raw = sources.read_grouplens(config.path)
  elif config.source == 'synthetic':
    raw = synthetic.read(config.synthetic, resolve_data_dir(config.data_dir))
  else:
    raw = sources.read_delimited(config.delimited, config.path)
  if config.protocol == 'cold_start_users':
    return protocols.cold_start_users(
        raw, max_len=config.max_len, split_seed=config.split_seed,
        train_fraction=config.train_fraction, val_fraction=config.val_fraction,
        train_user_fraction=user_fraction)
  if config.protocol == 'cold_start_items':
    return protocols.cold_start_items(
        raw, max_len=config.max_len, split_seed=config.split_seed,
        val_fraction=config.val_fraction, new_item_fraction=config.new_item_fraction)
  return protocols.leave_one_out(raw, max_len=config.max_len,
                                 min_interactions=config.min_interactions)


class AlphafuseSequences(tfds.core.GeneratorBasedBuilder):
  """Split next-item examples, `CHUNK_SIZE` rows per record; see the module docstring."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, prepared: protocols.PreparedDataset | None = None, **kwargs):
    # The examples are computed before preparation (they also give the metadata).
    self._prepared = prepared
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    max_len = self._prepared.max_len if self._prepared is not None else None
    vector = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                          encoding=tfds.features.Encoding.BYTES)
    return tfds.core.DatasetInfo(
        builder=self,
        description='AlphaFuse next-item examples: history [L] left-padded with N, target.',
        features=tfds.features.FeaturesDict({
            'chunk': np.int64,
            'user_id': vector(), 'position': vector(), 'target': vector(),
            'history': tfds.features.Tensor(shape=(None, max_len), dtype=np.int32,
                                            encoding=tfds.features.Encoding.BYTES),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Sources are local; nothing to download.
    return {name: self._generate_examples(name) for name in protocols.SPLITS}

  def _generate_examples(self, split: str):
    arrays = self._prepared.splits[split]
    n = arrays['target'].shape[0]
    for chunk, start in enumerate(range(0, n, CHUNK_SIZE)):
      record = {k: arrays[k][start:start + CHUNK_SIZE] for k in protocols.EXAMPLE_FIELDS}
      record['chunk'] = chunk
      yield chunk, record


def _write_metadata(directory: pathlib.Path, ds: protocols.PreparedDataset) -> None:
  meta = {'num_items': ds.num_items, 'max_len': ds.max_len, 'item_keys': ds.item_keys,
          'item_fields': ds.item_fields, 'user_keys': ds.user_keys,
          'description': ds.description}
  (directory / META_JSON).write_text(json.dumps(meta, ensure_ascii=False))
  indptr, items = ds.user_sequences
  with open(directory / META_ARRAYS, 'wb') as f:
    extra = {} if ds.new_items is None else {'new_items': ds.new_items}  # cold_start_items.
    np.savez(f, train_item_counts=ds.train_item_counts, user_seq_indptr=indptr,
             user_seq_items=items, **extra)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by another user.
    return True
  return True


def scratch_prefix() -> str:
  """`.incomplete-<pid>-<host>-`: the preparing process, so that an orphan can be recognised."""
  return f'{INCOMPLETE}{os.getpid()}-{socket.gethostname().replace("-", "_")}-'


def clean_orphans(data_dir: pathlib.Path) -> None:
  """Removes `.incomplete-<pid>-[<host>-]*` directories whose preparing process is gone.

  A directory of another host (a shared file system) or without a pid (older versions) is
  removed only after a day.
  """
  host = socket.gethostname().replace('-', '_')
  for path in data_dir.glob(INCOMPLETE + '*'):
    parts = path.name[len(INCOMPLETE):].split('-')
    local = parts[0].isdigit() and (len(parts) < 3 or parts[1] == host)
    stale = (not _pid_alive(int(parts[0]))) if local else (
        time.time() - path.stat().st_mtime > 86400)
    if stale and path.is_dir():
      logging.warning('Removing %s, left by a preparation that did not finish.', path)
      shutil.rmtree(path, ignore_errors=True)


def prepare(ds: protocols.PreparedDataset, data_dir: pathlib.Path, name: str) -> pathlib.Path:
  """Writes `ds` into <data_dir>/alphafuse_sequences/<name>/<VERSION>, atomically."""
  final = data_dir / DATASET_NAME / name / VERSION
  scratch = pathlib.Path(tempfile.mkdtemp(prefix=scratch_prefix(), dir=data_dir))
  try:
    builder = AlphafuseSequences(prepared=ds, data_dir=str(scratch),
                                 config=tfds.core.BuilderConfig(name=name),
                                 file_format='array_record')
    # TFDS prints its progress lines to stdout; keep stdout for the caller's own output.
    with contextlib.redirect_stdout(sys.stderr):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
    built = pathlib.Path(str(builder.data_dir))
    _write_metadata(built, ds)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.rename(built, final)
    except OSError:
      if not (final / META_ARRAYS).is_file():
        raise
      logging.info('%s was prepared concurrently; keeping that copy.', final)
    logging.info('Prepared %s', final)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return final


def _read_split(data_source: Any, name: str, meta: dict[str, Any]) -> dict[str, np.ndarray]:
  """One split of a prepared directory in numpy (chunks reassembled in order), checked."""
  records = data_source.__getitems__(list(range(len(data_source))))
  records.sort(key=lambda r: int(r['chunk']))
  if [int(r['chunk']) for r in records] != list(range(len(records))):
    raise ValueError(f'split {name!r} lacks some of its chunks')
  split = {k: np.concatenate([np.asarray(r[k], np.int32) for r in records])
           for k in protocols.EXAMPLE_FIELDS}
  split['history'] = split['history'].reshape(-1, meta['max_len'])
  n = len(split['target'])
  in_range = (split['target'] < meta['num_items']).all() and (
      split['history'] <= meta['num_items']).all()
  if any(len(v) != n for v in split.values()) or not in_range:
    raise ValueError(f'split {name!r} has arrays of unequal lengths or item ids beyond N')
  return split


class LazySplit(collections.abc.Mapping):
  """A prepared split left on disk: its arrays are read (all at once, with a warning) on first use.

  `read(..., train_arrays=False)` puts one in `PreparedDataset.splits['train']`, so a loop that
  reads its training rows from `directory` (grain_input.TfdsSplitSource) never holds the split
  in memory, while code that needs the arrays (LLM-ESR's similar users) still gets them.
  Iterating over the field names or testing membership reads nothing; `loads` counts reads.
  """

  def __init__(self, directory: pathlib.Path, split: str, meta: dict[str, Any]):
    self.directory, self.split, self._meta = pathlib.Path(directory), split, meta
    self._arrays, self.loads = None, 0
    self._lock = threading.Lock()

  def arrays(self) -> dict[str, np.ndarray]:
    """The split's arrays, as `read(..., train_arrays=True)` gives them (read once, then kept)."""
    with self._lock:
      if self._arrays is None:
        logging.warning('Reading the whole %s split of %s into host memory.', self.split,
                        self.directory)
        source = tfds.builder_from_directory(str(self.directory)).as_data_source(self.split)
        try:
          self._arrays = _read_split(source, self.split, self._meta)
        except ValueError as e:
          raise sources.DataError(f'{self.directory}: {e}; delete that directory to prepare '
                                  'the data again.') from e
        self.loads += 1
      return self._arrays

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in protocols.EXAMPLE_FIELDS:
      raise KeyError(key)
    return self.arrays()[key]

  def __contains__(self, key: object) -> bool:
    return key in protocols.EXAMPLE_FIELDS

  def __iter__(self):
    return iter(protocols.EXAMPLE_FIELDS)

  def __len__(self) -> int:
    return len(protocols.EXAMPLE_FIELDS)

  def __repr__(self) -> str:
    return f'LazySplit({self.directory}, {self.split!r}, loaded={self._arrays is not None})'


def read(directory: pathlib.Path, train_arrays: bool = True) -> protocols.PreparedDataset:
  """Reads a prepared directory back into numpy, checked.

  With `train_arrays=False` the train split stays on disk: `splits['train']` is a `LazySplit`.
  """
  builder = tfds.builder_from_directory(str(directory))
  data_sources = builder.as_data_source()
  meta = json.loads((directory / META_JSON).read_text())
  splits = {name: _read_split(data_sources[name], name, meta) if train_arrays or name != 'train'
            else LazySplit(directory, name, meta) for name in protocols.SPLITS}
  with np.load(directory / META_ARRAYS) as arrays:
    counts, indptr, items = (arrays['train_item_counts'], arrays['user_seq_indptr'],
                             arrays['user_seq_items'])
    new_items = arrays['new_items'] if 'new_items' in arrays.files else None
  return protocols.PreparedDataset(
      num_items=meta['num_items'], max_len=meta['max_len'], item_keys=meta['item_keys'],
      item_fields=meta['item_fields'], user_keys=meta['user_keys'], train_item_counts=counts,
      splits=splits, user_sequences=(indptr, items), description=meta['description'],
      new_items=new_items)


def prepared_directory(config: Any) -> pathlib.Path:
  """The directory `load` prepares `config`'s dataset into (keyed on the sources' sha256)."""
  config_settings = settings(config)
  name = config_name(config_settings, fingerprint(source_files(config), config_settings))
  return resolve_data_dir(config.data_dir) / DATASET_NAME / name / VERSION


def load(config: Any, train_arrays: bool = True) -> protocols.PreparedDataset:
  """Prepares the config's dataset into the cache if needed, then reads it.

  Every source goes through the cache. `train_arrays=False` leaves the train split on disk (a
  `LazySplit`, see `read`): for a loop that reads its batches from the prepared split.

  A cache that cannot be read back (truncated, edited, half deleted) is deleted and prepared again
  with a warning; one that fails again right after preparation is a DataError naming it.
  """
  protocols._check_max_len(config.max_len)
  final = prepared_directory(config)
  data_dir, name = final.parents[2], final.parent.name
  if data_dir.is_dir():
    clean_orphans(data_dir)
  if final.exists():
    try:
      logging.info('Reading cached %s', final)
      return read(final, train_arrays)
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to read back means a damaged cache: it is a pure function of the sources.
      logging.warning('The prepared data in %s cannot be read (%s: %s); preparing it again.',
                      final, type(e).__name__, str(e).split('\n')[0][:200])
      shutil.rmtree(final, ignore_errors=True)
      if final.exists():
        raise sources.DataError(f'{final} is damaged and could not be deleted; delete that '
                                'directory to prepare the data again.') from e
  logging.info('Preparing %s into %s', name, final)
  data_dir.mkdir(parents=True, exist_ok=True)
  prepare(build(config), data_dir, name)
  try:
    return read(final, train_arrays)
  except Exception as e:  # pylint: disable=broad-except
    raise sources.DataError(f'{final}: the data just prepared cannot be read back ({e}); delete '
                            'that directory and check the disk (space, permissions).') from e
