"""Shared test set-up: quiet TensorFlow, keep it off accelerators (JAX owns them)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
