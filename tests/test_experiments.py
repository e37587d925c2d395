"""The experiments outside the library: their runners (loaded by file path), gin layers and random-image data."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import gin
import numpy as np
import pytest

import experiment_runners

from topk_transformers import gin_utils
from topk_transformers.data import random_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
PNG = b"\x89PNG\r\n\x1a\n"


_load = experiment_runners.load


@pytest.fixture(scope="module")
def sparsity():
  return _load("sparsity")


@pytest.fixture(scope="module")
def robustness_runner():
  return _load("robustness")


@pytest.fixture(scope="module")
def mlp_formulations():
  return _load("mlp_formulations")


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == PNG


# ---------------------------------------------------------------------------
# The random-image dataset of experiment 3 (topk_transformers/data/random_images.py)
# ---------------------------------------------------------------------------

def test_random_image_dataset_is_fixed_noise_with_padded_eval():
  ds = random_images.RandomImageDataset(num_train=10, num_eval=7, image_size=4, num_classes=3, seed=1)
  train_batches = list(ds.get_dataset("train", 4, shuffle=False, repeat=False).as_numpy_iterator())
  again = list(random_images.RandomImageDataset(num_train=10, num_eval=7, image_size=4, num_classes=3, seed=1)
               .get_dataset("train", 4, shuffle=False, repeat=False).as_numpy_iterator())
  assert len(train_batches) == 3 and train_batches[0]["image"].shape == (4, 4, 4, 1)
  np.testing.assert_array_equal(train_batches[0]["image"], again[0]["image"])
  assert sum(b["weight"].sum() for b in train_batches) == 10  # two padding rows carry weight 0
  images = np.concatenate([b["image"][b["weight"] > 0] for b in train_batches])
  assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.4  # uniform noise, not digits
  test = next(ds.get_dataset("test", 7, shuffle=False, repeat=False).as_numpy_iterator())
  assert not np.array_equal(test["image"][:4], train_batches[0]["image"])
  assert ds.num_examples("train") == 10 and ds.num_examples("test") == 7 and ds.get_num_classes() == 3
  repeated = next(iter(ds.get_dataset("train", 8, seed=0)))
  assert repeated["image"].shape == (8, 4, 4, 1)
  with pytest.raises(ValueError, match="no split 'validation'"):
    ds.get_dataset("validation", 2)
  with pytest.raises(ValueError, match="num_train must be a positive integer, got 0"):
    random_images.RandomImageDataset(num_train=0)
  with pytest.raises(ValueError, match="must differ"):
    random_images.RandomImageDataset(train_split="test")


def test_random_images_gin_layer_builds_the_dataset():
  layers = [os.path.join(EXPERIMENTS, "sparsity", f) for f in ("vit_dense.gin", "vit_random_images.gin")]
  gin_utils.configure(layers)
  dataset = gin_utils.build(gin.query_parameter("train.train.dataset"))
  assert isinstance(dataset, random_images.RandomImageDataset)
  assert (dataset.num_examples("train"), dataset.num_examples("test"), dataset.get_num_classes()) == (1437, 360, 10)
  assert next(iter(dataset.get_dataset("train", 2)))["image"].shape == (2, 8, 8, 1)


# ---------------------------------------------------------------------------
# experiments/sparsity/run.py
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--experiment=emergence,bogus", "--out=/tmp/x"], "error: unknown experiment 'bogus'; choose from emergence"),
    (["--experiment=,", "--out=/tmp/x"], "error: --experiment names no experiment"),
    (["--experiment=topk", "--out=/tmp/x", "--steps=0"], "error: --steps must be positive, got 0"),
    (["--experiment=topk", "--out=/tmp/x", "--eval_steps=-1"], "error: --eval_steps must be positive, got -1"),
    (["--experiment=topk"], "error: run.py: the following arguments are required: --out"),
])
def test_sparsity_runner_argument_errors_are_one_line_and_exit_2(sparsity, argv, message, capsys):
  assert sparsity.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith(message)


def test_sparsity_runner_all_names_the_four_experiments(sparsity):
  names, args = sparsity.parse_args(["--experiment=all", "--out=/tmp/x"])
  assert names == ["emergence", "scale", "random_data", "topk"] and args.steps is None
  names, _ = sparsity.parse_args(["--experiment= scale , topk", "--out=/tmp/x", "--steps=5"])
  assert names == ["scale", "topk"]


def _all_specs(sparsity):
  return ((sparsity.T5_DENSE, sparsity.T5_LONG) + sparsity.T5_SIZES + sparsity.VIT_RUNS + sparsity.topk_specs()
          + sparsity.scale_long_specs())


def test_every_runs_gin_stack_is_in_the_experiment_directory_and_parses(sparsity):
  seen = {}
  for spec in _all_specs(sparsity):
    files, bindings = spec.configuration("/tmp/model_dir", None)
    assert all(os.path.dirname(f) == os.path.join(EXPERIMENTS, "sparsity") and os.path.isfile(f) for f in files)
    gin_utils.configure(files, bindings)
    seen[spec.name] = (gin_utils.get_macro("TRAIN_STEPS"), gin_utils.get_macro("TOP_K"),
                       gin_utils.get_macro("MODEL_DIR"))
  # The step counts and Top-k of README.md's tables; runs that share a name share a configuration.
  assert seen["t5_dense"] == (400, None, "/tmp/model_dir")
  assert seen["t5_dense_long"][:2] == (20000, None)
  assert [seen[f"t5_scale_long_{size}_seed1"][:2] for size in ("small", "medium", "large")] == [(3000, None)] * 3
  assert [seen[f"t5_scale_long_{size}_seed0_warmup4000"][:2] for size in ("small", "large")] == [(3000, None)] * 2
  gin_utils.configure(*sparsity.scale_long_specs()[-1].configuration(None, None))
  assert gin_utils.get_macro("RANDOM_SEED") == 1 and gin.query_parameter("network.T5Config.emb_dim") == 192
  assert gin.query_parameter("train.rsqrt_schedule.warmup_steps") == 4000  # lr 1/sqrt(4000)
  gin_utils.configure(*sparsity.scale_long_specs()[0].configuration(None, None))
  assert gin.query_parameter("train.rsqrt_schedule.warmup_steps") == 1000  # the packaged cpu_smoke.gin rate
  assert len({s.name for s in sparsity.scale_long_specs()}) == 12  # 2 rates x 2 seeds x 3 sizes
  assert gin_utils.get_macro("TASK_FEATURE_LENGTHS") == {"inputs": 64, "targets": 16}
  assert seen["t5_short_dense"][:2] == seen["t5_size_small"][:2] == (300, None)
  assert [seen[f"t5_short_top{k}"][:2] for k in (16, 64, 256)] == [(300, 16), (300, 64), (300, 256)]
  assert seen["vit_digits"][:2] == seen["vit_random_images"][:2] == (4000, None)
  # The long run changes only bookkeeping: its first steps are t5_dense's (same rsqrt schedule, seed, data).
  gin_utils.configure(*sparsity.T5_LONG.configuration(None, None))
  assert (gin_utils.get_macro("CHECKPOINT_PERIOD"), gin_utils.get_macro("KEEP_CHECKPOINTS")) == (500, None)
  assert (gin_utils.get_macro("LOG_PERIOD"), gin_utils.get_macro("EVAL_PERIOD")) == (20, 100)
  gin_utils.configure(*sparsity.VIT_RUNS[1].configuration(None, 7))
  assert gin_utils.get_macro("LABEL_NOISE") == 1.0 and gin_utils.get_macro("TRAIN_STEPS") == 7
  assert not set(os.listdir(os.path.join(EXPERIMENTS, "sparsity"))) - {
      "README.md", "run.py", "results", "__pycache__"} - {f for s in _all_specs(sparsity) for f in s.gin_files}


@pytest.mark.slow
def test_random_data_experiment_end_to_end_on_random_images(sparsity, tmp_path, monkeypatch, capsys):
  """Experiment 3 with only its random-image run, 2 steps: JSON, figures, and the run reused the second time."""
  monkeypatch.setattr(sparsity, "VIT_RUNS", sparsity.VIT_RUNS[2:])
  out = str(tmp_path)
  first = sparsity.run(["random_data"], out, steps=2, eval_steps=1)["random_data"]
  assert "[vit_random_images] training 2 steps" in capsys.readouterr().out
  exp_dir = tmp_path / "random_data"
  with open(exp_dir / "random_data.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(first))
  assert saved["machine"]["cores"] == os.cpu_count() and "load_average_at_start" in saved["machine"]
  (entry,) = saved["runs"]
  assert entry["name"] == "vit_random_images" and entry["gin_files"] == ["vit_dense.gin", "vit_random_images.gin"]
  assert entry["parameters"] == 18154  # README.md: 'Test/2' with dense ReLU MLPs
  assert [(m["label"], m["split"]) for m in entry["measurements"]] == [
      ("init", "train"), ("init", "test"), ("step 2", "train"), ("step 2", "test")]
  for m in entry["measurements"]:
    assert list(m["percent_nonzero"]) == ["Transformer/encoderblock_0", "Transformer/encoderblock_1"]
    assert all(0.0 < v < 100.0 for v in m["percent_nonzero"].values())
    assert m["token_count"]["Transformer/encoderblock_0"] == 128 * 16  # one batch of 128 images x 16 patches
  assert _is_png(exp_dir / "random_data.png") and _is_png(exp_dir / "random_data_over_steps.png")
  assert (tmp_path / "runs" / "vit_random_images" / "train_seconds.json").exists()

  again = sparsity.run(["random_data"], out, steps=2, eval_steps=1)["random_data"]
  assert "[vit_random_images] already trained" in capsys.readouterr().out
  assert again["runs"][0]["measurements"] == first["runs"][0]["measurements"]  # same checkpoint, same numbers
  assert again["runs"][0]["train_seconds"] == first["runs"][0]["train_seconds"]


def test_sparsity_runner_long_run_is_named_explicitly(sparsity, capsys):
  names, args = sparsity.parse_args(["--experiment=emergence_long", "--out=/tmp/x", "--measure_only"])
  assert names == ["emergence_long"] and args.measure_only
  assert sparsity.main(["--experiment=emergence", "--out=/tmp/x", "--measure_only"]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "error: --measure_only applies to --experiment=emergence_long alone")


def test_a_run_stopped_by_sigterm_stops_the_experiment_before_it_is_measured(sparsity, tmp_path, monkeypatch, capsys):
  """A SIGTERM'd training (checkpoint written, ``preempted``) exits 143 instead of measuring an unfinished run."""
  from topk_transformers import train as train_lib
  stopped = train_lib.TrainResult(state=types.SimpleNamespace(step=np.int32(700)), train_metrics={}, eval_metrics={},
                                  sparsity={}, preempted=True)
  calls = []
  monkeypatch.setattr(sparsity.gin, "get_configurable", lambda fn: lambda: calls.append(fn) or stopped)
  spec = sparsity.scale_long_specs()[0]
  with pytest.raises(SystemExit) as stop:
    sparsity.train_run(spec, str(tmp_path))
  assert stop.value.code == 143 and calls == [train_lib.train]
  assert capsys.readouterr().err.strip() == (
      f"[{spec.name}] stopped by SIGTERM at step 700 of 3000, checkpoint written; run the same command again to resume")
  assert not os.path.exists(tmp_path / "runs" / spec.name / "train_seconds.json")  # not taken for a finished run
  # Finished, the same call records its time and returns the run.
  monkeypatch.setattr(sparsity.gin, "get_configurable", lambda fn: lambda: dataclasses.replace(stopped, preempted=False))
  run_dir, seconds = sparsity.train_run(spec, str(tmp_path))
  assert run_dir == str(tmp_path / "runs" / spec.name) and seconds >= 0
  with open(os.path.join(run_dir, "train_seconds.json")) as f:
    assert json.load(f)["train_steps"] == 3000


