"""T5X-style gin command lines: ``--gin_file=...`` and ``--gin.NAME=VALUE``.

Commands do (``commands/common.py`` wraps the first line)::

  gin_files, bindings, rest = gin_utils.parse_gin_flags(argv)
  gin_utils.configure(gin_files, bindings)
  model = gin_utils.get_macro('MODEL')        # builds the object
  model_dir = gin_utils.get_macro('MODEL_DIR')

Gin files are named relative to the packaged ``configs/`` directory
(``t5/runs/cpu_smoke.gin``, ``vit/b16.gin``), which ships inside the wheel and
sits at the top of a clone; :func:`add_search_paths` puts it on gin's search
path, so ``--gin_file`` and a user's own ``include`` lines find it from any
directory. A path to the user's own file works too (absolute, or relative to
the working directory).

Every configuration mistake (a missing file, an unknown configurable or macro,
a malformed binding, a value the model rejects such as ``TOP_K = 0``) comes
out as one :class:`ConfigError` (a ``ValueError``) whose message is one line
naming the culprit; the commands (``commands/common.py``, the one front end that
reads ``--gin_file`` flags) print it as ``error: ...`` and exit with status 2,
without a traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any, List, Optional, Sequence, Tuple

import gin

from topk_transformers.errors import ConfigError, one_line  # noqa: F401  (re-exported)

# The packaged configs: inside the installed package, or beside it in a clone.
ENV_SEARCH_PATHS = "TOPK_GIN_SEARCH_PATHS"
_added_search_paths: set = set()


def config_root() -> str:
  """The directory of the packaged gin files (``t5/...``, ``vit/...``).

  A wheel ships ``configs/`` inside the package (``topk_transformers/configs``); a clone
  or an editable install keeps it at the top of the repository, beside the package.
  """
  package_dir = os.path.dirname(os.path.abspath(__file__))
  for candidate in (os.path.join(package_dir, "configs"), os.path.join(os.path.dirname(package_dir), "configs")):
    if os.path.isdir(os.path.join(candidate, "t5")):
      return candidate
  raise ConfigError(f"the packaged gin configs are missing (looked in {package_dir}/configs and beside it)")


def search_paths() -> List[str]:
  """Directories gin files are looked up in, in order: the working directory, $TOPK_GIN_SEARCH_PATHS, the package."""
  extra = [p for p in os.environ.get(ENV_SEARCH_PATHS, "").split(os.pathsep) if p]
  paths = [os.getcwd(), *extra, config_root()]
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


class _GinLookupNoise(logging.Filter):
  """Drops gin's log lines for the places a file is not (it tries Python packages before our search paths)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.pathname.endswith(os.path.join("gin", "resource_reader.py"))


def add_search_paths() -> None:
  """Adds :func:`search_paths` to gin's search path (public API), so ``include 't5/...'`` lines resolve."""
  for path in search_paths():
    if path not in _added_search_paths:
      gin.add_config_file_search_path(path)
      _added_search_paths.add(path)
  root = logging.getLogger()
  if not any(isinstance(f, _GinLookupNoise) for f in root.filters):
    root.addFilter(_GinLookupNoise())


def configure(gin_files: Sequence[str], bindings: Sequence[str] = (), finalize: bool = False,
              check_macros: bool = True) -> None:
  """Clears gin, then parses ``gin_files`` in order and ``bindings`` after them.

  With ``check_macros``, a macro that a binding sets but that no gin file sets and nothing uses
  (``--gin.TRAIN_STEP=5`` for ``TRAIN_STEPS``) is an error, as an unknown configurable is to gin itself:
  see :func:`check_bound_macros`.

  Raises:
    ConfigError: one line naming the missing file, unknown configurable or macro, or bad binding.
  """
  gin.clear_config()
  add_search_paths()
  resolved = [resolve_gin_file(f) for f in gin_files]
  try:
    # Bindings are parsed one by one so an error names the binding at fault.
    gin.parse_config_files_and_bindings(resolved, None, finalize_config=False)
  except ConfigError:
    raise
  except Exception as e:  # gin raises ValueError, SyntaxError, IOError, ImportError...
    raise ConfigError(f"in gin files {', '.join(gin_files)}: {one_line(e)}") from None
  files_config = gin.config_str() if check_macros and bindings else ""
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:
      raise ConfigError(f"bad gin binding {binding!r}: {one_line(e)}") from None
  if check_macros:
    check_bound_macros(bindings, _defined_macros(files_config))
  if finalize:
    gin.finalize()


def build(value: Any) -> Any:
  """Calls configurable references (``@foo()``, also inside lists) so macros yield built objects."""
  if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
    return value.scoped_configurable_fn()
  if isinstance(value, (list, tuple)):
    return type(value)(build(v) for v in value)
  return value


