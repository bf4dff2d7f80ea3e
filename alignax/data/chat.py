"""Chat messages -> text: alignax's built-in template or a model's own.

Preference records may hold chat messages (``[{"role", "content"}, ...]``)
instead of strings (see :mod:`alignax.data.preference`). Two renderers turn
them into the prompt and completion texts that are then tokenized:

* :class:`BuiltinChat` (``data.preference.chat_template=""``)::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n ... <|assistant|>\\n

* :class:`TemplateChat`: a Hugging Face chat template (Jinja), as
  ``transformers``' ``apply_chat_template`` renders it, from a model
  directory (``chat_template.jinja`` or ``tokenizer_config.json``'s
  ``chat_template``) or a ``.jinja`` file. The prompt is the template with
  ``add_generation_prompt=True``; a completion is what the template adds to
  it when the completion's messages follow the prompt's, TRL's
  ``maybe_apply_chat_template`` split. A leading BOS string is dropped: the
  pipeline adds the BOS id itself. The Jinja environment is
  ``transformers``' own: ``{% generation %}`` blocks (rendered as their
  body; ``transformers`` uses them for assistant masks), ``strftime_now``,
  ``raise_exception``, its ``tojson`` (no ASCII escaping; ``indent``,
  ``separators``, ``sort_keys``), loop controls, trimmed blocks.

A run that starts from a Hugging Face directory (``checkpoint.init_from``)
uses that model's template when it has one.
"""

import datetime
import json
import os

import jinja2
import jinja2.ext
import jinja2.sandbox


class BuiltinChat:
  """alignax's own template (see the module docstring)."""

  @staticmethod
  def _render(messages):
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)

  def prompt(self, messages):
    return self._render(messages) + "<|assistant|>\n"

  def completion(self, prompt_messages, messages):
    """The first (assistant) message's content and a newline (the header is
    the prompt's), any further messages with the template."""
    del prompt_messages
    return messages[0]["content"] + "\n" + self._render(messages[1:])


# BuiltinChat as a Jinja chat template (what an HF export writes).
BUILTIN_JINJA = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None,
            sort_keys=False):
  """``transformers``' ``tojson`` filter (Jinja's escapes HTML)."""
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}``: renders its body.

  ``transformers`` marks the assistant's tokens with it
  (``return_assistant_tokens_mask``); the text is the body either way.
  """
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [],
                                  body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _token(value):
  """A special token of ``tokenizer_config.json``: a string or AddedToken."""
  if isinstance(value, dict):
    return value.get("content", "")
  return value or ""


class TemplateChat:
  """A Hugging Face chat template (Jinja source) with its special tokens."""

  def __init__(self, template: str, *, bos_token: str = "",
               eos_token: str = "", name: str = "chat template"):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
      self._template = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise ValueError(f"{name}: line {e.lineno}: {e.message}") from None
    self._bos, self._eos, self._name = bos_token, eos_token, name
    self.source = template  # the Jinja text, as read

  @classmethod
  def from_path(cls, path: str) -> "TemplateChat":
    """From a model directory, its ``tokenizer_config.json``, or a
    ``.jinja`` file."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
      with open(config_path) as f:
        config = json.load(f)
    tokens = dict(bos_token=_token(config.get("bos_token")),
                  eos_token=_token(config.get("eos_token")))
    if path.endswith(".jinja"):
      jinja = path
    else:
      jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
      with open(jinja) as f:
        return cls(f.read(), name=jinja, **tokens)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
      template = {t.get("name"): t.get("template") for t in template}.get(
          "default")
    if not isinstance(template, str):
      raise ValueError(f"{path}: no chat template (looked for "
                       f"chat_template.jinja and chat_template in "
                       f"{config_path})")
    return cls(template, name=config_path, **tokens)

  def render(self, messages, *, add_generation_prompt: bool) -> str:
    """The template's text, as ``apply_chat_template(tokenize=False)``."""
    try:
      return self._template.render(
          messages=messages, add_generation_prompt=add_generation_prompt,
          bos_token=self._bos, eos_token=self._eos)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"{self._name}: {e}") from None

  def _strip_bos(self, text):
    return text[len(self._bos):] if self._bos and text.startswith(
        self._bos) else text

  def prompt(self, messages):
    return self._strip_bos(self.render(messages, add_generation_prompt=True))

  def completion(self, prompt_messages, messages):
    prompt = self.render(prompt_messages, add_generation_prompt=True)
    full = self.render(list(prompt_messages) + list(messages),
                       add_generation_prompt=False)
    if not full.startswith(prompt):
      raise ValueError(f"{self._name} does not render the prompt as a prefix "
                       "of prompt + completion, so the completion cannot be "
                       "cut out of it")
    return full[len(prompt):]


def build_chat(template_path: str):
  """``data.preference.chat_template`` -> a renderer ("" = built-in)."""
  return TemplateChat.from_path(template_path) if template_path else (
      BuiltinChat())
