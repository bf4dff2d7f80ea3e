"""Tokenizers with reserved UL2 ids: SentencePiece (trained + cached) or HF.

Id layout of a :class:`Tokenizer` with ``V`` total ids::

  [0, base)                 the backend's vocabulary (pad = 0)
  [base, ...)               [BOS] / [EOS] when the backend has none
  next 3                    UL2 mode tokens [NLU] [NLG] [S2S]
  ...                       unused ids when ``vocab_size`` is padded up
  [V - num_sentinels, V)    sentinels, counting down: <extra_id_i> = V - 1 - i

Encoding never produces a reserved id from text (the string ``"[NLU]"`` is
encoded as ordinary characters); the UL2 transforms insert them by id, and
:meth:`Tokenizer.decode` renders them as ``[NLU]`` or ``<extra_id_7>``.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile

from alignax.data import embedded

MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
# SentencePiece maps ' ' to U+2581 and back, so a literal U+2581 in the text
# would decode as a space; it is encoded as its UTF-8 byte pieces instead.
_SPM_SPACE = "\u2581"
_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]",
                   "<|endoftext|>")
_EOS_CANDIDATES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>",
                   "[SEP]")


class _SentencePieceBackend:
  """Base vocabulary from a SentencePiece model (serialized proto bytes)."""

  def __init__(self, model_proto):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    space_bytes = [f"<0x{b:02X}>" for b in _SPM_SPACE.encode("utf-8")]
    self._space_ids = [self._sp.piece_to_id(p) for p in space_bytes]
    if any(self._sp.id_to_piece(i) != p
           for i, p in zip(self._space_ids, space_bytes)):
      self._space_ids = None  # No byte fallback: U+2581 cannot round-trip.

  def encode(self, text):
    if self._space_ids is None or _SPM_SPACE not in text:
      return self._sp.encode(text)
    ids = []
    for i, part in enumerate(text.split(_SPM_SPACE)):
      if i:
        ids.extend(self._space_ids)
      ids.extend(self._sp.encode(part))
    return ids

  def encode_batch(self, texts):
    if any(_SPM_SPACE in t for t in texts):
      return [self.encode(t) for t in texts]
    return self._sp.encode(list(texts))

  def decode(self, ids):
    return self._sp.decode(ids)


class _HfBackend:
  """Base vocabulary from a Hugging Face ``tokenizers`` tokenizer.json."""

  def __init__(self, path, bos_token=None, eos_token=None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._tok = tokenizers.Tokenizer.from_file(os.fspath(path))
    self.size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._find(bos_token, _BOS_CANDIDATES)
    self.eos_id = self._find(eos_token, _EOS_CANDIDATES)

  def _find(self, token, candidates):
    if token is not None:
      token_id = self._tok.token_to_id(token)
      if token_id is None:
        raise ValueError(f"Token {token!r} is not in the tokenizer's vocab.")
      return token_id
    for candidate in candidates:
      token_id = self._tok.token_to_id(candidate)
      if token_id is not None:
        return token_id
    return None

  def encode(self, text):
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts):
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def decode(self, ids):
    return self._tok.decode(ids, skip_special_tokens=False)


class Tokenizer:
  """A base vocabulary plus reserved ids (see the module docstring).

  Args:
    backend: an object with ``encode``, ``encode_batch``, ``decode``,
      ``size`` (base vocabulary size), ``bos_id`` and ``eos_id`` (``None``
      when the base vocabulary lacks them; they are then reserved).
    num_sentinels: number of ``<extra_id_i>`` sentinels at the top.
    vocab_size: total number of ids; ``None`` for the smallest that fits.
      Larger values (e.g. padded to a multiple of 128) leave unused ids
      between the mode tokens and the sentinels.
  """

  def __init__(self, backend, *, num_sentinels=100, vocab_size=None):
    self._backend = backend
    self._base = backend.size
    self._num_sentinels = int(num_sentinels)
    if self._num_sentinels < 0:
      raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}.")
    next_id = self._base
    self._extra = {}  # Reserved non-sentinel id -> rendering.
    ids = {}
    for name, base_id in (("[BOS]", backend.bos_id), ("[EOS]", backend.eos_id)):
      if base_id is None:
        base_id, next_id = next_id, next_id + 1
        self._extra[base_id] = name
      ids[name] = base_id
    self._bos_id, self._eos_id = ids["[BOS]"], ids["[EOS]"]
    self._mode_ids = {}
    for name in MODE_TOKENS:
      self._mode_ids[name] = next_id
      self._extra[next_id] = name
      next_id += 1
    needed = next_id + self._num_sentinels
    if vocab_size is None:
      vocab_size = needed
    if vocab_size < needed:
      raise ValueError(
          f"vocab_size={vocab_size} is too small: the base vocabulary has "
          f"{self._base} ids and {needed - self._base} more are reserved.")
    self._vocab_size = int(vocab_size)
    self._first_sentinel_bottom = self._vocab_size - self._num_sentinels

  @property
  def vocab_size(self):
    """Total number of ids, reserved ones included (the model's vocab)."""
    return self._vocab_size

  @property
  def base_vocab_size(self):
    return self._base

  @property
  def pad_id(self):
    """Always 0; padding is also marked by ``segment_ids == 0``."""
    return 0

  @property
  def bos_id(self):
    return self._bos_id

  @property
  def eos_id(self):
    return self._eos_id

  @property
  def num_sentinels(self):
    return self._num_sentinels

  def sentinel_id(self, i):
    """Id of ``<extra_id_i>``: ``vocab_size - 1 - i`` (T5 convention)."""
    if not 0 <= i < self._num_sentinels:
      raise ValueError(f"sentinel index {i} not in [0, {self._num_sentinels}).")
    return self._vocab_size - 1 - i

  def mode_id(self, name):
    """Id of a UL2 mode token, one of ``MODE_TOKENS``."""
    if name not in self._mode_ids:
      raise ValueError(f"Unknown mode token {name!r}; valid: {MODE_TOKENS}.")
    return self._mode_ids[name]

  def is_reserved(self, token_id):
    """Whether ``token_id`` lies above the base vocabulary."""
    return self._base <= token_id < self._vocab_size

  def encode(self, text):
    """Token ids of ``text`` (no BOS/EOS added), as a list of ints."""
    return list(self._backend.encode(text))

  def encode_batch(self, texts):
    return [list(ids) for ids in self._backend.encode_batch(texts)]

  def _render(self, token_id):
    if token_id >= self._first_sentinel_bottom:
      return f"<extra_id_{self._vocab_size - 1 - token_id}>"
    return self._extra.get(token_id, f"<unused_{token_id}>")

  def decode(self, ids):
    """Text of ``ids``; reserved ids render as ``[NLU]``, ``<extra_id_3>``."""
    pieces, run = [], []
    for token_id in map(int, ids):
      if not 0 <= token_id < self._vocab_size:
        raise ValueError(f"id {token_id} not in [0, {self._vocab_size}).")
      if token_id < self._base:
        run.append(token_id)
        continue
      if run:
        pieces.append(self._backend.decode(run))
        run = []
      pieces.append(self._render(token_id))
    if run:
      pieces.append(self._backend.decode(run))
    return "".join(pieces)


def _sentencepiece_settings(vocab_size, model_type):
  return dict(
      vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
      pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      # Keep text exactly: no normalization, no whitespace folding, no
      # dummy prefix; newline is a piece of its own (lines are the unit of
      # SentencePiece training, so no learned piece could contain it).
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=False, allow_whitespace_only_pieces=True,
      split_digits=True, user_defined_symbols=["\n"],
      max_sentence_length=16384, character_coverage=0.9999,
      # The learned pieces depend on the thread count: fixing it makes every
      # host train the same model.
      num_threads=2)


def _training_lines(documents, max_chars):
  """Non-blank lines of ``documents``, subsampled to about ``max_chars``."""
  lines = [line for text in documents for line in text.split("\n")
           if line.strip()]
  total = sum(map(len, lines))
  stride = max(1, -(-total // max_chars))  # Evenly spaced, deterministic.
  return lines[::stride]


def _train_sentencepiece(lines, path, settings):
  """Trains a SentencePiece model on ``lines`` and writes it to ``path``."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  with open(path, "wb") as f:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                   model_writer=f, minloglevel=2, **settings)


@contextlib.contextmanager
def _file_lock(path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def train_or_load_sentencepiece(cache_dir, vocab_size, num_sentinels=100,
                                documents=None, *, model_type="bpe",
                                max_chars=20_000_000):
  """A SentencePiece :class:`Tokenizer`, trained once and cached on disk.

  The model file is ``cache_dir/spm_v{vocab_size}_{hash}.model`` where the
  hash covers the trainer settings and the training lines, so a later call
  with the same arguments loads it instead of training (``num_sentinels``
  only shapes the reserved ids, not the file). A file lock plus
  write-then-rename keeps concurrent processes from training twice or reading
  a partial file.

  Args:
    cache_dir: local directory for the model file (created if missing).
    vocab_size: number of SentencePiece pieces (the base vocabulary); the
      tokenizer has ``vocab_size + 3 + num_sentinels`` ids in all.
    num_sentinels: number of ``<extra_id_i>`` sentinels.
    documents: iterable of training texts; default the embedded corpus's
      train split.
    model_type: ``'bpe'`` or ``'unigram'``.
    max_chars: training input budget; lines are subsampled evenly past it.

  Returns:
    a :class:`Tokenizer`.
  """
  if "://" in os.fspath(cache_dir):
    raise ValueError(f"tokenizer cache_dir must be a local directory, got "
                     f"{cache_dir!r}; set tokenizer.cache_dir to a local path.")
  if documents is None:
    documents = [d["text"] for d in embedded.embedded_documents("train")]
  settings = _sentencepiece_settings(vocab_size, model_type)
  lines = _training_lines(documents, max_chars)
  digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
  for line in lines:
    digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir,
                      f"spm_v{vocab_size}_{digest.hexdigest()[:16]}.model")
  with _file_lock(path + ".lock"):
    if not os.path.exists(path):
      fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".model.tmp")
      os.close(fd)
      try:
        _train_sentencepiece(lines, tmp, settings)
        os.replace(tmp, path)
      except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed for "
                         f"vocab_size={vocab_size}: {e}") from e
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)
  return load_sentencepiece(path, num_sentinels)


def load_sentencepiece(path, num_sentinels=100, *, vocab_size=None):
  """A :class:`Tokenizer` from an existing SentencePiece ``.model`` file."""
  with open(path, "rb") as f:
    backend = _SentencePieceBackend(f.read())
  return Tokenizer(backend, num_sentinels=num_sentinels, vocab_size=vocab_size)


def load_hf_tokenizer(path, num_sentinels=100, *, vocab_size=None,
                      bos_token=None, eos_token=None):
  """A :class:`Tokenizer` from a Hugging Face ``tokenizer.json`` file.

  BOS/EOS are the named tokens, else the first of the usual names found in
  the vocabulary (``</s>``, ``<|endoftext|>``, ...), else reserved ids. Id 0
  is the pad id of the batch format even when it is a real token of the base
  vocabulary: padding is identified by ``segment_ids == 0``.
  """
  backend = _HfBackend(path, bos_token=bos_token, eos_token=eos_token)
  return Tokenizer(backend, num_sentinels=num_sentinels, vocab_size=vocab_size)


def build_tokenizer(tok_cfg, workdir):
  """Builds the tokenizer described by ``tok_cfg``.

  Args:
    tok_cfg: ml_collections config with ``kind`` (``'sentencepiece'`` or
      ``'hf'``), ``vocab_size`` (SentencePiece pieces to train; unused for
      an existing model), ``num_sentinels``, ``path`` (an existing
      ``.model`` / ``tokenizer.json``; for SentencePiece, empty = train on the
      embedded corpus) and ``cache_dir`` (default ``<workdir>/tokenizer``).
    workdir: the run's directory.

  Returns:
    a :class:`Tokenizer` with the smallest id range that fits (the model
    config may pad its vocabulary further).
  """
  kind = tok_cfg.kind
  num_sentinels = tok_cfg.get("num_sentinels", 100)
  vocab_size = tok_cfg.get("vocab_size") or None
  path = tok_cfg.get("path") or None
  if kind == "hf":
    if path is None:
      raise ValueError("tokenizer.kind='hf' needs tokenizer.path "
                       "(a tokenizer.json file).")
    return load_hf_tokenizer(path, num_sentinels)
  if kind != "sentencepiece":
    raise ValueError(f"Unknown tokenizer kind {kind!r}; valid: "
                     "('sentencepiece', 'hf').")
  if path is not None:
    return load_sentencepiece(path, num_sentinels)
  if vocab_size is None:
    raise ValueError("Training a SentencePiece model needs "
                     "tokenizer.vocab_size.")
  cache_dir = tok_cfg.get("cache_dir") or os.path.join(workdir, "tokenizer")
  return train_or_load_sentencepiece(cache_dir, vocab_size, num_sentinels)
