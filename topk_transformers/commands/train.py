"""``topk-train``: trains the model that the gin files describe (``train.train``).

  topk-train --gin_file=t5/runs/cpu_smoke.gin --gin.MODEL_DIR="'/tmp/topk_t5_smoke'"

Flags follow T5X: ``--gin_file=...`` (repeatable; packaged names such as
``t5/t5_1_0/base.gin`` or paths to your own files) and ``--gin.NAME=VALUE``.
Exit status 143 after SIGTERM, once the checkpoint is written.
"""

from __future__ import annotations

from topk_transformers.commands import common

EXIT_PREEMPTED = 143


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
