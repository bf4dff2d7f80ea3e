"""An embedded retrieval task: find a stdlib function's code from its docstring.

Pairs are built from the Python sources of the embedded corpus
(:mod:`alignax.data.embedded`) with :mod:`ast`: for every function or method
with a docstring,

* the **query** is the docstring's first paragraph (its summary), with
  ``inspect.cleandoc`` whitespace;
* the **document** is the function's source text without the docstring
  lines, dedented (decorators dropped; comments and layout kept as written).

Functions are skipped when the summary has fewer than ``MIN_QUERY_WORDS``
words, the docstring shares a line with other code, or fewer than
``MIN_CODE_LINES`` non-blank lines remain. Repeated queries or documents keep
their first occurrence only, so every query has exactly one relevant
document.

The split is the corpus's: pairs of held-out documents
(:func:`alignax.data.embedded.is_heldout`) form the ``'heldout'`` split, so a
model pretrained on the ``'train'`` documents never saw the held-out code or
docstrings.
"""

import functools
import inspect
import textwrap

from alignax.data import embedded

MIN_QUERY_WORDS = 3
MIN_CODE_LINES = 3


def _summary(docstring):
  """First paragraph of a cleaned docstring, on one line."""
  paragraph = inspect.cleandoc(docstring).split("\n\n")[0]
  return " ".join(paragraph.split())


def _code_without_docstring(lines, node):
  """Source of ``node`` minus its docstring lines, or ``None`` if not clean."""
  doc = node.body[0]
  if doc.lineno <= node.lineno:  # def f(): """doc""" on one line
    return None
  if len(node.body) < 2 or node.body[1].lineno <= doc.end_lineno:
    return None  # nothing else in the body, or code on the docstring's line
  if lines[doc.lineno - 1][:doc.col_offset].strip():
    return None  # the docstring's first line holds other code
  kept = (lines[node.lineno - 1:doc.lineno - 1]
          + lines[doc.end_lineno:node.end_lineno])
  code = textwrap.dedent("\n".join(kept)).strip("\n")
  if sum(1 for line in code.split("\n") if line.strip()) < MIN_CODE_LINES:
    return None
  return code


def function_pairs(text, name):
  """``[{'query', 'positive', 'name'}]`` of the documented functions.

  Args:
    text: Python source.
    name: the document's name (used in the pairs' ``name``,
      ``'<name>:<line>'``).

  Returns:
    pairs in source order; ``[]`` for text that does not parse.
  """
  lines = text.split("\n")
  pairs = []
  for node, docstring in embedded.documented_functions(text, clean=False):
    query = _summary(docstring)
    code = _code_without_docstring(lines, node)
    if len(query.split()) >= MIN_QUERY_WORDS and code is not None:
      pairs.append({"query": query, "positive": code,
                    "name": f"{name}:{node.lineno}"})
  return sorted(pairs, key=lambda p: int(p["name"].rsplit(":", 1)[1]))


@functools.lru_cache(maxsize=None)
def _split_pairs(split, heldout_fraction):
  pairs, queries, docs = [], set(), set()
  for doc in embedded.embedded_documents(split, heldout_fraction):
    if not doc["name"].endswith(".py"):
      continue
    for pair in function_pairs(doc["text"], doc["name"]):
      if pair["query"] in queries or pair["positive"] in docs:
        continue
      queries.add(pair["query"])
      docs.add(pair["positive"])
      pairs.append(pair)
  return tuple(pairs)


def code_search_pairs(split, heldout_fraction=0.02):
  """The docstring -> code pairs of one split of the embedded corpus.

  Args:
    split: ``'train'`` or ``'heldout'`` (the embedded corpus's splits).
    heldout_fraction: the corpus's held-out fraction; use the pretraining
      run's ``data.heldout_fraction`` so that no held-out code was seen.

  Returns:
    a new list of ``{'query', 'positive', 'name'}`` dicts (shared with a
    cache: do not mutate them).
  """
  return list(_split_pairs(split, float(heldout_fraction)))


class CodeSearchSource:
  """Random-access grain source of :func:`code_search_pairs` records."""

  def __init__(self, split, heldout_fraction=0.02):
    self._pairs = code_search_pairs(split, heldout_fraction)
    if not self._pairs:
      raise ValueError(f"the {split!r} split of the embedded corpus "
                       f"(heldout_fraction={heldout_fraction}) has no "
                       "documented functions")

  def __len__(self):
    return len(self._pairs)

  def __getitem__(self, index):
    return dict(self._pairs[index])

  def __repr__(self):
    return f"CodeSearchSource(len={len(self)})"
