"""LLM-ESR (Liu et al., NeurIPS 2024): a dual-view SASRec with retrieval-augmented self-distillation.

The sequence side of the `llmesr` pipeline (the item side is `embeddings.LLMESREmbedding`):
  1. dual view: the history embeds through the trainable ID view and the adapted frozen text view
     [batch, L, h] each; both get the SAME positional embeddings and embedding dropout;
  2. sequence-level fusion: cross_id = CrossAttn(queries=text, keys/values=ID) and
     cross_text = CrossAttn(queries=ID, keys/values=text), key padding masked (the authors'
     `llm2id(llm_seqs, id_seqs)` / `id2llm(id_seqs, llm_seqs)`, kept by AlphaFuse's port);
  3. ONE shared encoder (reference or standard blocks, as SASRec) over each fused view; the user
     state is concat(id_h, text_h) [batch, 2h], scored against the 2h item table concat(ID, text);
  4. auxiliary terms over the device batch (`batch_loss`):
     - beta * Contrastive_Loss2(ID view, text view) over every non-pad history item (the AlphaFuse
       authors' LLMESR baseline; `item_reg` in the LLM-ESR code);
     - alpha * self-distillation: the user state (student) is pulled towards the mean state of the
       user's K most similar train users (teacher: the same model on their train histories,
       gradient stopped), by MSE ('kd', the authors' scripts) or Contrastive_Loss2 ('cl').

Similar users (what differs from the paper): LLM-ESR embeds each user's interaction history with an
LLM prompt and retrieves the top-K users by cosine similarity of those vectors. There is no LLM user
text here, so a user's vector is the MEAN LANGUAGE EMBEDDING of the items of their train sequence;
retrieval is by cosine similarity among TRAIN users only, excluding the user itself (the authors
drop rank 0, assumed to be the user). A teacher sequence is the similar user's train sequence
without its last item, truncated to L (the authors' `_get_user_seq`), i.e. the history of that
user's last train example. The authors' user vectors come from the full sequence (val/test items
included); ours use train items only, so nothing of val/test leaks into training.

`bug_compatible=True` reproduces the AlphaFuse authors' bug (reference-spec §2.3 and §7 item 16):
`id_seq = emb_dropout(inputs_text_emb)`, so both cross-attention inputs are the text view and the ID
table reaches the loss only through scoring.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alphafuse_jax import embeddings as embeddings_lib
from alphafuse_jax import losses
from alphafuse_jax.models import base
from alphafuse_jax.models import layers
from alphafuse_jax.models import sasrec as sasrec_lib

Array = jax.Array

DISTILL_LOSSES = ('kd', 'cl')


class SimilarUsers:
  """Host constants of the self-distillation: per-user similar train users and teacher histories.

  Compared and hashed by identity (like `embeddings.FrozenTable`), so the module stays hashable.

  Attributes:
    similar: int32 [num_users, K], the K most similar train users of each user (row u is only
      meaningful for train users; other rows point at train users too but are never read).
    histories: int32 [num_users, L], each user's teacher sequence, left-padded with the pad id.
  """
  __slots__ = ('similar', 'histories')

  def __init__(self, similar: np.ndarray, histories: np.ndarray):
    similar = np.asarray(similar, np.int32)
    histories = np.asarray(histories, np.int32)
    if similar.ndim != 2 or histories.ndim != 2 or similar.shape[0] != histories.shape[0]:
      raise ValueError(f'SimilarUsers needs similar [U, K] and histories [U, L] with the same U, '
                       f'got {similar.shape} and {histories.shape}.')
    similar.setflags(write=False)
    histories.setflags(write=False)
    self.similar, self.histories = similar, histories

  @property
  def num_similar(self) -> int:
    return self.similar.shape[1]

  def __repr__(self) -> str:
    return f'SimilarUsers(users={self.similar.shape[0]}, k={self.num_similar})'


def retrieve_similar_users(train_split: dict[str, np.ndarray], user_sequences: tuple[np.ndarray,
                           np.ndarray], language_embeddings: np.ndarray, *, num_users: int,
                           num_items: int, num_similar: int, chunk: int = 1024) -> SimilarUsers:
  """Top-K similar TRAIN users by cosine similarity of mean language embeddings (host numpy).

  Args:
    train_split: the dataset's 'train' split: user_id [n], position [n], history [n, L].
    user_sequences: (indptr [U + 1], items [nnz]), every user's chronological items.
    language_embeddings: [N, d_l] item vectors (any scale: cosine similarity ignores it).
    num_users: U; num_items: N (the pad id).
    num_similar: K.
    chunk: query users per similarity block (bounds memory at chunk x U floats).

  Returns:
    SimilarUsers with similar [U, K] (self excluded; ties broken by the lower user id) and
    histories [U, L] (the history of each user's last train example; all-pad for non-train users).
  """
  user_id = np.asarray(train_split['user_id'], np.int64)
  position = np.asarray(train_split['position'], np.int64)
  history = np.asarray(train_split['history'], np.int32)
  train_users = np.unique(user_id)
  if num_similar < 1 or train_users.size <= num_similar:
    raise ValueError(f'config.embedding.llmesr_num_similar_users={num_similar} must be >= 1 and '
                     f'below the {train_users.size} train users; lower it or set '
                     'config.embedding.llmesr_distill_weight=0.')
  # Each train user's last train example: its history is the teacher sequence, and items up to
  # and including its target are the user's train sequence.
  order = np.lexsort((position, user_id))
  last_row = order[np.r_[np.nonzero(np.diff(user_id[order]))[0], order.size - 1]]
  histories = np.full((num_users, history.shape[1]), num_items, np.int32)
  histories[user_id[last_row]] = history[last_row]
  indptr, items = user_sequences
  x = np.asarray(language_embeddings, np.float64)
  vectors = np.zeros((train_users.size, x.shape[1]))
  for i, (u, p) in enumerate(zip(user_id[last_row], position[last_row])):
    vectors[i] = x[items[indptr[u]:indptr[u] + p + 1]].mean(axis=0)
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  vectors = vectors / np.maximum(norms, 1e-12)
  similar = np.zeros((num_users, num_similar), np.int32)
  similar[:] = train_users[:num_similar]  # Placeholder rows for users with no train example.
  for start in range(0, train_users.size, chunk):
    scores = vectors[start:start + chunk] @ vectors.T  # [chunk, train users]
    rows = np.arange(scores.shape[0])
    scores[rows, start + rows] = -np.inf  # Never the user itself.
    # Stable sort of -score: equal scores keep the lower user id first.
    top = np.argsort(-scores, axis=1, kind='stable')[:, :num_similar]
    similar[train_users[start:start + chunk]] = train_users[top]
  return SimilarUsers(similar, histories)


class LLMESRCrossAttention(nn.Module):
  """LLM-ESR's Multi_CrossAttention: queries from x, keys/values from y.

  Bias-free Q/K/V projections (h -> h), scores QK^T with padded keys set to -1e9 BEFORE the
  1/sqrt(h / heads) scaling, softmax over keys, an output Linear with bias; no causal mask and no
  dropout (reference-spec section 2.3).

  Attributes:
    hidden_dim: h (input and output width).
    num_heads: 2 in the reference.
  """
  hidden_dim: int
  num_heads: int = 2

  @nn.compact
  def __call__(self, x: Array, y: Array, key_padding_mask: Array) -> Array:
    """x [B, L, h], y [B, S, h], key_padding_mask bool [B, S] (True = pad) -> [B, L, h]."""
    if self.hidden_dim % self.num_heads:
      raise ValueError(f'hidden_dim {self.hidden_dim} is not divisible by {self.num_heads} heads.')
    head = self.hidden_dim // self.num_heads

    def split(t):
      return t.reshape(t.shape[:-1] + (self.num_heads, head))
    q = split(layers.TorchDense(self.hidden_dim, use_bias=False, name='query')(x))
    k = split(layers.TorchDense(self.hidden_dim, use_bias=False, name='key')(y))
    v = split(layers.TorchDense(self.hidden_dim, use_bias=False, name='value')(y))
    scores = jnp.einsum('blhd,bshd->bhls', q, k)
    scores = jnp.where(key_padding_mask[:, None, None, :], -1e9, scores) / math.sqrt(head)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum('bhls,bshd->blhd', probs, v).reshape(x.shape[:-1] + (self.hidden_dim,))
    return layers.TorchDense(self.hidden_dim, name='output')(out)


def contrastive_loss2(x: Array, y: Array, *, temperature: float = 1.0,
                      mask: Array | None = None) -> Array:
  """LLM-ESR's Contrastive_Loss2 between two views of the same M items.

  logits = X Y^T / tau; targets = row-softmax((Y Y^T + X X^T) / 2 * tau) (the reference
  multiplies by tau here); loss = mean_i (CE_row_i(logits, targets) + CE_row_i(logits^T,
  targets^T)) / 2, with CE(p, t) = -sum_j t_j log_softmax(p)_j. The reference calls it with
  X = ID view and Y = text view of every non-pad item in the batch.

  Args:
    x: [M, h] first view.
    y: [M, h] second view.
    temperature: tau (1 in the reference).
    mask: optional bool [M]; False rows/columns (padding of a static-shape batch) are left out,
      which equals the reference on the selected rows.

  Returns:
    Scalar loss.
  """
  neg = jnp.asarray(-1e9, x.dtype)
  logits = jnp.matmul(x, y.T) / temperature
  similarity = (jnp.matmul(y, y.T) + jnp.matmul(x, x.T)) / 2 * temperature
  if mask is None:
    mask = jnp.ones((x.shape[0],), bool)
  pair = mask[:, None] & mask[None, :]
  targets = jax.nn.softmax(jnp.where(pair, similarity, neg), axis=-1)
  targets = jnp.where(pair, targets, 0.0)
  # Row-wise log-softmax over valid columns, and over valid rows for the transposed term.
  row_log = jax.nn.log_softmax(jnp.where(pair, logits, neg), axis=1)
  col_log = jax.nn.log_softmax(jnp.where(pair, logits, neg), axis=0)
  x_loss = -jnp.sum(jnp.where(pair, targets * row_log, 0.0), axis=1)
  y_loss = -jnp.sum(jnp.where(pair, targets * col_log, 0.0), axis=0)
  count = jnp.maximum(jnp.sum(mask), 1)
  return jnp.sum(jnp.where(mask, (x_loss + y_loss) / 2.0, 0.0)) / count


def mse(x: Array, y: Array, weights: Array) -> Array:
  """torch MSELoss (mean over every element) restricted to rows with weight 1: x, y [B, d]."""
  per_row = jnp.mean(jnp.square(x - y), axis=-1)
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class LLMESR(base.Recommender):
  """The LLM-ESR backbone over an `LLMESREmbedding`, with SASRec's public methods.

  Attributes:
    item_embedding: embeddings.LLMESREmbedding (pad id = item_embedding.num_items = N).
    max_len: history length L.
    block, num_blocks, num_heads, dropout_rate, pre_ln: the shared encoder, as in SASRec.
    cross_heads: heads of the two cross-attention modules (2 in both references).
    bug_compatible: True feeds the text view to the ID path (the AlphaFuse authors' bug).
    item_reg_weight: beta of the ID/text contrastive term (0 disables it).
    distill_weight: alpha of the self-distillation (0 disables it).
    distill_loss: 'kd' (MSE) or 'cl' (Contrastive_Loss2).
    similar_users: the retrieval result; needed when distill_weight > 0.
    objective: the training loss of the user states (as SASRec's).
  """
  item_embedding: embeddings_lib.LLMESREmbedding
  max_len: int
  block: str = 'reference'
  num_blocks: int = 1
  num_heads: int = 1
  dropout_rate: float = 0.1
  pre_ln: bool = True
  cross_heads: int = 2
  bug_compatible: bool = False
  item_reg_weight: float = 0.1
  distill_weight: float = 0.0
  distill_loss: str = 'kd'
  similar_users: SimilarUsers | None = None
  objective: losses.Objective = losses.Objective()

  def setup(self):
    if not isinstance(self.item_embedding, embeddings_lib.LLMESREmbedding):
      raise ValueError('The LLM-ESR backbone needs config.embedding.pipeline=\'llmesr\', got '
                       f'{type(self.item_embedding).__name__}.')
    hidden = self.item_embedding.hidden_dim
    for name, heads in (('config.model.num_heads', self.num_heads), ('cross_heads',
                                                                      self.cross_heads)):
      if heads < 1 or hidden % heads:
        raise ValueError(f'{name}={heads} must divide the view width '
                         f'config.embedding.hidden_dim={hidden}.')
    if self.distill_loss not in DISTILL_LOSSES:
      raise ValueError(f'config.embedding.llmesr_distill_loss={self.distill_loss!r} is not one of '
                       f'{DISTILL_LOSSES}.')
    if self.distill_weight > 0 and self.similar_users is None:
      raise ValueError('llmesr_distill_weight > 0 needs the similar-user retrieval '
                       '(similar_users); build the model with from_config.')
    # One positional table for both views (N(0, 1) like torch nn.Embedding), one dropout module.
    self.position_embedding = nn.Embed(self.max_len, hidden,
                                       embedding_init=nn.initializers.normal(1.0))
    self.embedding_dropout = layers.Dropout(self.dropout_rate)
    self.language_to_id = LLMESRCrossAttention(hidden, self.cross_heads)
    self.id_to_language = LLMESRCrossAttention(hidden, self.cross_heads)
    # The shared encoder: the same blocks (same parameters) run over both fused views.
    self.blocks, self.final_ln = layers.encoder_blocks(
        self.block, self.num_blocks, self.num_heads, self.dropout_rate, self.pre_ln)

  @property
  def num_items(self) -> int:
    return self.item_embedding.num_items

  # ---- the sequence side -----------------------------------------------------------------------
  def _embed_view(self, view: Array, deterministic: bool) -> Array:
    """view [B, L, h] -> (x * sqrt(h) for standard blocks) + positions -> dropout."""
    if self.block in layers.SCALED_INPUT_BLOCKS:
      view = view * math.sqrt(view.shape[-1])
    view = view + self.position_embedding(jnp.arange(self.max_len))[None]
    return self.embedding_dropout(view, deterministic=deterministic)

  def _fused_views(self, history: Array, deterministic: bool) -> tuple[Array, Array]:
    """The two cross-attended views [B, L, h] each (ID path, text path)."""
    if history.ndim != 2 or history.shape[1] != self.max_len:
      raise ValueError(f'LLM-ESR expects history of shape [batch, {self.max_len}] '
                       f'(config.data.max_len), got {history.shape}.')
    pad_mask = history == self.num_items
    text_view = self.item_embedding.text_view(history)
    text_seq = self._embed_view(text_view, deterministic)
    # The AlphaFuse authors' bug: the ID path is fed the text view (its own dropout draw).
    id_view = text_view if self.bug_compatible else self.item_embedding.id_view(history)
    id_seq = self._embed_view(id_view, deterministic)
    cross_id = self.language_to_id(text_seq, id_seq, pad_mask)
    cross_text = self.id_to_language(id_seq, text_seq, pad_mask)
    return cross_id, cross_text

  def _encode_view(self, x: Array, pad_mask: Array, deterministic: bool,
                   query_positions: Array | None) -> Array:
    """The shared encoder over one fused view: [B, L, h] -> [B, L, h] (or [B, 1, h])."""
    return layers.run_encoder(self.blocks, self.final_ln, x, pad_mask,
                              deterministic=deterministic, query_positions=query_positions)

  def _encode(self, history: Array, deterministic: bool,
              query_positions: Array | None = None) -> Array:
    pad_mask = history == self.num_items
    cross_id, cross_text = self._fused_views(history, deterministic)
    id_h = self._encode_view(cross_id, pad_mask, deterministic, query_positions)
    text_h = self._encode_view(cross_text, pad_mask, deterministic, query_positions)
    return jnp.concatenate([id_h, text_h], axis=-1)

  def encode(self, history: Array, *, deterministic: bool) -> Array:
    """Hidden states [batch, L, 2h] at every position (position i has seen items 0..i)."""
    return self._encode(history, deterministic)

  def __call__(self, history: Array, *, deterministic: bool) -> Array:
    """User states [batch, 2h] = concat(id_h, text_h) at the last non-pad position."""
    last = sasrec_lib.last_nonpad_index(history == self.num_items)
    return self._encode(history, deterministic, query_positions=last)[:, 0]

  # ---- the batch-level auxiliary terms ---------------------------------------------------------
  def item_contrastive_loss(self, history: Array, row_mask: Array) -> Array:
    """Contrastive_Loss2(ID view, text view) over the non-pad items of the rows kept [B, L]."""
    flat = history.reshape(-1)
    keep = ((history != self.num_items) & row_mask[:, None]).reshape(-1)
    return contrastive_loss2(self.item_embedding.id_view(flat),
                                            self.item_embedding.text_view(flat), mask=keep)

  def distillation_loss(self, history: Array, user_id: Array, row_mask: Array, *,
                        deterministic: bool) -> Array:
    """alpha-free self-distillation: student = this batch's states, teacher = similar users'.

    Args:
      history: int [B, L]; user_id: int [B] (train user of each row); row_mask: bool [B].
    Returns:
      Scalar: MSE ('kd') or Contrastive_Loss2 ('cl') between the student states [B, 2h] and the
      mean teacher state over the K similar users (gradient stopped), over the kept rows.
    """
    student = self(history, deterministic=deterministic)
    similar = jnp.asarray(self.similar_users.similar)[user_id]  # [B, K]
    teacher_history = jnp.asarray(self.similar_users.histories)[similar]  # [B, K, L]
    batch, k = similar.shape
    teacher = self(teacher_history.reshape(batch * k, self.max_len), deterministic=deterministic)
    teacher = jax.lax.stop_gradient(teacher.reshape(batch, k, -1).mean(axis=1))
    if self.distill_loss == 'kd':
      return mse(student, teacher, row_mask.astype(student.dtype))
    return contrastive_loss2(student, teacher, mask=row_mask)

  def batch_loss(self, history: Array, user_id: Array | None, row_mask: Array, *,
                           deterministic: bool) -> Array:
    """beta * item contrastive + alpha * self-distillation over one device batch (weighted).

    Args:
      history: int [B, L] the batch's histories; user_id: int [B] or None (distillation off).
      row_mask: bool [B], False on the padding rows of the last batch.
    """
    loss = jnp.zeros((), jnp.float32)
    if self.item_reg_weight:
      loss = loss + self.item_reg_weight * self.item_contrastive_loss(history, row_mask)
    if self.distill_weight:
      if user_id is None:
        raise ValueError('LLM-ESR self-distillation needs the batch\'s user_id field.')
      loss = loss + self.distill_weight * self.distillation_loss(
          history, user_id, row_mask, deterministic=deterministic)
    return loss
