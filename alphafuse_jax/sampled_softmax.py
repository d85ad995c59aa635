"""Sampled softmax with logQ correction: a training loss whose cost does not grow with N.

The full softmax ('ce') scores every row against all N items: O(B N h) a step. The sampled softmax
(config.train.loss='sampled_softmax') scores each row's target against K negatives drawn once per
step and shared by every row (and, with `in_batch_negatives`, against the targets of the device
batch's other rows), and corrects every logit by the log of how often its item is expected among
the candidates (Bengio & Senecal 2008; Jean et al. 2015; TF's `sampled_softmax_loss`, whose
`subtract_log_q` corrects the true class too; Yi et al. 2019 for in-batch negatives):

  logit'(i) = <s, e_i> - log m(i),      m(i) = K Q(i) + n_b P(i)
  loss = -log softmax([logit'(target), logit'(neg_1..K), logit'(batch_1..n_b)])[0]

Q is the sampler's distribution: 'uniform' over the items, or 'popularity', (count_i + 1)^alpha
normalised; P is the in-batch distribution, the train frequency (count_i + 1) normalised, and n_b
the number of counted rows of the device batch (their targets are the in-batch candidates). m(i)
is the expected number of times item i is among a row's candidates, so one formula corrects every
column whichever source it came from, the target too; with uniform Q and no in-batch negatives it
is a constant and cancels. Counts get one added so that no item has probability 0 (an item never
seen in training is still a negative now and then). Logits are dot products, as in the full
softmax this loss approximates (no temperature). A candidate equal to the row's target (an
accidental hit; under leave-one-out training the position's target) gets logit -inf; so does the
row's own column among the in-batch candidates.

Why shared negatives: they are drawn from the step's table key (`Recommender.train_table`), the
same on every device, so a step embeds K items instead of b K and scores them with one [b, K]
matmul, and a row's loss does not depend on how the global batch is split over devices (in-batch
candidates do: they are the device batch's rows).

Popularity sampling is Walker's alias method (Vose 1991): (probability, alias) tables of the N items
built once on the host in O(N); a draw is one uniform column and one coin, O(K) a step. Neither
`jax.random.categorical` over N logits (O(N) a draw) nor an inverse CDF over a float32 cumulative
table (items below its 6e-8 spacing vanish) would do. The tables are compile-time constants of
12 to 20 bytes an item (alias probability and column, log Q, and log P with in-batch negatives,
the column's item with excluded items): 12-20 MB at N = 10^6, built in about a second.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from alphafuse_jax import losses

Array = jax.Array

KIND = 'sampled_softmax'
SAMPLERS = ('uniform', 'popularity')


# ---- the sampler's host tables ----------------------------------------------------------------
def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Vose's alias tables of the distribution weights / sum(weights).

  Column j of N is drawn uniformly, then j itself with probability prob[j], else alias[j].

  Args:
    weights: [N] finite, > 0.
  Returns:
    (prob float64 [N] in [0, 1], alias int64 [N]).
  """
  w = np.asarray(weights, np.float64)
  n = w.size
  scaled = (w * (n / w.sum())).tolist()
  prob, alias = [1.0] * n, list(range(n))
  small = [i for i, v in enumerate(scaled) if v < 1.0]
  large = [i for i, v in enumerate(scaled) if v >= 1.0]
  while small and large:
    s, big = small.pop(), large[-1]
    prob[s], alias[s] = scaled[s], big
    scaled[big] -= 1.0 - scaled[s]
    if scaled[big] < 1.0:
      small.append(large.pop())
  # Leftovers (rounding) keep prob 1: they are (to float64 precision) exactly full columns.
  return np.asarray(prob), np.asarray(alias, np.int64)


def alias_distribution(prob: np.ndarray, alias: np.ndarray, columns: np.ndarray | None = None,
                       num_items: int | None = None) -> np.ndarray:
  """The exact float64 distribution [num_items] that alias tables draw from (tests, checks)."""
  prob = np.asarray(prob, np.float64)
  columns = np.arange(prob.size) if columns is None else np.asarray(columns)
  out = np.zeros(num_items or prob.size)
  np.add.at(out, columns, prob)
  np.add.at(out, columns[np.asarray(alias)], 1.0 - prob)
  return out / prob.size


