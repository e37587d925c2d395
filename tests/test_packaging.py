"""The package as a user gets it: a wheel with its gin configs, console scripts, and a core free of TensorFlow."""

import glob
import os
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_core_modules_import_neither_tensorflow_nor_seqio_nor_gin():
  code = ("import sys\n"
          "import topk_transformers.topk, topk_transformers.t5.network, topk_transformers.vit.network\n"
          "import topk_transformers.decoding, topk_transformers.t5.sizes, topk_transformers.benchmarks.decoding\n"
          "import topk_transformers.row_kernels, topk_transformers.predictors\n"
          "print(' '.join(m for m in ('tensorflow', 'seqio', 'gin') if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
  assert out.stdout.strip() == ""


def test_packaged_gin_names_resolve_from_any_directory(tmp_path, monkeypatch):
  from topk_transformers import gin_utils

  monkeypatch.chdir(tmp_path)
  # A user's own file includes the packaged ones by their packaged names.
  mine = tmp_path / "mine.gin"
  mine.write_text("include 't5/t5_1_0/tiny.gin'\ninclude 't5/topk.gin'\nTOP_K = 8\n")
  gin_utils.configure([str(mine)])
  assert gin_utils.get_macro("MODEL").module.config.top_k == 8
  gin_utils.configure(["vit/b16.gin"])
  assert gin_utils.get_macro("MODEL").module.variant == "B/16"
  with pytest.raises(gin_utils.ConfigError, match="gin file not found: 't5/nope.gin'"):
    gin_utils.configure(["t5/nope.gin"])


def _site_packages(venv: str) -> str:
  return sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv})


@pytest.mark.slow
def test_wheel_installs_and_trains_the_packaged_smoke_config_from_an_empty_directory(tmp_path):
  """Builds the wheel, installs it (no deps) into a fresh venv that sees this venv's dependencies, trains 2 steps."""
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                  REPO], check=True, capture_output=True, cwd=tmp_path)
  wheel, = glob.glob(str(wheels / "topk_transformers-*.whl"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  # The dependencies come from this environment's site-packages as a plain path: its .pth files (and so the
  # editable install of this checkout) are not processed, so the package imported is the wheel's.
  site = _site_packages(str(venv))
  with open(os.path.join(site, "deps.pth"), "w") as f:
    f.write(_site_packages(sys.prefix) + "\n")
  python = str(venv / "bin" / "python")
  subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], check=True,
                 capture_output=True)
  where = subprocess.run([python, "-c", "import topk_transformers, os; print(os.path.dirname(topk_transformers.__file__))"],
                         check=True, capture_output=True, text=True, cwd=tmp_path).stdout.strip()
  assert where.startswith(str(venv)), where
  assert os.path.isfile(os.path.join(where, "configs", "t5", "runs", "cpu_smoke.gin"))
  assert os.path.isfile(os.path.join(where, "native", "row_kernels.cc"))  # built on first use from the wheel
  empty = tmp_path / "empty"
  empty.mkdir()
  run_dir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  # The packaged config on small shapes (one layer per stack, short sequences): what is checked is the wheel.
  small = ["--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.network.T5Config.emb_dim=32",
           "--gin.network.T5Config.mlp_dim=64", "--gin.network.T5Config.num_encoder_layers=1",
           "--gin.network.T5Config.num_decoder_layers=1", "--gin.TOP_K=8"]
  proc = subprocess.run([str(venv / "bin" / "topk-train"), "--gin_file=t5/runs/cpu_smoke.gin",
                         f"--gin.MODEL_DIR='{run_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4",
                         "--gin.EVAL_STEPS=1", "--gin.LOG_PERIOD=1", *small],
                        cwd=empty, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2/2" in proc.stdout
  assert (run_dir / "checkpoints" / "2").is_dir() and os.listdir(empty) == []
  assert "network.T5Config" in (run_dir / "config.gin").read_text()
  assert "held-out example 0" in proc.stdout  # the packaged config's end-of-training report ran
