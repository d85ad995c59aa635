"""Transformer layers shared by the SASRec and DreamRec backbones.

Three families live here:
  * the `reference` layers, a literal port of the authors' `models/modules.py` (reference-spec §3.1):
    attention scaled by 1/sqrt(h) with no output projection, residual on the normalised queries, an
    FFN of width h with its own LayerNorm, four LayerNorms with eps 1e-5 and PyTorch initialisers;
  * the `standard` layers of SASRec as Kang & McAuley (2018) describe it: multi-head attention scaled
    by 1/sqrt(h/H) with an output projection, pre-LN or post-LN residual sub-layers;
  * `kang_code`: the block their code (and the ports the literature's numbers come from) computes,
    whose residuals differ from the paper's formula (KangCodeBlock).

Every module takes a boolean `pad_mask` [batch, seq_len] that is True at padding positions, instead of
the reference's `sum(e) == 0` test; the masked scores get the reference's fill -2^32+1 either way.

`full_len` (leave-one-out training, `SASRec.encode_suffix`): the inputs hold the LAST seq_len of
full_len positions, all earlier ones being padding. The outputs there equal the full-length
computation's (padding keys get zero attention), and every dropout draws the mask the full-length
input would get (`dropout_as_in_full`), so the results match; only the random bits are full-size.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from alphafuse_jax.basic_layers import Dropout  # Re-exported for the backbones.
from alphafuse_jax.basic_layers import TorchDense
from alphafuse_jax.basic_layers import layer_norm

Array = jax.Array

# The reference fills masked attention scores with -2**32 + 1 (not -inf): a query row whose keys are
# all masked then gets uniform weights instead of NaN. Those rows are padding and zeroed afterwards.
MASK_FILL = -(2.0**32) + 1.0
# The LayerNorm epsilon of Kang & McAuley's code (TF `normalize`, SASRec.pytorch).
KANG_LAYER_NORM_EPS = 1e-8


def attention_mask(pad_mask: Array) -> Array:
  """Allowed (query i, key j) pairs: causal (j <= i) and key j not padding.

  Args:
    pad_mask: bool [batch, seq_len], True at padding positions.
  Returns:
    bool [batch, 1, seq_len, seq_len] (broadcast over heads), True where attention is allowed.
  """
  seq_len = pad_mask.shape[-1]
  causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
  return (causal[None, :, :] & ~pad_mask[:, None, :])[:, None, :, :]


def dropout_as_in_full(dropout: Dropout, x: Array, *, deterministic: bool,
                       full_len: int | None = None, axes: tuple[int, ...] = (1,)) -> Array:
  """`dropout(x)` where x holds the last positions of `full_len` on `axes`: the mask there is the
  full-length input's."""
  if full_len is None or deterministic:
    return dropout(x, deterministic=deterministic)
  axes = [a % x.ndim for a in axes]
  full_shape = tuple(full_len if a in axes else n for a, n in enumerate(x.shape))
  return dropout(x, deterministic=False, full_shape=full_shape)


def _split_heads(x: Array, num_heads: int) -> Array:
  """[batch, seq_len, h] -> [batch, heads, seq_len, h / heads]: head k holds channel chunk k."""
  batch, seq_len, hidden = x.shape
  return x.reshape(batch, seq_len, num_heads, hidden // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x: Array) -> Array:
  """[batch, heads, seq_len, d] -> [batch, seq_len, heads * d], the inverse of `_split_heads`."""
  batch, num_heads, seq_len, head_dim = x.shape
  return x.transpose(0, 2, 1, 3).reshape(batch, seq_len, num_heads * head_dim)


def masked_softmax_attention(q: Array, k: Array, v: Array, mask: Array, scale: float,
                             dropout: nn.Module, deterministic: bool,
                             full_len: int | None = None) -> Array:
  """softmax(q k^T * scale, masked with MASK_FILL) -> dropout -> @ v, per head.

  Args:
    q, k, v: [batch, heads, seq_len, head_dim].
    mask: bool broadcastable to [batch, heads, seq_len, seq_len], True where allowed.
    full_len: see the module docstring (q and k hold the same last positions).
  Returns:
    [batch, heads, seq_len, head_dim].
  """
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k) * scale
  scores = jnp.where(mask, scores, MASK_FILL)
  weights = jax.nn.softmax(scores, axis=-1)
  weights = dropout_as_in_full(dropout, weights, deterministic=deterministic, full_len=full_len,
                               axes=(-2, -1))
  return jnp.einsum('bhqk,bhkd->bhqd', weights, v)


