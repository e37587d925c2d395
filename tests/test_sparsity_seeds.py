"""experiments/sparsity/run.py over seeds (emergence_seeds, random_data_seeds): runs, bands, tables, end to end."""

import json
import os

import numpy as np
import pytest

import experiment_runners

from topk_transformers import gin_utils, intervals
from topk_transformers import sparsity_report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sparsity():
  return experiment_runners.load("sparsity")


def test_seed_0_is_the_single_seed_run_and_other_seeds_bind_random_seed(sparsity):
  assert sparsity.seeded(sparsity.T5_DENSE, 0) is sparsity.T5_DENSE
  spec = sparsity.seeded(sparsity.VIT_RUNS[1], 2)
  assert spec.name == "vit_random_labels_seed2" and spec.gin_files == sparsity.VIT_RUNS[1].gin_files
  gin_utils.configure(*spec.configuration(None, None))
  assert gin_utils.get_macro("RANDOM_SEED") == 2 and gin_utils.get_macro("LABEL_NOISE") == 1.0
  gin_utils.configure(*sparsity.T5_DENSE.configuration(None, None))
  assert gin_utils.get_macro("RANDOM_SEED") == 0  # so seed 0 is the packaged default, the existing run
  names, _ = sparsity.parse_args(["--experiment=all", "--out=/tmp/x"])
  assert "emergence_seeds" not in names and "random_data_seeds" not in names  # hours: named explicitly


def test_seed_curves_are_the_mean_and_interval_on_the_steps_every_seed_logged(sparsity):
  curves = [{"train": {"l0": ([10, 20, 30], [50.0, 40.0, 30.0])}},
            {"train": {"l0": ([10, 20], [52.0, 44.0])}},
            {"train": {"l0": ([10, 20, 30], [48.0, 42.0, 33.0])}}]
  band = sparsity.seed_curves(curves)["train"]["l0"]
  assert band["steps"] == [10, 20] and band["seeds"] == 3
  assert band["mean"] == pytest.approx([50.0, 42.0])
  iv = intervals.seed_interval([40.0, 44.0, 42.0], n_resamples=2000, seed=0)
  assert (band["low"][1], band["high"][1]) == pytest.approx((iv.low, iv.high), abs=1e-4)
  assert all(lo <= m <= hi for lo, m, hi in zip(band["low"], band["mean"], band["high"]))
  two_layers = [{"train": {"a": ([10], [10.0]), "b": ([10], [30.0])}},
                {"train": {"a": ([10], [20.0]), "b": ([10], [60.0])}}]
  mean = sparsity.seed_curves(two_layers)["mean_of_layers"]["train"]
  assert mean["steps"] == [10] and mean["mean"] == [30.0]  # seeds' layer means 20 and 40
  iv = intervals.seed_interval([20.0, 40.0], n_resamples=2000, seed=0)
  assert (mean["low"][0], mean["high"][0]) == pytest.approx((iv.low, iv.high), abs=1e-4)
  one = sparsity.seed_curves(curves[:1])["train"]["l0"]
  assert one["low"] == one["mean"] == one["high"] == [50.0, 40.0, 30.0]  # one seed: no band


def _measurement(label, level, rng, batches=6, below=0.5):
  names = ["encoder/layers_0", "decoder/layers_0"]
  tokens = rng.integers(90, 100, batches).astype(float)
  per_layer = {n: level + i * 10 + rng.normal(0, 1.0, batches) for i, n in enumerate(names)}
  freq = np.where(np.arange(10) < below * 10, 0.05, 0.5)
  return report_lib.Measurement(
      label=label, split="validation", step=0 if label == "init" else 100, metrics={"loss": level / 10},
      percent_nonzero={n: float((v * tokens).sum() / tokens.sum()) for n, v in per_layer.items()},
      token_count={n: float(tokens.sum()) for n in names}, firing_frequency={n: freq for n in names},
      per_batch={"weight": tokens.tolist(), "metrics": {"loss": [level / 10] * batches},
                 "percent_nonzero": {k: v.tolist() for k, v in per_layer.items()},
                 "token_count": {n: tokens.tolist() for n in names}})


def test_seed_table_intervals_over_seeds_and_batches_and_firing_ranges(sparsity):
  rng = np.random.default_rng(0)
  by_seed = [[_measurement("init", 50.0, rng), _measurement("step 100", level, rng, below=b)]
             for level, b in ((20.0, 0.3), (24.0, 0.5), (22.0, 0.7))]
  (row,) = sparsity.seed_table(by_seed)  # init rows are left out
  assert row["label"] == "step 100" and row["seeds"] == 3 and row["eval_batches"] == [6, 6, 6]
  enc = row["percent_nonzero"]["encoder/layers_0"]
  direct = intervals.hierarchical_interval([m[1].per_batch["percent_nonzero"]["encoder/layers_0"] for m in by_seed],
                                           [m[1].per_batch["token_count"]["encoder/layers_0"] for m in by_seed])
  assert (enc["estimate"], enc["low"], enc["high"]) == pytest.approx((direct.estimate, direct.low, direct.high),
                                                                     abs=1e-3)
  assert enc["estimate"] == pytest.approx(np.mean([m[1].percent_nonzero["encoder/layers_0"] for m in by_seed]),
                                          abs=1e-3)
  assert row["fraction_firing_below_10pct"]["decoder/layers_0"] == {"mean": 0.5, "min": 0.3, "max": 0.7}
  assert row["percent_nonzero"]["decoder/layers_0"]["estimate"] > enc["estimate"] + 5
  assert row["mean_of_layers"]["low"] <= row["mean_of_layers"]["estimate"] <= row["mean_of_layers"]["high"]


@pytest.mark.slow
def test_random_data_seeds_end_to_end_on_random_images(sparsity, tmp_path, monkeypatch):
  """Two seeds of the random-image run, 2 steps: seed 0 named as the single-seed run, the JSON's band and figure."""
  monkeypatch.setattr(sparsity, "VIT_RUNS", sparsity.VIT_RUNS[2:])
  monkeypatch.setattr(sparsity, "SEEDS", (0, 1))
  payload = sparsity.over_seeds(str(tmp_path), sparsity.VIT_RUNS, "random_data_seeds", "test", steps=2,
                                eval_steps=1, seeds=(0, 1))
  assert sorted(os.listdir(tmp_path / "runs")) == ["vit_random_images", "vit_random_images_seed1"]
  saved = json.loads((tmp_path / "random_data_seeds" / "random_data_seeds.json").read_text())
  assert saved == json.loads(json.dumps(payload)) and saved["seeds"] == [0, 1]
  (run,) = saved["runs"]
  assert [s["seed"] for s in run["seeds"]] == [0, 1]
  assert [(r["label"], r["split"]) for r in run["table"]] == [("step 2", "train"), ("step 2", "test")]
  seed_pct = [s["measurements"][3]["mean_percent_nonzero"]["all"] for s in run["seeds"]]  # step 2, test
  assert seed_pct[0] != seed_pct[1]  # the seeds differ
  assert run["table"][1]["mean_of_layers"]["estimate"] == pytest.approx(np.mean(seed_pct), abs=1e-3)
  band = run["curves"]["train"]["Transformer/encoderblock_0"]
  assert band["seeds"] == 2 and len(band["steps"]) == len(band["mean"]) == len(band["low"])
  assert run["curves"]["mean_of_layers"]["train"]["steps"] == band["steps"]
  with open(tmp_path / "random_data_seeds" / "random_data_seeds.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
