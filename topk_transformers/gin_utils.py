"""T5X-style gin command lines: ``--gin_file=...`` and ``--gin.NAME=VALUE``.

Scripts do::

  gin_files, bindings, argv = gin_utils.parse_gin_flags(sys.argv[1:])
  gin_utils.configure(gin_files, bindings)
  model = gin_utils.get_macro('MODEL')        # builds the object
  model_dir = gin_utils.get_macro('MODEL_DIR')

Every configuration mistake (a missing file, an unknown configurable or macro,
a malformed binding, a value the model rejects such as ``TOP_K = 0``) comes
out as one :class:`ConfigError` (a ``ValueError``) whose message is one line
naming the culprit; :func:`exit_on_config_error` turns it into ``error: ...``
on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import gin

# `include 'configs/...'` lines and --gin_file paths resolve from the working
# directory first, then from the repository (or source tree) holding this package.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_SEARCH_PATHS = "TOPK_GIN_SEARCH_PATHS"


class ConfigError(ValueError):
  """A configuration mistake, with a one-line message."""


def search_paths() -> List[str]:
  """Directories gin files are looked up in, in order."""
  extra = [p for p in os.environ.get(ENV_SEARCH_PATHS, "").split(os.pathsep) if p]
  paths = [os.getcwd(), *extra, _PACKAGE_ROOT]
  return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def parse_gin_flags(argv: Sequence[str]) -> Tuple[List[str], List[str], List[str]]:
  """Splits gin flags from other arguments.

  Understands ``--gin_file=a.gin`` / ``--gin_file a.gin`` (repeatable, also a
  comma-separated list), ``--gin.NAME=VALUE`` (the binding ``NAME = VALUE``,
  VALUE in gin syntax, e.g. ``--gin.MODEL_DIR="'/tmp/run'"``) and
  ``--gin_bindings=BINDING`` / ``--gin_bindings BINDING`` (repeatable).

  Returns:
    ``(gin_files, bindings, remaining_argv)`` with order preserved.
  """
  gin_files: List[str] = []
  bindings: List[str] = []
  rest: List[str] = []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, has_value, value = arg.partition("=")
    if name in ("--gin_file", "--gin_bindings"):
      if not has_value:
        if i + 1 >= len(args):
          raise ConfigError(f"{name} needs a value")
        i += 1
        value = args[i]
      if name == "--gin_file":
        gin_files.extend(f.strip() for f in value.split(",") if f.strip())
      else:
        bindings.append(value)
    elif name.startswith("--gin."):
      key = name[len("--gin."):]
      if not key or not has_value:
        raise ConfigError(f"malformed gin flag {arg!r}: expected --gin.NAME=VALUE")
      bindings.append(f"{key} = {value}")
    else:
      rest.append(arg)
    i += 1
  return gin_files, bindings, rest


def resolve_gin_file(path: str) -> str:
  """The existing file ``path`` names, searched in :func:`search_paths`."""
  if os.path.isabs(path):
    if os.path.isfile(path):
      return path
  else:
    for root in search_paths():
      candidate = os.path.join(root, path)
      if os.path.isfile(candidate):
        return candidate
  raise ConfigError(f"gin file not found: {path!r} (searched {', '.join(search_paths())})")


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


def _install_search_paths() -> None:
  """Puts :func:`search_paths` ahead of gin's own lookups (``include`` lines use them)."""
  # pylint: disable=protected-access
  prefixes = gin.config._LOCATION_PREFIXES
  ours = search_paths()
  prefixes[:] = ours + [p for p in prefixes if p not in ours]
  # gin's second reader treats 'configs/t5/x.gin' as a Python package path; for a
  # directory without __init__.py (a namespace package) it raises TypeError instead
  # of answering "no such file". Make that check answer False so lookups go on.
  # It is also skipped for absolute paths (ours), where it only logs "Path not found".
  readers = gin.config._FILE_READERS
  for i, (reader, exists) in enumerate(readers):
    if exists is not os.path.isfile and not getattr(exists, "_topk_safe", False):
      def safe_exists(path, _exists=exists):
        if os.path.isabs(path):
          return False
        try:
          return _exists(path)
        except Exception:  # pylint: disable=broad-except
          return False
      safe_exists._topk_safe = True
      readers[i] = (reader, safe_exists)


