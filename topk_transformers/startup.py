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
import logging
import os
import subprocess
import sys
from typing import Iterator, Sequence

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
_FILTER_PROGRAM = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; we stop at end of input
noise = [re.compile(p.encode()) for p in sys.argv[1:]]
keep = lambda line: not any(n.fullmatch(line.rstrip(b"\r")) for n in noise)
pending = b""
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\n")
    out = b"".join(line + b"\n" for line in lines if keep(line))
    if out:
        os.write(1, out)
if pending and keep(pending):
    os.write(1, pending)
"""
_FILTER_WAIT_S = 10.0
_running_filters = []  # filters still forwarding for a process started inside the block


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[str] = TENSORFLOW_START_NOISE) -> Iterator[None]:
  """Within the block, file descriptor 2 goes through a filter that drops whole lines matching ``noise``.

  Every other line (Python's and C's alike) is passed on when it is complete,
  in order. Where no filter can be started (no Python interpreter to run it,
  fd 2 closed), the block runs unfiltered.
  """
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (AttributeError, OSError, ValueError):
    saved = None
  proc = None
  if saved is not None and sys.executable and not getattr(sys, "frozen", False):  # frozen: the executable is an app
    try:
      proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER_PROGRAM, *noise], stdin=subprocess.PIPE,
                              stdout=saved, stderr=saved, start_new_session=os.name == "posix")
    except OSError:
      proc = None
  if proc is None:
    if saved is not None:
      os.close(saved)
    yield
    return
  os.dup2(proc.stdin.fileno(), 2)
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
  tf_logger = logging.getLogger("tensorflow")
  for handler in list(tf_logger.handlers):
    tf_logger.removeHandler(handler)
  if _not_a_deprecation_notice not in tf_logger.filters:
    tf_logger.addFilter(_not_a_deprecation_notice)
