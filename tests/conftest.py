"""Shared test set-up: quiet TensorFlow, keep it off accelerators (JAX owns them), one JAX compilation cache,
and the tiny models that many tests build (``tiny_t5_config``, ``tiny_t5``, ``save_tiny_hf_t5``).

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
# Speed choices come from the rules, not from timing this shared CPU, so every run of the suite traces the same
# programs (autotune is tested with a fake timer in test_autotune.py).
os.environ.setdefault("TOPK_AUTOTUNE", "0")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="topk_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

import pytest  # noqa: E402

# The tiny T5 most tests build: one encoder and one decoder layer, width 16, deterministic (no dropout).
TINY_T5 = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=1, num_decoder_layers=1,
               mlp_dim=32, dropout_rate=0.0)


def tiny_t5_config(**overrides):
  """A tiny ``network.T5Config`` (:data:`TINY_T5`), with ``overrides`` for the fields a test varies.

  A plain function as well as the fixture of the same name, so that a test's subprocess script can import it.
  """
  from topk_transformers.t5 import network  # pylint: disable=g-import-not-at-top

  return network.T5Config(**{**TINY_T5, **overrides})


@pytest.fixture(name="tiny_t5_config")
def _tiny_t5_config_factory():
  """The :func:`tiny_t5_config` factory: ``tiny_t5_config(top_k=4, mlp_dim=64)``."""
  return tiny_t5_config


@pytest.fixture
def tiny_t5():
  """The tiny T5 (``tiny_t5_config()``) as the model the trainer and decoders use, without vocabularies."""
  from topk_transformers.t5 import model as t5_model  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import network  # pylint: disable=g-import-not-at-top

  return t5_model.EncoderDecoderModel(network.Transformer(tiny_t5_config()))


@pytest.fixture
def model_config_error():
  """``model_config_error(gin_files, bindings, *needles)``: the message of the ``ConfigError`` that configuring
  gin and building its ``MODEL`` raises, checked to be one line that contains every needle."""
  from topk_transformers import gin_utils  # pylint: disable=g-import-not-at-top

  def check(gin_files, bindings, *needles):
    with pytest.raises(gin_utils.ConfigError) as info:
      gin_utils.configure(list(gin_files), list(bindings))
      gin_utils.get_macro("MODEL")
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
      assert needle in message, message
    return message

  return check


# The tiny Hugging Face T5 that the import and fine-tuning tests save: two layers each side, width 32.
TINY_HF_T5 = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


@pytest.fixture
def save_tiny_hf_t5():
  """Saves a tiny ``transformers`` T5 (:data:`TINY_HF_T5` with overrides, torch seed 0) to a directory.

  ``save_tiny_hf_t5(path, feed_forward_proj='gated-gelu')``; needs torch and transformers (the test skips
  without them, through its own ``pytest.importorskip``).
  """

  def save(path, **overrides):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(**{**TINY_HF_T5, **overrides})).save_pretrained(path)
    return str(path)

  return save


def assert_trees_equal(a, b):
  """The same tree structure and every leaf equal, bit for bit (arrays fetched to the host first)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  leaves_a, tree_a = jax.tree_util.tree_flatten(jax.device_get(a))
  leaves_b, tree_b = jax.tree_util.tree_flatten(jax.device_get(b))
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y)
