"""Tests for experiments/infinite_data/run.py: the ViT on fresh random images against a fixed set of them."""

import json
import os

import gin
import pytest

import experiment_runners

from topk_transformers import gin_utils
from topk_transformers.data import random_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "experiments", "infinite_data", "run.py")


@pytest.fixture(scope="module")
def runner():
  return experiment_runners.load("infinite_data")


def test_both_kinds_are_experiment_3s_model_and_differ_only_in_the_dataset(runner):
  configs = {}
  for data in ("finite", "infinite"):
    runner.configure(data, 3, "/tmp/x", None, 500)
    dataset = gin_utils.build(gin.query_parameter("train.train.dataset"))
    configs[data] = {name: gin_utils.get_macro(name) for name in
                     ("TRAIN_STEPS", "BATCH_SIZE", "PEAK_LEARNING_RATE", "TOP_K", "MLP_ACTIVATION", "RANDOM_SEED")}
    configs[data]["variant"] = gin.query_parameter("network.ViT.variant")
    seed = gin.query_parameter(f"{runner.DATA[data][1]}.seed")
    configs[data]["dataset"] = (type(dataset), seed, dataset.get_num_classes(), dataset.num_examples("test"))
  assert configs["finite"]["dataset"] == (random_images.RandomImageDataset, 3, 10, 360)
  assert configs["infinite"]["dataset"] == (random_images.InfiniteRandomImageDataset, 3, 10, 360)
  for c in configs.values():
    del c["dataset"]
  assert configs["finite"] == configs["infinite"] == {
      "TRAIN_STEPS": 4000, "BATCH_SIZE": 128, "PEAK_LEARNING_RATE": 1e-2, "TOP_K": None, "MLP_ACTIVATION": "relu",
      "RANDOM_SEED": 3, "variant": "Test/2"}


def _fake(data, seed, pct):
  layer = {"Transformer/encoderblock_0": pct, "Transformer/encoderblock_1": pct + 2}
  measured = {"percent_nonzero": layer, "mean_percent_nonzero": pct + 1,
              "firing": {k: {"below_10pct": 0.1, "never": 0.0} for k in layer}, "metrics": {"accuracy": 0.1}}
  return {"data": data, "seed": seed, "splits": {"train": "train", "eval": "test"},
          "measured": {"train": measured, "test": measured}}


def test_summary_means_and_unpaired_difference(runner):
  results = {("finite", s): _fake("finite", s, 20.0 + s) for s in range(3)}
  results.update({("infinite", s): _fake("infinite", s, 30.0 + s) for s in range(3)})
  summary = runner.summarise(results, [0, 1, 2])
  finite = summary["by_data"]["finite"]["eval"]
  assert finite["mean_percent_nonzero"]["estimate"] == pytest.approx(22.0)
  assert 21.0 <= finite["mean_percent_nonzero"]["low"] <= finite["mean_percent_nonzero"]["high"] <= 23.0
  assert finite["percent_nonzero"]["Transformer/encoderblock_1"]["estimate"] == pytest.approx(23.0)
  # Half of layer 0's units never fire: its live units are at twice its % nonzero.
  results[("finite", 0)]["measured"]["test"]["firing"]["Transformer/encoderblock_0"]["never"] = 0.5
  live = runner.summarise(results, [0])["by_data"]["finite"]["eval"]["live_unit_percent_nonzero"]
  assert live["estimate"] == pytest.approx((20.0 / 0.5 + 22.0) / 2)
  diff = summary["infinite_minus_finite_eval_mean_percent_nonzero"]
  assert diff["estimate"] == pytest.approx(10.0) and 8.0 <= diff["low"] <= diff["high"] <= 12.0


def test_tiny_runs_measure_resume_and_skip(runner, tmp_path, capsys):
  out = tmp_path / "out"
  argv = [f"--out={out}", "--data", "infinite", "--seeds", "0", "1", "--steps", "2", "--eval_period", "1"]
  assert runner.main(argv) == 0
  payload = json.loads((out / "infinite_data.json").read_text())
  assert [(r["data"], r["seed"], r["step"]) for r in payload["runs"]] == [("infinite", 0, 2), ("infinite", 1, 2)]
  run = payload["runs"][0]
  # The first 1437 images of the stream and the 360 held-out ones, 16 tokens per image; the zero images that pad
  # the last batch of 128 are not counted.
  assert run["measured"]["train"]["tokens"]["Transformer/encoderblock_0"] == 1437 * 16
  assert run["measured"]["test"]["tokens"]["Transformer/encoderblock_0"] == 360 * 16
  assert run["curves"]["eval/sparsity/Transformer/encoderblock_0"]["steps"] == [1, 2]
  iv = payload["by_data"]["infinite"]["eval"]["mean_percent_nonzero"]
  assert iv["n_seeds"] == 2 and iv["low"] <= iv["estimate"] <= iv["high"]
  assert (out / payload["figure"]).exists()
  capsys.readouterr()
  assert runner.main(argv) == 0  # everything measured: nothing trains again
  assert capsys.readouterr().out.count("measured, skipped") == 2
  # --remeasure measures again from the checkpoints and keeps the recorded training time.
  done = out / "runs" / "infinite_seed0" / "measurement.json"
  stale = json.loads(done.read_text())
  stale["measured"]["test"]["mean_percent_nonzero"] = -1.0
  stale["train_seconds_this_invocation"] = 123.0
  done.write_text(json.dumps(stale))
  assert runner.main(argv + ["--remeasure"]) == 0
  assert capsys.readouterr().out.count("measured again") == 2
  again = json.loads(done.read_text())
  assert again["measured"]["test"] == run["measured"]["test"] and again["train_seconds_this_invocation"] == 123.0
  assert "--remeasure" not in json.loads((out / "infinite_data.json").read_text())["command"]


def test_remeasure_refuses_runs_that_never_finished(runner, tmp_path, capsys):
  out = tmp_path / "out"
  assert runner.main([f"--out={out}", "--data", "infinite", "--seeds", "0", "--remeasure"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "infinite_seed0 not measured yet" in err[0]
  assert not (out / "runs").exists()
