"""What every command does alike: one-line user errors, ``--debug``.

A user's mistake (a config typo, a missing file, a bad record, a mesh that
does not fit the devices, a full disk) prints one line,
``alignax: error: <what>, <where>``, and exits with status 2; the traceback
appears only with ``--debug``. Anything else is a bug and keeps its
traceback.

Usage in a command::

  app.run(main, flags_parser=cli.parse_flags)

  def main(argv):
    with cli.user_errors():
      ...
"""

from __future__ import annotations

import ast
import contextlib
import errno
import re
import sys
from collections.abc import Callable

from absl import app
from absl import flags

DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of a user "
                          "error instead of its one-line message.")

# OSError numbers that mean the environment, not the code, is at fault.
_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.EDQUOT, errno.ENOENT, errno.ENOTDIR,
                       errno.EISDIR)
USER_ERRORS = (ValueError, FloatingPointError, FileNotFoundError,
               NotADirectoryError, IsADirectoryError, PermissionError,
               KeyError)


def one_line(error: BaseException) -> str:
  """The message of ``error`` on one line (literal ``\\n``s included)."""
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args \
      else str(error)
  if isinstance(error, OSError) and error.strerror:
    where = f": {error.filename}" if error.filename else ""
    text = f"{error.strerror}{where}"
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:  # a message that is the repr of a string (ml_collections' KeyError)
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  text = text.replace("\\n", " ").replace("\n", " ")
  return " ".join(text.split()) or type(error).__name__


def is_user_error(error: BaseException) -> bool:
  if isinstance(error, OSError):
    return error.errno in _ENVIRONMENT_ERRNOS or isinstance(error,
                                                            USER_ERRORS)
  return isinstance(error, USER_ERRORS)


def fail(message: str, status: int = 2):
  """Prints ``alignax: error: message`` to stderr and exits."""
  print(f"alignax: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


@contextlib.contextmanager
def user_errors():
  """Turns user errors raised inside into one line and exit status 2."""
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if DEBUG.value or not is_user_error(e):
      raise
    fail(one_line(e))


def parse_flags(argv):
  """``absl`` flag parsing whose errors (config typos, a missing config
  file) are one line and exit status 2."""
  try:
    argv = flags.FLAGS(argv)
    # ml_collections defers a recipe that failed to load (a missing file, an
    # error inside it) to the first access; report it now, as a flag error.
    for name in ("config",):
      value = flags.FLAGS[name].value if name in flags.FLAGS else None
      if hasattr(value, "_ReportError"):
        value._ReportError()  # pylint: disable=protected-access
    return argv
  except OSError as e:
    if "--debug" in argv[1:]:
      raise
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(f"--config: {lines[-1] if lines else one_line(e)}")
  except Exception as e:  # pylint: disable=broad-except
    # Everything raised while parsing the command line is about the command
    # line: ml_collections reports an unknown --config.* field as an
    # AttributeError, a bad value as a ValueError or TypeError.
    if "--debug" in argv[1:]:
      raise
    fail(_flag_error(argv, e))


def _flag_error(argv, error) -> str:
  """``--config.a.b: no such field 'b' ...`` for an unknown override."""
  text = one_line(error)
  if isinstance(error, (AttributeError, KeyError)):
    match = re.match(r"'([^']+)'(.*)", text)
    if match:
      key, rest = match.groups()
      for arg in argv[1:]:
        name = arg.split("=", 1)[0]
        if name.startswith("--config.") and name.split(".")[-1] == key:
          return f"{name}: no such config field {key!r}{rest}"
  return f"command line: {text}"


def config_command(body: Callable[[object, str], None], workdir_help: str):
  """Runs ``body(config, workdir)`` as a command: ``--config`` (a recipe,
  overridable field by field) and ``--workdir`` flags, one-line errors."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file("config", None, "Recipe file.")
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    with user_errors():
      body(config.value, workdir.value)

  app.run(main, flags_parser=parse_flags)