class ReferenceAttention(nn.Module):
  """The authors' `MultiHeadAttention(queries, keys)` (reference-spec §3.1 step 4).

  Q = queries W_q + b, K = keys W_k + b, V = keys W_v + b (each h -> h); heads split the channels
  into H chunks; scores are scaled by 1/sqrt(h) (the FULL width, not h/H); causal + key-padding mask;
  attention dropout; no output projection; the output is A V + queries (the normalised queries).
  The reference's query mask (rows times sign|sum_d q|) is omitted: it only touches padding rows,
  which the block zeroes afterwards, so outputs are unchanged.
  """
  num_heads: int = 1
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, queries: Array, keys: Array, pad_mask: Array, *,
               deterministic: bool, query_positions: Array | None = None,
               full_len: int | None = None) -> Array:
    """Attention of queries over keys.

    Args:
      queries: [batch, seq_len, h], or [batch, 1, h] with `query_positions`.
      keys: [batch, seq_len, h]; pad_mask: bool [batch, seq_len].
      query_positions: None (queries at every position), or int [batch]: the single position
        each row's one query sits at (its causal mask row).
    Returns:
      [batch, queries' length, h].
    """
    hidden = queries.shape[-1]
    q = _split_heads(TorchDense(hidden, name='query')(queries), self.num_heads)
    k = _split_heads(TorchDense(hidden, name='key')(keys), self.num_heads)
    v = _split_heads(TorchDense(hidden, name='value')(keys), self.num_heads)
    if query_positions is None:
      mask = attention_mask(pad_mask)
    else:
      seq_len = pad_mask.shape[-1]
      causal = jnp.arange(seq_len)[None, :] <= query_positions[:, None]
      mask = (causal & ~pad_mask)[:, None, None, :]
    out = masked_softmax_attention(q, k, v, mask, 1.0 / math.sqrt(hidden),
                                   Dropout(self.dropout_rate), deterministic, full_len)
    return _merge_heads(out) + queries


class ReferenceFeedForward(nn.Module):
  """The authors' `PositionwiseFeedForward(h, h)`: LN(Dropout(W2 ReLU(W1 x)) + x), width h."""
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool, full_len: int | None = None) -> Array:
    hidden = x.shape[-1]
    y = TorchDense(hidden, name='w_1')(x)
    y = TorchDense(hidden, name='w_2')(nn.relu(y))
    y = dropout_as_in_full(Dropout(self.dropout_rate), y, deterministic=deterministic,
                           full_len=full_len)
    return layer_norm(name='layer_norm')(y + x)


class ReferenceBlock(nn.Module):
  """One reference transformer block (reference-spec §3.1 steps 3-6).

  Input x [batch, seq_len, h] must be zero at padding rows (the backbone multiplies by the mask).
    q = LN1(x); a = Attention(q, x); f = FFN(LN2(a)); f = f * m; out = LN3(f).
  The authors always run exactly one such block; stacking more (num_blocks > 1) is our extension,
  and the backbone re-zeroes padding rows between blocks.
  """
  num_heads: int = 1
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x: Array, pad_mask: Array, *, deterministic: bool,
               query_positions: Array | None = None, full_len: int | None = None) -> Array:
    """The block at every position, or only at `query_positions`.

    Args:
      x: [batch, seq_len, h]; pad_mask: bool [batch, seq_len].
      query_positions: None, or int [batch]: compute each row's output at that one position only.
        Keys and values still come from every position, so the result equals the full block's
        output there, at about half the FLOPs for the user state SASRec scores with.
    Returns:
      [batch, seq_len, h], or [batch, 1, h] with `query_positions`.
    """
    keep = (~pad_mask)[..., None].astype(x.dtype)
    if query_positions is not None:
      x_query = jnp.take_along_axis(x, query_positions[:, None, None], axis=1)
      keep = jnp.take_along_axis(keep, query_positions[:, None, None], axis=1)
    else:
      x_query = x
    q = layer_norm(name='ln_1')(x_query)
    a = ReferenceAttention(self.num_heads, self.dropout_rate, name='attention')(
        q, x, pad_mask, deterministic=deterministic, query_positions=query_positions,
        full_len=full_len)
    f = ReferenceFeedForward(self.dropout_rate, name='feed_forward')(
        layer_norm(name='ln_2')(a), deterministic=deterministic, full_len=full_len)
    return layer_norm(name='ln_3')(f * keep)


