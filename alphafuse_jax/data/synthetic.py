"""The `synthetic` source: a catalogue of any size with text vectors and sequences that agree.

One latent model generates both, from `config.data.synthetic` and its seed:
  * items: C clusters with centres in R^rank; item j belongs to cluster c_j (uniform), has the
    latent factor z_j = centre[c_j] + 0.5 g_j and a Zipf popularity w_j = rank_j^-s (rank_j a
    random permutation of 1..N, so popularity is unrelated to the item id or cluster);
  * text vectors (low rank plus noise): x_j = (z_j * sv) Q^T / norm + (noise / sqrt(d)) e_j,
    Q [d, rank] orthonormal, sv decaying from 1 to 0.2, `norm` making E|signal|^2 = 1, so `noise`
    is the noise-to-signal ratio of the vector norms; float32 [N, d];
  * users: a length 1 + Geometric(1 / (mean_length - 1)) (mean `mean_length`, at least 2); a
    start cluster drawn by cluster popularity; each step stays in its cluster with probability
    `stay_probability`, else jumps to another cluster c' with probability proportional to
    mass(c') exp(5 cos(centre_c, centre_c')); the item is drawn within the cluster by popularity.
    Timestamps: a start uniform over ~3 years, then exponential gaps (mean one day).
  So the next item's cluster is predictable from the history, and the text vectors reveal the
  cluster: a trained model beats popularity by a wide margin, and text carries signal.
  * coverage: every item gets at least one interaction (an item never drawn replaces a random
    interaction of its own cluster whose item has others), so the prepared catalogue has exactly
    N items and item key j = item index j = row j of the vectors file (cold_start_users,
    cold_start_items; a k-core filter may drop items: see `embeddings_file`).

Files, generated once and atomically (a scratch directory renamed into place) in
`<data_dir>/synthetic/<dataset_name>/`: item_vectors.npy (float32 [N, d], appended chunk by
chunk), users.npy / items.npy (int64 [R]), timestamps.npy (float64 [R]), one row per
interaction grouped by user and chronological; item_clusters.npy (int32 [N]); manifest.json.
Generation is chunked (ITEM_CHUNK items, USER_CHUNK users a chunk, each chunk from its own
seeded stream), so it is deterministic for a seed and never holds the vectors in memory; the R
interactions are held once, for the coverage pass, as the protocols hold them anyway.

Training reads the vectors through `text.encoder='file'` with `text.embeddings_file` set to
`<data_dir>/synthetic/<dataset_name>/item_vectors.npy` (`embeddings_file` returns that path, or
a row-aligned copy when the protocol dropped items). The prepared-data cache key holds the
settings (`dataset_name`) and the hashes of the interaction files, as for the other sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from alphafuse_jax.data import sources

GENERATOR_VERSION = 1
ITEM_CHUNK = 16384
USER_CHUNK = 16384
VECTORS = 'item_vectors.npy'
ARRAYS = ('users', 'items', 'timestamps')
MANIFEST = 'manifest.json'
_SPREAD = 0.5  # Within-cluster spread of the latent factors (centres are standard normal).
_JUMP_SHARPNESS = 5.0  # Jumps prefer clusters with similar centres: exp(5 cos).
_SPAN_SECONDS = 1e8
_MEAN_GAP_SECONDS = 86400.0


def _options(options: Any) -> dict[str, Any]:
  """The generation settings as plain numbers, checked."""
  o = {'num_items': int(options.num_items), 'num_users': int(options.num_users),
       'mean_length': float(options.mean_length), 'text_dim': int(options.text_dim),
       'rank': int(options.rank), 'noise': float(options.noise),
       'zipf_exponent': float(options.zipf_exponent), 'num_clusters': int(options.num_clusters),
       'stay_probability': float(options.stay_probability), 'seed': int(options.seed)}
  problems = [name for name, ok in (
      ('num_items >= 2', o['num_items'] >= 2), ('num_users >= 2', o['num_users'] >= 2),
      ('mean_length >= 2', o['mean_length'] >= 2), ('text_dim >= 1', o['text_dim'] >= 1),
      ('1 <= rank <= text_dim', 1 <= o['rank'] <= o['text_dim']), ('noise >= 0', o['noise'] >= 0),
      ('zipf_exponent >= 0', o['zipf_exponent'] >= 0),
      ('1 <= num_clusters <= num_items', 1 <= o['num_clusters'] <= o['num_items']),
      ('0 <= stay_probability <= 1', 0 <= o['stay_probability'] <= 1)) if not ok]
  if problems:
    raise sources.DataError(f'config.data.synthetic: need {", ".join(problems)}; got {o}.')
  if o['num_users'] * o['mean_length'] < 2 * o['num_items']:
    raise sources.DataError(
        f'config.data.synthetic: num_users * mean_length = {o["num_users"] * o["mean_length"]:g} '
        f'interactions cannot give each of num_items={o["num_items"]} items an interaction with '
        'room to spare; raise num_users or mean_length to at least 2 * num_items in total.')
  return o


def dataset_name(options: Any) -> str:
  """Directory name spelling out every setting, e.g. 'N2000_U3000_len20_d384_..._seed0'."""
  o = _options(options)
  return (f"N{o['num_items']}_U{o['num_users']}_len{o['mean_length']:g}_d{o['text_dim']}_"
          f"rank{o['rank']}_noise{o['noise']:g}_zipf{o['zipf_exponent']:g}_"
          f"C{o['num_clusters']}_stay{o['stay_probability']:g}_seed{o['seed']}_"
          f'v{GENERATOR_VERSION}')


def dataset_dir(options: Any, data_dir: str | os.PathLike[str]) -> pathlib.Path:
  return pathlib.Path(data_dir) / 'synthetic' / dataset_name(options)


def _item_model(o: dict[str, Any]):
  """Cluster centres, item clusters, popularity, the text basis and singular values."""
  rng = np.random.default_rng([o['seed'], 0])
  n, c = o['num_items'], o['num_clusters']
  centres = rng.standard_normal((c, o['rank']))
  clusters = rng.integers(c, size=n).astype(np.int32)
  popularity = (rng.permutation(n) + 1.0) ** -o['zipf_exponent']
  basis, _ = np.linalg.qr(rng.standard_normal((o['text_dim'], o['rank'])))
  singular = np.geomspace(1.0, 0.2, o['rank'])
  return centres, clusters, popularity, basis, singular


def _write_vectors(path: pathlib.Path, o: dict[str, Any], model) -> None:
  """item_vectors.npy, ITEM_CHUNK rows at a time (chunk k from the stream [seed, 1, k])."""
  centres, clusters, _, basis, singular = model
  n, d, rank = o['num_items'], o['text_dim'], o['rank']
  mixing = (singular[:, None] * basis.T).astype(np.float32)  # [rank, d]
  norm = np.sqrt(np.sum(singular ** 2) * (1 + _SPREAD ** 2))
  # Plain appends, not a memmap: written pages do not pile up in this process's memory.
  with open(path, 'wb') as out:
    np.lib.format.write_array_header_1_0(out, {'descr': '<f4', 'fortran_order': False,
                                               'shape': (n, d)})
    for chunk, start in enumerate(range(0, n, ITEM_CHUNK)):
      rng = np.random.default_rng([o['seed'], 1, chunk])
      rows = min(ITEM_CHUNK, n - start)
      latent = centres[clusters[start:start + rows]] + _SPREAD * rng.standard_normal((rows, rank))
      noise = rng.standard_normal((rows, d), dtype=np.float32)
      block = ((latent / norm).astype(np.float32) @ mixing
               + np.float32(o['noise'] / np.sqrt(d)) * noise)
      out.write(block.astype('<f4').tobytes())


def _inverse_cdf(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Sorted keys b + (cumulative weight within block b), each block ending at exactly b + 1.

  `searchsorted(keys, b + u, side='right')` (u uniform in [0, 1)) then draws an element of block
  b in proportion to its weight; `blocks` must be sorted.
  """
  sizes = np.bincount(blocks)
  totals = np.bincount(blocks, weights=weights)
  within = np.cumsum(weights) - np.repeat(np.cumsum(totals) - totals, sizes)
  keys = blocks + np.clip(within / totals[blocks], 0.0, 1.0)
  keys[(np.cumsum(sizes) - 1)[sizes > 0]] = np.flatnonzero(sizes > 0) + 1.0
  return keys