class ItemTables:
  """Host constants of the sampled softmax, built once; compared and hashed by identity.

  Attributes:
    num_items: N.
    alias_prob: float32 [M] and alias_column: int32 [M]: alias tables over the M items that can be
      drawn (None: uniform over all N, drawn directly).
    column_items: int32 [M] the item of each column (None when M = N: column j is item j).
    log_q: float32 [N] log Q(i) of the sampler (None: uniform over N, -log N). Items that cannot
      be drawn (excluded) hold a finite value that no candidate uses.
    log_p: float32 [N] log P(i) of the in-batch candidates (None without in-batch negatives).
  """
  __slots__ = ('num_items', 'alias_prob', 'alias_column', 'column_items', 'log_q', 'log_p')

  def __init__(self, num_items: int, sampler: str, alpha: float, *,
               counts: np.ndarray | None = None, allowed: np.ndarray | None = None,
               in_batch: bool = False):
    self.num_items = int(num_items)
    self.alias_prob = self.alias_column = self.column_items = self.log_q = self.log_p = None
    if counts is not None:
      counts = np.asarray(counts)
      if counts.shape != (num_items,) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f'train_item_counts must be [{num_items}] finite counts >= 0, got '
                         f'shape {counts.shape}; the dataset metadata is inconsistent (prepare '
                         'it again).')
    if counts is None and (sampler == 'popularity' or in_batch):
      raise ValueError(f"config.train.sampler='{sampler}' with in_batch_negatives={in_batch} "
                       'needs the train item counts (dataset.train_item_counts).')
    log_counts = None if counts is None else np.log1p(counts.astype(np.float64))
    if sampler == 'popularity' or allowed is not None:
      weight = np.exp(alpha * log_counts) if sampler == 'popularity' else np.ones(num_items)
      drawn = np.ones(num_items, bool) if allowed is None else np.asarray(allowed, bool)
      if drawn.shape != (num_items,) or not drawn.any():
        raise ValueError(f'The items negatives may be drawn from must be a non-empty bool '
                         f'[{num_items}] mask, got {drawn.shape} with {int(drawn.sum())} set.')
      items = np.flatnonzero(drawn)
      prob, alias = alias_table(weight[items])
      self.alias_prob = _frozen(prob, np.float32)
      self.alias_column = _frozen(alias, np.int32)
      self.column_items = None if items.size == num_items else _frozen(items, np.int32)
      log_q = np.log(weight) - np.log(weight[items].sum())
      self.log_q = _frozen(np.where(drawn, log_q, log_q[items].mean()), np.float32)
    if in_batch:
      self.log_p = _frozen(log_counts - np.log(np.exp(log_counts).sum()), np.float32)

  def sample(self, key: Array, count: int) -> Array:
    """int32 [count] items drawn independently from Q: O(count), whatever N."""
    if self.alias_prob is None:
      return jax.random.randint(key, (count,), 0, self.num_items, jnp.int32)
    column_key, coin_key = jax.random.split(key)
    columns = jax.random.randint(column_key, (count,), 0, self.alias_prob.size, jnp.int32)
    coin = jax.random.uniform(coin_key, (count,))
    picked = jnp.where(coin < jnp.asarray(self.alias_prob)[columns], columns,
                       jnp.asarray(self.alias_column)[columns])
    return picked if self.column_items is None else jnp.asarray(self.column_items)[picked]

  def log_expected_counts(self, ids: Array, num_negatives: int,
                          num_batch: Array | None = None) -> Array:
    """log m(i) = log(K Q(i) + n_b P(i)) for int ids [...] (n_b = num_batch; None: no in-batch)."""
    log_q = (jnp.full(ids.shape, -math.log(self.num_items), jnp.float32) if self.log_q is None
             else jnp.asarray(self.log_q)[ids])
    out = math.log(num_negatives) + log_q
    if num_batch is None:
      return out
    return jnp.logaddexp(out, jnp.log(num_batch.astype(jnp.float32)) + jnp.asarray(self.log_p)[ids])

  def __repr__(self) -> str:
    return (f'ItemTables(items={self.num_items}, alias={self.alias_prob is not None}, '
            f'in_batch={self.log_p is not None})')


