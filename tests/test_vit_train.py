"""The ViT run configs: cpu_smoke.gin trains through the real trainer and tfds digits, topk-eval evaluates it."""

import json
import os

import gin
import jax
import numpy as np
import pytest

from topk_transformers import evaluators, gin_utils, runs
from topk_transformers.commands import eval as eval_command
from topk_transformers import train as train_lib
from topk_transformers.vit import model as vit_model

SMOKE = "vit/runs/cpu_smoke.gin"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """A short Top-k run of the smoke config on digits built in a temporary tfds dir (~30 s on a busy CPU)."""
  root = tmp_path_factory.mktemp("vit_smoke")
  run_dir, data_dir = str(root / "run"), str(root / "tfds")
  bindings = [f"MODEL_DIR = '{run_dir}'", f"vision.ImageDataset.data_dir = '{data_dir}'", "TRAIN_STEPS = 150",
              "WARMUP_STEPS = 10", "BATCH_SIZE = 32", "LOG_PERIOD = 50", "EVAL_PERIOD = 150", "CHECKPOINT_PERIOD = 150"]
  gin_utils.configure([SMOKE], bindings)
  result = gin.get_configurable(train_lib.train)()
  return run_dir, bindings, result


@pytest.mark.slow
def test_smoke_config_trains_a_topk_vit_on_digits(smoke_run):
  _, _, result = smoke_run
  assert int(result.state.step) == 150
  losses = [m["loss"] for _, m in result.log]
  # Ten classes start at ln(10) = 2.30 (zero head); the loss falls within 150 steps.
  assert abs(losses[0] - np.log(10)) < 0.1, losses
  assert losses[-1] < losses[0] - 0.25, losses
  # Chance on the 360 test digits is 10% +- 1.6% (binomial std); this early the model is at ~20%.
  assert result.eval_metrics["accuracy"] > 0.16, result.eval_metrics
  assert result.eval_metrics["loss"] < np.log(10) - 0.1, result.eval_metrics
  # k = 5 of 64 hidden units in both layers: at most 7.8125% nonzero, and Top-k is on (not a dense ReLU).
  assert set(result.sparsity) == {f"Transformer/encoderblock_{i}" for i in range(2)}
  assert all(5.0 < p <= 100 * 5 / 64 + 1e-6 for p in result.sparsity.values()), result.sparsity


@pytest.mark.slow
def test_eval_command_writes_table1_results_for_the_checkpoint(smoke_run, tmp_path):
  run_dir, bindings, result = smoke_run
  flags = [f"--gin_file={SMOKE}"] + [f"--gin_bindings={b}" for b in bindings]
  flags += ["--gin_bindings=evaluators.CorruptionEvaluator.corruptions = ['impulse_noise']",
            "--gin_bindings=evaluators.CorruptionEvaluator.severities = [1, 5]", f"--json={tmp_path / 'eval.json'}"]
  assert eval_command.main(flags + [f"--checkpoint={run_dir}"]) == 0
  out = json.loads((tmp_path / "eval.json").read_text())
  with open(os.path.join(run_dir, "eval_results.json")) as f:
    written = json.load(f)
  rob = out["robustness"]
  assert out["evaluators"] == ["robustness"] and written["accuracy"] == rob["accuracy"]
  # The same parameters on the same (clean) split as the trainer's last evaluation, ECE included.
  np.testing.assert_allclose(rob["accuracy"], result.eval_metrics["accuracy"], atol=1e-6)
  np.testing.assert_allclose(rob["ece"], result.eval_metrics["ece"], atol=1e-6)
  np.testing.assert_allclose(out["metrics"]["ece"], result.eval_metrics["ece"], atol=1e-6)
  assert rob["num_examples"] == 360 and sum(rob["reliability"]["count"]) == 360
  assert (rob["name"], rob["top_k"], rob["label_noise"], rob["step"]) == ("top5", 5, 0.0, 150)
  assert 0.0 <= rob["ece"] <= 1.0 and rob["ece_num_bins"] == 15
  assert set(rob["corruptions"]) == {"impulse_noise"}
  impulse = rob["corruptions"]["impulse_noise"]
  assert set(impulse) == {"1", "5", "mean"}
  np.testing.assert_allclose(impulse["mean"], (impulse["1"] + impulse["5"]) / 2)
  with open(os.path.join(run_dir, "reliability_diagram.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _configure(files, bindings=()):
  gin_utils.configure(files, ["MODEL_DIR = '/nonexistent'", *bindings])
  return gin_utils.get_macro("MODEL"), runs.build_from_gin("train.train.dataset")


@pytest.mark.parametrize("run, tfds_name, train_split, eval_split, num_classes, corruptions", [
    ("imagenet1k", "imagenet2012", "train", "validation", 1000, 3),
    ("imagenet21k", "imagenet21k", "full[51200:]", "full[:25600]", 21843, 0),
    ("cifar10", "cifar10", "train", "test", 10, 3),
])
def test_run_layers_on_b16_topk(run, tfds_name, train_split, eval_split, num_classes, corruptions):
  model, dataset = _configure(["vit/b16.gin", "vit/topk.gin", f"vit/runs/{run}.gin"],
                              ["LABEL_NOISE = 0.8"])
  assert isinstance(model, vit_model.ClassificationModel)
  vit = model.module
  assert (vit.variant, vit.top_k, vit.mlp_activation, vit.num_classes) == ("B/16", 256, "relu", num_classes)
  assert (dataset.tfds_name, dataset.train_split, dataset.eval_split) == (tfds_name, train_split, eval_split)
  assert dataset.num_classes == num_classes and dataset.image_size == 224 and dataset.label_noise == 0.8
  assert len(gin.query_parameter("evaluators.CorruptionEvaluator.corruptions")) == corruptions
  assert [e.__name__ for e in evaluators.from_gin()] == ["MetricsEvaluator", "SparsityEvaluator",
                                                         "CalibrationEvaluator", "CorruptionEvaluator"]
  # AdamW with warm-up then cosine decay, as the trainer will build it.
  schedule = runs.build_from_gin("train.train.learning_rate")
  warmup = gin_utils.get_macro("WARMUP_STEPS")
  peak = gin_utils.get_macro("PEAK_LEARNING_RATE")
  total = gin_utils.get_macro("TRAIN_STEPS")
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(warmup)), peak, rtol=1e-5)
  np.testing.assert_allclose(float(schedule((warmup + total) // 2)), peak / 2, rtol=1e-3)
  assert float(schedule(total)) < 1e-3 * peak
  optimizer = gin.query_parameter("train.train.optimizer")
  assert optimizer.selector.endswith("adamw") and not optimizer.evaluate  # @train.adamw, called by the trainer
  tx = optimizer.scoped_configurable_fn(learning_rate=schedule)
  params = {"w": jax.numpy.ones((3,))}
  updates, _ = tx.update({"w": jax.numpy.zeros((3,))}, tx.init(params), params)
  assert np.all(np.asarray(updates["w"]) == 0.0)  # at step 0 the learning rate (and decay) is 0


def test_relu_layer_makes_the_smoke_model_dense():
  topk_model, _ = _configure([SMOKE])
  dense_model, dataset = _configure([SMOKE, "vit/relu.gin"])
  assert (topk_model.module.top_k, topk_model.module.mlp_activation) == (5, "relu")
  assert (dense_model.module.top_k, dense_model.module.mlp_activation) == (None, "relu")
  assert dense_model.module.variant == "Test/2" and dense_model.module.shape["mlp_dim"] == 64
  assert (dataset.tfds_name, dataset.image_size, dataset.augment) == ("digits", 8, "random_crop")
