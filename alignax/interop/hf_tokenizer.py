"""An alignax tokenizer as a Hugging Face ``tokenizer.json`` directory.

A run's :class:`alignax.data.tokenizer.Tokenizer` is a base vocabulary
(a SentencePiece model or a ``tokenizers`` tokenizer) plus reserved ids
above it (``[BOS]``/``[EOS]`` when the base lacks them, the UL2 mode tokens
``[NLU] [NLG] [S2S]``, unused ids and the ``<extra_id_i>`` sentinels, which
count down from the top). :func:`write_tokenizer` writes the same ids for
``transformers``:

* a SentencePiece base is converted with ``transformers``' own SentencePiece
  converter (:meth:`SpmConverter.build_tokenizer_from_spm_proto`: a BPE or
  Unigram model with byte fallback, the spm normaliser), merges ordered by
  piece score, control and user-defined pieces as added tokens;
* every reserved id is an added special token whose content is the string
  alignax's ``decode`` renders (``[S2S]``, ``<extra_id_0>``,
  ``<unused_517>``), at the same id.

Text encodes to the same ids as alignax's ``encode`` (no BOS is added, as
alignax's pipelines add it themselves where a recipe says so) for BPE
models, alignax's default (checked on the whole embedded corpus); a Unigram
model's Viterbi split differs from SentencePiece's on a few words (about 7%
of the corpus's documents hold one). Two more differences remain: ``transformers`` turns the literal text ``[S2S]`` or
``<extra_id_0>`` into the reserved id (alignax encodes it as characters),
and alignax encodes a literal ``U+2581`` as its bytes.
"""

from __future__ import annotations

import json
import os
from typing import Any

# tokenizer_config.json's class for a bare tokenizer.json directory.
_TOKENIZER_CLASS = 'PreTrainedTokenizerFast'


def _spm_tokenizer(model_proto: bytes):
  """A ``tokenizers.Tokenizer`` equal to a serialized SentencePiece model."""
  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken
  from transformers.convert_slow_tokenizer import SpmConverter
  from transformers.convert_slow_tokenizer import generate_merges
  # pylint: enable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  if proto.normalizer_spec.add_dummy_prefix or (
      proto.normalizer_spec.remove_extra_whitespaces):
    raise ValueError(
        'the SentencePiece model adds a dummy prefix or folds whitespace, '
        'which this converter does not reproduce; export with --like=HF_DIR.')
  pieces = [(p.piece, p.score) for p in proto.pieces]
  if proto.trainer_spec.model_type == 2:  # BPE: merges by piece score
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, pieces)
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab,
                                                           merges)
  elif proto.trainer_spec.model_type == 1:
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, pieces)
  else:
    raise ValueError('only BPE and Unigram SentencePiece models convert '
                     f'(model_type={proto.trainer_spec.model_type}).')
  # Control pieces (<s>, </s>, <pad>) are special; user-defined ones ("\n")
  # are matched before the model, as SentencePiece does.
  tok.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == 3)
                  for p in proto.pieces if p.type in (3, 4)])
  return tok


def base_tokenizer(tokenizer):
  """The ``tokenizers.Tokenizer`` of an alignax tokenizer's base vocabulary."""
  # The backend is the tokenizer module's own (SentencePiece or tokenizers);
  # this reads it rather than re-deriving the model file from the config.
  # pylint: disable=protected-access
  backend = tokenizer._backend
  if hasattr(backend, '_sp'):
    return _spm_tokenizer(backend._sp.serialized_model_proto())
  import tokenizers  # pylint: disable=g-import-not-at-top
  return tokenizers.Tokenizer.from_str(backend._tok.to_str())


def to_hf(tokenizer):
  """The full ``tokenizers.Tokenizer`` (reserved ids included) of ``tokenizer``.

  Raises:
    ValueError: if the converted base vocabulary has another size.
  """
  from tokenizers import AddedToken  # pylint: disable=g-import-not-at-top
  tok = base_tokenizer(tokenizer)
  base = tokenizer.base_vocab_size
  if tok.get_vocab_size(with_added_tokens=True) != base:
    raise ValueError(f'converted tokenizer has {tok.get_vocab_size()} ids, '
                     f'the run\'s base vocabulary {base}.')
  reserved = [tokenizer.decode([i]) for i in range(base,
                                                  tokenizer.vocab_size)]
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t in reserved])
  for i, text in enumerate(reserved, base):
    if tok.token_to_id(text) != i:
      raise ValueError(f'reserved token {text!r} would get id '
                       f'{tok.token_to_id(text)}, not {i}.')
  return tok


def special_tokens(tokenizer) -> dict[str, Any]:
  """``tokenizer_config.json`` entries: BOS/EOS/PAD/UNK and the reserved."""
  hf = to_hf(tokenizer)
  out = {'bos_token': hf.id_to_token(tokenizer.bos_id),
         'eos_token': hf.id_to_token(tokenizer.eos_id),
         'pad_token': hf.id_to_token(tokenizer.pad_id)}
  unk = hf.token_to_id('<unk>')
  if unk is not None:
    out['unk_token'] = '<unk>'
  out['additional_special_tokens'] = [
      hf.id_to_token(i) for i in range(tokenizer.base_vocab_size,
                                       tokenizer.vocab_size)
      if i not in (tokenizer.bos_id, tokenizer.eos_id)]
  return out


def write_tokenizer(directory: str, tokenizer, *,
                    chat_template: str | None = None,
                    model_max_length: int | None = None) -> None:
  """Writes ``tokenizer.json``, ``tokenizer_config.json`` and
  ``special_tokens_map.json`` (and ``chat_template.jinja``) to ``directory``.
  """
  os.makedirs(directory, exist_ok=True)
  to_hf(tokenizer).save(os.path.join(directory, 'tokenizer.json'))
  special = special_tokens(tokenizer)
  config = dict(special, tokenizer_class=_TOKENIZER_CLASS,
                add_bos_token=False, add_eos_token=False,
                clean_up_tokenization_spaces=False)
  if model_max_length:
    config['model_max_length'] = int(model_max_length)
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  with open(os.path.join(directory, 'special_tokens_map.json'), 'w') as f:
    json.dump(special, f, indent=2, ensure_ascii=False)
  if chat_template:
    with open(os.path.join(directory, 'chat_template.jinja'), 'w') as f:
      f.write(chat_template)
