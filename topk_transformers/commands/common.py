"""What every command shares: a quiet start, gin flags, and exit statuses.

Exit statuses: 0 done; 2 a configuration mistake (``ConfigError``: one
``error: ...`` line, no traceback); 1 a run that cannot go on (a bad
checkpoint, a non-finite loss), also one line. Every other exception keeps its
traceback: it is a bug to report, not a mistake to correct.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

from topk_transformers import startup
from topk_transformers.errors import ConfigError, one_line

EXIT_CONFIG = 2
EXIT_FAILED = 1


class CommandFailed(RuntimeError):
  """A run that cannot go on; the command prints its one-line message and exits 1."""


def command(main: Optional[Callable[..., Optional[int]]] = None, *, tensorflow: bool = True):
  """Decorates a command's ``main(argv)``: quiet start, logging, and the exit statuses above.

  ``tensorflow=False`` for commands that only need jax and flax (the benchmarks, model info): they
  then run where TensorFlow is not installed, such as a bare GPU machine.
  """
  if main is None:
    return functools.partial(command, tensorflow=tensorflow)

  @functools.wraps(main)
  def wrapper(argv: Optional[Sequence[str]] = None) -> int:
    if tensorflow:
      startup.quiet_start()
    quiet_closed_event_loops()
    startup.setup_logging()
    # A missing data file (``data.tasks.MissingDataError``, gensim's corpus) is named in one line too.
    failures: Tuple[type, ...] = (CommandFailed, FileNotFoundError)
    if tensorflow:
      from topk_transformers import checkpoints  # pylint: disable=g-import-not-at-top  # after the quiet start
      failures += (checkpoints.CheckpointError,)
    try:
      status = main(start_processes(list(sys.argv[1:] if argv is None else argv)))
    except ConfigError as e:
      print(f"error: {one_line(e)}", file=sys.stderr)
      return EXIT_CONFIG
    except failures as e:
      print(f"error: {one_line(e)}", file=sys.stderr)
      return EXIT_FAILED
    except Exception as e:  # pylint: disable=broad-except
      from topk_transformers import distributed  # pylint: disable=g-import-not-at-top
      if not distributed.is_peer_failure(e):
        raise
      print(f"error: {distributed.await_lost_process_report(e)}", file=sys.stderr)
      return EXIT_FAILED
    return int(status or 0)

  return wrapper


def start_processes(argv: Sequence[str]) -> List[str]:
  """Starts the multi-process run that the flags (``--coordinator_address``, ``--process_count``,
  ``--process_index``) or the environment describe, before the command touches a device; returns the other
  arguments. In a multi-process run, the distributed runtime's report of a lost process becomes one line."""
  from topk_transformers import distributed  # pylint: disable=g-import-not-at-top

  processes, rest = distributed.split_flags(argv)
  distributed.initialize(processes)
  if distributed.started():
    index, count = distributed.process()
    if index > 0:  # process 0 speaks for the run; the others print warnings and errors only
      import logging  # pylint: disable=g-import-not-at-top
      logging.getLogger().setLevel(logging.WARNING)
    startup.filter_for_good(distributed.RUNTIME_CHATTER, fatal=distributed.TERMINATING,
                            hold=distributed.COORDINATION_ERROR,
                            report="topk_transformers.distributed:lost_process_line", report_args=(index, count))
    startup.filter_for_good(distributed.RUNTIME_CHATTER, fd=1)  # the CPU collectives print to stdout
  return rest


def _closed_event_loop(exc: Optional[BaseException]) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def quiet_closed_event_loops() -> None:
  """Drops the ``RuntimeError: Event loop is closed`` tracebacks that follow a failed checkpoint read.

  When one array of an orbax restore cannot be read, orbax's ``asyncio.gather`` stops and its event loop is
  closed while TensorStore still completes the other reads; each completion then calls
  ``loop.call_soon_threadsafe`` on the closed loop from TensorStore's threads, and TensorStore prints that error
  (``PyErr_WriteUnraisable`` / ``PyErr_Print``) after the command's one ``error:`` line, even at exit. Nothing is
  lost: the restore has already failed and been reported. Only that exact error is dropped (to the debug log);
  every other exception reaches the previous hooks.
  """
  import logging  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  if getattr(sys.unraisablehook, "_topk_quiet", False):
    return
  previous_unraisable, previous_except, previous_thread = sys.unraisablehook, sys.excepthook, threading.excepthook

  def unraisable(args):
    if _closed_event_loop(args.exc_value):
      logging.debug("dropped after a failed checkpoint read: %s", args.exc_value)
    else:
      previous_unraisable(args)

  def excepthook(exc_type, exc, tb):
    if _closed_event_loop(exc):
      logging.debug("dropped after a failed checkpoint read: %s", exc)
    else:
      previous_except(exc_type, exc, tb)

  def thread_hook(args):
    if _closed_event_loop(args.exc_value):
      logging.debug("dropped after a failed checkpoint read: %s", args.exc_value)
    else:
      previous_thread(args)

  for hook in (unraisable, excepthook, thread_hook):
    hook._topk_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook, sys.excepthook, threading.excepthook = unraisable, excepthook, thread_hook


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are a ``ConfigError`` (one line, exit 2)."""

  def error(self, message):
    raise ConfigError(f"{self.prog}: {message}")


def gin_flags(argv: Sequence[str], required: bool = True) -> Tuple[List[str], List[str], List[str]]:
  """``(gin_files, bindings, other args)``; with ``required``, no ``--gin_file`` is a ``ConfigError``."""
  from topk_transformers import gin_utils  # pylint: disable=g-import-not-at-top  # commands without gin skip it

  gin_files, bindings, rest = gin_utils.parse_gin_flags(argv)
  if required and not gin_files:
    raise ConfigError("no --gin_file given (e.g. --gin_file=t5/runs/cpu_smoke.gin)")
  return gin_files, bindings, rest


def write_json(path: Optional[str], payload: Any) -> None:
  """Writes ``payload`` as indented JSON to ``path`` (its directory is made), if a path is given."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, default=float)


def read_lines(path: str) -> List[str]:
  """The non-empty lines of a UTF-8 text file; a missing or undecodable file is a one-line ``ConfigError``."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ConfigError(f"cannot read {path}: {e.strerror}") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
  return [line for line in text.splitlines() if line.strip()]


def comma_list(text: str, kind=str) -> tuple:
  """``'a,b'`` -> ``('a', 'b')``, each converted by ``kind``; a bad item is a one-line ``ConfigError``."""
  try:
    return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
  except ValueError:
    raise ConfigError(f"expected a comma list of {kind.__name__}s, got {text!r}") from None
