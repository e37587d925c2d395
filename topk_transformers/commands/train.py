"""``topk-train``: trains the model that the gin files describe (``train.train``).

  topk-train --gin_file=t5/runs/cpu_smoke.gin --gin.MODEL_DIR="'/tmp/topk_t5_smoke'"

Flags follow T5X: ``--gin_file=...`` (repeatable; packaged names such as
``t5/t5_1_0/base.gin`` or paths to your own files) and ``--gin.NAME=VALUE``.
Exit status 143 after SIGTERM, once the checkpoint is written.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional

from topk_transformers.commands import common

if TYPE_CHECKING:  # the command imports train (and TensorFlow's data stack) only when it runs
  from topk_transformers import train

EXIT_PREEMPTED = 143


def exit_if_preempted(result: "train.TrainResult", run_name: str, train_steps: Optional[int] = None) -> None:
  """For runners that train several runs: a run stopped by SIGTERM (its checkpoint written) ends the
  process with :data:`EXIT_PREEMPTED`, before anything measures or evaluates an unfinished run.

  The one-line message names the run and its step (``of train_steps`` when given); the same command
  resumes it.
  """
  if not result.preempted:
    return
  of = "" if train_steps is None else f" of {train_steps}"
  print(f"[{run_name}] stopped by SIGTERM at step {int(result.state.step)}{of}, checkpoint written; "
        "run the same command again to resume", file=sys.stderr, flush=True)
  raise SystemExit(EXIT_PREEMPTED)


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
  return EXIT_PREEMPTED if result.preempted else 0
