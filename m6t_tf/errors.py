"""Errors the user fixes: a configuration or input error says what, where, and the fix.

The command-line tools print a `ConfigError` as one line and exit with status 2 (`m6t_tf.cli`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Sequence


class ConfigError(ValueError):
  """A configuration or input error; its message names the value, where it came from and the fix.

  Args:
    message: one line.
    fix: gin bindings that fix it (`"train.warmup_steps=1"`), when a binding does: the message
      quotes them as `--gin_bindings=...`, and tests apply them to check that they do.
  """

  def __init__(self, message: str, *, fix: Sequence[str] = ()):
    super().__init__(message)
    self.fix = tuple(fix)


def one_line(error: BaseException) -> str:
  """The error's message as one line (gin appends "In call to configurable ..." lines)."""
  text = str(error).strip()
  return text.splitlines()[0].strip() if text else type(error).__name__


def bindings_flag(fix: Sequence[str]) -> str:
  """`--gin_bindings=a --gin_bindings=b`: how a message quotes the bindings that fix it."""
  return " ".join(f"--gin_bindings={b}" for b in fix)
