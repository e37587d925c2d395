"""Command-line entry points (``scripts/*.py`` and the ``topk-*`` console scripts call these).

Flags follow T5X: ``--gin_file=...`` (repeatable) and ``--gin.NAME=VALUE``, e.g.::

  python scripts/train.py --gin_file=configs/t5/t5_1_0/base.gin --gin_file=configs/t5/topk.gin \
      --gin_file=configs/t5/runs/pretrain_c4.gin --gin.MODEL_DIR="'gs://bucket/run'"
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence

import gin

from topk_transformers import gin_utils


def _quiet_tf() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # tf.data only: TensorFlow must not grab accelerators that JAX owns.
  tf.config.set_visible_devices([], "GPU")
  try:
    tf.config.set_visible_devices([], "TPU")
  except (RuntimeError, ValueError):
    pass


def _setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _write_config(model_dir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(os.path.join(model_dir, "config.gin"), "w") as f:
      f.write(gin.config_str())


@gin_utils.exit_on_config_error
def train_main(argv: Optional[Sequence[str]] = None) -> None:
  """``topk-train``: runs ``train.train`` as configured by the gin files."""
  _quiet_tf()
  _setup_logging()
  from topk_transformers import train as train_lib  # pylint: disable=g-import-not-at-top

  rest = gin_utils.configure_from_argv(argv)
  if rest:
    raise gin_utils.ConfigError(f"unknown arguments: {' '.join(rest)}")
  model_dir = gin_utils.get_macro("MODEL_DIR")
  train_fn = gin.get_configurable(train_lib.train)
  try:
    _write_config(model_dir)
    result = train_fn()
  except gin_utils.ConfigError:
    raise
  except (ValueError, TypeError) as e:
    if _is_config_problem(e):
      raise gin_utils.ConfigError(gin_utils.one_line(e)) from None
    raise
  except train_lib.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    from topk_transformers import checkpoints  # pylint: disable=g-import-not-at-top

    if isinstance(e, (checkpoints.CheckpointError, FileNotFoundError)):
      print(f"error: {gin_utils.one_line(e)}", file=sys.stderr)
      sys.exit(1)
    raise
  if result.preempted:
    sys.exit(143)


def _is_config_problem(e: Exception) -> bool:
  text = str(e)
  return any(s in text for s in ("gin", "top_k", "must be", "got"))


def eval_main(argv: Optional[Sequence[str]] = None) -> None:
  from topk_transformers import evaluate  # pylint: disable=g-import-not-at-top

  evaluate.main(sys.argv[1:] if argv is None else argv)


def model_info_main(argv: Optional[Sequence[str]] = None) -> None:
  import runpy  # pylint: disable=g-import-not-at-top

  sys.argv = ["model_info.py", *(sys.argv[1:] if argv is None else argv)]
  runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "model_info.py"),
                 run_name="__main__")