class MultiHeadSelfAttention(nn.Module):
  """Standard causal multi-head self-attention: scale 1/sqrt(h/H), output projection W_o."""
  num_heads: int = 1
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x: Array, pad_mask: Array, *, deterministic: bool,
               full_len: int | None = None, keys: Array | None = None) -> Array:
    """x: [batch, seq_len, h]; pad_mask: bool [batch, seq_len] -> [batch, seq_len, h].

    `keys` (same shape as x): keys and values come from it instead of x (Kang's code block).
    """
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    keys = x if keys is None else keys
    q = _split_heads(TorchDense(hidden, name='query')(x), self.num_heads)
    k = _split_heads(TorchDense(hidden, name='key')(keys), self.num_heads)
    v = _split_heads(TorchDense(hidden, name='value')(keys), self.num_heads)
    out = masked_softmax_attention(q, k, v, attention_mask(pad_mask), 1.0 / math.sqrt(head_dim),
                                   Dropout(self.dropout_rate), deterministic, full_len)
    return TorchDense(hidden, name='out')(_merge_heads(out))


class StandardBlock(nn.Module):
  """A SASRec block as in Kang & McAuley (2018), §III-B/C.

  pre_ln=True (the paper's g(x) = x + Dropout(g(LayerNorm(x)))):
    x = x + Dropout(Attn(LN1(x))); x = x + Dropout(FFN(LN2(x)))
  pre_ln=False (post-LN, Vaswani et al.):
    x = LN1(x + Dropout(Attn(x))); x = LN2(x + Dropout(FFN(x)))
  FFN(x) = W2 Dropout(ReLU(W1 x + b1)) + b2 with hidden width h. Padding rows are zeroed after the
  block so they never feed the next block's keys. Note: Kang's TF code (and pmixer's PyTorch port)
  add the residual to the NORMALISED input instead; we follow the paper's formula.
  """
  num_heads: int = 1
  dropout_rate: float = 0.1
  pre_ln: bool = True

  @nn.compact
  def __call__(self, x: Array, pad_mask: Array, *, deterministic: bool,
               query_positions: Array | None = None, full_len: int | None = None) -> Array:
    """x: [batch, seq_len, h]; pad_mask: bool [batch, seq_len] -> [batch, seq_len, h].

    With `query_positions` (int [batch]) the result is [batch, 1, h], the states at those positions
    (the same interface as ReferenceBlock). Every position is computed, then gathered.
    """
    hidden = x.shape[-1]
    keep = (~pad_mask)[..., None].astype(x.dtype)
    attention = MultiHeadSelfAttention(self.num_heads, self.dropout_rate, name='attention')
    ln_1, ln_2 = layer_norm(name='ln_1'), layer_norm(name='ln_2')
    w_1, w_2 = TorchDense(hidden, name='w_1'), TorchDense(hidden, name='w_2')

    def dropout(y):
      return dropout_as_in_full(Dropout(self.dropout_rate), y, deterministic=deterministic,
                                full_len=full_len)

    def ffn(y):
      return w_2(dropout(nn.relu(w_1(y))))

    def attend(y):
      return attention(y, pad_mask, deterministic=deterministic, full_len=full_len)

    if self.pre_ln:
      x = x + dropout(attend(ln_1(x)))
      x = x + dropout(ffn(ln_2(x)))
    else:
      x = ln_1(x + dropout(attend(x)))
      x = ln_2(x + dropout(ffn(x)))
    x = x * keep
    if query_positions is not None:
      x = jnp.take_along_axis(x, query_positions[:, None, None], axis=1)
    return x