def _user_model(o: dict[str, Any], model):
  """Samplers of the cluster walk and of items within a cluster."""
  centres, clusters, popularity, _, _ = model
  c = o['num_clusters']
  mass = np.bincount(clusters, weights=popularity, minlength=c)
  unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
  jumps = mass[None, :] * np.exp(_JUMP_SHARPNESS * (unit @ unit.T))
  np.fill_diagonal(jumps, 0.0)
  stuck = jumps.sum(axis=1) == 0  # Only one populated cluster: a jump stays.
  jumps[stuck, np.flatnonzero(stuck)] = 1.0
  jump_keys = _inverse_cdf(np.repeat(np.arange(c), c), jumps.reshape(-1))
  by_cluster = np.argsort(clusters, kind='stable')
  item_keys = _inverse_cdf(clusters[by_cluster].astype(np.int64), popularity[by_cluster])
  return mass / mass.sum(), jump_keys, by_cluster, item_keys


def _walk(rng, lengths: np.ndarray, o: dict[str, Any], user_model) -> np.ndarray:
  """Items [sum(lengths)] of users with these lengths, user by user, in order."""
  start_probs, jump_keys, by_cluster, item_keys = user_model
  c = o['num_clusters']
  order = np.argsort(-lengths, kind='stable')  # Longest first: step t's walkers are a prefix.
  steps = np.zeros((lengths.size, int(lengths.max())), np.int64)
  steps[:, 0] = rng.choice(c, size=lengths.size, p=start_probs)
  sorted_lengths = lengths[order]
  for t in range(1, steps.shape[1]):
    active = int(np.sum(sorted_lengths > t))
    prev = steps[:active, t - 1]
    jump = np.searchsorted(jump_keys, prev + rng.random(active), side='right') - prev * c
    steps[:active, t] = np.where(rng.random(active) < o['stay_probability'], prev, jump)
  walked = steps[np.argsort(order)]  # Back to user order.
  cluster_seq = walked[np.arange(steps.shape[1]) < lengths[:, None]]
  return by_cluster[np.searchsorted(item_keys, cluster_seq + rng.random(cluster_seq.size),
                                    side='right')]