def _frozen(x: np.ndarray, dtype) -> np.ndarray:
  x = np.asarray(x, dtype)
  x.setflags(write=False)
  return x


# ---- the loss ------------------------------------------------------------------------------------
def sampled_softmax_loss(states: Array, positives: Array, targets: Array, negative_ids: Array,
                         negatives: Array, log_m_targets: Array, log_m_negatives: Array, *,
                         batch_ids: Array | None = None, batch_items: Array | None = None,
                         batch_valid: Array | None = None,
                         log_m_batch: Array | None = None) -> Array:
  """Cross-entropy over [target, K shared negatives, in-batch candidates], logQ-corrected.

  Args:
    states: [b, ..., h] user states (a row, or every position of a row); positives: [b, ..., h]
      the targets' embeddings; targets: int [b, ...].
    negative_ids: int [K] shared negatives; negatives: [K, h] their embeddings.
    log_m_targets: [b, ...] and log_m_negatives: [K]: log m of the targets and negatives.
    batch_ids: int [c] in-batch candidates, batch_items [c, h] their embeddings, batch_valid bool
      [c] (False: not a candidate) and log_m_batch [c]; all None for no in-batch negatives.
  Returns:
    [b, ...] losses; a hit (a candidate equal to the target) has logit -inf.
  """
  pos = jnp.sum(states * positives, axis=-1) - log_m_targets
  neg = jnp.einsum('...h,kh->...k', states, negatives) - log_m_negatives
  columns = [pos[..., None], jnp.where(negative_ids == targets[..., None], -jnp.inf, neg)]
  if batch_ids is not None:
    scores = jnp.einsum('...h,ch->...c', states, batch_items) - log_m_batch
    excluded = (batch_ids == targets[..., None]) | ~batch_valid
    columns.append(jnp.where(excluded, -jnp.inf, scores))
  logits = jnp.concatenate(columns, axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]


