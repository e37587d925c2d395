"""The project's error for configuration mistakes, and how any error becomes one line.

It has no dependencies, so the core and the benchmarks raise it where gin is not installed.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A configuration mistake (a bad flag, binding, file or value), with a one-line message.

  The commands print it as ``error: ...`` and exit with status 2, without a traceback.
  """


def one_line(exc: BaseException) -> str:
  """The first meaningful line of an exception message (gin appends context lines)."""
  text = str(exc).strip()
  if isinstance(exc, SyntaxError) and getattr(exc, "msg", None):
    where = f" in {exc.filename!r}" if exc.filename and exc.filename != "<string>" else ""
    snippet = (exc.text or "").strip()
    return f"{exc.msg}{where}" + (f": {snippet!r}" if snippet else "")
  if isinstance(exc, KeyError) and exc.args:
    text = str(exc.args[0])
  if len(exc.args) == 2 and isinstance(exc.args[0], str) and isinstance(exc.args[1], tuple) and exc.args[1]:
    text = f"{exc.args[0]} (line {exc.args[1][0]})"  # tokenize errors: (message, (line, column))
  first = text.splitlines()[0].strip() if text else type(exc).__name__
  return first
