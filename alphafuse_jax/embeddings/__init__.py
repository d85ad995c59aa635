"""Item-embedding modules (Flax linen): AlphaFuse and the paper's baselines behind one base class.

  base.py       the contract (`ItemEmbedding`), frozen host tables, ID-table initialisers
  pipelines.py  the modules: ID, LLMInit, AlphaFuse, MoRec/WhitenRec, UniSRec, RLMRec, LLM-ESR's
                item side, iDreamRec's frozen table
  variants.py   variants beyond the paper under their own names: AlphaFuse-Anchor
  registry.py   the registry of named pipelines (`PIPELINES`, the one list) and the factory
"""

from alphafuse_jax.embeddings.base import FrozenTable
from alphafuse_jax.embeddings.base import ID_INITS
from alphafuse_jax.embeddings.base import ItemEmbedding
from alphafuse_jax.embeddings.base import id_initializer
from alphafuse_jax.embeddings.base import sparse_init
from alphafuse_jax.embeddings.pipelines import AdapterEmbedding
from alphafuse_jax.embeddings.pipelines import AlphaFuseEmbedding
from alphafuse_jax.embeddings.pipelines import FrozenLanguageEmbedding
from alphafuse_jax.embeddings.pipelines import IDEmbedding
from alphafuse_jax.embeddings.pipelines import LLMESREmbedding
from alphafuse_jax.embeddings.pipelines import MoEAdaptor
from alphafuse_jax.embeddings.pipelines import RLMREC_ALIGNMENTS
from alphafuse_jax.embeddings.pipelines import Reconstructor
from alphafuse_jax.embeddings.pipelines import RLMRecEmbedding
from alphafuse_jax.embeddings.pipelines import SemanticInitEmbedding
from alphafuse_jax.embeddings.pipelines import UniSRecEmbedding
from alphafuse_jax.embeddings.pipelines import cosine_alignment_loss
from alphafuse_jax.embeddings.registry import PIPELINES
from alphafuse_jax.embeddings.registry import REGISTRY
from alphafuse_jax.embeddings.registry import Pipeline
from alphafuse_jax.embeddings.registry import get_pipeline
from alphafuse_jax.embeddings.registry import make_item_embedding
from alphafuse_jax.embeddings.registry import pipelines_for
from alphafuse_jax.embeddings.registry import semantic_table
from alphafuse_jax.embeddings.variants import AnchoredAlphaFuseEmbedding
