"""Chat templates: built-in, and a Hugging Face template as transformers renders."""

import json

import pytest

from alignax.data import chat
from alignax.data import preference
from alignax.interop import hf

# A Llama 3 style template (BOS, header tokens, end-of-turn, trimming).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
PROMPT = [{"role": "system", "content": "be brief"},
          {"role": "user", "content": " hello "}]
CHOSEN = [{"role": "assistant", "content": "hi"}]


def _template_dir(tmp_path, as_file):
  d = tmp_path / ("jinja" if as_file else "config")
  d.mkdir()
  config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
  if as_file:
    (d / "chat_template.jinja").write_text(LLAMA3_STYLE)
  else:
    config["chat_template"] = LLAMA3_STYLE
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  return d


@pytest.mark.parametrize("as_file", [True, False])
def test_template_renders_prompt_and_completion_by_hand(tmp_path, as_file):
  d = _template_dir(tmp_path, as_file)
  assert hf.has_chat_template(str(d))
  t = chat.TemplateChat.from_path(str(d))
  header = "<|start_header_id|>{}<|end_header_id|>\n\n"
  # Written out by hand from the template; the pipeline adds BOS itself.
  assert t.prompt(PROMPT) == (header.format("system") + "be brief<|eot_id|>"
                              + header.format("user") + "hello<|eot_id|>"
                              + header.format("assistant"))
  assert t.render(PROMPT, add_generation_prompt=False).startswith("<s>")
  assert t.completion(PROMPT, CHOSEN) == "hi<|eot_id|>"
  ex = preference.parse_pair({"prompt": PROMPT, "chosen": CHOSEN,
                              "rejected": "plain"}, chat=t)
  assert ex["prompt"] == t.prompt(PROMPT)
  assert ex["responses"] == ["hi<|eot_id|>", "plain"]


def test_builtin_is_the_default(tmp_path):
  assert isinstance(chat.build_chat(""), chat.BuiltinChat)
  assert isinstance(chat.build_chat(str(_template_dir(tmp_path, True))),
                    chat.TemplateChat)
  ex = preference.parse_pair({"prompt": PROMPT, "chosen": CHOSEN,
                              "rejected": "x"})
  assert ex["prompt"].endswith("<|assistant|>\n")


def test_template_errors_are_named(tmp_path):
  t = chat.TemplateChat.from_path(str(_template_dir(tmp_path, True)))
  with pytest.raises(ValueError, match="chat_template.jinja: unknown role"):
    t.prompt([{"role": "tool", "content": "x"}])
  with pytest.raises(ValueError, match="bad.jinja: line 1"):
    chat.TemplateChat("{% for %}", name="bad.jinja")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "tokenizer_config.json").write_text("{}")
  assert not hf.has_chat_template(str(empty))
  with pytest.raises(ValueError, match="no chat template"):
    chat.TemplateChat.from_path(str(empty))


def test_matches_transformers_apply_chat_template(tmp_path):
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
      unk_token="[UNK]")
  tok.chat_template = LLAMA3_STYLE
  tok.save_pretrained(tmp_path / "hf")
  ours = chat.TemplateChat.from_path(str(tmp_path / "hf"))
  for gen in (True, False):
    assert ours.render(PROMPT, add_generation_prompt=gen) == (
        tok.apply_chat_template(PROMPT, tokenize=False,
                                add_generation_prompt=gen))
  # TRL's split of a conversational pair: prompt + chosen minus the prompt.
  prompt = tok.apply_chat_template(PROMPT, tokenize=False,
                                   add_generation_prompt=True)
  full = tok.apply_chat_template(PROMPT + CHOSEN, tokenize=False)
  assert ours.completion(PROMPT, CHOSEN) == full[len(prompt):]
  assert ours.prompt(PROMPT) == prompt[len("<s>"):]