def _cover_every_item(items: np.ndarray, clusters: np.ndarray, rng) -> None:
  """Gives every never-drawn item one interaction, in place (see the module docstring)."""
  counts = np.bincount(items, minlength=clusters.size)
  missing = np.flatnonzero(counts == 0)
  slot_cluster = clusters[items]
  order = np.argsort(slot_cluster, kind='stable')
  sizes = np.bincount(slot_cluster, minlength=int(clusters.max()) + 1)
  starts = np.cumsum(sizes) - sizes
  for attempt in range(200):
    if missing.size == 0:
      return
    own = clusters[missing]
    local = (sizes[own] > 0) & (attempt < 20)  # Later rounds draw from any cluster.
    offsets = (rng.random(missing.size) * np.maximum(sizes[own], 1)).astype(np.int64)
    slots = np.where(local, order[starts[own] + offsets], rng.integers(items.size, size=own.size))
    _, first = np.unique(slots, return_index=True)  # One candidate per slot.
    donors = items[slots[first]]
    by_donor = np.argsort(donors, kind='stable')
    group_start = np.searchsorted(donors[by_donor], donors[by_donor])
    rank = np.empty_like(by_donor)
    rank[by_donor] = np.arange(by_donor.size) - group_start
    take = first[rank < counts[donors] - 1]  # Every donor keeps at least one interaction.
    np.subtract.at(counts, items[slots[take]], 1)
    items[slots[take]] = missing[take]
    counts[missing[take]] = 1
    missing = np.delete(missing, take)
  raise sources.DataError(f'config.data.synthetic: could not give {missing.size} items an '
                          'interaction; raise num_users or mean_length.')


