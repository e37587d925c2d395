"""The quiet start: none of TensorFlow's start-up noise, every other line kept, TensorFlow off accelerators."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

# What TensorFlow 2.21 prints on a machine without a GPU (copied from a real start).
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796114014.372959    5614 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "E0000 00:00:1796114000.982044    4956 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1796114014.430064    5614 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    "compiler flags.",
]
# Signatures of the three lines a newcomer saw first.
NOISE_MARKS = ("absl::InitializeLog", "cuInit", "cudart_stub", "cpu_feature_guard", "oneDNN")
# Not noise: a CUDA error with a driver present, and a line that merely mentions one of the noisy files.
REAL = [
    "E0000 00:00:1796114000.982044    4956 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    "W0000 00:00:1796114000.982044    4956 cudart_stub.cc:31] something else went wrong",
]


def _python(code, tmp_path, fake_tensorflow=None, env=None):
  """Runs ``code`` in a fresh interpreter; ``fake_tensorflow``: the source of a stand-in ``tensorflow``."""
  environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  paths = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
  if fake_tensorflow is not None:
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(fake_tensorflow))
    paths.insert(0, str(tmp_path / "fake"))
  environ["PYTHONPATH"] = os.pathsep.join(paths + [environ.get("PYTHONPATH", "")])
  environ.update(env or {})
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environ,
                        timeout=120, cwd=str(tmp_path))


def _writes(lines):
  return "".join(f"os.write(2, {(line + chr(10)).encode()!r})\n" for line in lines)


FAKE_TF = """
import os, types
{import_writes}
hidden = []

def set_visible_devices(devices, device_type=None):
  os.write(2, {cuinit!r})  # listing the GPUs probes CUDA
  hidden.append((device_type, list(devices)))

config = types.SimpleNamespace(set_visible_devices=set_visible_devices)
{tail}
"""


def _fake_tf(import_lines, tail=""):
  return FAKE_TF.format(import_writes=_writes(import_lines), cuinit=(NOISE[2] + "\n").encode(), tail=tail)


def test_quiet_start_prints_none_of_tensorflows_noise_and_hides_accelerators_from_it(tmp_path):
  result = _python("""
      from topk_transformers import startup
      startup.quiet_start()
      import os, jax, tensorflow as tf
      print(tf.config.get_visible_devices("GPU"), tf.config.get_visible_devices("TPU"), jax.devices()[0].platform,
            repr(os.environ.get("CUDA_VISIBLE_DEVICES")).replace(" ", ""))
  """, tmp_path)
  assert result.returncode == 0, result.stderr
  for mark in NOISE_MARKS:
    assert mark not in result.stderr
  # TensorFlow sees no accelerator; JAX keeps its own (cpu here), and CUDA_VISIBLE_DEVICES is left alone.
  cuda_visible = repr(os.environ.get("CUDA_VISIBLE_DEVICES")).replace(" ", "")
  assert result.stdout.split() == ["[]", "[]", jax_platform(), cuda_visible]


def jax_platform():
  import jax  # pylint: disable=g-import-not-at-top

  return jax.devices()[0].platform


def test_quiet_start_drops_exactly_the_noise_and_keeps_other_lines_in_order(tmp_path):
  lines = [NOISE[0], NOISE[1], "2026-01-01 a Python warning", NOISE[0], NOISE[1], NOISE[3], NOISE[4], REAL[0],
           REAL[1]]
  result = _python("""
      from topk_transformers import startup
      startup.quiet_start()
      import tensorflow as tf
      print(tf.hidden)
  """, tmp_path, fake_tensorflow=_fake_tf(lines))
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines() == ["2026-01-01 a Python warning", REAL[0], REAL[1]]
  assert result.stdout.strip() == "[('GPU', []), ('TPU', [])]"


def test_import_error_of_tensorflow_still_surfaces(tmp_path):
  result = _python("""
      from topk_transformers import startup
      startup.quiet_start()
  """, tmp_path, fake_tensorflow=_fake_tf(
      [NOISE[0], NOISE[1], "a real loader message"],
      tail="raise ImportError('libtensorflow_framework.so.2: cannot open shared object file')"))
  assert result.returncode == 1
  assert "a real loader message" in result.stderr
  assert "ImportError: libtensorflow_framework.so.2: cannot open shared object file" in result.stderr
  assert "Traceback" in result.stderr
  for mark in NOISE_MARKS:
    assert mark not in result.stderr


def test_a_fatal_message_before_an_abort_is_not_lost(tmp_path):
  fatal = ("F0000 00:00:1796114014.372959    5614 cpu_feature_guard.cc:90] The TensorFlow library was compiled to "
           "use AVX instructions, but these aren't available on your machine.")
  result = _python("""
      from topk_transformers import startup
      startup.quiet_start()
  """, tmp_path, fake_tensorflow=_fake_tf([NOISE[0], fatal], tail="os.abort()"))
  assert result.returncode == -signal.SIGABRT
  assert result.stderr.splitlines() == [fatal]


def test_stderr_is_restored_after_the_quiet_start(tmp_path):
  result = _python("""
      import os, sys
      from topk_transformers import startup
      startup.quiet_start()
      os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
      print("python after", file=sys.stderr)
  """, tmp_path, fake_tensorflow=_fake_tf([NOISE[1]]))
  assert result.returncode == 0
  # After the start nothing is filtered: the same line, printed later, is not TensorFlow's start-up noise.
  assert result.stderr.splitlines() == [NOISE[0], "python after"]


def test_tf_cpp_min_log_level_0_shows_everything(tmp_path):
  result = _python("""
      from topk_transformers import startup
      startup.quiet_start()
  """, tmp_path, fake_tensorflow=_fake_tf([NOISE[0], NOISE[1]]), env={"TF_CPP_MIN_LOG_LEVEL": "0"})
  assert result.returncode == 0
  assert result.stderr.splitlines() == [NOISE[0], NOISE[1], NOISE[2], NOISE[2]]


@pytest.mark.parametrize("level", [None, "1"])
def test_tf_cpp_min_log_level_defaults_to_2_and_a_users_value_is_kept(tmp_path, level):
  result = _python("""
      import os
      from topk_transformers import startup
      startup.quiet_start()
      print(os.environ["TF_CPP_MIN_LOG_LEVEL"])
  """, tmp_path, fake_tensorflow=_fake_tf([]), env={"TF_CPP_MIN_LOG_LEVEL": level} if level else None)
  assert result.stdout.strip() == (level or "2")


def test_tensorflow_log_lines_come_once_in_the_projects_format_without_deprecation_notices(tmp_path):
  # Like TensorFlow's tf_logging: imported before logging is set up, it gives its logger a handler of its own.
  tail = ("import logging\n"
          "logging.getLogger('tensorflow').addHandler(logging.StreamHandler())\n")
  result = _python("""
      import logging
      from topk_transformers import startup
      startup.quiet_start()
      startup.setup_logging()
      tf_logger = logging.getLogger("tensorflow")
      tf_logger.warning("From /x/tensorflow_datasets/core/reader.py:102: CounterV2 (from tensorflow.python.data."
                        "experimental.ops.counter) is deprecated and will be removed in a future version.\\n"
                        "Instructions for updating:\\nUse `tf.data.Dataset.counter(...)` instead.")
      tf_logger.warning("a real TensorFlow warning")
      tf_logger.info("TensorFlow chatter")
  """, tmp_path, fake_tensorflow=_fake_tf([], tail=tail))
  assert result.returncode == 0, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].endswith(" WARNING a real TensorFlow warning"), lines
