"""An embedded multi-attribute task: which name fits this docstring, and how?

The docstring -> function-name task of :mod:`alignax.data.preference_task`
(same prompts, same train / held-out split of the stdlib functions) with
candidates rated on several attributes, so multi-objective and causal
reward models train without a download. For a function ``get_tag`` the
candidates are

* ``get_tag``, the true name;
* ``getTag``, its camelCase spelling (right words, wrong style);
* ``get_tag_value_helper``, the name padded with filler words (verbose);
* ``get``, its first word (or, for one-word names, a truncation);
* the name of another function of the split (half the time one that shares
  a word with the true name).

Each response (the name plus ``"("``, as in the preference task) is rated
on four attributes, all computed, all in ``[0, 1]`` but ``length``:

============ ==============================================================
correctness  F1 of the candidate's words against the true name's words
             (case-insensitive, snake_case and camelCase split alike)
brevity      ``min(1, true words / candidate words)``: 1 unless padded
style        1 for a PEP 8 function name (``lower_case_with_underscores``,
             leading underscores allowed), else 0
length       characters of the name / 32: the deliberately spurious one
============ ==============================================================

The true quality of a response is ``utility = 0.6 correctness + 0.2 brevity
+ 0.2 style``; length is not part of it. Records come in two formats:

* ``ratings``: ``{"prompt", "response", "attributes": {name: score}}``, one
  random candidate per record, each attribute missing (left out) with
  probability ``missing`` (at least one kept): the stage-1 records of a
  multi-objective reward model;
* ``pairs``: ``{"prompt", "chosen", "rejected"}`` plus ``chosen_<a>`` /
  ``rejected_<a>`` for every attribute ``a`` and ``utility``: two candidates
  whose utilities differ by at least 0.1, the better one chosen. In the
  training split the chosen response is the longer one in a share
  ``length_bias`` of the pairs (default 0.85; held-out pairs: 0.5), a
  spurious length-preference correlation that a plain Bradley–Terry reward
  model can learn instead of the attributes.

Every record is a pure function of ``(split, format, index)``: the same on
every host and every run.
"""

import functools
import hashlib
import re

import numpy as np

from alignax.data import preference_task

ATTRIBUTES = ("correctness", "brevity", "style", "length")
UTILITY_WEIGHTS = {"correctness": 0.6, "brevity": 0.2, "style": 0.2}
FORMATS = ("ratings", "pairs")
_FILLERS = ("value", "data", "helper", "impl", "internal", "object", "item",
            "result", "info", "wrapper")
_PEP8 = re.compile(r"_*[a-z][a-z0-9]*(?:_[a-z0-9]+)*_*")
_MIN_GAP = 0.1  # utility gap of a pair
_LENGTH_SCALE = 32.0


def words(name):
  """Lower-case words of a snake_case or camelCase name, in order."""
  spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
  return [w.lower() for w in spaced.split("_") if w]


def correctness(true_name, candidate):
  """F1 of the candidate's word multiset against the true name's."""
  t, c = words(true_name), words(candidate)
  common = sum(min(t.count(w), c.count(w)) for w in set(c))
  if not common:
    return 0.0
  precision, recall = common / len(c), common / len(t)
  return 2 * precision * recall / (precision + recall)


def brevity(true_name, candidate):
  """1 unless the candidate has more words than the true name."""
  return min(1.0, max(len(words(true_name)), 1) / max(len(words(candidate)),
                                                        1))


def style(candidate):
  """1.0 for a PEP 8 function name, else 0.0."""
  return 1.0 if _PEP8.fullmatch(candidate) else 0.0


def length(candidate):
  """The spurious attribute: characters / 32."""
  return len(candidate) / _LENGTH_SCALE


def attributes(true_name, candidate):
  """``{attribute: score}`` of a candidate name (see the module docstring)."""
  return {"correctness": correctness(true_name, candidate),
          "brevity": brevity(true_name, candidate),
          "style": style(candidate), "length": length(candidate)}


def utility(attrs):
  """The true quality: the weighted attributes, without length."""
  return sum(w * attrs[a] for a, w in UTILITY_WEIGHTS.items())


