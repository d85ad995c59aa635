"""Item texts -> language embeddings: all-MiniLM-L6-v2 in Flax, a disk cache, and file readers."""

from alphafuse_jax.text.cache import embed_items
from alphafuse_jax.text.cache import embed_texts_cached
from alphafuse_jax.text.encoder import encode_texts
from alphafuse_jax.text.encoder import find_model_dir
from alphafuse_jax.text.encoder import INSTALL_COMMAND
from alphafuse_jax.text.encoder import MiniLMEncoder
from alphafuse_jax.text.encoder import ModelNotFoundError
from alphafuse_jax.text.bert import WeightsError
from alphafuse_jax.text.readers import EmbeddingFileError
from alphafuse_jax.text.readers import load_embeddings
from alphafuse_jax.text.template import format_item_text
from alphafuse_jax.text.template import format_item_texts
from alphafuse_jax.text.template import TemplateError

__all__ = [
    'EmbeddingFileError', 'INSTALL_COMMAND', 'MiniLMEncoder', 'ModelNotFoundError',
    'TemplateError', 'WeightsError', 'embed_items', 'embed_texts_cached', 'encode_texts',
    'find_model_dir', 'format_item_text', 'format_item_texts', 'load_embeddings',
]
