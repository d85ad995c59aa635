"""Trained models in use: top-K recommendations, new items from their text, export for serving.

  from alphafuse_jax import serving
  rec = serving.Recommender.from_workdir('workdirs/default')
  rec.recommend(['Toy Story (1995)', 'Heat (1995)'], k=10, exclude_seen=True)
  rec = rec.add_items_from_text(['my-film'], [{'title': 'My Film', 'year': '2026',
                                               'genres': ['Drama']}])
  serving.export(rec, 'exported/', k=10)

Reads a finished workdir (`<workdir>/inference/` and `best/`), never the training data. The
command lines are `python -m alphafuse_jax.recommend` and `python -m alphafuse_jax.export`.
"""

from alphafuse_jax.serving.catalogue import Catalogue
from alphafuse_jax.serving.catalogue import ServingError
from alphafuse_jax.serving.exporting import export
from alphafuse_jax.serving.histories import read_histories
from alphafuse_jax.serving.histories import write_recommendations
from alphafuse_jax.serving.new_items import NewItems
from alphafuse_jax.serving.new_items import extend_model
from alphafuse_jax.serving.new_items import read as read_new_items
from alphafuse_jax.serving.recommender import Recommendation
from alphafuse_jax.serving.recommender import Recommender
from alphafuse_jax.serving.recommender import USER_ERRORS
from alphafuse_jax.serving.recommender import exit_on_input_error
from alphafuse_jax.serving.topk import top_k_chunked

__all__ = ['Catalogue', 'NewItems', 'Recommendation', 'Recommender', 'ServingError', 'USER_ERRORS',
           'exit_on_input_error', 'export', 'extend_model', 'read_histories', 'read_new_items',
           'top_k_chunked', 'write_recommendations']
