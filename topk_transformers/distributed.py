"""Which process of a multi-process run this is, and ``jax.distributed`` started before any device is touched.

A run on a pod (or a GPU cluster) is one process per host, all in one SPMD program. Every command starts it the
same way, before gin builds anything (a ``Partitioner`` lists the devices of every host, so the distributed
runtime must be up by then):

* explicitly, with T5X's flags ``--coordinator_address=HOST:PORT --process_count=N --process_index=I``
  (all three, or ``--process_count``/``--process_index`` with ``JAX_COORDINATOR_ADDRESS`` set);
* or detected: a Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` with several hosts, ``MEGASCALE_*``), SLURM
  (``SLURM_NTASKS`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1), where JAX finds the rest itself.

A half-given set of flags, an index out of range, or a coordinator without a process count is a one-line
``ConfigError``. When a process of a running job dies, JAX's coordination service stops the others (after
``TOPK_HEARTBEAT_TIMEOUT_S`` seconds without a heartbeat, 60 by default); :func:`lost_process_filter` turns the
service's fatal report into one line that names the lost process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import List, Optional, Sequence, Tuple

from topk_transformers.errors import ConfigError

FLAGS = ("coordinator_address", "process_count", "process_index")
HEARTBEAT_TIMEOUT_ENV = "TOPK_HEARTBEAT_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Processes:
  """An explicit multi-process launch: where the coordinator listens, how many processes, which one this is."""

  coordinator_address: str
  process_count: int
  process_index: int

  def __post_init__(self):
    host, _, port = self.coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ConfigError(f"--coordinator_address must be HOST:PORT, got {self.coordinator_address!r}")
    if self.process_count < 1:
      raise ConfigError(f"--process_count must be >= 1, got {self.process_count}")
    if not 0 <= self.process_index < self.process_count:
      raise ConfigError(f"--process_index={self.process_index} is out of range for --process_count="
                        f"{self.process_count} (0 to {self.process_count - 1})")


def split_flags(argv: Sequence[str]) -> Tuple[Optional[Processes], List[str]]:
  """``(the launch the flags describe, or None; the other arguments)``.

  Accepts ``--flag=value`` and ``--flag value``. Only some of the three flags given (without
  ``JAX_COORDINATOR_ADDRESS`` for the address) is a ``ConfigError``.
  """
  values, rest = {}, []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
    if name in FLAGS:
      if "=" in arg:
        value = arg.split("=", 1)[1]
      elif i + 1 < len(args):
        i += 1
        value = args[i]
      else:
        raise ConfigError(f"--{name} needs a value")
      if name in values:
        raise ConfigError(f"--{name} is given twice")
      values[name] = value
    else:
      rest.append(arg)
    i += 1
  if not values:
    return None, rest
  if "coordinator_address" not in values and os.environ.get("JAX_COORDINATOR_ADDRESS"):
    values["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
  missing = [f"--{f}" for f in FLAGS if f not in values]
  if missing:
    given = ", ".join(f"--{f}" for f in FLAGS if f in values)
    raise ConfigError(f"{given} given without {' and '.join(missing)}: a multi-process launch needs all of "
                      "--coordinator_address, --process_count and --process_index")
  numbers = {}
  for name in ("process_count", "process_index"):
    try:
      numbers[name] = int(values[name])
    except ValueError:
      raise ConfigError(f"--{name} must be an integer, got {values[name]!r}") from None
  return Processes(values["coordinator_address"], **numbers), rest


def detected_cluster() -> Optional[str]:
  """The multi-host environment that JAX can read its processes from, or ``None`` for a one-process run."""
  env = os.environ
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "a TPU pod slice (TPU_WORKER_HOSTNAMES)"
  if "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "a multi-slice TPU job (MEGASCALE_COORDINATOR_ADDRESS)"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return "a SLURM job (SLURM_NTASKS)"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "an Open MPI job (OMPI_COMM_WORLD_SIZE)"
  return None


def heartbeat_timeout_s() -> int:
  text = os.environ.get(HEARTBEAT_TIMEOUT_ENV, str(DEFAULT_HEARTBEAT_TIMEOUT_S))
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise ConfigError(f"{HEARTBEAT_TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
  return value


_STARTED: Optional[Tuple[int, int]] = None


def started() -> bool:
  """Whether :func:`initialize` started a multi-process run in this process."""
  return _STARTED is not None


def initialize(processes: Optional[Processes] = None) -> None:
  """Starts ``jax.distributed`` for an explicit launch or a detected cluster; nothing for a one-process run.

  Must come before anything lists devices or runs on them; if JAX's backends are already up, that is a
  ``ConfigError`` naming the cause. Idempotent.
  """
  global _STARTED
  if _STARTED is not None:
    return
  cluster = None
  if processes is None:
    cluster = detected_cluster()
    if cluster is None and os.environ.get("JAX_COORDINATOR_ADDRESS"):
      raise ConfigError("JAX_COORDINATOR_ADDRESS is set but this process does not know which of how many it is: "
                        "pass --process_count=N and --process_index=I too")
    if cluster is None:
      return
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if xla_bridge.backends_are_initialized():
    raise ConfigError("the multi-process run must start before JAX uses a device, but JAX's backends are already "
                      "up in this process; start it first (topk_transformers.distributed.initialize)")
  timeout = heartbeat_timeout_s()
  what = f"coordinator {processes.coordinator_address}" if processes else cluster
  try:
    if processes is not None:
      jax.distributed.initialize(processes.coordinator_address, processes.process_count, processes.process_index,
                                 heartbeat_timeout_seconds=timeout)
    else:
      jax.distributed.initialize(heartbeat_timeout_seconds=timeout)
  except (ValueError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"cannot start the multi-process run ({what}): {first}; pass --coordinator_address, "
                      "--process_count and --process_index") from None
  _STARTED = (jax.process_index(), jax.process_count())
  if jax.process_index() == 0:
    logging.info("multi-process run: %d processes, %d devices (%s)", jax.process_count(), jax.device_count(), what)


def process() -> Tuple[int, int]:
  """``(index, count)`` of this process; ``(0, 1)`` when no multi-process run was started."""
  return _STARTED or (0, 1)


def processes_where(flag: bool) -> List[int]:
  """The indices of the processes where ``flag`` is true: a collective, so every process must call it."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return [0] if flag else []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).reshape(-1)
  return [int(i) for i in np.flatnonzero(flags)]


