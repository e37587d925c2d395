"""``topk-launch``: a pod run rehearsed on one machine, N local processes with D host (CPU) devices each.

  topk-launch --processes=2 --devices_per_process=2 -- \\
      topk-train --gin_file=t5/runs/cpu_smoke.gin --gin.MODEL_DIR="'/tmp/pods'"

Each process gets T5X's flags (``--coordinator_address=127.0.0.1:PORT --process_count=N --process_index=I``,
on a free loopback port) and ``--xla_force_host_platform_device_count=D``; together they are one SPMD program
over N x D devices, its collectives over loopback. Their output reads as one run: process 0's goes to the
terminal; the others' goes to ``--log_dir`` (a new temporary directory by default) and is shown, under its
process's name, only when that process fails.

SIGTERM or Ctrl-C reaches every process (a preemption: they agree on a step, checkpoint it and exit 143 or 130).
When a process fails, the others stop on their own once the distributed runtime misses its heartbeat
(``TOPK_HEARTBEAT_TIMEOUT_S``); any still running ``--grace_s`` later are killed. The exit status is the first
failing process's (128 + the signal for one killed by a signal), else 0.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from topk_transformers.commands import common

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
TAIL_LINES = 20
STOPPED_BY_SIGTERM, STOPPED_BY_SIGINT = 143, 130  # topk-train's statuses after a signal, its checkpoint written


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices: int, base: Optional[dict] = None) -> dict:
  """The environment of one process: ``devices`` host devices, JAX on the CPU unless the caller chose."""
  env = dict(os.environ if base is None else base)
  flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _die_with_parent() -> None:
  """In the child, before it runs the command: a SIGKILL when the launcher dies (Linux), so that a launcher killed
  without the chance to pass a signal on leaves no process behind."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def describe_status(status: int) -> str:
  if status < 0:
    try:
      return f"was killed by {signal.Signals(-status).name}"
    except ValueError:
      return f"was killed by signal {-status}"
  return f"exited with status {status}"


def exit_status(status: int) -> int:
  return 128 - status if status < 0 else status


def tail(path: str, lines: int = TAIL_LINES) -> List[str]:
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return []
  return [line for line in text.splitlines() if line.strip()][-lines:]


@common.command(tensorflow=False)
def main(argv) -> int:
  parser = common.ArgumentParser(prog="topk-launch", description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, required=True, help="how many processes (hosts) to start")
  parser.add_argument("--devices_per_process", type=int, default=1, help="host (CPU) devices of each process")
  parser.add_argument("--log_dir", default=None, help="where processes 1..N-1 write their output")
  parser.add_argument("--grace_s", type=float, default=None,
                      help="after a process fails, seconds before the ones still running are killed "
                      "(default: the heartbeat timeout + 60)")
  if "--" not in argv:
    raise common.ConfigError("topk-launch: give the command after '--', e.g. topk-launch --processes=2 -- "
                             "topk-train --gin_file=t5/runs/cpu_smoke.gin ...")
  split = argv.index("--")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    raise common.ConfigError("topk-launch: no command after '--'")
  if args.processes < 1 or args.devices_per_process < 1:
    raise common.ConfigError("topk-launch: --processes and --devices_per_process must be >= 1")
  from topk_transformers import distributed  # pylint: disable=g-import-not-at-top
  grace = args.grace_s if args.grace_s is not None else distributed.heartbeat_timeout_s() + 60
  log_dir = args.log_dir or tempfile.mkdtemp(prefix="topk-launch-")
  os.makedirs(log_dir, exist_ok=True)
  port = free_port()
  env = child_env(args.devices_per_process)
  print(f"topk-launch: {args.processes} processes x {args.devices_per_process} devices, coordinator "
        f"127.0.0.1:{port}" + (f"; processes 1-{args.processes - 1} write to {log_dir}" if args.processes > 1 else ""),
        file=sys.stderr, flush=True)

  children = []
  logs = {}
  for i in range(args.processes):
    flags = [f"--coordinator_address=127.0.0.1:{port}", f"--process_count={args.processes}", f"--process_index={i}"]
    out = None
    if i > 0:
      logs[i] = os.path.join(log_dir, f"process_{i}.log")
      out = open(logs[i], "wb")  # pylint: disable=consider-using-with
    try:
      children.append(subprocess.Popen(command + flags, env=env, stdout=out, stderr=out, start_new_session=True,
                                       preexec_fn=_die_with_parent if sys.platform == "linux" else None))
    except OSError as e:
      for child in children:
        child.kill()
      raise common.ConfigError(f"topk-launch: cannot start {command[0]}: {e.strerror}") from None
    finally:
      if out is not None:
        out.close()

  def forward(signum, frame):
    del frame
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  first_failure = None  # (time, status)
  try:
    reported = set()
    while True:
      running = [c for c in children if c.poll() is None]
      for i, child in enumerate(children):
        status = child.returncode
        if status is None or i in reported:
          continue
        reported.add(i)
        if status != 0:
          if first_failure is None:
            first_failure = (time.monotonic(), status)
          print(f"topk-launch: [process {i}] {describe_status(status)}", file=sys.stderr, flush=True)
          stopped = status in (STOPPED_BY_SIGTERM, STOPPED_BY_SIGINT)  # a checkpoint written, as asked
          for line in tail(logs[i]) if i in logs and not stopped else []:
            print(f"[process {i}] {line}", file=sys.stderr, flush=True)
      if not running:
        break
      if first_failure is not None and time.monotonic() - first_failure[0] > grace:
        for child in running:
          child.kill()
        names = ", ".join(str(children.index(c)) for c in running)
        print(f"topk-launch: process(es) {names} still running {grace:.0f} s after the first failure: killed",
              file=sys.stderr, flush=True)
      time.sleep(0.2)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  return exit_status(first_failure[1]) if first_failure else 0
