"""Semantic-space decomposition of language embeddings: the heart of AlphaFuse.

The item language vectors X [N, d] are summarised by their (optionally popularity-weighted)
mean and covariance; the covariance's eigen-decomposition splits the space into the
high-variance "semantic" directions and the low-variance "null" directions. AlphaFuse keeps the
top-k directions (whitened), and learns ID embeddings in the last n of them.

Pure functions, no Flax and no I/O (`fit_semantic_space` hands chunked sources to
streaming_decomposition.py). Every function runs in float64 when `jax_enable_x64` is on (e.g.
inside `with jax.enable_x64(True):`) and in float32 otherwise.

Precision (u = unit roundoff: 2**-24 ~ 6e-8 in float32, 2**-53 ~ 1.1e-16 in float64):
- The covariance C is formed with one matmul at HIGHEST precision (never TF32/bf16 passes on GPU),
  so each entry carries an error of about sqrt(N) * u * |X_c|^T |X_c| / (N - 1) (N * u worst case).
- `jnp.linalg.eigh` is backward stable: every computed eigenvalue satisfies
  |lambda_hat_j - lambda_j| <= p(d) * u * lambda_max (Weyl), p(d) a modest polynomial; the
  *relative* error of lambda_j therefore grows like u * lambda_max / lambda_j.
- Eigenvectors: the angle error of column j is about p(d) * u * lambda_max / gap_j
  (Davis-Kahan), where gap_j is the distance to the nearest other eigenvalue. Directions with
  (near-)degenerate eigenvalues are not individually determined (only their span is).
In practice float64 gives eigenvalues to ~1e-12 relative and float32 to ~1e-5 relative for
eigenvalues above ~1e-2 * lambda_max. Exact zeros come out at about 1 * eps * lambda_max
(measured 0.7-1.1 eps for d <= 1024, N <= 500, eps = 2u), so eigenvalues below
`30 * eps * lambda_max` cannot be told apart from zero: `project` refuses to whiten by them unless
an explicit floor is given (above it, eigenvalues are resolved to a few per cent or better).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Weighting variants for `fit_semantic_space(..., item_weights=p)`.
WEIGHTINGS = ('weighted', 'authors')
# `project` refuses eigenvalues below this many machine epsilons times the largest one.
DEFAULT_RELATIVE_FLOOR_EPS = 30.0


class SemanticSpace(NamedTuple):
  """Moments and eigen-decomposition of a set of language embeddings.

  Attributes:
    mean: [d] the (weighted) mean mu.
    eigenvalues: [d] eigenvalues of the covariance, in descending order (tiny negative values
      from roundoff are kept as computed).
    eigenvectors: [d, d] orthonormal eigenvectors as COLUMNS, in the same order; each column's
      largest-magnitude entry is positive (canonical signs, identical across backends).
  """
  mean: Array
  eigenvalues: Array
  eigenvectors: Array


def compute_dtype() -> jnp.dtype:
  """float64 when jax_enable_x64 is on, float32 otherwise."""
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def canonicalize_signs(eigenvectors: Array) -> Array:
  """Flips each column [d, d] so that its largest-magnitude entry is positive.

  Ties in magnitude are broken by the first index (argmax), so the result is deterministic.
  """
  rows = jnp.argmax(jnp.abs(eigenvectors), axis=0)
  pivots = eigenvectors[rows, jnp.arange(eigenvectors.shape[1])]
  signs = jnp.where(pivots < 0, -1.0, 1.0).astype(eigenvectors.dtype)
  return eigenvectors * signs[None, :]


def _gram(a: Array, b: Array) -> Array:
  """a^T b at full precision (no TF32/bf16 passes on accelerators)."""
  return jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=('weighting',))
def _fit(embeddings: Array, item_weights: Array | None, weighting: str) -> SemanticSpace:
  """Jitted core of `fit_semantic_space` (inputs already validated and cast)."""
  num = embeddings.shape[0]
  if item_weights is None:
    mean = jnp.mean(embeddings, axis=0)
    centred = embeddings - mean
    # Unbiased 1/(N-1), exactly np.cov(X, rowvar=False).
    cov = _gram(centred, centred) / (num - 1)
  else:
    p = item_weights / jnp.sum(item_weights)
    mean = jnp.matmul(p, embeddings, precision=jax.lax.Precision.HIGHEST)
    centred = embeddings - mean
    if weighting == 'weighted':
      # sum_i p_i (x_i - mu)(x_i - mu)^T.
      cov = _gram(centred * p[:, None], centred)
    else:
      # The authors' np.cov(sqrt(p) * (X - mu)): re-centred and divided by N-1.
      scaled = centred * jnp.sqrt(p)[:, None]
      scaled = scaled - jnp.mean(scaled, axis=0)
      cov = _gram(scaled, scaled) / (num - 1)
  return eigendecompose(mean, cov)


def eigendecompose(mean: Array, covariance: Array) -> SemanticSpace:
  """The SemanticSpace of a mean [d] and covariance [d, d] (symmetrised, then eigh)."""
  eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (covariance + covariance.T))
  # eigh is ascending; the reference (np.linalg.svd) is descending.
  return SemanticSpace(mean=mean, eigenvalues=eigenvalues[::-1],
                       eigenvectors=canonicalize_signs(eigenvectors[:, ::-1]))


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def fit_semantic_space(embeddings: Array | np.ndarray,
                       item_weights: Array | np.ndarray | None = None, *, weighting: str = 'weighted') -> SemanticSpace:
  """Mean and eigen-decomposition of the covariance of language embeddings.

  Args:
    embeddings: [N, d] item language vectors (already multiplied by the language scale), or a
      chunked source streamed in bounded memory and float64 (a `.npy` path, an np.memmap, an
      iterator of [n_i, d] chunks; `streaming_decomposition.fit_semantic_space_streaming`).
    item_weights: optional [N] non-negative weights (e.g. train popularity counts); normalised
      to p = w / sum(w). None gives the uniform mean and np.cov's unbiased 1/(N-1) covariance.
    weighting: only used with item_weights.
      'weighted' (default): mu = sum_i p_i x_i and C = sum_i p_i (x_i - mu)(x_i - mu)^T, the
        properly weighted covariance (note: with uniform p this is the 1/N covariance).
      'authors': the reference's C = np.cov(sqrt(p_i) (x_i - mu)), which re-centres the scaled
        rows and divides by N-1, i.e. about 1/(N-1) times the weighted covariance (reference-spec
        section 2.1 and section 7 item 10). Use it to reproduce the authors' eigenvalue scale
        (and hence their `null_threshold`).

  Returns:
    A SemanticSpace in float64 under jax_enable_x64, float32 otherwise.
  """
  from alphafuse_jax import streaming_decomposition  # pylint: disable=g-import-not-at-top
  if streaming_decomposition.is_chunked_source(embeddings):  # Lazy import: it builds on this.
    return streaming_decomposition.fit_semantic_space_streaming(embeddings, item_weights,
                                                                weighting=weighting)
  dtype = compute_dtype()
  x = jnp.asarray(embeddings, dtype=dtype)
  if x.ndim != 2:
    raise ValueError(f'embeddings must be a matrix [N, d], got shape {x.shape}.')
  if x.shape[0] < 2 or x.shape[1] < 1:
    raise ValueError(f'embeddings {x.shape}: need at least 2 items and 1 dimension to estimate a '
                     'covariance.')
  if _is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError('embeddings contain NaN or inf; fix the language vectors (row '
                     f'{int(jnp.argmax(~jnp.all(jnp.isfinite(x), axis=1)))} is the first bad one).')
  weights = None
  if item_weights is not None:
    if weighting not in WEIGHTINGS:
      raise ValueError(f'weighting={weighting!r}: use one of {WEIGHTINGS}.')
    weights = jnp.asarray(item_weights, dtype=dtype)
    if weights.shape != (x.shape[0],):
      raise ValueError(f'item_weights has shape {weights.shape}; expected ({x.shape[0]},), one '
                       'weight per embedding row.')
    if _is_concrete(weights):
      if not bool(jnp.all(jnp.isfinite(weights))) or bool(jnp.any(weights < 0)):
        raise ValueError('item_weights must be finite and non-negative (popularity counts).')
      if not float(jnp.sum(weights)) > 0:
        raise ValueError('item_weights sum to 0: no item has any weight (check the item counts).')
  return _fit(x, weights, weighting=weighting if weights is not None else 'weighted')


def null_space_dim(eigenvalues: Array | np.ndarray, null_dim: int | None = None,
                   null_threshold: float | None = None, kept_dim: int | None = None) -> int:
  """The nullity n: how many of the kept dimensions receive the ID embedding.

  As in the reference, `null_threshold` wins when set: n = #{j : lambda_j <= threshold}, counted
  over the FULL spectrum. Otherwise n = `null_dim`.

  Args:
    eigenvalues: [d] the spectrum (any order).
    null_dim: fixed nullity (reference default 64).
    null_threshold: eigenvalue threshold (reference DreamRec setting 0.25 on scale-40 vectors).
    kept_dim: the number k of kept dimensions; n > k is refused (the reference fails later with
      a shape error).

  Returns:
    n, with 0 < n (<= kept_dim when given).
  """
  values = np.asarray(eigenvalues)
  if null_threshold is not None:
    n = int(np.sum(values <= null_threshold))
    source = f'null_threshold={null_threshold} (count of eigenvalues <= it)'
    if n == 0:
      raise ValueError(f'Nullity 0: no eigenvalue is <= null_threshold={null_threshold} (the '
                       f'smallest is {values.min():.6g}); raise null_threshold or set null_dim.')
  elif null_dim is not None:
    if isinstance(null_dim, bool) or not isinstance(null_dim, (int, np.integer)):
      raise ValueError(f'null_dim must be an int, got {null_dim!r}.')
    n = int(null_dim)
    source = f'null_dim={null_dim}'
    if n <= 0:
      raise ValueError(f'null_dim={null_dim}: the nullity must be >= 1 (the reference would slice '
                       '[..., -0:], i.e. everything); set null_dim to a positive int.')
    if n > values.shape[0]:
      raise ValueError(f'null_dim={null_dim} exceeds the embedding dimension {values.shape[0]}.')
  else:
    raise ValueError('Set null_dim or null_threshold to choose the nullity.')
  if kept_dim is not None and n > kept_dim:
    raise ValueError(f'Nullity {n} from {source} exceeds the {kept_dim} kept dimensions '
                     '(hidden_dim): the ID table would not fit. Lower null_dim/null_threshold or '
                     'raise hidden_dim.')
  return n


def relative_floor(dtype) -> float:
  """Default smallest eigenvalue / lambda_max that `project` whitens by: 30 machine epsilons.

  That is 3.6e-6 in float32 and 6.7e-15 in float64. Computed zero eigenvalues sit near
  1 eps * lambda_max (see module docstring), so this keeps a ~30x margin; whitening by such a
  noise eigenvalue would blow its direction up by ~1/sqrt(eps) (x2900 in float32, x6.7e7 in
  float64).
  """
  return DEFAULT_RELATIVE_FLOOR_EPS * float(jnp.finfo(dtype).eps)


@jax.jit
def _project(embeddings: Array, mean: Array, basis: Array, scale: Array) -> Array:
  """(X - mu) @ basis * scale; basis [d, k], scale [k]."""
  centred = embeddings - mean
  return jnp.matmul(centred, basis, precision=jax.lax.Precision.HIGHEST) * scale


def whitening_scale(space: SemanticSpace, dim: int, *, eigenvalue_floor: float | None = None,
                    min_relative_eigenvalue: float | None = None) -> Array:
  """1/sqrt(lambda_j) for the top `dim` directions, refusing numerically-zero eigenvalues.

  Args:
    space: the fitted space.
    dim: number of top directions.
    eigenvalue_floor: if given (> 0, absolute, in eigenvalue units), eigenvalues are clamped to
      max(lambda_j, eigenvalue_floor) and nothing is refused.
    min_relative_eigenvalue: refusal threshold relative to lambda_max when no floor is given;
      default `relative_floor(dtype)` = 30 machine epsilons of the space's dtype.

  Returns:
    [dim] scale factors.
  """
  values = np.asarray(space.eigenvalues, dtype=np.float64)
  top = values[:dim]
  if eigenvalue_floor is not None:
    if not eigenvalue_floor > 0:
      raise ValueError(f'eigenvalue_floor={eigenvalue_floor} must be > 0.')
    top = np.maximum(top, eigenvalue_floor)
  else:
    largest = values.max()
    if not largest > 0:
      raise ValueError('The covariance is zero (all embeddings identical): nothing to whiten.')
    rel = (relative_floor(space.eigenvalues.dtype) if min_relative_eigenvalue is None
           else float(min_relative_eigenvalue))
    bad = np.nonzero(top < rel * largest)[0]
    if bad.size:
      first = int(bad[0])
      in_float64 = space.eigenvalues.dtype == np.float64
      raise ValueError(
          f'Refusing to whiten: {bad.size} of the top {dim} eigenvalues are below '
          f'{rel:.3g} * lambda_max = {rel * largest:.3g} (first: lambda_{first} = '
          f'{top[first]:.3g}, lambda_max = {largest:.6g}), i.e. numerically zero at '
          f'{space.eigenvalues.dtype} precision; dividing by their square root would amplify '
          f'noise. Keep at most {first} directions'
          + ('' if in_float64 else ', compute in float64 (jax.enable_x64)')
          + ', or pass an explicit eigenvalue_floor (config.embedding.eigenvalue_floor) to clamp '
          f'them, e.g. 1e-6 * lambda_max = {1e-6 * largest:.3g}, which leaves those directions '
          'near zero instead of blowing their noise up to unit variance.')
  return jnp.asarray(1.0 / np.sqrt(top), dtype=space.eigenvalues.dtype)


def project(embeddings: Array | np.ndarray, space: SemanticSpace, dim: int,
            standardize: bool = True, *, eigenvalue_floor: float | None = None,
            min_relative_eigenvalue: float | None = None) -> Array:
  """Projects embeddings on the top `dim` eigen-directions: (X - mu) U_k [diag(lambda_k)^-1/2].

  Args:
    embeddings: [N, d] language vectors (the same scale as those fitted).
    space: from `fit_semantic_space`.
    dim: kept directions k, 1 <= k <= d.
    standardize: divide each direction by sqrt(eigenvalue) (whitening to unit variance).
    eigenvalue_floor: see `whitening_scale`; None refuses near-zero eigenvalues with an error.
    min_relative_eigenvalue: see `whitening_scale`.

  Returns:
    [N, dim] in the compute dtype. For tables larger than memory,
    `streaming_decomposition.project_to_file` writes the same rows block by block.
  """
  d = space.eigenvectors.shape[0]
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
    raise ValueError(f'dim={dim!r}: must be an int in [1, {d}] (the embedding dimension).')
  x = jnp.asarray(embeddings, dtype=space.eigenvectors.dtype)
  if x.ndim != 2 or x.shape[1] != d:
    raise ValueError(f'embeddings of shape {x.shape} do not match the fitted dimension {d}.')
  if standardize:
    scale = whitening_scale(space, int(dim), eigenvalue_floor=eigenvalue_floor,
                            min_relative_eigenvalue=min_relative_eigenvalue)
  else:
    scale = jnp.ones((dim,), dtype=space.eigenvectors.dtype)
  return _project(x, space.mean, space.eigenvectors[:, :dim], scale)


def fuse(language_table: Array, id_table: Array, cover: bool = False) -> Array:
  """Fuses ID embeddings into the language embeddings' null dimensions.

  The fused width is k in both modes, and the output equals the reference's `embed_ID`:
  - cover=False (reference default): language_table [..., k] (the top-k projection); the ID
    [..., n] is ADDED to its last n columns.
  - cover=True: language_table [..., k - n] (the top k-n projection, as the reference shrinks
    k <- k - n); the ID [..., n] is CONCATENATED after it. Because the projection of each
    direction does not depend on how many are kept, this equals replacing the last n columns
    of the top-k projection by the ID.

  Args:
    language_table: [..., k] (add) or [..., k - n] (cover).
    id_table: [..., n], the same leading shape.
    cover: replace (concatenate) instead of add.

  Returns:
    [..., k].
  """
  if language_table.shape[:-1] != id_table.shape[:-1]:
    raise ValueError(f'language {language_table.shape} and ID {id_table.shape} tables must agree '
                     'in every dimension but the last.')
  n = id_table.shape[-1]
  if n < 1:
    raise ValueError('The ID table has 0 columns: the nullity must be >= 1.')
  if cover:
    return jnp.concatenate([language_table, id_table.astype(language_table.dtype)], axis=-1)
  k = language_table.shape[-1]
  if n > k:
    raise ValueError(f'ID width {n} exceeds the language width {k}: cannot add it into the last '
                     f'{n} dimensions.')
  head = language_table[..., :k - n]
  tail = language_table[..., k - n:] + id_table
  return jnp.concatenate([head, tail.astype(jnp.result_type(language_table, id_table))], axis=-1)


def explained_variance(eigenvalues: Array | np.ndarray, dim: int) -> float:
  """Fraction of the total variance in the top `dim` directions (negative roundoff clipped)."""
  values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
  total = values.sum()
  return float(values[:dim].sum() / total) if total > 0 else 0.0
