"""Item text from item fields: '{title} ({year}); genres: {genres}' and friends.

Fields come from the data layer as {'title': str, 'year': str, 'genres': [str, ...]}. Placeholders:
{title}, {year}, {genres} (all genres joined by ', ') and {genre1}, {genre2}, ... (one genre each,
'' when the item has fewer). Literal braces are written '{{' and '}}'.
"""

from __future__ import annotations

import re
import string
from typing import Any, Mapping, Sequence

_SIMPLE = ('title', 'year', 'genres')
_GENRE_N = re.compile(r'genre([1-9][0-9]*)')
VALID_PLACEHOLDERS = '{title}, {year}, {genres} and {genreN} for N = 1, 2, ...'


class TemplateError(ValueError):
  """The template uses a placeholder or syntax that item texts do not support."""


def template_fields(template: str) -> list[str]:
  """The placeholder names a template uses, in order; raises TemplateError for unknown ones."""
  if not isinstance(template, str):
    raise TemplateError(f'template must be a str, got {type(template).__name__}.')
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise TemplateError(f'template {template!r} is malformed ({e}); write literal braces as '
                        '{{ and }}.') from e
  names = []
  for _, name, spec, conversion in parsed:
    if name is None:
      continue
    if name not in _SIMPLE and not _GENRE_N.fullmatch(name):
      raise TemplateError(f'template {template!r} has the unknown placeholder {{{name}}}; valid '
                          f'placeholders are {VALID_PLACEHOLDERS}.')
    if spec or conversion:
      # Format specs and conversions would be applied to strings and are almost surely mistakes.
      raise TemplateError(f'template {template!r}: placeholder {{{name}}} may not have a format '
                          'spec or conversion (!r, :>10, ...); use a bare {name}.')
    names.append(name)
  return names


def _as_text(value: Any, what: str) -> str:
  """Year/title values as text: ints and integral floats (1995.0) print without decimals."""
  if isinstance(value, str):
    return value
  if isinstance(value, bool) or value is None:
    raise TypeError(f'{what} must be a str, got {value!r}.')
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  if isinstance(value, (int, float)):
    return str(value)
  raise TypeError(f'{what} must be a str, got {type(value).__name__} {value!r:.60}.')


def _genres(fields: Mapping[str, Any], where: str) -> list[str]:
  genres = fields.get('genres')
  if genres is None:
    return []
  # A bare string would be joined letter by letter: refuse it rather than guess a separator.
  if isinstance(genres, str) or not isinstance(genres, Sequence):
    raise TypeError(f"{where}['genres'] must be a list of str, got {type(genres).__name__} "
                    f'{genres!r:.60}.')
  for i, genre in enumerate(genres):
    if not isinstance(genre, str):
      raise TypeError(f"{where}['genres'][{i}] must be a str, got {type(genre).__name__}.")
  return list(genres)


def _format(fields: Mapping[str, Any], template: str, names: list[str], where: str) -> str:
  if not isinstance(fields, Mapping):
    raise TypeError(f'{where} must be a dict of item fields, got {type(fields).__name__}.')
  values: dict[str, str] = {}
  genres = None
  for name in names:
    if name in values:
      continue
    if name in ('title', 'year'):
      if name not in fields:
        raise ValueError(f'{where} has no {name!r} field, which template {template!r} uses; '
                       f'it has {sorted(fields)}.')
      values[name] = _as_text(fields[name], f"{where}['{name}']")
    else:
      genres = _genres(fields, where) if genres is None else genres
      if name == 'genres':
        values[name] = ', '.join(genres)
      else:
        k = int(_GENRE_N.fullmatch(name).group(1))
        values[name] = genres[k - 1] if k <= len(genres) else ''
  return template.format(**values)


def format_item_text(fields: Mapping[str, Any], template: str) -> str:
  """One item's text, e.g. {'title': 'Heat', 'year': '1995', 'genres': ['Action', 'Crime']}
  with '{title} ({year}); genres: {genres}' -> 'Heat (1995); genres: Action, Crime'."""
  return _format(fields, template, template_fields(template), 'fields')


def format_item_texts(list_of_fields: Sequence[Mapping[str, Any]], template: str) -> list[str]:
  """Texts for many items (the template is checked once); errors name the item index."""
  names = template_fields(template)
  return [_format(fields, template, names, f'item_fields[{i}]')
          for i, fields in enumerate(list_of_fields)]