def configure(gin_files: Sequence[str], bindings: Sequence[str] = (), finalize: bool = False) -> None:
  """Clears gin, then parses ``gin_files`` in order and ``bindings`` after them.

  Raises:
    ConfigError: one line naming the missing file, unknown configurable or bad binding.
  """
  gin.clear_config()
  _install_search_paths()
  resolved = [resolve_gin_file(f) for f in gin_files]
  try:
    # Bindings are parsed one by one so an error names the binding at fault.
    gin.parse_config_files_and_bindings(resolved, None, finalize_config=False)
  except ConfigError:
    raise
  except Exception as e:  # gin raises ValueError, SyntaxError, IOError, ImportError...
    raise ConfigError(f"in gin files {', '.join(gin_files)}: {one_line(e)}") from None
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:
      raise ConfigError(f"bad gin binding {binding!r}: {one_line(e)}") from None
  if finalize:
    gin.finalize()


def _evaluate(value: Any) -> Any:
  """Calls configurable references (``@foo()``) so macros yield built objects."""
  if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
    return value.scoped_configurable_fn()
  return value


def get_macro(name: str, default: Any = gin.REQUIRED, evaluate: bool = True) -> Any:
  """The value bound to macro ``name`` (``%NAME``), built if it is ``@configurable()``.

  Raises:
    ConfigError: the macro is unbound (and no default given), or building it
      failed, e.g. ``TOP_K = 0`` -> ``top_k must be a positive integer ...``.
  """
  try:
    value = gin.query_parameter(f"%{name}")
  except ValueError:
    if default is not gin.REQUIRED:
      return default
    raise ConfigError(f"gin macro {name} is not set (add a --gin_file that sets it, or --gin.{name}=...)") from None
  if not evaluate:
    return value
  try:
    return _evaluate(value)
  except Exception as e:  # gin wraps errors raised while building configurables
    unset = undefined_macros()
    if unset:  # gin's own message for these is an opaque TypeError
      where, macro = unset[0]
      raise ConfigError(f"building %{name}: gin macro %{macro} is used by {where} but never set") from None
    raise ConfigError(f"building %{name}: {one_line(e)}") from None


def undefined_macros() -> List[Tuple[str, str]]:
  """``(binding, macro)`` pairs where a binding refers to a macro no file or flag sets."""
  config = gin.config._CONFIG  # pylint: disable=protected-access
  found = []

  def walk(value, where):
    if isinstance(value, gin.config.ConfigurableReference):
      if value.selector == "gin.macro":
        macro = "/".join(value.scopes)
        if (macro, "gin.macro") not in config:
          found.append((where, macro))
    elif isinstance(value, (list, tuple)):
      for v in value:
        walk(v, where)
    elif isinstance(value, dict):
      for v in value.values():
        walk(v, where)

  for (scope, selector), params in config.items():
    for param, value in params.items():
      target = scope if selector == "gin.macro" else ".".join(p for p in (scope, selector) if p)
      walk(value, target if selector == "gin.macro" else f"{target}.{param}")
  return found


def exit_on_config_error(main: Callable[..., Any]) -> Callable[..., Any]:
  """Decorator for script ``main``s: a :class:`ConfigError` prints ``error: ...`` and exits 2."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapper


def configure_from_argv(argv: Optional[Sequence[str]] = None) -> List[str]:
  """``parse_gin_flags`` + ``configure`` on ``argv`` (default ``sys.argv[1:]``); returns the other arguments."""
  gin_files, bindings, rest = parse_gin_flags(sys.argv[1:] if argv is None else argv)
  if not gin_files:
    raise ConfigError("no --gin_file given (e.g. --gin_file=configs/t5/t5_1_0/tiny.gin)")
  configure(gin_files, bindings)
  return rest