def variants(name, other, rng):
  """The five candidate names of a draw (see the module docstring)."""
  ws = words(name) or [name.strip("_").lower() or "f"]
  lead = "_" * (len(name) - len(name.lstrip("_")))
  camel = lead + ws[0] + "".join(w.capitalize() for w in ws[1:])
  if camel == name:  # already camelCase (or one word): the other way round
    camel = lead + "_".join(ws) if name != lead + "_".join(ws) else (
        lead + ws[0].capitalize())
  extra = [_FILLERS[i] for i in rng.permutation(len(_FILLERS))[
      :1 + int(rng.integers(3))]]
  verbose = name + "_" + "_".join(extra)
  short = lead + ws[0] if len(ws) > 1 else name[:max(2, len(name) // 2)]
  return [name, camel, verbose, short, other]


@functools.lru_cache(maxsize=None)
def _names(split, heldout_fraction):
  """Sorted names of a split's functions, and ``{word: [names]}``."""
  names = sorted({n for n, _ in preference_task.documented_functions(
      split, heldout_fraction)})
  by_word = {}
  for name in names:
    for word in set(words(name)):
      by_word.setdefault(word, []).append(name)
  return names, by_word


class AttributeNames:
  """Random-access rating or pair records (``__len__`` / ``__getitem__``).

  Args:
    split: ``'train'`` or ``'eval'`` (the corpus's ``'heldout'`` split).
    fmt: ``'ratings'`` or ``'pairs'``.
    repeats: independent draws per function.
    heldout_fraction: the corpus's held-out fraction.
    length_bias: share of pairs whose chosen response is the longer; None =
      0.85 for the training split, 0.5 (no bias) for the held-out one.
    missing: probability that a rating record leaves an attribute out.
  """

  def __init__(self, split, fmt, *, repeats=4, heldout_fraction=0.02,
               length_bias=None, missing=0.2):
    if fmt not in FORMATS:
      raise ValueError(f"format {fmt!r} not in {FORMATS}.")
    self._split = "train" if split == "train" else "heldout"
    self._fraction = float(heldout_fraction)
    self._functions = preference_task.documented_functions(self._split,
                                                           self._fraction)
    if not self._functions:
      raise ValueError(f"no documented functions in the {self._split} split "
                       f"(heldout_fraction={heldout_fraction}).")
    if length_bias is None:
      length_bias = 0.85 if self._split == "train" else 0.5
    if not 0.0 <= length_bias <= 1.0 or not 0.0 <= missing < 1.0:
      raise ValueError(f"length_bias={length_bias} must be in [0, 1] and "
                       f"missing={missing} in [0, 1).")
    self._fmt, self._repeats = fmt, int(repeats)
    self._bias, self._missing = float(length_bias), float(missing)

  def __len__(self):
    return len(self._functions) * self._repeats

  def _rng(self, index):
    key = f"attributes/{self._split}/{self._fmt}/{index}".encode()
    digest = hashlib.sha1(key).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))

  def _other(self, name, rng):
    """Another function's name; half the time one sharing a word."""
    names, by_word = _names(self._split, self._fraction)
    near = sorted({n for w in words(name) for n in by_word.get(w, ())}
                  - {name})
    pool = near if near and rng.random() < 0.5 else names
    for i in rng.permutation(len(pool)):
      if pool[i] != name:
        return pool[i]
    return name + "_other"  # a split of one function

  def candidates(self, index):
    """``(prompt, true name, [(candidate, attributes)])`` of a record."""
    return self._draw(index)[:3]

  def _draw(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)}).")
    name, summary = self._functions[index // self._repeats]
    rng = self._rng(index)
    cands = variants(name, self._other(name, rng), rng)
    seen, out = set(), []
    for c in cands:  # a short name's camel form can repeat another
      if c not in seen:
        seen.add(c)
        out.append((c, attributes(name, c)))
    return f"# {summary}\ndef ", name, out, rng

  def __getitem__(self, index):
    prompt, _, scored, rng = self._draw(index)
    if self._fmt == "ratings":
      return self._rating(prompt, scored, rng)
    return self._pair(prompt, scored, rng)

  def _rating(self, prompt, scored, rng):
    cand, attrs = scored[int(rng.integers(len(scored)))]
    keep = rng.random(len(ATTRIBUTES)) >= self._missing
    keep[int(rng.integers(len(ATTRIBUTES)))] = True  # at least one rating
    return {"prompt": prompt, "response": cand + "(",
            "attributes": {a: float(attrs[a])
                           for a, k in zip(ATTRIBUTES, keep) if k}}

  def _pair(self, prompt, scored, rng):
    longer, shorter, other = [], [], []
    for a, attrs_a in scored:
      for b, attrs_b in scored:
        gap = utility(attrs_a) - utility(attrs_b)
        if gap >= _MIN_GAP and len(a) != len(b):
          (longer if len(a) > len(b) else shorter).append((a, b))
        elif gap > 0:
          other.append((a, b))
    if longer and shorter:
      group = longer if rng.random() < self._bias else shorter
    else:  # no choice to bias (rare: names of one or two letters)
      group = longer or shorter or other
    chosen, rejected = group[int(rng.integers(len(group)))]
    attrs = dict(scored)
    out = {"prompt": prompt, "chosen": chosen + "(",
           "rejected": rejected + "("}
    for side, cand in (("chosen", chosen), ("rejected", rejected)):
      out.update({f"{side}_{a}": float(v) for a, v in attrs[cand].items()})
      out[f"{side}_utility"] = float(utility(attrs[cand]))
    return out

  def __repr__(self):
    return (f"AttributeNames({self._split}, {self._fmt}, len={len(self)})")