def test_training_segments_split_a_resumed_run_at_long_gaps(sparsity, tmp_path):
  """Wall time of a run stopped and resumed: logged training time per stretch, the pause left out."""
  import tensorflow as tf
  from tensorboard.compat.proto import event_pb2, summary_pb2

  def write(name, points):
    with tf.io.TFRecordWriter(str(tmp_path / f"events.out.tfevents.{name}")) as w:
      for step, wall in points:
        value = summary_pb2.Summary.Value(tag="train/loss", simple_value=1.0)
        w.write(event_pb2.Event(wall_time=wall, step=step, summary=summary_pb2.Summary(value=[value]))
                .SerializeToString())

  write("1000.a", [(20, 1000.0), (40, 1030.0), (60, 1075.0)])
  write("9000.b", [(60, 9000.0), (80, 9020.0)])  # resumed from the step-60 checkpoint hours later
  assert sparsity.training_segments(str(tmp_path)) == [
      {"first_step": 20, "last_step": 60, "seconds": 75.0}, {"first_step": 60, "last_step": 80, "seconds": 20.0}]
  assert sparsity.training_segments(str(tmp_path / "none")) == []


def test_sparsity_figures_of_the_experiments(sparsity, tmp_path):
  """plot_scale / plot_topk / plot_mean_curves from hand-made results (no training)."""
  from topk_transformers import sparsity_report

  def measurement(label, split, step, pct):
    layers = ["encoder/layers_0", "decoder/layers_0"]
    return sparsity_report.Measurement(label=label, split=split, step=step, metrics={}, token_count={},
                                       percent_nonzero={n: pct for n in layers}, firing_frequency={})

  curves = {"train": {"encoder/layers_0": ([20, 40], [45.0, 40.0]), "decoder/layers_0": ([20, 40], [44.0, 35.0])}}
  results = []
  for i, spec in enumerate(sparsity.T5_SIZES):
    ms = [measurement("init", s, 0, 50.0) for s in ("train", "validation")]
    ms += [measurement("step 300", s, 300, 40.0 - i) for s in ("train", "validation")]
    results.append({"spec": spec, "params": 1e6 * (i + 1), "measurements": ms, "curves": curves})
  assert _is_png(sparsity.plot_scale(results, str(tmp_path / "scale.png")))
  losses = [{"spec": spec, "train_loss": ([20, 300], [6.0, 5.1]), "eval_loss": ([100, 300], [5.8, 5.5])}
            for spec in sparsity.topk_specs()]
  assert _is_png(sparsity.plot_topk(losses, str(tmp_path / "topk.png")))
  mean = sparsity.plot_mean_curves({"a": {"encoder": ([1, 2], [50.0, 40.0])}}, str(tmp_path / "mean.png"), "t")
  assert _is_png(mean)
  rows = [{"seed": seed, "size": size, "parameters": p, "held_out_loss": loss,
           "mean_percent_nonzero": {"encoder": pct, "decoder": pct - 5, "all": pct - 2.5}}
          for seed in (0, 1) for size, p, loss, pct in (("small", 4e5, 5.6, 43.0), ("large", 5e6, 5.2, 35.0))]
  assert _is_png(sparsity.plot_scale_long(rows, str(tmp_path / "scale_long.png")))
  # Two rates; small is better at 1000, large at 4000.
  worse = {("small", 4000), ("large", 1000)}
  by_rate = [dict(r, warmup_steps=w, held_out_loss=r["held_out_loss"] + 0.2 * ((r["size"], w) in worse))
             for r in rows for w in (1000, 4000)]
  assert _is_png(sparsity.plot_scale_long(by_rate, str(tmp_path / "scale_long_best.png"),
                                          sparsity.best_rates(by_rate)))


