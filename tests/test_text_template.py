"""Tests for item-text templates (alphafuse_jax.text.template)."""

import json
import pathlib

import pytest

from alphafuse_jax import text
from configs import default

TOY_STORY = {'title': 'Toy Story', 'year': '1995', 'genres': ['Animation', "Children's", 'Comedy']}
HEAT = {'title': 'Heat', 'year': '1995', 'genres': ['Action', 'Crime', 'Thriller']}
GOLDEN = pathlib.Path(__file__).parent / 'fixtures' / 'minilm_golden.json'


def test_default_template_gives_the_golden_fixture_texts():
  # The golden embeddings were made for exactly these strings.
  golden_texts = [item['text'] for item in json.loads(GOLDEN.read_text())['items']]
  template = default.get_config().text.template
  assert text.format_item_text(TOY_STORY, template) == golden_texts[2]
  assert text.format_item_text(HEAT, template) == golden_texts[3]
  assert golden_texts[2] == "Toy Story (1995); genres: Animation, Children's, Comedy"


def test_numbered_genres_and_missing_ones_are_empty():
  template = '{title} [{genre1}|{genre3}|{genre4}]'
  assert text.format_item_text(TOY_STORY, template) == 'Toy Story [Animation|Comedy|]'
  assert text.format_item_text({'title': 'X', 'genres': []}, template) == 'X [||]'
  assert text.format_item_text({'title': 'X', 'year': '2000'}, '{title}: {genres}') == 'X: '


def test_literal_braces_and_repeated_placeholders():
  assert text.format_item_text(HEAT, '{{{title}}} {title}') == '{Heat} Heat'


def test_numeric_years_print_without_decimals():
  assert text.format_item_text({'title': 'A', 'year': 1995.0}, '{year}') == '1995'
  assert text.format_item_text({'title': 'A', 'year': 1995}, '{year}') == '1995'


def test_many_items_in_order():
  assert text.format_item_texts([TOY_STORY, HEAT], '{title}/{genre2}') == [
      "Toy Story/Children's", 'Heat/Crime']


@pytest.mark.parametrize('template, match', [
    ('{title} {plot}', r'unknown placeholder \{plot\}; valid placeholders are \{title\}, '
                       r'\{year\}, \{genres\} and \{genreN\}'),
    ('{genre0}', r'unknown placeholder \{genre0\}'),
    ('{title.upper}', r'unknown placeholder \{title.upper\}'),
    ('{}', r'unknown placeholder \{\}'),
    ('{title!r}', 'may not have a format spec or conversion'),
    ('{title', 'malformed'),
])
def test_bad_templates(template, match):
  with pytest.raises(text.TemplateError, match=match):
    text.format_item_text(TOY_STORY, template)


def test_bad_fields_name_the_item():
  with pytest.raises(ValueError, match=r"item_fields\[1\] has no 'year' field"):
    text.format_item_texts([TOY_STORY, {'title': 'B', 'genres': []}], '{title} ({year})')
  with pytest.raises(TypeError, match=r"item_fields\[0\]\['genres'\] must be a list of str"):
    text.format_item_texts([{'title': 'A', 'genres': 'Action Crime'}], '{genres}')
  with pytest.raises(TypeError, match=r"item_fields\[0\]\['genres'\]\[1\] must be a str"):
    text.format_item_texts([{'title': 'A', 'genres': ['Action', 3]}], '{genre1}')
  with pytest.raises(TypeError, match=r"item_fields\[0\]\['title'\] must be a str"):
    text.format_item_texts([{'title': None}], '{title}')
