"""Shared test set-up: quiet TensorFlow, keep it off accelerators (JAX owns them), and one JAX compilation cache.

The cache is a fresh directory per session, removed at its end, so every session starts cold as on a new
clone. Many tests build the same program more than once (a trainer's step after a restart, an evaluation
repeated by a command, the same tiny model in several runs, in this process and in the subprocesses,
which inherit the variable): XLA compiles each distinct program once and later builds load it. A cache hit
is the same executable XLA would compile again; what the tests compute does not change. A directory set by
the caller (``scripts/mutation_test.sh`` sets its own) is kept.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="topk_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