def test_scale_long_compares_each_size_at_the_rate_with_the_lower_mean_held_out_loss(sparsity):
  def row(size, warmup, loss):
    return {"size": size, "warmup_steps": warmup, "held_out_loss": loss}

  rows = [row("small", 1000, 4.90), row("small", 1000, 4.96), row("small", 4000, 4.91), row("small", 4000, 4.94),
          row("large", 1000, 4.80), row("large", 1000, 5.10), row("large", 4000, 4.90), row("large", 4000, 4.91)]
  # small: mean 4.930 against 4.925; large: 4.950 against 4.905, though its single best run is at 1000.
  assert sparsity.best_rates(rows) == {"small": 4000, "large": 4000}
  assert sparsity.best_rates(rows[:2] + rows[4:6]) == {"small": 1000, "large": 1000}  # one rate only: that one
  tie = [row("small", 4000, 4.9), row("small", 1000, 4.9)]
  assert sparsity.best_rates(tie) == {"small": 1000}  # a tie goes to the higher rate


# ---------------------------------------------------------------------------
# experiments/robustness/run.py
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--gin_file=vit/relu.gin"], "error: the models' gin files are fixed"),
    (["--label_noise", "0", "1.5"], "error: --label_noise values must be in [0, 1], got 1.5"),
    (["--seeds", "1", "1"], "error: --seeds repeats a value: 1 1"),
    (["--models", "bogus"], "error: run.py: argument --models: invalid model 'bogus'"),
    (["--models", "top0"], "error: run.py: argument --models: invalid model 'top0'"),
    (["--setting=long"], "error: run.py: argument --setting: invalid choice: 'long'"),
    (["--name=a/b"], "error: --name must be a plain file name, got 'a/b'"),
    (["--gin.TRAIN_STEPS"], "error: malformed gin flag '--gin.TRAIN_STEPS'"),
])
def test_robustness_runner_argument_errors_are_one_line_and_exit_2(robustness_runner, argv, message, tmp_path,
                                                                   capsys):
  assert robustness_runner.main([f"--out={tmp_path}", *argv]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
  assert not os.listdir(tmp_path)  # nothing trained or written


def test_a_robustness_run_stopped_by_sigterm_exits_143_without_evaluating(robustness_runner, tmp_path, monkeypatch,
                                                                          capsys):
  """A SIGTERM'd training must not write eval_results.json, which marks a finished run that a rerun skips."""
  from topk_transformers import train as train_lib
  stopped = train_lib.TrainResult(state=types.SimpleNamespace(step=np.int32(40)), train_metrics={}, eval_metrics={},
                                  sparsity={}, preempted=True)
  monkeypatch.setattr(robustness_runner.gin, "get_configurable", lambda fn: lambda: stopped)
  monkeypatch.setattr(robustness_runner.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated a stopped run"))
  run_dir = tmp_path / "dense_noise0.4_seed0"
  with pytest.raises(SystemExit) as stop:
    robustness_runner.train_and_evaluate("dense", 0.4, 0, str(run_dir), [])
  assert stop.value.code == 143
  assert capsys.readouterr().err.strip() == (
      "[dense_noise0.4_seed0] stopped by SIGTERM at step 40, checkpoint written; run the same command again to resume")
  assert not (run_dir / "eval_results.json").exists()


def test_robustness_runs_are_paired_by_seed(robustness_runner):
  dense = robustness_runner.run_bindings("dense", 0.4, 2, "/tmp/r")
  assert "RANDOM_SEED = 2" in dense and "LABEL_NOISE_SEED = 2" in dense and "LABEL_NOISE = 0.4" in dense
  assert "evaluators.CorruptionEvaluator.corruptions = []" in dense  # corruptions only on clean labels
  clean = robustness_runner.run_bindings("topk", 0.0, 2, "/tmp/r")
  assert "evaluators.CorruptionEvaluator.name = 'topk'" in clean
  assert not any("corruptions" in b for b in clean)
  assert robustness_runner.run_name("dense", 0.4, 2) == "dense_noise0.4_seed2"
  assert robustness_runner.MODELS["dense"] == robustness_runner.MODELS["topk"] + ["vit/relu.gin"]


def test_robustness_models_and_settings(robustness_runner):
  files, bindings = robustness_runner.model_gin("top20", "memorisation")
  assert files == ["vit/runs/cpu_smoke.gin", os.path.join(EXPERIMENTS, "robustness", "memorisation.gin")]
  assert bindings == ["TOP_K = 20"]
  assert robustness_runner.model_gin("dense") == (["vit/runs/cpu_smoke.gin", "vit/relu.gin"], [])
  args, _ = robustness_runner.parse_args(["--setting=memorisation"])
  assert args.models == ["dense", "top5"] and args.name == "table"
  assert robustness_runner.parse_args([])[0].models == ["dense", "topk"]
  for model, top_k in (("dense", None), ("top20", 20), ("top5", 5)):
    files, bindings = robustness_runner.model_gin(model, "memorisation")
    gin_utils.configure(files, bindings)
    assert gin_utils.get_macro("TOP_K") == top_k
    assert (gin_utils.get_macro("TRAIN_STEPS"), gin_utils.get_macro("EVAL_PERIOD"),
            gin_utils.get_macro("CHECKPOINT_PERIOD"), gin_utils.get_macro("KEEP_CHECKPOINTS")) == (3000, 100, 100, None)
    assert gin.query_parameter("vision.ImageDataset.augment") == "none"
  gin_utils.configure(*robustness_runner.model_gin("topk"))
  assert gin.query_parameter("vision.ImageDataset.augment") == "random_crop" and gin_utils.get_macro("TOP_K") == 5


def _memo(seed, best_step, best, final, fit):
  layer = {"Transformer/encoderblock_0": 30.0 + seed}
  at = {"accuracy_noisy_labels": fit, "accuracy_true_labels": 0.6, "memorised": fit - 0.1,
        "percent_nonzero_train": layer, "percent_nonzero_test": layer}
  return {"seed": seed, "best_step": best_step, "best_test_accuracy": best, "final_test_accuracy": final,
          "final": at, "best": at}


def test_memorisation_summary_and_paired_differences(robustness_runner):
  memo = {("dense", 0.4, 0): _memo(0, 200, 0.77, 0.61, 1.0), ("dense", 0.4, 1): _memo(1, 300, 0.75, 0.59, 0.98),
          ("top5", 0.4, 0): _memo(0, 400, 0.80, 0.70, 0.9)}
  (dense, top5) = robustness_runner.memorisation_summary(memo, ["dense", "top5"], [0.4], [0, 1])
  assert dense["seeds"] == [0, 1] and dense["best_step"]["mean"] == 250 and dense["best_step"]["n"] == 2
  assert dense["final_test_accuracy"]["values"] == [0.61, 0.59]
  assert dense["final_train_accuracy_noisy_labels"]["mean"] == pytest.approx(0.99)
  assert dense["final_percent_nonzero_test"]["Transformer/encoderblock_0"]["mean"] == 30.5
  assert top5["seeds"] == [0] and top5["best_test_accuracy"]["std"] is None
  results = {("dense", 0.4, 0): {"accuracy": 0.61}, ("dense", 0.4, 1): {"accuracy": 0.59},
             ("top5", 0.4, 0): {"accuracy": 0.70}, ("top5", 0.4, 1): {"accuracy": 0.65},
             ("dense", 0.0, 0): {"accuracy": 0.9, "ece": 0.05, "corruptions": {"shot_noise": {"mean": 0.7}}},
             ("top5", 0.0, 0): {"accuracy": 0.92, "ece": 0.03, "corruptions": {"shot_noise": {"mean": 0.6}}}}
  diffs = robustness_runner.paired_differences(results, ["dense", "top5"], [0.0, 0.4], [0, 1])
  assert list(diffs) == ["accuracy", "label_noise_0.4", "corruption_shot_noise", "ece"]
  noisy = diffs["label_noise_0.4"]["top5"]
  assert noisy["per_seed"] == {0: pytest.approx(0.09), 1: pytest.approx(0.06)} and noisy["n"] == 2
  assert noisy["mean"] == pytest.approx(0.075)
  assert diffs["corruption_shot_noise"]["top5"]["values"] == [pytest.approx(-0.1)]
  assert diffs["ece"]["top5"]["n"] == 1 and "dense" not in diffs["ece"]


@pytest.mark.slow
def test_robustness_memorisation_setting_tiny(robustness_runner, tmp_path):
  """Two 4-step runs in the memorisation setting: curves, best step, exact training-set fit, tables, figures."""
  out = tmp_path / "out"
  assert robustness_runner.main([f"--out={out}", "--setting=memorisation", "--seeds", "0", "--label_noise", "0.4",
                                 "--models", "top5", "top2", "--name=k", "--gin.TRAIN_STEPS=4",
                                 "--gin.EVAL_PERIOD=2", "--gin.CHECKPOINT_PERIOD=2"]) == 0
  memo = json.loads((out / "top2_noise0.4_seed0" / "memorisation.json").read_text())
  assert memo["train_steps"] == 4 and memo["seed"] == 0 and memo["top_k"] == 2
  assert memo["curves"]["test_accuracy"]["steps"] == [2, 4]
  assert memo["best_test_accuracy"] == max(memo["curves"]["test_accuracy"]["values"])
  best = json.loads((out / "top2_noise0.4_seed0" / "best" / "eval_results.json").read_text())
  assert best["step"] == memo["best_step"] and best["accuracy"] == pytest.approx(memo["best_test_accuracy"])
  final = memo["final"]
  assert final["step"] == 4 and final["num_examples"] == 1437
  assert 0.3 < final["num_labels_changed"] / 1437 < 0.42  # 40% redrawn over 10 classes: 36% change
  for split in ("train", "test"):  # Top-2 of 64: at most 3.125% nonzero on either split
    assert all(0.0 < v <= 100 * 2 / 64 + 1e-6 for v in final[f"percent_nonzero_{split}"].values())
  table = json.loads((out / "k.json").read_text())
  assert table["train_steps"] == 4 and table["seeds"] == [0] and table["models"] == ["top5", "top2"]
  assert [r["model"] for r in table["memorisation"]] == ["top5", "top2"]
  assert set(table["figures"]) == {"curves", "per_layer", "k"}
  assert all(_is_png(out / f) for f in table["figures"].values())
  assert "Table 1 at the step of best test accuracy" in (out / "k.md").read_text()


@pytest.mark.slow
def test_robustness_runner_tiny_table_from_another_directory(tmp_path):
  """A 2-step Top-k run through the command line, started outside the repository: results, diagram, table."""
  out = tmp_path / "out"
  command = [sys.executable, os.path.join(EXPERIMENTS, "robustness", "run.py"), f"--out={out}", "--seeds", "0",
             "--label_noise", "0", "--models", "topk", "--gin.TRAIN_STEPS=2"]
  env = dict(os.environ, PYTHONPATH="")  # the installed package, not the repository on sys.path
  proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "topk_noise0_seed0" / "eval_results.json").read_text())
  assert results["name"] == "topk" and results["seed"] == 0 and results["label_noise"] == 0.0
  assert results["top_k"] == 5 and results["step"] == 2 and results["num_examples"] == 360
  assert set(results["corruptions"]) == {"gaussian_noise", "shot_noise", "impulse_noise"}
  assert _is_png(out / "topk_noise0_seed0" / results["reliability_diagram"])
  table = json.loads((out / "table.json").read_text())
  assert table["columns"] == ["topk"] and table["seeds"] == [0] and table["extra_bindings"] == ["TRAIN_STEPS = 2"]
  assert table["machine"]["cores"] == os.cpu_count() and "load_average_at_start" in table["machine"]
  accuracy = next(r for r in table["rows"] if r["key"] == "accuracy")
  assert accuracy["cells"]["topk"]["values"] == [results["accuracy"]]
  assert (out / "table.md").read_text() in proc.stdout