# ---- the one-line report of a lost process

# JAX's coordination service ends every surviving process with a fatal log and a stack trace when another one
# dies: "F... client.h:NN] Terminating process because the JAX distributed service detected fatal errors. ...
# The following tasks are unhealthy (stopped sending heartbeats):\n1\n..." (a worker lost), or "... Failed to
# send RPC to coordination service. Either the leader task was preempted/died..." (process 0 lost).
COORDINATION_ERROR = r"E\d{4} \S+ +\d+ coordination_service(?:_agent)?\.cc:\d+\] .*"
TERMINATING = (r"F\d{4} \S+ +\d+ client\.h:\d+\] Terminating process because the JAX distributed service "
               r"detected fatal errors\..*")
# Lines of the runtime that say nothing a user acts on: the CPU collectives' connection count, and the
# preemption notifier's note of a SIGTERM (the trainer says what it does about it). Two threads print the
# connection count at once, so a line may hold the start of the other's ("[Gloo] Rank [Gloo] Rank 0 is ...",
# then "1 is connected ...").
RUNTIME_CHATTER = (
    r"(?:\[Gloo\] Rank )*(?:\d+ )?is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+",
    r"W\d{4} \S+ +\d+ preemption_notifier\.cc:\d+\] SIGTERM caught at .*",
)


PEER_FAILURE = re.compile(r"Gloo .*failed|Connection reset by peer|Connection closed by peer|Broken pipe")


def is_peer_failure(exc: BaseException) -> bool:
  """Whether ``exc`` is a collective of a multi-process run that failed because another process went away."""
  if not started():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  seen = set()
  while exc is not None and id(exc) not in seen:  # orbax and gin wrap it
    if isinstance(exc, jax.errors.JaxRuntimeError) and PEER_FAILURE.search(str(exc)):
      return True
    seen.add(id(exc))
    exc = exc.__cause__ or exc.__context__
  return False


def await_lost_process_report(exc: BaseException) -> str:
  """After :func:`is_peer_failure`: waits for the coordination service to name the lost process (it ends this
  process with :func:`lost_process_line`'s line once the heartbeat is missed); the line to print if it does not."""
  import time  # pylint: disable=g-import-not-at-top
  time.sleep(heartbeat_timeout_s() + 15)
  index, count = process()
  first = str(exc).strip().splitlines()[0]
  return (f"[process {index}] a collective with the other processes failed ({first}); another of the {count} "
          "processes has probably stopped. Restart all processes on the same MODEL_DIR: they resume from the "
          "last complete checkpoint")


def lost_process_line(report: str, process_index: int, process_count: int) -> str:
  """The one line that replaces the coordination service's fatal report (``report``: its text, all lines)."""
  unhealthy = re.search(r"stopped sending heartbeats\):\s*\n((?:\s*\d+\s*\n?)+)", report)
  if unhealthy:
    lost = sorted({int(t) for t in re.findall(r"\d+", unhealthy.group(1))})
    who = ("process " if len(lost) == 1 else "processes ") + ", ".join(map(str, lost))
    cause = f"{who} of {process_count} stopped responding (no heartbeat)"
  elif re.search(r"leader task was preempted|Failed to send RPC to coordination service", report):
    cause = f"process 0 of {process_count}, the coordinator, stopped responding"
  else:
    status = re.search(r"absl::Status: (.*)", report)
    cause = f"the distributed runtime failed: {status.group(1).strip() if status else 'see the other processes'}"
  return (f"error: [process {process_index}] {cause}; this process stops too. Restart all processes on the same "
          "MODEL_DIR: they resume from the last complete checkpoint")
