"""What every command does first: a quiet start, and logging in the project's format.

TensorFlow is only used for tf.data here, so it must neither print its banners
nor claim accelerators that JAX owns. On a machine without a GPU, TensorFlow's
own C++ code prints, before anything of ours:

* ``WARNING: All log messages before absl::InitializeLog() is called are
  written to STDERR`` and ``I... cudart_stub.cc] Could not find cuda drivers on
  your machine, GPU will not be used.``, once for each of its two shared
  libraries, while ``import tensorflow`` loads them. They come before its
  logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them.
* ``E... cuda_platform.cc] failed call to cuInit: ... UNKNOWN ERROR (303)``
  when ``tf.config.set_visible_devices`` lists the GPUs it is to hide: CUDA's
  stub library finds no driver.
* the CPU-feature banner (``This TensorFlow binary is optimized to use
  available CPU instructions ...``) and the oneDNN one (``oneDNN custom
  operations are on ...``) at INFO level: ``TF_CPP_MIN_LOG_LEVEL=2``, set
  unless the user set it, hides them.

:func:`quiet_start` does both steps with the process's stderr (file descriptor
2, so C++ writes too) passed through :func:`filtered_stderr`, which drops those
exact lines and passes every other line on as it comes: an ``ImportError``, a
real CUDA error, a fatal message before an abort. JAX is not touched: its
backends, GPUs included, start later and print as they would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from typing import Iterator, Optional, Sequence

# Whole lines (regular expressions) that TensorFlow prints at start-up on a machine without a GPU.
_LOG_PREFIX = r"[IWE]\d{4} \S+ +\d+ "
TENSORFLOW_START_NOISE = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    _LOG_PREFIX + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.",
    # No driver (the stub's 303) or no device: TensorFlow is to see no GPU anyway; JAX reports its own.
    _LOG_PREFIX + r"cuda_(?:platform|driver|executor)\.cc:\d+\] failed call to cuInit: .*"
    r"(?:UNKNOWN ERROR \(303\)|CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected)",
    _LOG_PREFIX + r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU "
    r"instructions in performance-critical operations\.",
    r"To enable the following instructions: .*, in other operations, rebuild TensorFlow with the appropriate "
    r"compiler flags\.",
    _LOG_PREFIX + r"port\.cc:\d+\] oneDNN custom operations are on\. .*",
)

# The filter runs in a child process, so a line written just before a crash (a fatal C++ message, then
# abort) still reaches the terminal: the child reads the pipe to its end whatever happens to us.
#
# Besides dropping ``noise``, it can replace a fatal report: from a line matching ``fatal`` to the end of the
# input, all lines (and the ``hold`` lines that lead up to it, kept back a few seconds in case) become the one
# line that ``report`` ("module:function", called as ``function(text, *report_args)``) returns.
_FILTER_PROGRAM = r"""
import importlib, json, os, re, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; we stop at end of input
config = json.loads(sys.argv[1])
noise = [re.compile(p.encode()) for p in config["noise"]]
hold = re.compile(config["hold"].encode()) if config.get("hold") else None
fatal = re.compile(config["fatal"].encode()) if config.get("fatal") else None
log_line = re.compile(rb"[IWEF]\d{4} ")
held, held_at, report, pending = [], 0.0, None, b""
def out(lines):
    if lines:
        os.write(1, b"".join(line + b"\n" for line in lines))
def take(line):
    global held, held_at, report
    bare = line.rstrip(b"\r")
    if report is not None:
        report.append(line)
    elif fatal is not None and fatal.fullmatch(bare):
        report, held = held + [line], []
    elif hold is not None and hold.fullmatch(bare):
        held.append(line)
        held_at = time.monotonic()
    elif held and not log_line.match(bare):  # a held message's continuation lines
        held.append(line)
    elif not any(n.fullmatch(bare) for n in noise):
        out(held + [line])
        held = []
    elif held:
        out(held)
        held = []
while True:
    ready, _, _ = select.select([0], [], [], 1.0)
    if held and time.monotonic() - held_at > 3.0:
        out(held)
        held = []
    if not ready:
        continue
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\n")
    for line in lines:
        take(line)
if pending:
    take(pending)
if report is not None:
    text = b"\n".join(report).decode("utf-8", "replace")
    try:
        sys.path.insert(0, config["path"])
        module, function = config["report"].split(":")
        line = getattr(importlib.import_module(module), function)(text, *config["report_args"])
        os.write(1, (line + "\n").encode())
    except Exception:  # the report as it was rather than nothing
        out(report)