# ---------------------------------------------------------------------------
# experiments/mlp_formulations/run.py
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--shapes=large,huge"], "error: --shapes: unknown 'huge'; choose from large, 3B, 11B"),
    (["--dtype=float16"], "error: --dtype: unknown 'float16'"),
    (["--variants=take_promise,nope"], "error: --variants: unknown 'nope'"),
    (["--shapes=large", "--k=5000"], "error: --k=5000 exceeds d_ff=4096 of the smallest shape"),
    (["--reps=0"], "error: --reps must be positive, got 0"),
])
def test_mlp_formulations_argument_errors_are_one_line_and_exit_2(mlp_formulations, argv, message, capsys):
  assert mlp_formulations.main(argv) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)


def test_mlp_formulations_tiny_run_checks_variants_against_dense_topk(mlp_formulations, tmp_path, capsys):
  out = tmp_path / "study.json"
  assert mlp_formulations.main(["--shapes=large", "--dtype=float32", "--k=8", "--reps=2",
                                "--variants=take_promise,dense_topk_scatter,mul_reduce", f"--json={out}"]) == 0
  assert "WARNING" not in capsys.readouterr().out  # every sparse variant equals the dense Top-k product
  saved = json.loads(out.read_text())
  rows = {r["variant"]: r for r in saved["results"]}
  assert list(rows) == ["dense", "take_promise", "dense_topk_scatter", "mul_reduce"]
  assert rows["dense"]["speedup_vs_dense"] == 1.0 and all(r["median_s"] > 0 for r in rows.values())
  assert rows["take_promise"]["bound"] == pytest.approx(2 * 4096 / (4096 + 8))
  import jax  # pylint: disable=g-import-not-at-top
  assert saved["platform"] == saved["machine"]["platform"] == jax.devices()[0].platform
  assert "load_average_at_start" in saved["machine"] and saved["command"].startswith("--shapes=large")


def test_committed_mlp_formulations_json_covers_the_documented_table():
  with open(os.path.join(EXPERIMENTS, "mlp_formulations", "mlp_formulations.json")) as f:
    saved = json.load(f)
  measured = {(r["shape"], r["dtype"]) for r in saved["results"]}
  assert {("large", "float32"), ("large", "bfloat16"), ("3B", "float32"), ("3B", "bfloat16"),
          ("11B", "float32")} <= measured