def generate(options: Any, data_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Writes the dataset's files unless present; returns their directory."""
  o = _options(options)
  final = dataset_dir(options, data_dir)
  if (final / MANIFEST).is_file():
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(tempfile.mkdtemp(prefix=f'.incomplete-{os.getpid()}-', dir=final.parent))
  try:
    model = _item_model(o)
    _write_vectors(scratch / VECTORS, o, model)
    np.save(scratch / 'item_clusters.npy', model[1])
    lengths = 1 + np.random.default_rng([o['seed'], 2]).geometric(
        1.0 / (o['mean_length'] - 1), size=o['num_users'])
    total = int(lengths.sum())
    arrays = {name: np.lib.format.open_memmap(scratch / f'{name}.npy', mode='w+', dtype=dtype,
                                              shape=(total,))
              for name, dtype in zip(ARRAYS, (np.int64, np.int64, np.float64))}
    user_model = _user_model(o, model)
    done = 0
    for chunk, first in enumerate(range(0, o['num_users'], USER_CHUNK)):
      rng = np.random.default_rng([o['seed'], 3, chunk])
      chunk_lengths = lengths[first:first + USER_CHUNK]
      rows = slice(done, done + int(chunk_lengths.sum()))
      arrays['users'][rows] = np.repeat(np.arange(first, first + chunk_lengths.size),
                                        chunk_lengths)
      arrays['items'][rows] = _walk(rng, chunk_lengths, o, user_model)
      # Timestamps: the user's start plus the user's running sum of gaps.
      gaps = np.floor(rng.exponential(_MEAN_GAP_SECONDS, size=rows.stop - rows.start))
      user_start = np.floor(rng.random(chunk_lengths.size) * _SPAN_SECONDS)
      running = np.cumsum(gaps)
      first_row = np.cumsum(chunk_lengths) - chunk_lengths
      before = np.where(first_row > 0, running[np.maximum(first_row - 1, 0)], 0.0)
      arrays['timestamps'][rows] = np.repeat(user_start - before, chunk_lengths) + running
      done = rows.stop
    _cover_every_item(arrays['items'], model[1], np.random.default_rng([o['seed'], 4]))
    for array in arrays.values():
      array.flush()
    del arrays
    (scratch / MANIFEST).write_text(json.dumps(
        {**o, 'generator_version': GENERATOR_VERSION, 'interactions': total}, indent=1))
    try:
      os.rename(scratch, final)
    except OSError:
      if not (final / MANIFEST).is_file():  # Not a concurrent twin: a real failure.
        raise
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return final


def source_files(options: Any, data_dir: str | os.PathLike[str]) -> list[pathlib.Path]:
  """The interaction files and manifest (generated if missing), for the cache fingerprint."""
  directory = generate(options, data_dir)
  return [directory / f'{name}.npy' for name in ARRAYS] + [directory / MANIFEST]


def read(options: Any, data_dir: str | os.PathLike[str]) -> sources.RawInteractions:
  """The generated interactions (generated if missing) as RawInteractions; items have no text."""
  directory = generate(options, data_dir)
  users, items, timestamps = (np.load(directory / f'{name}.npy') for name in ARRAYS)
  return sources.RawInteractions(users, items, timestamps, {}, source_files(options, data_dir),
                                 f'synthetic ({directory})')


def embeddings_file(options: Any, data_dir: str | os.PathLike[str],
                    item_keys: Any = None) -> pathlib.Path:
  """A vectors file whose row i is the prepared dataset's item i (for text.encoder='file').

  With every item kept (the cold-start protocols; `item_keys` None or 0..N-1) that is
  item_vectors.npy itself. A protocol that drops items (leave_one_out's k-core) gets
  item_vectors.<hash of the keys>.npy, those rows gathered chunk by chunk, written once.
  """
  directory = generate(options, data_dir)
  full = directory / VECTORS
  n = _options(options)['num_items']
  if item_keys is None:
    return full
  keys = np.asarray(item_keys, np.int64)
  if keys.size == n and np.array_equal(keys, np.arange(n)):
    return full
  if keys.ndim != 1 or keys.size == 0 or keys.min() < 0 or keys.max() >= n:
    raise sources.DataError(f'item_keys must be synthetic item ids in 0..{n - 1}.')
  path = directory / f'item_vectors.{hashlib.sha256(keys.tobytes()).hexdigest()[:16]}.npy'
  if not path.is_file():
    source = np.load(full, mmap_mode='r')
    scratch = path.with_suffix(f'.incomplete-{os.getpid()}.npy')
    out = np.lib.format.open_memmap(scratch, mode='w+', dtype=np.float32,
                                    shape=(keys.size, source.shape[1]))
    for start in range(0, keys.size, ITEM_CHUNK):
      out[start:start + ITEM_CHUNK] = source[keys[start:start + ITEM_CHUNK]]
    out.flush()
    del out
    os.replace(scratch, path)
  return path
