"""alphafuse-jax: AlphaFuse (SIGIR'25) in JAX/Flax.

Learn ID embeddings for sequential recommendation in the null space of language embeddings.
"""

__version__ = "0.1.0"
