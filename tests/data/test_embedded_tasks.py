"""The embedded tasks' shared docstring walker, pinned to its output."""

import ast

from alignax.data import embedded
from alignax.data import preference_task
from alignax.data import retrieval_task


# Every branch of both walkers: async, methods, a property, a dunder, nested
# functions, a too-short summary, a docstring on the def line, no body.
WALKER_SOURCE = '''
"""Module docstring: not a function."""


def top_level(a, b):
  """Adds two numbers together, returning the sum.

  More text in a second paragraph.
  """
  total = a + b
  # a comment that stays
  return total


async def fetch_item(key):
  """Fetches one item from the remote store by its key."""
  value = await lookup(key)
  if value is None:
    raise KeyError(key)
  return value


class Store:
  """A class docstring is not a function."""

  def __init__(self):
    """Dunder methods are skipped by the preference task."""
    self.items = {}
    self.count = 0
    self.ready = True

  @property
  def size(self):
    """Returns the number of items held in the store."""
    n = len(self.items)
    m = self.count
    return n + m

  def short(self):
    """Too short."""
    return 1

  def one_line(self): """Docstring on the def line is skipped here."""; return 2

  def nested_outer(self):
    """Outer function with a nested documented helper inside."""
    def nested_inner(x):
      """Inner helper that doubles its argument twice over."""
      y = x * 2
      z = y * 2
      return z
    return nested_inner


def no_doc(x):
  return x


def only_doc():
  """This function has a docstring and nothing else at all."""
'''

# Computed before the two walkers became embedded.documented_functions.
WANT_NAMES = [
    ('top_level', 'Adds two numbers together, returning the sum.'),
    ('fetch_item', 'Fetches one item from the remote store by its key.'),
    ('only_doc', 'This function has a docstring and nothing else at all.'),
    ('size', 'Returns the number of items held in the store.'),
    ('short', 'Too short.'),
    ('one_line', 'Docstring on the def line is skipped here.'),
    ('nested_outer', 'Outer function with a nested documented helper inside.'),
    ('nested_inner', 'Inner helper that doubles its argument twice over.'),
]
WANT_PAIRS = [  # (query, name, code lines)
    ('Adds two numbers together, returning the sum.', 'doc.py:5', [
        'def top_level(a, b):',
        '  total = a + b',
        '  # a comment that stays',
        '  return total',
    ]),
    ('Fetches one item from the remote store by its key.', 'doc.py:15', [
        'async def fetch_item(key):',
        '  value = await lookup(key)',
        '  if value is None:',
        '    raise KeyError(key)',
        '  return value',
    ]),
    ('Dunder methods are skipped by the preference task.', 'doc.py:26', [
        'def __init__(self):',
        '  self.items = {}',
        '  self.count = 0',
        '  self.ready = True',
    ]),
    ('Returns the number of items held in the store.', 'doc.py:33', [
        'def size(self):',
        '  n = len(self.items)',
        '  m = self.count',
        '  return n + m',
    ]),
    ('Outer function with a nested documented helper inside.', 'doc.py:45', [
        'def nested_outer(self):',
        '  def nested_inner(x):',
        '    """Inner helper that doubles its argument twice over."""',
        '    y = x * 2',
        '    z = y * 2',
        '    return z',
        '  return nested_inner',
    ]),
    ('Inner helper that doubles its argument twice over.', 'doc.py:47', [
        'def nested_inner(x):',
        '  y = x * 2',
        '  z = y * 2',
        '  return z',
    ]),
]


def test_walker_finds_documented_functions_in_walk_order():
  found = embedded.documented_functions(WALKER_SOURCE)
  assert [n.name for n, _ in found] == [
      "top_level", "fetch_item", "only_doc", "__init__", "size", "short",
      "one_line", "nested_outer", "nested_inner"]
  assert isinstance(found[1][0], ast.AsyncFunctionDef)
  raw = dict((n.name, d) for n, d in embedded.documented_functions(
      WALKER_SOURCE, clean=False))
  assert raw["top_level"].endswith("paragraph.\n  ")  # indentation kept
  assert embedded.documented_functions("def broken(:\n") == []


def test_preference_task_names_are_unchanged():
  assert preference_task._functions_of(WALKER_SOURCE) == WANT_NAMES


def test_retrieval_task_pairs_are_unchanged():
  got = retrieval_task.function_pairs(WALKER_SOURCE, "doc.py")
  assert [(p["query"], p["name"], p["positive"].split("\n"))
          for p in got] == WANT_PAIRS
