"""Item names <-> indices: original keys, display titles, and histories typed as text."""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Sequence

from alphafuse_jax import errors


class ServingError(errors.AlphafuseError):
  """Bad input to serving (unknown item, empty history, clashing new key, bad file): the
  message names the problem and the fix."""


def display_title(fields: Mapping[str, Any]) -> str:
  """'Toy Story (1995)' from {'title': 'Toy Story', 'year': '1995'}; the title alone without a
  year."""
  title, year = str(fields.get('title', '')).strip(), str(fields.get('year', '')).strip()
  return f'{title} ({year})' if year else title


class Catalogue:
  """The items a model ranks: index i <-> original key, with titles.

  An item is named by its key (compared as text, so 7 and '7' are the same item) or by its
  display title when that title is unique and no key reads the same.

  Attributes:
    keys: index -> original key; titles: index -> display title.
    num_trained: items the model trained on; indices from there on are new items.
  """

  def __init__(self, keys: Sequence[Any], fields: Sequence[Mapping[str, Any]],
               num_trained: int | None = None):
    self.keys = list(keys)
    self.titles = [display_title(f) for f in fields]
    self.num_trained = len(self.keys) if num_trained is None else num_trained
    self._index = {str(k): i for i, k in enumerate(self.keys)}
    by_title: dict[str, list[int]] = {}
    for i, title in enumerate(self.titles):
      if title and title not in self._index:
        by_title.setdefault(title, []).append(i)
    self._by_title = by_title

  def __len__(self) -> int:
    return len(self.keys)

  def is_new(self, index: int) -> bool:
    return index >= self.num_trained

  def closest(self, name: str, n: int = 5) -> list[str]:
    """Up to n keys or titles that read like `name` (difflib), best first."""
    names = list(self._index) + list(self._by_title)
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)

  def index(self, name: Any) -> int:
    """The index of the item named `name`; an unknown name suggests the closest ones."""
    text = str(name).strip()
    if text in self._index:
      return self._index[text]
    hits = self._by_title.get(text, [])
    if len(hits) == 1:
      return hits[0]
    if hits:
      raise ServingError(f'{text!r} is the title of {len(hits)} items (keys '
                         f'{[self.keys[i] for i in hits[:5]]}); name one by its key.')
    close = self.closest(text)
    hint = f'closest: {close}' if close else f'keys look like {self.keys[:3]}'
    raise ServingError(f'Unknown item {text!r}: not a key or title of the {len(self)} items '
                       f'({hint}). Items are named by their original key; add a new item with '
                       '--new_items.')

  def indices(self, names: Iterable[Any]) -> list[int]:
    """Indices of a history's items, oldest first; an empty history is an error."""
    if isinstance(names, (str, bytes)):
      raise ServingError(f'history must be a list of item keys, not the string {names!r}; '
                         'split it (or use parse_history).')
    indices = [self.index(name) for name in names]
    if not indices:
      raise ServingError('The history is empty: give at least one item key, oldest first.')
    return indices

  def parse_history(self, text: str) -> list[int]:
    """Indices of a comma-separated history ('Toy Story (1995),Heat (1995)').

    Keys may contain commas ('American President, The (1995)'): at each position the longest
    run of comma-separated pieces that names an item wins.
    """
    pieces = text.split(',')
    if not text.strip():
      raise ServingError('The history is empty: pass --history="key1,key2,..." (oldest first).')
    indices, start = [], 0
    while start < len(pieces):
      for end in range(len(pieces), start, -1):
        name = ','.join(pieces[start:end]).strip()
        if name in self._index or len(self._by_title.get(name, ())) == 1:
          indices.append(self.index(name))
          start = end
          break
      else:
        if not pieces[start].strip():
          raise ServingError(f'Empty item name at position {len(indices) + 1} of the history '
                             f'{text!r}; remove the extra comma.')
        self.index(pieces[start])  # Raises with the closest names.
    return indices

  def extended(self, keys: Sequence[Any], fields: Sequence[Mapping[str, Any]]) -> 'Catalogue':
    """This catalogue plus new items; a key that is empty, repeated or already taken is an
    error."""
    seen: set[str] = set()
    for key in keys:
      text = str(key).strip()
      if not text:
        raise ServingError('A new item has an empty key; give every new item a key.')
      if text in seen:
        raise ServingError(f'New item key {text!r} appears twice; keys must be unique.')
      seen.add(text)
    clash = [k for k in keys if str(k).strip() in self._index]
    if clash:
      raise ServingError(f'New item key(s) {clash[:5]} already name catalogue items; give the '
                         'new items keys of their own (catalogue items are ranked already).')
    return Catalogue(self.keys + list(keys), [{'title': t} for t in self.titles] + list(fields),
                     self.num_trained)
