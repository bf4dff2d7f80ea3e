"""A small text corpus that ships with every Python: stdlib sources + pydoc.

The corpus lets demos, tests and notebooks train on real text without a
download. Documents are

* every ``.py`` file under ``sysconfig.get_paths()['stdlib']`` (sorted by
  path), except ``site-packages``, test directories (``test``, ``tests``,
  ``idlelib``, ``lib2to3``), build-specific files (``_sysconfigdata*``,
  ``config-*``), files larger than 200 KB and files that are not UTF-8; named
  ``stdlib/<relative/posix/path>``, e.g. ``stdlib/json/decoder.py``;
* every entry of ``pydoc_data.topics.topics`` (sorted by key), named
  ``pydoc/topic/<key>``.

The train / held-out split hashes the document name (``sha1``), so it does not
depend on the machine, the file system order or the other documents: two
machines with the same Python version agree on it, and later tasks built from
the same documents (docstring -> code retrieval, preferences) can exclude the
held-out documents with :func:`is_heldout`.
"""

import ast
import functools
import hashlib
import os
import sysconfig

# Directory names whose contents are tests, fixtures or machine-specific.
_SKIP_DIRS = frozenset(
    {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_MAX_FILE_BYTES = 200_000
SPLITS = ("train", "heldout")


def is_heldout(name, fraction=0.02):
  """Whether the document called ``name`` belongs to the held-out split.

  Args:
    name: the document's stable name, e.g. ``'stdlib/json/decoder.py'``.
    fraction: the expected held-out fraction, in ``[0, 1]``.

  Returns:
    True for roughly ``fraction`` of all names, the same on every machine.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"heldout fraction must be in [0, 1], got {fraction}.")
  digest = hashlib.sha1(name.encode("utf-8")).digest()
  # The first 8 bytes of sha1 are uniform over [0, 2**64).
  return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def documented_functions(text, *, clean=True):
  """The functions and methods of Python source that have a docstring.

  The one AST walk behind the embedded tasks (docstring -> name preferences
  in :mod:`alignax.data.preference_task`, docstring -> code retrieval in
  :mod:`alignax.data.retrieval_task`).

  Args:
    text: Python source.
    clean: whether docstrings are cleaned (``ast.get_docstring``'s
      ``clean``: ``inspect.cleandoc`` whitespace).

  Returns:
    ``[(node, docstring)]`` for every ``FunctionDef`` / ``AsyncFunctionDef``
    with a non-empty docstring, in ``ast.walk`` order (breadth first);
    ``[]`` for text that does not parse.
  """
  try:
    tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return []
  found = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      docstring = ast.get_docstring(node, clean=clean)
      if docstring:
        found.append((node, docstring))
  return found


def _skip_dir(dirname):
  return dirname in _SKIP_DIRS or dirname.startswith("config-")


def _stdlib_documents(root):
  """Yields ``{'name', 'text'}`` for the stdlib sources under ``root``."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not _skip_dir(d)]
    for filename in filenames:
      if filename.endswith(".py") and not filename.startswith("_sysconfigdata"):
        paths.append(os.path.join(dirpath, filename))
  for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
    if os.path.getsize(path) > _MAX_FILE_BYTES:
      continue
    with open(path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue  # A handful of legacy files; skipping keeps the corpus UTF-8.
    relative = os.path.relpath(path, root).replace(os.sep, "/")
    yield {"name": f"stdlib/{relative}", "text": text}


def _pydoc_documents():
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  for key in sorted(topics.topics):
    yield {"name": f"pydoc/topic/{key}", "text": topics.topics[key]}


@functools.lru_cache(maxsize=None)
def _all_documents():
  root = sysconfig.get_paths()["stdlib"]
  return tuple(list(_stdlib_documents(root)) + list(_pydoc_documents()))


@functools.lru_cache(maxsize=None)
def _split_documents(split, heldout_fraction):
  want_heldout = split == "heldout"
  return tuple(doc for doc in _all_documents()
               if is_heldout(doc["name"], heldout_fraction) == want_heldout)


def embedded_documents(split, heldout_fraction=0.02):
  """The documents of one split of the embedded corpus, in a fixed order.

  Args:
    split: ``'train'`` or ``'heldout'``.
    heldout_fraction: expected fraction of documents in ``'heldout'``.

  Returns:
    a new list of ``{'name': str, 'text': str}`` dicts (the dicts are shared
    with the in-process cache: do not mutate them).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  return list(_split_documents(split, float(heldout_fraction)))