class KangCodeBlock(nn.Module):
  """A SASRec block as Kang & McAuley's code computes it (their TF `model.py`, SASRec.pytorch, and
  the SASRec+ of Klenitskiy & Vasilev 2023, the literature's ML-1M leave-one-out row), which is
  not the paper's formula:
    q = LN1(x); x = q + Attn(queries q, keys/values x)   (residual on the normalised queries)
    x = LN2(x); x = x + Dropout(W2 Dropout(ReLU(W1 x)))   (the FFN's residual is LN2's output)
  Attn is the standard one (scale 1/sqrt(h/H), output projection, dropout on its weights only).
  LayerNorm epsilon 1e-8, as theirs. Padding rows are zeroed after the block; with
  `query_positions` every position is computed, then gathered (StandardBlock's interface).
  """
  num_heads: int = 1
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x: Array, pad_mask: Array, *, deterministic: bool,
               query_positions: Array | None = None, full_len: int | None = None) -> Array:
    """x: [batch, seq_len, h]; pad_mask: bool [batch, seq_len] -> [batch, seq_len or 1, h]."""
    hidden = x.shape[-1]
    keep = (~pad_mask)[..., None].astype(x.dtype)

    def dropout(y):
      return dropout_as_in_full(Dropout(self.dropout_rate), y, deterministic=deterministic,
                                full_len=full_len)

    q = layer_norm(name='ln_1', epsilon=KANG_LAYER_NORM_EPS)(x)
    x = q + MultiHeadSelfAttention(self.num_heads, self.dropout_rate, name='attention')(
        q, pad_mask, deterministic=deterministic, full_len=full_len, keys=x)
    x = layer_norm(name='ln_2', epsilon=KANG_LAYER_NORM_EPS)(x)
    x = x + dropout(TorchDense(hidden, name='w_2')(dropout(nn.relu(
        TorchDense(hidden, name='w_1')(x)))))
    x = x * keep
    if query_positions is not None:
      x = jnp.take_along_axis(x, query_positions[:, None, None], axis=1)
    return x


# ---- the encoder stack shared by SASRec and LLM-ESR ----------------------------------------------
BLOCK_STYLES = ('reference', 'standard', 'kang_code')
# Blocks whose backbone scales the item embeddings by sqrt(h), as Kang & McAuley do.
SCALED_INPUT_BLOCKS = ('standard', 'kang_code')


def encoder_blocks(block: str, num_blocks: int, num_heads: int, dropout_rate: float,
                   pre_ln: bool) -> tuple[list[nn.Module], nn.Module | None]:
  """The blocks of an encoder and its final LayerNorm (standard pre-LN and kang_code, else None).

  Call it in `setup` and assign both to attributes (`blocks`, `final_ln`) so their parameters
  are named `blocks_<i>` and `final_ln`. Checks the style, block count and dropout rate for both
  backbones (the head count depends on each backbone's width, so each checks it).
  """
  if block not in BLOCK_STYLES:
    raise ValueError(f'Unknown encoder block style {block!r} (config.model.block); '
                     f'use one of {BLOCK_STYLES}.')
  if num_blocks < 1:
    raise ValueError(f'config.model.num_blocks must be >= 1, got {num_blocks}.')
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'config.model.dropout_rate must be in [0, 1), got {dropout_rate}.')
  if block == 'reference':
    return [ReferenceBlock(num_heads, dropout_rate) for _ in range(num_blocks)], None
  if block == 'kang_code':
    return ([KangCodeBlock(num_heads, dropout_rate) for _ in range(num_blocks)],
            layer_norm(epsilon=KANG_LAYER_NORM_EPS))
  blocks = [StandardBlock(num_heads, dropout_rate, pre_ln) for _ in range(num_blocks)]
  return blocks, layer_norm() if pre_ln else None


def run_encoder(blocks, final_ln: nn.Module | None, x: Array, pad_mask: Array, *,
                deterministic: bool, query_positions: Array | None = None,
                full_len: int | None = None) -> Array:
  """x [B, L, h] through the blocks, padding rows re-zeroed before each block.

  With `query_positions` [B] the last block returns the states at those positions, [B, 1, h] (a
  reference block computes only those, about half its work; a standard one gathers them); otherwise
  [B, L, h]. The final LayerNorm is per position, so it commutes with the gather. `full_len`: x
  holds the last positions of that many (see the module docstring).
  """
  keep = (~pad_mask)[..., None].astype(x.dtype)
  for i, block in enumerate(blocks):
    x = x * keep  # Reference blocks end in LN3, whose padding rows hold its bias.
    if query_positions is not None and i == len(blocks) - 1:
      x = block(x, pad_mask, deterministic=deterministic, query_positions=query_positions)
    else:
      x = block(x, pad_mask, deterministic=deterministic, full_len=full_len)
  return x if final_ln is None else final_ln(x)