def get_macro(name: str, default: Any = gin.REQUIRED, evaluate: bool = True) -> Any:
  """The value bound to macro ``name`` (``%NAME``), built if it is ``@configurable()``.

  Raises:
    ConfigError: the macro is unbound (and no default given), still bound to
      ``%gin.REQUIRED``, or building it failed, e.g. ``TOP_K = 0`` ->
      ``top_k must be a positive integer ...``.
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
    built = build(value)
  except Exception as e:  # gin wraps errors raised while building configurables
    macro = unset_macro(e)
    if macro:  # gin's own message for these is an opaque TypeError
      raise ConfigError(f"building %{name}: gin macro %{macro} is used but never set") from None
    raise ConfigError(f"building %{name}: {one_line(e)}") from None
  if built is gin.REQUIRED:  # gin hands the marker itself to whatever reads a macro bound to %gin.REQUIRED
    raise ConfigError(_required_message([name]))
  return built


def _required_message(names: Sequence[str]) -> str:
  if len(names) == 1:
    return (f"gin macro {names[0]} is required (%gin.REQUIRED) but not set: "
            f"add --gin.{names[0]}=VALUE (a string in both quotes: --gin.{names[0]}=\"'...'\")")
  return (f"gin macros {', '.join(names)} are required (%gin.REQUIRED) but not set: "
          f"add --gin.NAME=VALUE for each (a string in both quotes, e.g. --gin.{names[0]}=\"'...'\")")


_REQUIRED_MACRO = re.compile(r"^([A-Za-z_]\w*) = %gin\.REQUIRED$", re.MULTILINE)


def check_required_macros() -> None:
  """Raises a one-line :class:`ConfigError` naming every macro still bound to ``%gin.REQUIRED``.

  A run file marks what a launch must set that way (``MODEL_DIR``, a fine-tuning run's
  ``INITIAL_CHECKPOINT_PATH``); gin itself would pass its marker object on to whatever reads the macro.
  """
  names = [name for name in _REQUIRED_MACRO.findall(gin.config_str())
           if build(gin.query_parameter(f"%{name}")) is gin.REQUIRED]
  if names:
    raise ConfigError(_required_message(names))


_UNSET_MACRO = re.compile(r"configurable 'macro' \(.*\) in scope '([^']+)'")


def unset_macro(error: BaseException) -> Optional[str]:
  """The macro named by gin's error for a ``%MACRO`` that is used but never set, else ``None``."""
  found = _UNSET_MACRO.search(str(error))
  return found.group(1) if found else None


# Macros that commands read by name (``get_macro``) whether or not a gin file mentions them.
READ_BY_COMMANDS = ("MODEL", "MODEL_DIR", "BATCH_SIZE")
# ``NAME = value`` / ``scope/NAME = value`` at the start of a line: a macro (a configurable's parameter has a dot).
_MACRO_DEFINITION = re.compile(r"^\s*([A-Za-z_][\w/]*)\s*=", re.MULTILINE)
_MACRO_REFERENCE = re.compile(r"%([A-Za-z_][\w/]*)")


def _defined_macros(config_text: str) -> set:
  return set(_MACRO_DEFINITION.findall(config_text))


def check_bound_macros(bindings: Sequence[str], file_macros: Sequence[str] = ()) -> None:
  """Raises a one-line :class:`ConfigError` for a macro that ``bindings`` set and nothing knows.

  gin rejects an unknown configurable (``train.train.train_step = 5``) but takes any macro name, so a
  misspelt one (``TRAIN_STEP = 5``) would silently change nothing. A macro set by a binding is known
  when a gin file sets it too (``file_macros``), when the parsed configuration uses it (``%NAME``, in a
  file or in another binding), or when a command reads it by name (:data:`READ_BY_COMMANDS`). Call it
  after the bindings are parsed; the message names the nearest known macro.
  """
  config = gin.config_str()
  used = set(_MACRO_REFERENCE.findall(config)) - {"gin"}  # %gin.REQUIRED is no macro
  known = set(file_macros) | used | set(READ_BY_COMMANDS)
  for binding in bindings:
    for name in _MACRO_DEFINITION.findall(binding):
      if name in known:
        continue
      candidates = sorted((known | _defined_macros(config)) - {name})
      near = difflib.get_close_matches(name, candidates, n=1)
      hint = f"; did you mean {near[0]}?" if near else ""
      raise ConfigError(f"unknown gin macro {name} in binding {binding.strip()!r}: no loaded gin file sets or "
                        f"uses it{hint}")