# ---- the objective -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SampledSoftmax(losses.Objective):
  """`losses.Objective` of the sampled softmax; computed a device batch at once.

  `Recommender.train_table` calls `shared_negatives` (the K sampled items and their embeddings)
  and `Recommender.batch_example_loss` calls `batch_loss`. It always gathers (only the targets and
  the K negatives are embedded), whatever `negative_scoring` says.

  Attributes (beside `losses.Objective`'s num_negatives K and per_position):
    sampler: 'uniform' or 'popularity' (config.train.sampler).
    sampler_alpha: alpha of the popularity sampler, Q ~ (count + 1)^alpha.
    in_batch_negatives: the device batch's other targets are negatives too.
    tables: the host tables (`ItemTables`); None where no dataset is known (config validation),
      or uniform sampling over all N items without in-batch negatives (which needs none).
  """
  kind: str = KIND
  sampler: str = 'uniform'
  sampler_alpha: float = 0.75
  in_batch_negatives: bool = False
  tables: ItemTables | None = None

  def __post_init__(self):
    if self.kind != KIND:
      raise ValueError(f'SampledSoftmax has kind {KIND!r}, got {self.kind!r}.')
    if self.sampler not in SAMPLERS:
      raise ValueError(f'config.train.sampler={self.sampler!r} is not one of {SAMPLERS}.')
    if not (math.isfinite(self.sampler_alpha) and self.sampler_alpha >= 0):
      raise ValueError(f'config.train.sampler_alpha={self.sampler_alpha} must be >= 0 (0 = '
                       'uniform, 1 = proportional to the train counts; 0.75 is usual).')
    if self.num_negatives < 1:
      raise ValueError(f'config.train.num_negatives={self.num_negatives} must be >= 1 for the '
                       'sampled softmax.')

  @property
  def gathers(self) -> bool:
    return True

  def per_example(self, states, targets, item_embeddings, *, key, num_items):
    raise ValueError("The 'sampled_softmax' loss shares its negatives over a batch: it is "
                     'computed by Recommender.batch_example_loss, not per example.')

  def item_tables(self, num_items: int) -> ItemTables:
    """The tables, checked against the model's N (uniform over N needs none: built here)."""
    tables = self.tables
    if tables is None:
      if self.sampler == 'popularity' or self.in_batch_negatives:
        raise ValueError(f"config.train.sampler='{self.sampler}' with in_batch_negatives="
                         f'{self.in_batch_negatives} needs the train item counts: build the '
                         'objective with builders.objective(config, dataset).')
      return ItemTables(num_items, 'uniform', 0.0)
    if tables.num_items != num_items:
      raise ValueError(f'The sampled-softmax tables have {tables.num_items} items, the model '
                       f'{num_items}: build both from the same dataset.')
    return tables

  def negative_ids(self, key: Array, num_items: int) -> Array:
    """int32 [K] shared negatives drawn from Q with `key` (`shared_negatives`' ids)."""
    return self.item_tables(num_items).sample(key, self.num_negatives)

  def shared_negatives(self, key: Array, lookup, num_items: int) -> dict[str, Array]:
    """{'ids': int32 [K] drawn from Q, 'embeddings': [K, h] = lookup(ids)}, once per step."""
    ids = self.negative_ids(key, num_items)
    return {'ids': ids, 'embeddings': lookup(ids)}

  def batch_loss(self, states: Array, positives: Array, targets: Array, weights: Array,
                 negatives: dict[str, Array], *, num_items: int) -> Array:
    """Losses [b] (or [b, L] per position) of one device batch.

    Args:
      states, positives: [b, h] or [b, L, h]; targets int and weights float, [b] or [b, L]
        (weight 0: does not count; its target may be any real item);
      negatives: `shared_negatives`' output.
    """
    tables = self.item_tables(num_items)
    log_m = lambda ids, n_b: tables.log_expected_counts(ids, self.num_negatives, n_b)
    if not self.in_batch_negatives:
      return sampled_softmax_loss(states, positives, targets, negatives['ids'],
                                  negatives['embeddings'], log_m(targets, None),
                                  log_m(negatives['ids'], None))
    # The candidates are the rows' (last positions') targets.
    last = (lambda x: x[:, -1]) if targets.ndim == 2 else (lambda x: x)
    batch_ids, valid = last(targets), last(weights) > 0
    n_b = jnp.sum(valid)
    return sampled_softmax_loss(
        states, positives, targets, negatives['ids'], negatives['embeddings'],
        log_m(targets, n_b), log_m(negatives['ids'], n_b), batch_ids=batch_ids,
        batch_items=last(positives), batch_valid=valid, log_m_batch=log_m(batch_ids, n_b))


def make_objective(*, num_negatives: int, per_position: bool, sampler: str, sampler_alpha: float,
                   in_batch_negatives: bool, num_items: int | None = None,
                   counts: np.ndarray | None = None,
                   allowed: np.ndarray | None = None) -> SampledSoftmax:
  """The objective with its tables when the dataset is known (num_items and counts), else none.

  `allowed`: bool [N], the items negatives may be drawn from (None: all; cold_start_items
  excludes the new items).
  """
  objective = SampledSoftmax(num_negatives=num_negatives, per_position=per_position,
                             sampler=sampler, sampler_alpha=float(sampler_alpha),
                             in_batch_negatives=bool(in_batch_negatives))
  needs_tables = sampler == 'popularity' or in_batch_negatives or allowed is not None
  if num_items is None or not needs_tables:
    return objective
  return dataclasses.replace(objective, tables=ItemTables(
      num_items, sampler, float(sampler_alpha), counts=counts, allowed=allowed,
      in_batch=bool(in_batch_negatives)))
