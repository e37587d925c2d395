"""The embedded default end to end on a tiny config: real Task, real trainer, the loss falls."""

import pytest

import gin

from topk_transformers import gin_utils
from topk_transformers import train as train_lib


@pytest.mark.slow
def test_cpu_smoke_config_learns_on_tiny_shapes(tmp_path, capsys):
  gin_utils.configure(["t5/runs/cpu_smoke.gin"], [
      f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 30", "BATCH_SIZE = 8", "LOG_PERIOD = 5", "EVAL_PERIOD = 30",
      "EVAL_STEPS = 2", "CHECKPOINT_PERIOD = 30", "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 16}",
      "network.T5Config.emb_dim = 64", "network.T5Config.mlp_dim = 256", "TOP_K = 32",
      "train.rsqrt_schedule.warmup_steps = 100",
  ])
  result = gin.get_configurable(train_lib.train)()
  first_loss = result.log[0][1]["loss"]
  last_loss = result.log[-1][1]["loss"]
  assert int(result.state.step) == 30
  # Span corruption on real text: a uniform guess over 4096 ids costs ln(4096) = 8.3 nats.
  assert first_loss > 6.5
  assert last_loss < first_loss - 1.0, (first_loss, last_loss)
  # Top-k (k=32 of 256) holds in every layer: at most 12.5% nonzero.
  assert set(result.sparsity) == {f"{s}/layers_{i}" for s in ("encoder", "decoder") for i in range(2)}
  assert all(0 < p <= 12.5 + 1e-6 for p in result.sparsity.values())
  out = capsys.readouterr().out
  assert "held-out example 0" in out and "prediction:" in out and "encoder/layers_0" in out


TINY = [
    "BATCH_SIZE = 4", "LOG_PERIOD = 3", "EVAL_PERIOD = 0", "CHECKPOINT_PERIOD = 100",
    "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", "network.T5Config.emb_dim = 32",
    "network.T5Config.mlp_dim = 64", "network.T5Config.num_encoder_layers = 1",
    "network.T5Config.num_decoder_layers = 1", "TOP_K = 8", "DROPOUT_RATE = 0.1",
    "train.train.end_of_training = None",
]


def _train(model_dir, steps):
  gin_utils.configure(["t5/runs/cpu_smoke.gin"], TINY + [f"MODEL_DIR = '{model_dir}'",
                                                                  f"TRAIN_STEPS = {steps}"])
  return gin.get_configurable(train_lib.train)()


@pytest.mark.slow
def test_restarted_pretraining_reaches_the_same_parameters(tmp_path):
  """Real seqio pipeline (span corruption, packing, shuffling) + dropout: stop at 4, resume to 9."""
  import jax
  import numpy as np

  straight = _train(tmp_path / "straight", 9)
  _train(tmp_path / "resumed", 4)
  resumed = _train(tmp_path / "resumed", 9)
  a = jax.tree_util.tree_leaves(jax.device_get(straight.state.params))
  b = jax.tree_util.tree_leaves(jax.device_get(resumed.state.params))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_eval_command_reads_a_t5_run_and_agrees_with_the_trainers_last_evaluation(tmp_path):
  import json

  import numpy as np

  from topk_transformers.commands import eval as eval_command

  bindings = TINY + [f"MODEL_DIR = '{tmp_path / 'run'}'", "TRAIN_STEPS = 4", "EVAL_PERIOD = 4", "EVAL_STEPS = 2"]
  gin_utils.configure(["t5/runs/cpu_smoke.gin"], bindings)
  result = gin.get_configurable(train_lib.train)()
  out = tmp_path / "eval.json"
  flags = ["--gin_file=t5/runs/cpu_smoke.gin", *(f"--gin_bindings={b}" for b in bindings)]
  assert eval_command.main([*flags, f"--checkpoint={tmp_path / 'run'}", "--eval_steps=2", f"--json={out}"]) == 0
  evaluated = json.loads(out.read_text())
  assert evaluated["step"] == 4 and evaluated["split"] == "validation" and evaluated["evaluators"] == []
  for name in ("loss", "cross_ent_loss", "accuracy", "z_loss"):
    np.testing.assert_allclose(evaluated["metrics"][name], result.eval_metrics[name], rtol=1e-5, atol=1e-6)
  assert evaluated["percent_nonzero"] == pytest.approx(result.sparsity, rel=1e-6)
  assert all(0 < p <= 100 * 8 / 64 + 1e-6 for p in evaluated["percent_nonzero"].values())
