"""An embedded preference task: which name fits this docstring?

Built from the stdlib sources of :mod:`alignax.data.embedded`, so demos and
tests align a model without a download or hand-written labels. Each Python
function with a docstring gives one prompt::

  # Return the magic tag for .pyc files.
  def

and candidate responses ``"get_tag("``, ``"_comment_line("``, ... : the true
name plus ``K - 1`` distractors drawn from the other functions of the same
split (half of them sharing a word with the true name, so lists hold graded
near misses). A candidate's score is its similarity to the true name,
``difflib.SequenceMatcher(None, true, candidate).ratio()`` (1 for the true
name). Pairs are the true name against one distractor of the same draw, so
pairs and K-lists come from one source; binary records label a candidate
desirable when its score is above 1/2.

The split follows the corpus: functions of held-out documents
(:func:`alignax.data.embedded.is_heldout`, with the pretraining run's
fraction) are held out, so the evaluation measures generalisation to code the
pretrained model never saw. Every record is a pure function of
``(split, index)``: the same on every host and every run.
"""

import difflib
import functools
import hashlib
import re

import numpy as np

from alignax.data import embedded

FORMATS = ("pairs", "lists", "binary")
_MIN_SUMMARY_CHARS = 10
_MAX_SUMMARY_CHARS = 160


def _summary(docstring):
  """The first line of a docstring, or None when too short to describe."""
  lines = docstring.strip().split("\n")
  line = lines[0].strip() if lines else ""
  if len(line) < _MIN_SUMMARY_CHARS:
    return None
  return line[:_MAX_SUMMARY_CHARS]


def _is_dunder(name):
  return name.startswith("__") and name.endswith("__")


def _functions_of(text):
  """``(name, summary)`` of the documented functions of a source file."""
  out = []
  for node, doc in embedded.documented_functions(text):
    summary = None if _is_dunder(node.name) else _summary(doc)
    if summary:
      out.append((node.name, summary))
  return out


@functools.lru_cache(maxsize=None)
def documented_functions(split, heldout_fraction=0.02):
  """``((name, summary), ...)`` of one split, in corpus order.

  Args:
    split: ``'train'`` or ``'heldout'`` (of the embedded corpus).
    heldout_fraction: the corpus's held-out fraction (use the pretraining
      run's, so held-out functions were never trained on).
  """
  functions = []
  for doc in embedded.embedded_documents(split, heldout_fraction):
    if doc["name"].endswith(".py"):
      functions.extend(_functions_of(doc["text"]))
  return tuple(functions)


def _words(name):
  """Lower-case words of a snake_case or camelCase name."""
  spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
  return {w.lower() for w in spaced.split("_") if w}


@functools.lru_cache(maxsize=None)
def _names_by_word(split, heldout_fraction):
  names = sorted({name for name, _ in
                  documented_functions(split, heldout_fraction)})
  by_word = {}
  for name in names:
    for word in _words(name):
      by_word.setdefault(word, []).append(name)
  return names, by_word


def similarity(true_name, candidate):
  """The score of a candidate name: difflib's ratio, in ``[0, 1]``."""
  return difflib.SequenceMatcher(None, true_name, candidate).ratio()


class DocstringNames:
  """Random-access source of preference records (``__len__``/``__getitem__``).

  Args:
    split: ``'train'`` or ``'eval'`` (the corpus's ``'heldout'`` split).
    fmt: ``'pairs'`` (``prompt/chosen/rejected``), ``'lists'``
      (``prompt/responses/scores``) or ``'binary'``
      (``prompt/completion/label``), see :mod:`alignax.data.preference`.
    list_size: K candidates per draw (>= 2).
    repeats: independent distractor draws per function.
    heldout_fraction: the corpus's held-out fraction.
  """

  def __init__(self, split, fmt, *, list_size=4, repeats=4,
               heldout_fraction=0.02):
    if fmt not in FORMATS:
      raise ValueError(f"format {fmt!r} not in {FORMATS}.")
    if list_size < 2:
      raise ValueError(f"list_size must be >= 2, got {list_size}.")
    self._split = "train" if split == "train" else "heldout"
    self._fraction = float(heldout_fraction)
    self._functions = documented_functions(self._split, self._fraction)
    if not self._functions:
      raise ValueError(f"no documented functions in the {self._split} split "
                       f"(heldout_fraction={heldout_fraction}).")
    self._fmt, self._k, self._repeats = fmt, int(list_size), int(repeats)

  def __len__(self):
    return len(self._functions) * self._repeats

  def _rng(self, index):
    digest = hashlib.sha1(f"{self._split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))

  def _distractors(self, name, rng):
    """K - 1 distinct other names; half share a word with ``name`` if any."""
    names, by_word = _names_by_word(self._split, self._fraction)
    near = sorted({n for w in _words(name) for n in by_word.get(w, ())}
                  - {name})
    picked = []
    for pool, want in ((near, (self._k - 1) // 2), (names, self._k - 1)):
      for i in rng.permutation(len(pool)):
        if len(picked) >= want:
          break
        if pool[i] != name and pool[i] not in picked:
          picked.append(pool[i])
    return picked

  def candidates(self, index):
    """``(prompt, true name, [(candidate, score)] in random order)``."""
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)}).")
    name, summary = self._functions[index // self._repeats]
    rng = self._rng(index)
    cands = [name] + self._distractors(name, rng)
    cands = [cands[i] for i in rng.permutation(len(cands))]
    prompt = f"# {summary}\ndef "
    return prompt, name, [(c, similarity(name, c)) for c in cands]

  def __getitem__(self, index):
    prompt, name, scored = self.candidates(index)
    others = [c for c, _ in scored if c != name]
    if self._fmt == "pairs":
      return {"prompt": prompt, "chosen": name + "(",
              "rejected": others[0] + "("}
    if self._fmt == "lists":
      return {"prompt": prompt, "responses": [c + "(" for c, _ in scored],
              "scores": [float(s) for _, s in scored]}
    cand, score = scored[0]
    return {"prompt": prompt, "completion": cand + "(", "label": score > 0.5}

  def __repr__(self):
    return (f"DocstringNames({self._split}, {self._fmt}, K={self._k}, "
            f"len={len(self)})")
