"""``topk-train``: trains the model that the gin files describe (``train.train``).

  topk-train --gin_file=t5/runs/cpu_smoke.gin --gin.MODEL_DIR="'/tmp/topk_t5_smoke'"

Flags follow T5X: ``--gin_file=...`` (repeatable; packaged names such as
``t5/t5_1_0/base.gin`` or paths to your own files) and ``--gin.NAME=VALUE``.
Exit status 143 after SIGTERM and 130 after Ctrl-C (SIGINT), once the checkpoint of the step in progress
is written, with one line naming the step; the same command resumes from there. A second Ctrl-C stops at once,
without that checkpoint (exit 130, one line).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional

from topk_transformers.commands import common

if TYPE_CHECKING:  # the command imports train (and TensorFlow's data stack) only when it runs
  from topk_transformers import train

EXIT_PREEMPTED = 143  # 128 + SIGTERM
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def stop_status(result: "train.TrainResult") -> int:
  """The exit status of a run stopped by a signal: 130 after SIGINT (Ctrl-C), else 143."""
  return EXIT_INTERRUPTED if result.stop_signal == "SIGINT" else EXIT_PREEMPTED


def stop_message(result: "train.TrainResult", train_steps: Optional[int] = None) -> str:
  of = "" if train_steps is None else f" of {train_steps}"
  return (f"stopped by {result.stop_signal or 'SIGTERM'} at step {int(result.state.step)}{of}, checkpoint written; "
          "run the same command again to resume")


def exit_if_preempted(result: "train.TrainResult", run_name: str, train_steps: Optional[int] = None) -> None:
  """For runners that train several runs: a run stopped by SIGTERM or Ctrl-C (its checkpoint written) ends
  the process with :data:`EXIT_PREEMPTED` or :data:`EXIT_INTERRUPTED`, before anything measures or evaluates
  an unfinished run.

  The one-line message names the run and its step (``of train_steps`` when given); the same command
  resumes it.
  """
  if not result.preempted:
    return
  print(f"[{run_name}] {stop_message(result, train_steps)}", file=sys.stderr, flush=True)
  raise SystemExit(stop_status(result))


@common.command
def main(argv) -> int:
  from topk_transformers import gin_utils, train  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = common.gin_flags(argv)
  if rest:
    raise common.ConfigError(f"unknown arguments: {' '.join(rest)}")
  gin_utils.configure(gin_files, bindings)
  try:
    result = train.train_from_gin()
  except train.NonFiniteLossError as e:
    raise common.CommandFailed(str(e)) from None
  except KeyboardInterrupt:  # Ctrl-C before the training loop, or a second one inside it
    print("error: interrupted (Ctrl-C) without writing a checkpoint; run the same command again to resume from "
          "the last one", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  if result.preempted:
    print(stop_message(result), file=sys.stderr, flush=True)
    return stop_status(result)
  return 0