out(held)
"""
_FILTER_WAIT_S = 10.0
_running_filters = []  # filters still forwarding for a process started inside the block
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_filter(noise: Sequence[str], fatal: Optional[str] = None, hold: Optional[str] = None,
                  report: Optional[str] = None, report_args: Sequence = (), fd: int = 2):
  """``(the filter process, the saved fd)`` with ``fd`` going through it, or ``(None, None)`` where none starts."""
  try:
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
  except (AttributeError, OSError, ValueError):
    return None, None
  proc = None
  if sys.executable and not getattr(sys, "frozen", False):  # frozen: the executable is an app
    config = dict(noise=list(noise), fatal=fatal, hold=hold, report=report, report_args=list(report_args),
                  path=_PACKAGE_PARENT)
    try:
      proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER_PROGRAM, json.dumps(config)],
                              stdin=subprocess.PIPE, stdout=saved, stderr=saved,
                              start_new_session=os.name == "posix")
    except OSError:
      proc = None
  if proc is None:
    os.close(saved)
    return None, None
  os.dup2(proc.stdin.fileno(), fd)
  return proc, saved


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[str] = TENSORFLOW_START_NOISE) -> Iterator[None]:
  """Within the block, file descriptor 2 goes through a filter that drops whole lines matching ``noise``.

  Every other line (Python's and C's alike) is passed on when it is complete,
  in order. Where no filter can be started (no Python interpreter to run it,
  fd 2 closed), the block runs unfiltered.
  """
  proc, saved = _start_filter(noise)
  if proc is None:
    yield
    return
  try:
    yield
  finally:
    try:
      sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
      pass
    os.dup2(saved, 2)
    os.close(saved)
    proc.stdin.close()  # the filter sees the end of its input once no process holds the pipe
    try:
      proc.wait(timeout=_FILTER_WAIT_S)
    except subprocess.TimeoutExpired:  # a process started in the block holds the pipe; its lines still pass
      _running_filters.append(proc)


def filter_for_good(noise: Sequence[str], fatal: Optional[str] = None, hold: Optional[str] = None,
                    report: Optional[str] = None, report_args: Sequence = (), fd: int = 2) -> None:
  """From now until the process ends, ``fd`` goes through the filter: ``noise`` dropped, and a fatal report
  from ``fatal`` on replaced by ``report``'s one line. A multi-process run uses it for the distributed runtime's
  reports, which end the process from C++, where Python cannot catch them."""
  proc, saved = _start_filter(noise, fatal=fatal, hold=hold, report=report, report_args=report_args, fd=fd)
  if proc is None:
    return
  os.close(saved)
  proc.stdin.close()  # fd keeps the pipe open; the filter ends when the process does
  _running_filters.append(proc)


def quiet_start() -> None:
  """Imports TensorFlow without its start-up noise and hides accelerators from it (they belong to JAX).

  ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (TensorFlow's errors only); a user who
  sets it to 0 sees all of TensorFlow's start-up lines, unfiltered.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  verbose = os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
  with contextlib.nullcontext() if verbose else filtered_stderr():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    # Listing the devices to hide is what probes CUDA: inside the filter, so its no-driver error is dropped.
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TensorFlow's devices were set up before this call
      logging.warning("TensorFlow was initialised before quiet_start() and may hold GPUs: %s", e)
    try:
      tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # no TPU support in this TensorFlow
      pass


def _not_a_deprecation_notice(record: logging.LogRecord) -> bool:
  # "From .../tensorflow_datasets/core/reader.py:102: CounterV2 (from ...) is deprecated and will be removed ...":
  # TensorFlow's notices about the libraries' calls, which a user of this project cannot act on.
  message = record.getMessage()
  return not (message.startswith("From ") and " is deprecated and will be removed " in message)


def _not_a_sync_point_notice(record: logging.LogRecord) -> bool:
  # orbax's "[process=0][thread=...] Reached preemption sync point, step=5", once per thread: the trainer says
  # at which step it stopped, and why.
  return "Reached preemption sync point" not in record.getMessage()


def setup_logging() -> None:
  """INFO lines as ``time LEVEL message``; the libraries' chatter stays at WARNING.

  TensorFlow's logger gets a handler of its own when TensorFlow is imported
  before logging is set up (as :func:`quiet_start` does), which would print
  each of its lines twice; it is removed, and TensorFlow's deprecation notices
  about library code are dropped.
  """
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  absl_logger = logging.getLogger("absl")  # orbax logs through absl
  if _not_a_sync_point_notice not in absl_logger.filters:
    absl_logger.addFilter(_not_a_sync_point_notice)
  tf_logger = logging.getLogger("tensorflow")
  for handler in list(tf_logger.handlers):
    tf_logger.removeHandler(handler)
  if _not_a_deprecation_notice not in tf_logger.filters:
    tf_logger.addFilter(_not_a_deprecation_notice)
