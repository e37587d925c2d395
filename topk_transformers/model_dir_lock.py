"""One trainer per ``MODEL_DIR``: a second one started on a directory that a live run uses is refused.

Each process of a run holds an exclusive ``flock`` on ``MODEL_DIR/.lock.process_<i>`` while it trains. The
kernel releases it when the process ends in any way (SIGKILL included), so a lock never outlives its run and
needs no cleaning. A second trainer finds the lock taken and stops with one line, before it reads or writes
anything else there. Remote directories (``gs://``) have no such lock: one launch per directory is the user's
to keep there.
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Optional

from topk_transformers.errors import ConfigError

PREFIX = ".lock.process_"


def is_lock_file(name: str) -> bool:
  return name.startswith(PREFIX)


class ModelDirLock:
  """``with ModelDirLock(model_dir, process_index):`` holds this process's lock on ``model_dir``."""

  def __init__(self, model_dir: str, process_index: int = 0):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, f"{PREFIX}{process_index}")
    self._fd: Optional[int] = None

  def __enter__(self) -> "ModelDirLock":
    if "://" in self.model_dir:
      return self
    os.makedirs(self.model_dir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
      os.close(fd)
      raise ConfigError(f"MODEL_DIR {self.model_dir} is in use by a running trainer ({holder}); wait for it to "
                        "end, stop it, or use another MODEL_DIR") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # releases the lock; the file stays, for the next run to lock
      self._fd = None
