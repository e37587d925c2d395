"""Training-free Top-k (topk_sweep.py, topk-topk-sweep) on an imported checkpoint, over tfds mock GLUE."""

from __future__ import annotations

import json

import gin
import numpy as np
import pytest
import tensorflow_datasets as tfds

from topk_transformers.commands import topk_sweep as sweep_cmd
from topk_transformers.data import tasks, vocab
from topk_transformers.t5 import convert

pytest.importorskip("torch")  # save_tiny_hf_t5 saves a transformers T5
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def clean_gin(tmp_path, monkeypatch):
  monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path / "cache"))
  yield
  gin.clear_config()
  tasks.register_glue_task("sst2")


@pytest.mark.slow
def test_sweep_command_on_an_imported_dense_model(tmp_path, capsys, save_tiny_hf_t5):
  rng = np.random.default_rng(0)
  words = "the of and to in river city king war music sst2 sentence positive negative".split()
  (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(200)) + "\n")
  spm = vocab.train_sentencepiece([str(tmp_path / "corpus.txt")], str(tmp_path / "spm"), vocab_size=32)
  save_tiny_hf_t5(tmp_path / "hf", feed_forward_proj="relu", dropout_rate=0.0)
  config, params = convert.from_hf(str(tmp_path / "hf"))
  convert.save_project(config, params, str(tmp_path / "project"))
  # topk.gin sets the run's own TOP_K (8): the sweep's dense row must still be dense.
  argv = ["--gin_file=t5/t5_1_0/tiny.gin", "--gin_file=t5/topk.gin", "--gin_file=t5/runs/finetune.gin", "--gin.TOP_K=8",
          "--gin.MIXTURE_OR_TASK_NAME='glue_sst2_v2'", f"--gin.VOCABULARY_PATH='{spm}'", "--gin.EXTRA_IDS=100",
          f"--gin.TFDS_DATA_DIR='{tmp_path}'", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
          "--gin.NUM_EMBEDDINGS=256", "--gin.network.T5Config.emb_dim=32", "--gin.network.T5Config.num_heads=4",
          "--gin.network.T5Config.head_dim=8", "--gin.network.T5Config.mlp_dim=64", "--gin.DROPOUT_RATE=0.0",
          f"--checkpoint={tmp_path / 'project'}", "--k=8,64", "--eval_steps=2", "--batch_size=4",
          f"--out={tmp_path / 'out'}"]
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    assert sweep_cmd.main(argv) == 0
  out = capsys.readouterr().out
  assert "Training-free Top-k" in out and "dense" in out
  result = json.loads((tmp_path / "out" / "sweep.json").read_text())
  assert (tmp_path / "out" / "sweep.png").stat().st_size > 0
  dense, k8, k64 = result["rows"]
  assert [dense["k"], k8["k"], k64["k"]] == [None, 8, 64]
  # k = d_ff keeps every unit: the dense model exactly. k = 8 keeps at most 8 of 64 per token.
  assert k64["loss"] == dense["loss"] and k64["delta_loss"] == 0.0
  assert k8["percent_nonzero"] <= 100 * 8 / 64 + 1e-6 < dense["percent_nonzero"]
  assert k8["loss"] != dense["loss"] and k8["delta_loss"] == pytest.approx(k8["loss"] - dense["loss"])
