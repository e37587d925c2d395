"""Tests for experiments/robustness/run.py's power setting: wide MLPs, paired differences with 95% intervals,
partial tables of the finished runs."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import experiment_runners

from topk_transformers import gin_utils, intervals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "experiments", "robustness", "run.py")


@pytest.fixture(scope="module")
def runner():
  return experiment_runners.load("robustness")


def test_power_setting_is_the_memorisation_regime_with_d_ff_256(runner):
  args, _ = runner.parse_args(["--setting=power"])
  assert args.models == ["dense", "top54", "top27"]
  for model, top_k in (("dense", None), ("top54", 54), ("top27", 27)):
    gin_utils.configure(*runner.model_gin(model, "power"))
    model_obj = gin_utils.get_macro("MODEL")
    assert model_obj.module.shape["mlp_dim"] == 256 and model_obj.module.top_k == top_k
    assert (gin_utils.get_macro("TRAIN_STEPS"), gin_utils.get_macro("CHECKPOINT_PERIOD")) == (3000, 100)


def test_paired_differences_carry_the_paired_bootstrap_interval(runner):
  rng = np.random.default_rng(0)
  seeds = list(range(10))
  dense = {s: 0.6 + 0.05 * rng.standard_normal() for s in seeds}  # seeds vary far more than the effect
  results = {}
  for s in seeds:
    results[("dense", 0.4, s)] = {"accuracy": dense[s]}
    results[("top54", 0.4, s)] = {"accuracy": dense[s] + 0.02 + 0.005 * rng.standard_normal()}
  cell = runner.paired_differences(results, ["dense", "top54"], [0.4], seeds)["label_noise_0.4"]["top54"]
  iv = cell["interval"]
  expected = intervals.paired_difference_interval([results[("top54", 0.4, s)]["accuracy"] for s in seeds],
                                                  [dense[s] for s in seeds])
  close = lambda x: pytest.approx(x, abs=1e-6)  # the JSON keeps 6 digits
  assert iv["estimate"] == close(cell["mean"]) and iv["estimate"] == close(expected.estimate)
  assert (iv["low"], iv["high"]) == (close(expected.low), close(expected.high))
  # The pairing removes the seed-to-seed spread: the interval excludes 0 and is far narrower than 0.05.
  assert 0.0 < iv["low"] < 0.02 < iv["high"] < 0.03
  text = runner.power_markdown(runner.paired_differences(results, ["dense", "top54"], [0.4], seeds), [])
  assert f"| 40% label noise | {100 * iv['estimate']:+.2f} [{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] (n=10) |" \
      in text


def _run(runner, out, *extra):
  return runner.main([f"--out={out}", "--setting=power", "--label_noise", "0.4", "--models", "dense", "top27",
                      "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=2", "--gin.CHECKPOINT_PERIOD=2", *extra])


def _make_results():
  spec = importlib.util.spec_from_file_location("make_results_for_power", os.path.join(ROOT, "scripts",
                                                                                        "make_results.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _clone_seed(out, model, seed, accuracy_shift):
  """A copy of ``model``'s seed-0 run as seed ``seed`` with its test accuracies shifted (a finished run's files)."""
  src, dst = out / f"{model}_noise0.4_seed0", out / f"{model}_noise0.4_seed{seed}"
  (dst / "best").mkdir(parents=True)
  for rel in ("eval_results.json", "memorisation.json", "best/eval_results.json"):
    data = json.loads((src / rel).read_text())
    data["seed"] = seed
    for key in ("accuracy", "final_test_accuracy", "best_test_accuracy"):
      if key in data:
        data[key] += accuracy_shift
    (dst / rel).write_text(json.dumps(data))


def test_power_setting_tiny_end_to_end_and_partial_table(runner, tmp_path):
  """Dense and Top-27 (d_ff 256) trained for 2 steps, a second seed made from their files: the paired interval,
  figures, and tables of the finished runs only."""
  out = tmp_path / "out"
  assert _run(runner, out, "--seeds", "0", "--name=power") == 0
  table = json.loads((out / "power.json").read_text())
  assert table["runs_planned"] == table["runs_done"] == 2 and table["complete"] and table["seeds_done"] == [0]
  assert set(table["figures"]) >= {"curves", "differences"} and (out / table["figures"]["differences"]).exists()
  assert set(table["run_timings"]) == {"dense_noise0.4_seed0", "top27_noise0.4_seed0"}
  memo = json.loads((out / "top27_noise0.4_seed0" / "memorisation.json").read_text())
  assert memo["train_steps"] == 2 and all(0 < v <= 100 * 27 / 256 + 1e-6
                                          for v in memo["final"]["percent_nonzero_test"].values())
  _clone_seed(out, "dense", 1, 0.0)
  _clone_seed(out, "top27", 1, 0.05)
  # Seed 2 not trained yet: --table_only trains nothing and tabulates the 4 finished runs of 6, as partial.
  assert _run(runner, out, "--seeds", "0", "1", "2", "--name=partial", "--table_only") == 0
  partial = json.loads((out / "partial.json").read_text())
  assert (partial["runs_planned"], partial["runs_done"], partial["complete"]) == (6, 4, False)
  assert partial["seeds_done"] == [0, 1] and not (out / "dense_noise0.4_seed2").exists()
  cell = partial["paired_differences_end"]["label_noise_0.4"]["top27"]
  seed0 = table["paired_differences_end"]["label_noise_0.4"]["top27"]["mean"]
  assert cell["n"] == 2 and cell["per_seed"]["1"] == pytest.approx(seed0 + 0.05)
  assert cell["interval"]["low"] == pytest.approx(min(seed0, seed0 + 0.05), abs=1e-6)
  assert cell["interval"]["high"] == pytest.approx(seed0 + 0.05, abs=1e-6)
  assert "with 95% intervals" in (out / "partial.md").read_text()
  # The generated results page of a partial table says so, with each k's interval.
  make_results = _make_results()
  root = tmp_path / "root"
  (root / make_results.RB).mkdir(parents=True)
  (root / make_results.POWER).write_text((out / "partial.json").read_text())
  text, head = make_results.robustness_power_page(root)
  assert "**Partial: 4 of 6 runs finished**" in text and head["done"] == 4 and head["topks"] == ["top27"]
  # Runs measured now leave the padding images out, so the page has no note about them; a run from before does.
  assert partial["sparsity_padding_excluded"] and "pad the test split" not in text
  measured = {}
  for name in ("dense_noise0.4_seed0", "top27_noise0.4_seed0"):
    path = out / name / "memorisation.json"
    measured[name] = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in measured[name].items() if k != "sparsity_padding_excluded"}))
  assert _run(runner, out, "--seeds", "0", "--name=older", "--table_only") == 0
  older = json.loads((out / "older.json").read_text())
  assert older["sparsity_padding_excluded"] is False
  (root / make_results.POWER).write_text(json.dumps(older))
  assert "pad the test split's last batch" in make_results.robustness_power_page(root)[0]
  # --remeasure measures those runs' % nonzero again from their checkpoints (made wrong here), and only that.
  for name in measured:
    path = out / name / "memorisation.json"
    older_file = json.loads(path.read_text())
    for key in ("final", "best"):
      older_file[key]["percent_nonzero_train"] = {k: 99.0 for k in older_file[key]["percent_nonzero_train"]}
      older_file[key]["percent_nonzero_test"] = {k: 99.0 for k in older_file[key]["percent_nonzero_test"]}
    path.write_text(json.dumps(older_file))
  assert _run(runner, out, "--seeds", "0", "--name=remeasured", "--remeasure") == 0
  remeasured = json.loads((out / "remeasured.json").read_text())
  assert remeasured["sparsity_padding_excluded"] is True and "--remeasure" not in remeasured["command"]
  for name, before in measured.items():
    after = json.loads((out / name / "memorisation.json").read_text())
    for key in ("final", "best"):
      for field in ("percent_nonzero_train", "percent_nonzero_test"):
        assert after[key][field] == pytest.approx(before[key][field], abs=1e-4)
      assert after[key]["accuracy_true_labels"] == before[key]["accuracy_true_labels"]
    assert after["curves"] == before["curves"] and after["best_step"] == before["best_step"]
  assert remeasured["rows"] == table["rows"]  # accuracies, corruptions, ECE: as they were
  iv = cell["interval"]
  assert f"{100 * iv['estimate']:+.2f} [{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] (n=2)" in text
  # An unfinished run (no eval_results.json) is left alone by --table_only, and left out of its table.
  (out / "dense_noise0.4_seed1" / "eval_results.json").unlink()
  assert _run(runner, out, "--seeds", "0", "1", "--name=partial", "--table_only") == 0
  again = json.loads((out / "partial.json").read_text())
  assert again["runs_done"] == 3 and "interval" not in again["paired_differences_end"]["label_noise_0.4"]["top27"]
  assert (out / "dense_noise0.4_seed1" / "memorisation.json").exists()
  # --remeasure trains nothing: an unfinished run is a one-line error, and a wrong setting too.
  assert _run(runner, out, "--seeds", "0", "1", "--name=partial", "--remeasure") == 2
  assert not (out / "dense_noise0.4_seed1" / "eval_results.json").exists()
  assert runner.main([f"--out={out}", "--remeasure"]) == 2
