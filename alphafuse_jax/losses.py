"""Training losses for SASRec: full-softmax CE, BCE and InfoNCE with sampled negatives.

The reference (reference-spec §3.2) trains on the last position only:
  * 'ce': logits = s E[:N]^T over all N items, softmax cross-entropy;
  * 'bce': K uniform negatives per row; BCE(<s, e_pos>, 1) averaged over rows plus
    BCE(<s, e_neg>, 0) averaged over rows x K;
  * 'infonce': K uniform negatives; logits [cos(s, e_pos), cos(s, e_neg_1..K)] / tau with
    F.normalize's eps 1e-12; cross-entropy with label 0.
`per_example_loss` gives one value per row (or per position: leave-one-out training predicts the
next item at every non-pad history position, see `positional_targets`); the backbone's
`example_loss` returns it with the row weights, and the train step takes the weighted mean over
the global batch. `Objective` carries the config.train fields that choose the loss.
`chunked_ce.py` holds the full-softmax CE that never holds all [..., N] logits (SASRec's
leave-one-out training computes it over the whole batch). `sampled_softmax.py` holds the
'sampled_softmax' loss (K negatives shared by the step, uniform or by popularity, logQ-corrected,
optional in-batch negatives): its `Objective` subclass is computed a device batch at once.

Item embeddings for the sampled losses are either a table [N or N+1, h] or a callable
ids -> [..., h] (the item-embedding module itself): with `negative_scoring='gather'` only the
target and the K sampled items are embedded, so the step never touches the whole catalogue.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ItemEmbeddings = Array | Callable[[Array], Array]

LOSSES = ('ce', 'bce', 'infonce')
NEGATIVE_SCORING = ('dense', 'gather')
# torch.nn.functional.normalize's default epsilon.
NORMALIZE_EPS = 1e-12


def sample_negatives(key: Array, targets: Array, num_items: int, num_negatives: int) -> Array:
  """Draws negatives uniformly from the N-1 items other than each target.

  The reference draws from 0..N-1 and re-draws (in a while loop) until no negative equals the
  target, i.e. uniform over the other N-1 items. We draw r ~ U{0..N-2} and shift it past the target
  (r + [r >= target]): the same distribution, exact, with a static shape and no loop. Duplicates and history items are allowed, as in the reference.

  Args:
    key: a jax.random key.
    targets: int [...] target ids in 0..N-1 (a pad id N yields any real item).
    num_items: N (>= 2).
    num_negatives: K (>= 1).
  Returns:
    int32 [..., K] negative ids in 0..N-1, never equal to the row's target.
  """
  if num_items < 2:
    raise ValueError(f'Sampling negatives needs at least 2 items, got num_items={num_items}.')
  if num_negatives < 1:
    raise ValueError(f'config.train.num_negatives must be >= 1, got {num_negatives}.')
  draws = jax.random.randint(key, targets.shape + (num_negatives,), 0, num_items - 1,
                             dtype=jnp.int32)
  return draws + (draws >= targets[..., None]).astype(jnp.int32)


def l2_normalize(x: Array, eps: float = NORMALIZE_EPS) -> Array:
  """x / max(||x||_2, eps) along the last axis (torch.nn.functional.normalize), values and grads.

  The norm is sqrt(max(sum x^2, eps^2)): equal to max(||x||, eps), but its gradient at x = 0 is
  torch's (1/eps, the norm branch inactive) instead of jnp.linalg.norm's NaN. Zero rows occur:
  an ID table initialised with zeros (the authors' README setting) starts there.
  """
  squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(squared, eps * eps))


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """-log softmax(logits)[label] per example; logits [..., C], labels int [...] -> [...]."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def ce_per_example(states: Array, item_table: Array, targets: Array) -> Array:
  """Full-softmax CE over the N items: states [..., h], item_table [N, h], targets [...] -> [...].

  It holds all [..., N] logits; `chunked_ce.chunked_ce_per_example` does not.
  """
  return softmax_cross_entropy(jnp.matmul(states, item_table.T), targets)


def bce_from_logits(pos_logits: Array, neg_logits: Array) -> Array:
  """softplus(-pos) + mean_k softplus(neg_k): pos [...], neg [..., K] -> [...]."""
  return jax.nn.softplus(-pos_logits) + jnp.mean(jax.nn.softplus(neg_logits), axis=-1)


def infonce_from_cosines(pos_cos: Array, neg_cos: Array, temperature: float) -> Array:
  """CE with label 0 over [pos, neg_1..K] / temperature: pos [...], neg [..., K] -> [...]."""
  if temperature <= 0:
    raise ValueError(f'config.train.temperature must be > 0, got {temperature}.')
  logits = jnp.concatenate([pos_cos[..., None], neg_cos], axis=-1) / temperature
  return softmax_cross_entropy(logits, jnp.zeros(logits.shape[:-1], jnp.int32))


def bce_per_example(states: Array, positive: Array, negatives: Array) -> Array:
  """BCE-with-logits: softplus(-<s, e+>) + mean_k softplus(<s, e-_k>).

  A weighted mean of this over rows equals the reference's pos mean over rows plus its neg mean
  over rows x K, since every row has the same K negatives.

  Args:
    states: [..., h]; positive: [..., h]; negatives: [..., K, h].
  Returns:
    [...].
  """
  pos_logits = jnp.sum(states * positive, axis=-1)
  neg_logits = jnp.einsum('...h,...kh->...k', states, negatives)
  return bce_from_logits(pos_logits, neg_logits)


def infonce_per_example(states: Array, positive: Array, negatives: Array,
                        temperature: float) -> Array:
  """CE with label 0 over [cos(s, e+), cos(s, e-_1..K)] / temperature.

  Args:
    states: [..., h]; positive: [..., h]; negatives: [..., K, h].
  Returns:
    [...].
  """
  s = l2_normalize(states)
  pos = jnp.sum(s * l2_normalize(positive), axis=-1)
  neg = jnp.einsum('...h,...kh->...k', s, l2_normalize(negatives))
  return infonce_from_cosines(pos, neg, temperature)


def sampled_loss_dense(kind: str, states: Array, targets: Array, negatives: Array,
                       item_table: Array, temperature: float = 0.07) -> Array:
  """The 'bce' / 'infonce' loss from scores against the whole table, then picked at the ids.

  Same values as gathering the K+1 embeddings per row, but the backward pass is a dense matmul
  plus a scatter of B*(K+1) scalars instead of B*(K+1) embedding rows: several times faster on
  CPU for catalogues up to ~1e5 items. Memory is O(B*N) rather than O(B*K*h).

  Args:
    states: [..., h]; targets: int [...]; negatives: int [..., K]; item_table: [N, h].
  Returns:
    [...].
  """
  ids = jnp.concatenate([targets[..., None], negatives], axis=-1)
  if kind == 'infonce':
    scores = jnp.matmul(l2_normalize(states), l2_normalize(item_table).T)
  else:
    scores = jnp.matmul(states, item_table.T)
  picked = jnp.take_along_axis(scores, ids, axis=-1)
  if kind == 'infonce':
    return infonce_from_cosines(picked[..., 0], picked[..., 1:], temperature)
  return bce_from_logits(picked[..., 0], picked[..., 1:])


def _lookup(item_embeddings: ItemEmbeddings, ids: Array) -> Array:
  """Embeddings [..., h] of ids [...] from a table (gather) or a callable."""
  if callable(item_embeddings):
    return item_embeddings(ids)
  return jnp.take(item_embeddings, ids, axis=0)


def _real_item_table(item_embeddings: ItemEmbeddings, num_items: int, why: str) -> Array:
  """The [N, h] table (full-softmax CE, dense scoring); N rows or N+1 (the pad row is dropped)."""
  if callable(item_embeddings):
    raise ValueError(f'{why} needs the full item table [N, h], not a lookup function.')
  rows = item_embeddings.shape[0]
  if rows == num_items + 1:
    return item_embeddings[:num_items]
  if rows != num_items:
    raise ValueError(f'Item table has {rows} rows; expected num_items={num_items} '
                     f'(or {num_items + 1} with the pad row).')
  return item_embeddings


def per_example_loss(kind: str, states: Array, targets: Array, item_embeddings: ItemEmbeddings, *,
                     num_items: int, key: Array | None = None, num_negatives: int = 1,
                     temperature: float = 0.07, dense: bool = False,
                     excluded_items: tuple[int, ...] = ()) -> Array:
  """Per-example loss [...] for states [..., h] and targets int [...].

  Args:
    kind: 'ce', 'bce' or 'infonce' (config.train.loss).
    item_embeddings: [N or N+1, h] table, or (sampled losses only) a callable ids -> [..., h].
    num_items: N.
    key: random key for the negatives ('bce' and 'infonce').
    num_negatives: K negatives per example.
    temperature: InfoNCE temperature tau.
    dense: score the sampled items through the whole table (`sampled_loss_dense`); needs a table.
    excluded_items: items never scored (`Objective.excluded_items`); targets must not be among
      them.
  """
  if kind == 'ce':
    table = _real_item_table(item_embeddings, num_items, "The 'ce' loss")
    if not excluded_items:
      return ce_per_example(states, table, targets)
    keep = np.ones(num_items, bool)
    keep[list(excluded_items)] = False
    return softmax_cross_entropy(jnp.where(keep, jnp.matmul(states, table.T), -jnp.inf), targets)
  if kind not in LOSSES:
    raise ValueError(f'Unknown loss {kind!r} (config.train.loss); use one of {LOSSES}.')
  if key is None:
    raise ValueError(f'The {kind!r} loss samples negatives and needs a random key.')
  if excluded_items:
    # Uniform over the allowed items but the target: sample among their indices, then map.
    allowed = np.setdiff1d(np.arange(num_items), np.asarray(excluded_items, np.int64))
    at = jnp.searchsorted(jnp.asarray(allowed), targets)
    negatives = jnp.asarray(allowed, jnp.int32)[
        sample_negatives(key, at, allowed.size, num_negatives)]
  else:
    negatives = sample_negatives(key, targets, num_items, num_negatives)
  if dense:
    return sampled_loss_dense(kind, states, targets, negatives,
                              _real_item_table(item_embeddings, num_items,
                                               "negative_scoring='dense'"), temperature)
  positive = _lookup(item_embeddings, targets)
  negative = _lookup(item_embeddings, negatives)
  if kind == 'bce':
    return bce_per_example(states, positive, negative)
  return infonce_per_example(states, positive, negative, temperature)


def positional_targets(history: Array, targets: Array, pad_id: int) -> tuple[Array, Array]:
  """Next-item targets at every position, for leave-one-out training.

  Needs LEFT-padded histories (the project's convention): position i predicts history[i+1], and the
  last position predicts the example's target.

  Args:
    history: int [batch, L] (pad = pad_id); targets: int [batch].
  Returns:
    (next_items int [batch, L], valid bool [batch, L]); a position counts when its input and its
    next item are both real items.
  """
  next_items = jnp.concatenate([history[:, 1:], targets[:, None]], axis=1)
  valid = (history != pad_id) & (next_items != pad_id)
  return next_items, valid


@dataclasses.dataclass(frozen=True)
class Objective:
  """How a backbone's states are trained against the items (the config.train loss fields).

  Attributes:
    kind: 'ce' (full softmax over N), 'bce' or 'infonce' (K sampled negatives).
    num_negatives: K.
    temperature: InfoNCE's tau.
    negative_scoring: 'dense' scores the sampled items through the whole table [N, h] (one matmul;
      fast up to ~1e5 items); 'gather' embeds only the target and the K negatives of each row.
    per_position: leave-one-out training: every history position predicts its next item.
    excluded_items: items training never scores (cold_start_items' new items: a model cannot
      know of an item that does not exist yet): out of the full softmax (logit -inf, so no
      gradient reaches their rows) and never drawn as negatives. A tuple keeps it hashable.
  """
  kind: str = 'ce'
  num_negatives: int = 64
  temperature: float = 0.07
  negative_scoring: str = 'dense'
  per_position: bool = False
  excluded_items: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in LOSSES:
      raise ValueError(f'config.train.loss={self.kind!r} is not one of {LOSSES}.')
    if self.negative_scoring not in NEGATIVE_SCORING:
      raise ValueError(f'config.train.negative_scoring={self.negative_scoring!r} is not one of '
                       f'{NEGATIVE_SCORING}.')
    if self.kind != 'ce' and self.num_negatives < 1:
      raise ValueError(f'config.train.num_negatives={self.num_negatives} must be >= 1 for '
                       f'{self.kind}.')
    if self.excluded_items and self.per_position:
      raise ValueError('excluded items (cold_start_items) need last-position training, not '
                       "leave_one_out's per-position loss.")

  @property
  def gathers(self) -> bool:
    """True when the loss embeds only sampled items (no whole table in the step)."""
    return self.kind != 'ce' and self.negative_scoring == 'gather'

  def per_example(self, states: Array, targets: Array, item_embeddings: ItemEmbeddings, *,
                  key: Array, num_items: int) -> Array:
    """`per_example_loss` with this objective's settings: states [..., h] -> losses [...]."""
    return per_example_loss(self.kind, states, targets, item_embeddings, num_items=num_items,
                            key=key, num_negatives=self.num_negatives,
                            temperature=self.temperature,
                            dense=self.negative_scoring == 'dense',
                            excluded_items=self.excluded_items)
