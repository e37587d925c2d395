#!/usr/bin/env python
"""The paper's four sparsity experiments at CPU scale; results, figures and the comparison in README.md.

  python experiments/sparsity/run.py --experiment=emergence   --out=/tmp/sparsity_experiments
  python experiments/sparsity/run.py --experiment=scale       --out=/tmp/sparsity_experiments
  python experiments/sparsity/run.py --experiment=random_data --out=/tmp/sparsity_experiments
  python experiments/sparsity/run.py --experiment=topk        --out=/tmp/sparsity_experiments

* ``emergence``: a dense ReLU T5 pretrained on the embedded corpus; per-layer % nonzero
  at init and after training, on training and held-out data, and over training.
* ``scale``: the same for three model sizes (width and depth grow together).
* ``random_data``: a dense ReLU ViT on digits, with true labels, random labels and
  random images (uniform noise pixels with random labels).
* ``topk``: dense vs Top-k T5 at several k, final losses side by side.

Each run is a stack of this directory's gin files over the packaged configs, trained
into ``OUT/runs/<name>``. A run already trained to its step count is reused (the
trainer resumes a stopped one), so experiments that share a run train it once. Every
experiment writes ``OUT/<experiment>/<experiment>.json`` (with the machine and its load
average at the start) and its PNGs. ``--steps`` overrides every run's TRAIN_STEPS and
``--eval_steps`` the batches measured per split (a quick check: ``--steps=20 --eval_steps=2``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from topk_transformers import startup

startup.quiet_start()  # before the imports below bring in TensorFlow, so that it prints no banners

# pylint: disable=g-import-not-at-top,wrong-import-position
import gin  # noqa: E402
import jax  # noqa: E402

from topk_transformers import gin_utils, plotting, runs  # noqa: E402
from topk_transformers import sparsity_report as report_lib  # noqa: E402
from topk_transformers import train as train_lib  # noqa: E402
from topk_transformers.benchmarks import machine  # noqa: E402
from topk_transformers.commands import common  # noqa: E402
from topk_transformers.commands.train import exit_if_preempted  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run: this directory's gin files (in order) and extra bindings."""

  name: str
  """Directory name under ``OUT/runs`` (runs with the same name are the same run)."""
  gin_files: Tuple[str, ...]
  """File names in this directory; each includes the packaged configs it builds on."""
  bindings: Tuple[str, ...] = ()
  label: str = ""
  """Legend text."""

  def configuration(self, model_dir: Optional[str], steps: Optional[int]) -> Tuple[List[str], List[str]]:
    """``(gin file paths, bindings)`` of this run, into ``model_dir`` for ``steps`` steps when given."""
    bindings = list(self.bindings)
    if model_dir is not None:
      bindings.append(f"MODEL_DIR = '{model_dir}'")
    if steps is not None:
      bindings.append(f"TRAIN_STEPS = {int(steps)}")
    return [os.path.join(HERE, f) for f in self.gin_files], bindings


def out_dir_of(run_dir: str) -> str:
  """``OUT`` of a run directory ``OUT/runs/<name>``."""
  return os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))


def train_run(spec: RunSpec, root: str, steps: Optional[int] = None) -> Tuple[str, Optional[float]]:
  """Trains ``spec`` into ``root/runs/<name>`` unless a checkpoint of its last step is there.

  Returns ``(run_dir, seconds spent training)``; for a reused run, the seconds it took then
  (``run_dir/train_seconds.json``), or ``None`` if unknown.
  """
  run_dir = os.path.join(root, "runs", spec.name)
  timing = os.path.join(run_dir, "train_seconds.json")
  gin_utils.configure(*spec.configuration(run_dir, steps))
  train_steps = int(gin_utils.get_macro("TRAIN_STEPS"))
  if train_steps in report_lib.checkpoint_steps(run_dir):
    print(f"[{spec.name}] already trained ({run_dir})", flush=True)
    if os.path.exists(timing):
      with open(timing) as f:
        return run_dir, json.load(f)["train_seconds"]
    return run_dir, None
  print(f"[{spec.name}] training {train_steps} steps into {run_dir}", flush=True)
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "config.gin"), "w") as f:
    f.write(gin.config_str())
  start = time.time()
  result = gin.get_configurable(train_lib.train)()
  seconds = time.time() - start  # compilation, periodic evals and checkpoints included
  # Stopped by SIGTERM with its checkpoint written: measuring (or training the next run) would
  # report an unfinished run. The same command resumes it.
  exit_if_preempted(result, spec.name, train_steps)
  with open(timing, "w") as f:
    json.dump({"train_seconds": round(seconds, 1), "train_steps": train_steps}, f)
  return run_dir, seconds


def measure_run(spec: RunSpec, run_dir: str, eval_steps: Optional[int], steps: Optional[int] = None,
                with_init: bool = True, splits: str = "both") -> Tuple[List[report_lib.Measurement], int]:
  """Init (optional) and trained measurements of a run on its train and eval splits (``splits='eval'``:
  the eval split only); also its parameter count."""
  gin_files, bindings = spec.configuration(None, steps)
  trained = runs.load_run(run_dir, gin_files=gin_files, bindings=bindings)
  splits = list(dict.fromkeys(([trained.dataset.train_split] if splits == "both" else [])
                              + [trained.dataset.eval_split]))
  loaded = ([trained.with_params(runs.INIT)] if with_init else []) + [trained]
  n_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(trained.params)))
  return [report_lib.measure(r, split, eval_steps) for r in loaded for split in splits], n_params


def _scalar_curve(run_dir: str, tag: str) -> Tuple[List[int], List[float]]:
  points = report_lib.read_event_scalars(run_dir, tag).get(tag, {})
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def _mean_curves(curves: report_lib.Curves, kind: str) -> Dict[str, Tuple[List[int], List[float]]]:
  """Per stack, the mean over layers of a kind's (train / eval) sparsity curves."""
  out = {}
  layers = curves.get(kind, {})
  for stack in dict.fromkeys(report_lib.stack_of(n) for n in layers):
    members = [c for n, c in layers.items() if report_lib.stack_of(n) == stack]
    steps = members[0][0]
    out[stack] = (list(steps), [float(np.mean([m[1][i] for m in members])) for i in range(len(steps))])
  return out


# ---------------------------------------------------------------------------
# The experiments
# ---------------------------------------------------------------------------

T5_DENSE = RunSpec("t5_dense", ("t5_dense.gin",), label="dense ReLU T5")
T5_LONG = RunSpec("t5_dense_long", ("t5_dense.gin", "t5_long.gin"), label="dense ReLU T5, long")
_SHORT = ("t5_dense.gin", "t5_short.gin")
T5_SHORT_DENSE = RunSpec("t5_short_dense", _SHORT, label="dense")
T5_SIZES = (
    RunSpec("t5_size_small", _SHORT + ("t5_size_small.gin",), label="small"),
    dataclasses.replace(T5_SHORT_DENSE, label="medium"),
    RunSpec("t5_size_large", _SHORT + ("t5_size_large.gin",), label="large"),
)
VIT_RUNS = (
    RunSpec("vit_digits", ("vit_dense.gin",), label="digits, true labels"),
    RunSpec("vit_random_labels", ("vit_dense.gin", "vit_random_labels.gin"), label="digits, random labels"),
    RunSpec("vit_random_images", ("vit_dense.gin", "vit_random_images.gin"), label="random images, random labels"),
)
TOPK_VALUES = (16, 64, 256)
SCALE_LONG_SEEDS = (0, 1)
PACKAGED_WARMUP_STEPS = 1000
"""cpu_smoke.gin's ``train.rsqrt_schedule.warmup_steps``: peak learning rate 1/sqrt(1000) = 0.032."""
SCALE_LONG_WARMUPS = (PACKAGED_WARMUP_STEPS, 4000)
"""``train.rsqrt_schedule.warmup_steps`` of scale_long's two learning rates, peaks 0.032 and 1/sqrt(4000) =
0.016 (constant through 3000 steps): each size is compared at the rate that serves it better."""


def scale_long_specs(seeds: Sequence[int] = SCALE_LONG_SEEDS,
                     warmups: Sequence[int] = SCALE_LONG_WARMUPS) -> Tuple[RunSpec, ...]:
  """Experiment 2's three sizes with t5_scale_long.gin, one run per learning rate, seed and size.

  Every run binds its warm-up. The packaged rate's runs keep the names ``t5_scale_long_<size>_seed<seed>``;
  the others add ``_warmup<steps>``.
  """
  specs = []
  for warmup in warmups:
    for seed in seeds:
      for size in T5_SIZES:
        extra = size.gin_files[len(_SHORT):]
        suffix = "" if warmup == PACKAGED_WARMUP_STEPS else f"_warmup{warmup}"
        specs.append(RunSpec(f"t5_scale_long_{size.label}_seed{seed}{suffix}", _SHORT + extra + ("t5_scale_long.gin",),
                             (f"RANDOM_SEED = {seed}", f"train.rsqrt_schedule.warmup_steps = {warmup}"),
                             label=size.label))
  return tuple(specs)


def best_rates(rows: Sequence[dict]) -> Dict[str, int]:
  """Per size, the warm-up (learning rate) with the lower mean held-out loss over the seeds."""
  means: Dict[str, Dict[int, List[float]]] = {}
  for r in rows:
    means.setdefault(r["size"], {}).setdefault(r["warmup_steps"], []).append(r["held_out_loss"])
  return {size: min(by_rate, key=lambda w: (float(np.mean(by_rate[w])), w)) for size, by_rate in means.items()}


def topk_specs() -> Tuple[RunSpec, ...]:
  return (T5_SHORT_DENSE,) + tuple(
      RunSpec(f"t5_short_top{k}", _SHORT, (f"TOP_K = {k}",), label=f"Top-{k}") for k in TOPK_VALUES)


def _write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)


def _round(seconds: Optional[float]) -> Optional[float]:
  return None if seconds is None else round(float(seconds), 1)


def _means(m: report_lib.Measurement) -> Dict[str, float]:
  return {k: round(v, 3) for k, v in report_lib.stack_means(m.percent_nonzero).items()}


def emergence(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = 10,
              spec: RunSpec = T5_DENSE, name: str = "emergence") -> dict:
  """Experiment 1: a dense ReLU T5; init vs trained, train vs held-out, and over training."""
  run_dir, seconds = train_run(spec, out, steps)
  return _measure_emergence(spec, run_dir, seconds, eval_steps, steps, name)


def _measure_emergence(spec: RunSpec, run_dir: str, seconds: Optional[float], eval_steps: Optional[int],
                       steps: Optional[int], name: str) -> dict:
  host = machine.machine_info()
  measurements, n_params = measure_run(spec, run_dir, eval_steps, steps)
  curves = report_lib.read_event_sparsity(run_dir)
  exp_dir = os.path.join(out_dir_of(run_dir), name)
  report = report_lib.write_report(measurements, exp_dir, curves,
                                   title="Dense ReLU T5 on the embedded corpus",
                                   extra={"experiment": name, "run_dir": run_dir, "parameters": n_params,
                                          "train_seconds": _round(seconds), "eval_steps": eval_steps,
                                          "machine": host})
  os.replace(os.path.join(exp_dir, "report.json"), os.path.join(exp_dir, f"{name}.json"))
  print(report_lib.format_report(measurements))
  return report


def scale(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = 10) -> dict:
  """Experiment 2: three sizes of dense ReLU T5, same data and steps; larger should be sparser."""
  host = machine.machine_info()
  results = []
  for spec in T5_SIZES:
    run_dir, seconds = train_run(spec, out, steps)
    measurements, n_params = measure_run(spec, run_dir, eval_steps, steps)
    curves = report_lib.read_event_sparsity(run_dir)
    results.append({"spec": spec, "run_dir": run_dir, "seconds": seconds, "measurements": measurements,
                    "curves": curves, "params": n_params, "loss": _scalar_curve(run_dir, "eval/loss")})
  exp_dir = os.path.join(out, "scale")
  payload = {"experiment": "scale", "eval_steps": eval_steps, "machine": host, "runs": []}
  for r in results:
    payload["runs"].append({
        "name": r["spec"].name, "label": r["spec"].label, "gin_files": list(r["spec"].gin_files),
        "parameters": r["params"], "train_seconds": _round(r["seconds"]),
        "final_eval_loss": r["loss"][1][-1] if r["loss"][1] else None,
        "measurements": [m.summary() for m in r["measurements"]],
        "mean_percent_nonzero": {f"{m.label}, {m.split}": _means(m) for m in r["measurements"]},
        "over_steps": report_lib.curves_json(r["curves"]),
    })
  _write_json(os.path.join(exp_dir, "scale.json"), payload)
  plot_scale(results, os.path.join(exp_dir, "scale.png"))
  for r in results:
    plotting.plot_per_layer({f"{m.label}, {m.split}": m.percent_nonzero for m in r["measurements"]},
                            os.path.join(exp_dir, f"per_layer_{r['spec'].name}.png"), r["spec"].label)
  _print_table("mean % nonzero (all layers)", [
      (r["spec"].label, r["params"], {f"{m.label}/{m.split}": _means(m)["all"] for m in r["measurements"]})
      for r in results])
  return payload


def scale_long(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = None) -> dict:
  """Experiment 2 on a ten times larger token budget, 2 seeds and 2 learning rates: % nonzero against size and
  held-out loss, each size at its better rate (:func:`best_rates`).

  Loss and sparsity are measured on the whole held-out split (``eval_steps=None``; 73 batches): the
  trainer's periodic eval reads its first 10 batches only, whose loss moves by up to 0.09-0.16 between evaluations.
  """
  host = machine.machine_info()
  rows = []
  for spec in scale_long_specs():
    run_dir, seconds = train_run(spec, out, steps)
    (m,), n_params = measure_run(spec, run_dir, eval_steps, steps, with_init=False, splits="eval")
    loss = _scalar_curve(run_dir, "eval/loss")
    warmup = int(gin.query_parameter("train.rsqrt_schedule.warmup_steps"))
    rows.append({"name": spec.name, "size": spec.label, "seed": int(gin_utils.get_macro("RANDOM_SEED")),
                 "warmup_steps": warmup, "peak_learning_rate": round(1.0 / np.sqrt(warmup), 5),
                 "gin_files": list(spec.gin_files), "parameters": n_params, "train_seconds": _round(seconds),
                 "train_steps": int(gin_utils.get_macro("TRAIN_STEPS")), "held_out_loss": float(m.metrics["loss"]),
                 "held_out_accuracy": float(m.metrics["accuracy"]), "final_eval_loss": loss[1][-1],
                 "eval_loss": {"steps": loss[0], "values": loss[1]}, "split": m.split,
                 "percent_nonzero": m.percent_nonzero, "mean_percent_nonzero": _means(m)})
  best = best_rates(rows)
  exp_dir = os.path.join(out, "scale_long")
  payload = {"experiment": "scale_long", "eval_steps": eval_steps, "seeds": list(SCALE_LONG_SEEDS),
             "warmup_steps": list(SCALE_LONG_WARMUPS), "best_warmup_steps": best, "machine": host, "runs": rows}
  _write_json(os.path.join(exp_dir, "scale_long.json"), payload)
  plot_scale_long(rows, os.path.join(exp_dir, "scale_long.png"), best)

  def label(r):
    return f"{r['size']} seed {r['seed']} lr {r['peak_learning_rate']:.3f}" + (
        " (better)" if best[r["size"]] == r["warmup_steps"] else "")

  _print_table("held-out loss and mean % nonzero (held-out data)", [
      (label(r), r["parameters"], {"held-out loss": r["held_out_loss"], **r["mean_percent_nonzero"]}) for r in rows])
  return payload


def random_data(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = None) -> dict:
  """Experiment 3: dense ReLU ViT on digits with true labels, random labels, random images."""
  host = machine.machine_info()
  results = []
  for spec in VIT_RUNS:
    run_dir, seconds = train_run(spec, out, steps)
    measurements, n_params = measure_run(spec, run_dir, eval_steps, steps)
    results.append({"spec": spec, "run_dir": run_dir, "seconds": seconds, "measurements": measurements,
                    "params": n_params, "curves": report_lib.read_event_sparsity(run_dir),
                    "train_accuracy": _scalar_curve(run_dir, "train/accuracy")})
  exp_dir = os.path.join(out, "random_data")
  payload = {"experiment": "random_data", "eval_steps": eval_steps, "machine": host, "runs": []}
  for r in results:
    payload["runs"].append({
        "name": r["spec"].name, "label": r["spec"].label, "gin_files": list(r["spec"].gin_files),
        "parameters": r["params"], "train_seconds": _round(r["seconds"]),
        "final_train_accuracy": r["train_accuracy"][1][-1] if r["train_accuracy"][1] else None,
        "measurements": [m.summary() for m in r["measurements"]],
        "over_steps": report_lib.curves_json(r["curves"]),
    })
  _write_json(os.path.join(exp_dir, "random_data.json"), payload)
  # One colour per run: init (on its own training data) dashed, trained solid (train) and dotted (held out).
  series, styles = {}, {}
  for color, r in zip(plotting.pyplot().cm.tab10(np.arange(10)), results):
    train_split = r["measurements"][0].split
    for m in r["measurements"]:
      trained = m.label != runs.INIT
      if not trained and m.split != train_split:
        continue  # init on the training split suffices
      key = f"{r['spec'].label}: {m.label}, {m.split}"
      series[key] = m.percent_nonzero
      held_out = m.split != train_split
      styles[key] = {"color": color, "linestyle": ":" if held_out else ("-" if trained else "--"),
                     "marker": "s" if held_out else ("o" if trained else "x")}
  plotting.plot_per_layer(series, os.path.join(exp_dir, "random_data.png"),
                          "Dense ReLU ViT: % nonzero per layer", styles=styles)
  plot_mean_curves({r["spec"].label: _mean_curves(r["curves"], "train") for r in results},
                   os.path.join(exp_dir, "random_data_over_steps.png"),
                   "ViT, mean % nonzero over layers (training batches)")
  _print_table("mean % nonzero (all layers)", [
      (r["spec"].label, r["params"], {f"{m.label}/{m.split}": _means(m)["all"] for m in r["measurements"]})
      for r in results])
  return payload


def topk(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = None) -> dict:
  """Experiment 4: dense vs Top-k T5 at several k; final train and eval loss side by side.

  The losses are the trainer's (its periodic evals), so ``eval_steps`` is not used here.
  """
  del eval_steps
  host = machine.machine_info()
  results = []
  for spec in topk_specs():
    run_dir, seconds = train_run(spec, out, steps)
    results.append({"spec": spec, "run_dir": run_dir, "seconds": seconds,
                    "train_loss": _scalar_curve(run_dir, "train/loss"),
                    "eval_loss": _scalar_curve(run_dir, "eval/loss"),
                    "eval_accuracy": _scalar_curve(run_dir, "eval/accuracy"),
                    "curves": report_lib.read_event_sparsity(run_dir)})
  exp_dir = os.path.join(out, "topk")
  payload = {"experiment": "topk", "machine": host, "runs": []}
  for r in results:
    if not (r["train_loss"][1] and r["eval_loss"][1] and r["eval_accuracy"][1]):
      raise gin_utils.ConfigError(f"run {r['run_dir']} logged no train and eval losses: train it for at least "
                                  "LOG_PERIOD and EVAL_PERIOD steps")
    eval_sp = _mean_curves(r["curves"], "eval")
    payload["runs"].append({
        "name": r["spec"].name, "label": r["spec"].label, "bindings": list(r["spec"].bindings),
        "train_seconds": _round(r["seconds"]),
        "final_train_loss": r["train_loss"][1][-1], "final_eval_loss": r["eval_loss"][1][-1],
        "final_eval_accuracy": r["eval_accuracy"][1][-1],
        "final_eval_percent_nonzero": {s: c[1][-1] for s, c in eval_sp.items()},
        "train_loss": {"steps": r["train_loss"][0], "values": r["train_loss"][1]},
        "eval_loss": {"steps": r["eval_loss"][0], "values": r["eval_loss"][1]},
    })
  _write_json(os.path.join(exp_dir, "topk.json"), payload)
  plot_topk(results, os.path.join(exp_dir, "topk.png"))
  _print_table("final losses", [
      (r["label"], None, {"train loss": r["final_train_loss"], "eval loss": r["final_eval_loss"],
                          "eval acc": r["final_eval_accuracy"]}) for r in payload["runs"]])
  return payload


def training_segments(run_dir: str, tag: str = "train/loss", gap: float = 900.0) -> List[Dict[str, float]]:
  """The stretches a (resumed) run trained in, from the wall times of its logged ``tag`` events.

  Consecutive events more than ``gap`` seconds apart start a new segment (a stop and a resume).
  Each segment is ``{"first_step", "last_step", "seconds"}``: its training time between its first
  and last logged step (start-up and compilation before the first one are not counted).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  points = []  # (wall time, step): a resumed run logs again the steps after its checkpoint
  for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
    try:
      for event in tf.compat.v1.train.summary_iterator(path):
        if any(v.tag == tag for v in event.summary.value):
          points.append((float(event.wall_time), int(event.step)))
    except tf.errors.DataLossError:  # a file cut short by a killed run: keep what was read
      continue
  segments: List[Dict[str, float]] = []
  previous = None
  for wall, step in sorted(points):
    if previous is None or wall - previous[1] > gap:
      segments.append({"first_step": step, "last_step": step, "seconds": 0.0})
    else:
      segments[-1]["last_step"] = step
      segments[-1]["seconds"] = round(segments[-1]["seconds"] + wall - previous[1], 1)
    previous = (step, wall)
  return segments


def emergence_long(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = 10,
                   measure_only: bool = False) -> dict:
  """Experiment 1's model for 20,000 steps (t5_long.gin); resumable: the same command continues a stopped run.

  ``measure_only`` measures the run's newest checkpoint without training (e.g. while it trains).
  Adds the over-steps figure on a log step axis and the training segments (wall time per resume).
  """
  spec = T5_LONG
  run_dir = os.path.join(out, "runs", spec.name)
  if measure_only:
    if not report_lib.checkpoint_steps(run_dir):
      raise gin_utils.ConfigError(f"--measure_only: no checkpoint in {run_dir} yet")
    report = _measure_emergence(spec, run_dir, None, eval_steps, steps, "emergence_long")
  else:
    report = emergence(out, steps, eval_steps, spec=spec, name="emergence_long")
  exp_dir = os.path.join(out, "emergence_long")
  curves = report_lib.read_event_sparsity(run_dir)
  plotting.plot_over_steps(curves, os.path.join(exp_dir, "over_steps_log.png"),
                           "Dense ReLU T5, % nonzero per layer (log steps)", log_x=True)
  segments = training_segments(run_dir)
  loss = {tag: _scalar_curve(run_dir, tag) for tag in ("train/loss", "eval/loss")}
  report.update({
      "steps_reached": max(report_lib.checkpoint_steps(run_dir)),
      "train_steps": int(gin_utils.get_macro("TRAIN_STEPS")),
      "seed": int(gin_utils.get_macro("RANDOM_SEED", default=0)),
      "training_segments": segments,
      "training_seconds_logged": round(sum(s["seconds"] for s in segments), 1),
      "loss": {tag: {"steps": c[0], "values": c[1]} for tag, c in loss.items()},
  })
  _write_json(os.path.join(exp_dir, "emergence_long.json"), report)
  print(f"steps reached {report['steps_reached']} of {report['train_steps']}; "
        f"{report['training_seconds_logged'] / 3600:.2f} h of logged training in {len(segments)} segment(s)")
  return report


# ---------------------------------------------------------------------------
# Over seeds: experiments 1 and 3 with 3 seeds, the curves as a mean and a band
# ---------------------------------------------------------------------------

SEEDS = (0, 1, 2)
SEEDED_EVAL_STEPS = 50
"""Batches per split measured by the seeded experiments (the whole ViT splits are smaller: 12 and 3 batches)."""


def seeded(spec: RunSpec, seed: int) -> RunSpec:
  """``spec`` at another ``RANDOM_SEED`` (initialisation and data order); seed 0, the packaged default, is the
  run itself, so the single-seed experiments' runs are reused. Label noise keeps its own fixed seed."""
  if seed == 0:
    return spec
  return dataclasses.replace(spec, name=f"{spec.name}_seed{seed}", bindings=spec.bindings + (f"RANDOM_SEED = {seed}",))


def _band(values_by_seed: Sequence[Sequence[float]], seed: int = 0) -> Tuple[List[float], List[float], List[float]]:
  """Per step: the mean over seeds and its 95% bootstrap interval over the seeds (one seed: no band)."""
  from topk_transformers import intervals  # pylint: disable=g-import-not-at-top

  mean, low, high = [], [], []
  for column in zip(*values_by_seed):
    mean.append(round(float(np.mean(column)), 4))
    if len(column) >= 2:
      iv = intervals.seed_interval(column, n_resamples=2000, seed=seed)
      low.append(round(iv.low, 4))
      high.append(round(iv.high, 4))
    else:
      low.append(mean[-1])
      high.append(mean[-1])
  return mean, low, high


def seed_curves(curves_by_seed: Sequence[report_lib.Curves]) -> dict:
  """``{kind: {layer: {"steps", "mean", "low", "high", "seeds": n}}}`` on the steps every seed logged."""
  out: Dict[str, Any] = {}
  for kind in ("train", "eval"):
    for layer in (curves_by_seed[0].get(kind) or {}):
      series = [dict(zip(*c[kind][layer])) for c in curves_by_seed if layer in c.get(kind, {})]
      if len(series) != len(curves_by_seed):
        continue
      steps = sorted(set.intersection(*(set(x) for x in series)))
      mean, low, high = _band([[x[s] for s in steps] for x in series])
      out.setdefault(kind, {})[layer] = {"steps": steps, "mean": mean, "low": low, "high": high,
                                         "seeds": len(series)}
    # The mean over the layers, per seed first, then its mean and band over the seeds.
    layers = out.get(kind, {})
    if layers:
      steps = sorted(set.intersection(*(set(c["steps"]) for c in layers.values())))
      per_seed = [[float(np.mean([dict(zip(*c[kind][layer]))[s] for layer in layers])) for s in steps]
                  for c in curves_by_seed]
      mean, low, high = _band(per_seed)
      out.setdefault("mean_of_layers", {})[kind] = {"steps": steps, "mean": mean, "low": low, "high": high,
                                                    "seeds": len(per_seed)}
  return out


def seed_table(measurements_by_seed: Sequence[Sequence[report_lib.Measurement]]) -> List[dict]:
  """Per (label, split) of the trained params: each layer's and the layers' mean % nonzero over seeds, with 95%
  intervals over seeds and batches, and the firing shares' mean and range over seeds."""
  from topk_transformers import intervals  # pylint: disable=g-import-not-at-top

  rows = []
  for position, first in enumerate(measurements_by_seed[0]):
    if first.label == runs.INIT:
      continue
    ms = [seed_ms[position] for seed_ms in measurements_by_seed]
    layers = list(first.percent_nonzero)
    row = {"label": first.label, "split": first.split, "seeds": len(ms),
           "eval_batches": [len(m.per_batch["weight"]) for m in ms], "percent_nonzero": {},
           "fraction_firing_below_10pct": {}, "fraction_never_firing": {}}

    def interval(values_weights):
      values, weights = [v for v, _ in values_weights], [w for _, w in values_weights]
      if len(values) >= 2:
        return intervals.hierarchical_interval(values, weights).as_dict(3)
      return intervals.batch_interval(values[0], weights[0]).as_dict(3) if len(values[0]) >= 2 else None

    for layer in layers:
      row["percent_nonzero"][layer] = interval([(m.per_batch["percent_nonzero"][layer],
                                                 m.per_batch["token_count"][layer]) for m in ms])
      for key in ("fraction_firing_below_10pct", "fraction_never_firing"):
        values = [m.summary()[key][layer] for m in ms]
        row[key][layer] = {"mean": round(float(np.mean(values)), 4), "min": round(min(values), 4),
                           "max": round(max(values), 4)}
    row["mean_of_layers"] = interval([(np.mean([m.per_batch["percent_nonzero"][l] for l in layers], 0),
                                       np.mean([m.per_batch["token_count"][l] for l in layers], 0)) for m in ms])
    row["loss"] = [round(float(m.metrics["loss"]), 4) for m in ms]
    rows.append(row)
  return rows


def over_seeds(out: str, specs: Sequence[RunSpec], name: str, title: str, steps: Optional[int] = None,
               eval_steps: Optional[int] = SEEDED_EVAL_STEPS, seeds: Sequence[int] = SEEDS) -> dict:
  """Trains every spec at every seed (seed by seed), measures them, writes ``OUT/<name>/<name>.json`` and a figure
  of the mean % nonzero over layers during training, each run's curve as the mean over seeds and a band."""
  host = machine.machine_info()
  by_spec: Dict[str, Dict[str, list]] = {spec.name: {"measurements": [], "curves": [], "rows": []} for spec in specs}
  for seed in seeds:
    for spec in specs:
      s = seeded(spec, seed)
      run_dir, seconds = train_run(s, out, steps)
      measurements, n_params = measure_run(s, run_dir, eval_steps, steps)
      entry = by_spec[spec.name]
      entry["measurements"].append(measurements)
      entry["curves"].append(report_lib.read_event_sparsity(run_dir))
      entry["rows"].append({"name": s.name, "seed": seed, "parameters": n_params, "train_seconds": _round(seconds),
                            "measurements": [m.summary() for m in measurements]})
  payload = {"experiment": name, "seeds": list(seeds), "eval_steps": eval_steps, "machine": host, "runs": []}
  for spec in specs:
    entry = by_spec[spec.name]
    payload["runs"].append({"name": spec.name, "label": spec.label, "gin_files": list(spec.gin_files),
                            "seeds": entry["rows"], "table": seed_table(entry["measurements"]),
                            "curves": seed_curves(entry["curves"])})
  exp_dir = os.path.join(out, name)
  _write_json(os.path.join(exp_dir, f"{name}.json"), payload)
  plot_seed_curves(payload, os.path.join(exp_dir, f"{name}.png"), title)
  for r in payload["runs"]:
    for row in r["table"]:
      iv = row["mean_of_layers"]
      print(f"{r['label']}, {row['label']}, {row['split']}: mean % nonzero {iv['estimate']:.2f} "
            f"[{iv['low']:.2f}, {iv['high']:.2f}] over {row['seeds']} seeds", flush=True)
  return payload


def emergence_seeds(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = SEEDED_EVAL_STEPS) -> dict:
  """Experiment 1 over seeds 0, 1, 2 (seed 0 is experiment 1's run)."""
  return over_seeds(out, (T5_DENSE,), "emergence_seeds", "Dense ReLU T5, % nonzero over training", steps, eval_steps)


def random_data_seeds(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = None) -> dict:
  """Experiment 3 over seeds 0, 1, 2 (seed 0 is experiment 3's runs); whole splits measured."""
  return over_seeds(out, VIT_RUNS, "random_data_seeds", "Dense ReLU ViT, % nonzero over training", steps, eval_steps)


def plot_seed_curves(payload: dict, path: str, title: str) -> str:
  """Per run, the mean over layers of the logged training-batch % nonzero: the mean over seeds and its 95% band."""
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6.8, 4.2))
  colors = plt.cm.tab10(np.arange(10))
  for i, r in enumerate(payload["runs"]):
    curve = r["curves"].get("mean_of_layers", {}).get("train")
    if not curve:
      continue
    ax.plot(curve["steps"], curve["mean"], color=colors[i % 10],
            label=f"{r['label']} (mean of {len(r['seeds'])} seeds)")
    ax.fill_between(curve["steps"], curve["low"], curve["high"], color=colors[i % 10], alpha=0.25, linewidth=0)
  plotting.log_axis(ax)
  ax.set_xlabel("training step")
  ax.set_ylabel("% nonzero, mean over layers (training batches)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize="small")
  ax.set_title(f"{title}; band: 95% bootstrap interval over seeds", fontsize="medium")
  fig.tight_layout()
  return plotting.save(fig, path)


EXPERIMENTS = {"emergence": emergence, "emergence_long": emergence_long, "scale": scale, "scale_long": scale_long,
               "random_data": random_data, "topk": topk, "emergence_seeds": emergence_seeds,
               "random_data_seeds": random_data_seeds}
LONG_EXPERIMENTS = ("emergence_long", "scale_long", "emergence_seeds", "random_data_seeds")
"""Hours of training: named explicitly, never part of ``all``."""


# ---------------------------------------------------------------------------
# Figures and tables of these experiments (the per-layer ones are plotting.py's)
# ---------------------------------------------------------------------------

def _print_table(title: str, rows: Sequence[Tuple[str, Optional[int], Dict[str, float]]]) -> None:
  cols = list(dict.fromkeys(k for _, _, values in rows for k in values))
  width = max(len(r[0]) for r in rows)
  print(title)
  print(f"{'run':<{width}}  {'params':>10}  " + "  ".join(f"{c:>16}" for c in cols))
  for label, params, values in rows:
    p = f"{params:,}" if params else ""
    print(f"{label:<{width}}  {p:>10}  " + "  ".join(f"{values.get(c, float('nan')):>16.3f}" for c in cols))


def plot_mean_curves(curves: Dict[str, Dict[str, Tuple[List[int], List[float]]]], path: str, title: str) -> str:
  """Mean % nonzero over layers against training step: one colour per run, one line style per stack."""
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  styles = ["-", "--", ":", "-."]
  colors = plt.cm.tab10(np.arange(10))
  for i, (label, stacks) in enumerate(curves.items()):
    for j, (stack, (steps, values)) in enumerate(stacks.items()):
      name = label if len(stacks) == 1 else f"{label}, {stack}"
      ax.plot(steps, values, styles[j % len(styles)], color=colors[i % 10], label=name)
  plotting.log_axis(ax)
  ax.set_xlabel("training step")
  ax.set_ylabel("% nonzero MLP activations")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize="small")
  ax.set_title(title, fontsize="medium")
  fig.tight_layout()
  return plotting.save(fig, path)


def plot_scale(results: List[dict], path: str) -> str:
  """Left: mean % nonzero over training per size and stack; right: init vs trained on held-out data."""
  plt = plotting.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.0))
  colors = plt.cm.viridis(np.linspace(0.0, 0.8, len(results)))
  for color, r in zip(colors, results):
    for stack, style in (("encoder", "-"), ("decoder", "--")):
      steps, values = _mean_curves(r["curves"], "train").get(stack, ([], []))
      left.plot(steps, values, style, color=color, label=f"{r['spec'].label}, {stack}")
  plotting.log_axis(left)
  left.set_xlabel("training step")
  left.set_ylabel("% nonzero (mean over layers, training batches)")
  left.grid(True, which="both", alpha=0.3)
  left.legend(fontsize="x-small")
  labels = [f"{r['spec'].label}\n{r['params'] / 1e6:.1f}M" for r in results]
  x = np.arange(len(results))
  width = 0.2
  offset = -1.5 * width
  for kind in ("init", "trained"):
    for stack in ("encoder", "decoder"):
      values = []
      for r in results:
        ms = [m for m in r["measurements"] if (m.label == runs.INIT) == (kind == "init")]
        held_out = ms[-1]  # the eval split
        values.append(report_lib.stack_means(held_out.percent_nonzero).get(stack, np.nan))
      right.bar(x + offset, values, width, label=f"{kind}, {stack}", hatch="//" if stack == "decoder" else None,
                alpha=0.5 if kind == "init" else 1.0)
      offset += width
  right.set_xticks(x)
  right.set_xticklabels(labels)
  right.set_ylabel("% nonzero on held-out data (mean over layers)")
  right.set_ylim(0, 65)  # bars start at 0 (a log axis would exaggerate small differences)
  right.legend(fontsize="x-small", ncol=2, loc="upper center")
  right.grid(True, axis="y", which="both", alpha=0.3)
  fig.suptitle("Dense ReLU T5, three sizes, same data and steps")
  fig.tight_layout()
  return plotting.save(fig, path)


def plot_scale_long(rows: List[dict], path: str, best: Optional[Dict[str, int]] = None) -> str:
  """Mean % nonzero on held-out data (per stack) against parameters (left) and held-out loss (right), per seed.

  With ``best`` (size -> warm-up steps), the lines join each size's runs at its better rate; the other
  runs are the faint points on the right.
  """
  plt = plotting.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.0), sharey=True)
  chosen, others = [], []
  for r in rows:
    (chosen if best is None or best[r["size"]] == r.get("warmup_steps") else others).append(r)
  other_rate = None
  for stack, marker in (("encoder", "o"), ("decoder", "s")):
    for seed in sorted({r["seed"] for r in chosen}):
      rs = sorted((r for r in chosen if r["seed"] == seed), key=lambda r: r["parameters"])
      ys = [r["mean_percent_nonzero"].get(stack, np.nan) for r in rs]
      style = "-" if stack == "encoder" else "--"
      left.plot([r["parameters"] / 1e6 for r in rs], ys, style, marker=marker, label=f"{stack}, seed {seed}")
      right.plot([r["held_out_loss"] for r in rs], ys, style, marker=marker, label=f"{stack}, seed {seed}")
      for r, y in zip(rs, ys):
        right.annotate(r["size"], (r["held_out_loss"], y), fontsize="x-small", textcoords="offset points",
                       xytext=(3, 3))
    if others:
      points = right.scatter([r["held_out_loss"] for r in others],
                             [r["mean_percent_nonzero"].get(stack, np.nan) for r in others], marker=marker,
                             facecolors="none", edgecolors="gray", alpha=0.6, label=f"{stack}, the other learning rate")
      other_rate = other_rate or points
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  left.set_xscale("log")
  left.set_xticks(sorted({r["parameters"] / 1e6 for r in chosen}))  # one tick per size
  left.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
  left.xaxis.set_minor_formatter(ticker.NullFormatter())
  left.set_xlabel("parameters (millions)")
  left.set_ylabel("% nonzero on held-out data (mean over layers)")
  right.set_xlabel("held-out loss (whole split, end of training)")
  for ax in (left, right):
    ax.grid(True, which="both", alpha=0.3)
  left.legend(fontsize="x-small")
  if other_rate is not None:
    right.legend(handles=[other_rate], fontsize="x-small")
  fig.suptitle("Dense ReLU T5, three sizes, one token budget" + (", each at its better learning rate" if best else ""))
  fig.tight_layout()
  return plotting.save(fig, path)


def plot_topk(results: List[dict], path: str) -> str:
  """Left: train and eval loss curves per MLP; right: the final losses as bars."""
  plt = plotting.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.0))
  colors = plt.cm.tab10(np.arange(10))
  for i, r in enumerate(results):
    left.plot(*r["train_loss"], color=colors[i], label=f"{r['spec'].label} (train)")
    left.plot(*r["eval_loss"], "o--", color=colors[i], label=f"{r['spec'].label} (eval)")
  left.set_xlabel("training step")
  left.set_ylabel("loss")
  left.legend(fontsize="x-small", ncol=2)
  left.grid(True, alpha=0.3)
  x = np.arange(len(results))
  train_final = [r["train_loss"][1][-1] for r in results]
  eval_final = [r["eval_loss"][1][-1] for r in results]
  right.bar(x - 0.2, train_final, 0.4, label="train loss (last log window)")
  right.bar(x + 0.2, eval_final, 0.4, label="eval loss (final)")
  for xi, (t, e) in enumerate(zip(train_final, eval_final)):
    right.text(xi - 0.2, t, f"{t:.2f}", ha="center", va="bottom", fontsize="x-small")
    right.text(xi + 0.2, e, f"{e:.2f}", ha="center", va="bottom", fontsize="x-small")
  right.set_xticks(x)
  right.set_xticklabels([r["spec"].label for r in results])
  low = min(train_final + eval_final)
  right.set_ylim(low * 0.9, max(train_final + eval_final) * 1.03)
  right.set_ylabel("final loss")
  right.legend(fontsize="x-small")
  fig.suptitle("Dense vs Top-k T5 (same model, data and steps)")
  fig.tight_layout()
  return plotting.save(fig, path)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def run(names: Sequence[str], out: str, steps: Optional[int] = None,
        eval_steps: Optional[int] = None, measure_only: bool = False) -> Dict[str, Any]:
  """Runs the named experiments in order (never in parallel: they share the cores).

  ``eval_steps`` overrides each experiment's number of measured batches per split;
  ``measure_only`` (``emergence_long`` only) measures its newest checkpoint without training.
  """
  if measure_only and list(names) != ["emergence_long"]:
    raise gin_utils.ConfigError("--measure_only applies to --experiment=emergence_long alone")
  for name in names:
    if name not in EXPERIMENTS:
      raise gin_utils.ConfigError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
  results = {}
  for name in names:
    start = time.time()
    logging.info("experiment %s -> %s", name, out)
    kwargs = {} if eval_steps is None else {"eval_steps": eval_steps}
    if measure_only:
      kwargs["measure_only"] = True
    results[name] = EXPERIMENTS[name](out, steps, **kwargs)
    print(f"experiment {name}: {time.time() - start:.0f} s, outputs in {os.path.join(out, name)}", flush=True)
  return results


def parse_args(argv: Sequence[str]) -> Tuple[List[str], argparse.Namespace]:
  """``(experiment names, arguments)``; a bad value is a ``ConfigError``."""
  parser = common.ArgumentParser(prog="run.py", description=__doc__.splitlines()[0])
  parser.add_argument("--experiment", required=True,
                      help=f"comma-separated: {', '.join(EXPERIMENTS)} (or 'all': all but {', '.join(LONG_EXPERIMENTS)})")
  parser.add_argument("--out", required=True, help="output root (runs/ and one directory per experiment)")
  parser.add_argument("--steps", type=int, default=None, help="override every run's TRAIN_STEPS")
  parser.add_argument("--eval_steps", type=int, default=None,
                      help="override the batches measured per split (default: each experiment's own)")
  parser.add_argument("--measure_only", action="store_true",
                      help="emergence_long: measure the newest checkpoint without training (a run in progress)")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.experiment.split(",") if n.strip()]
  if names == ["all"]:
    names = [n for n in EXPERIMENTS if n not in LONG_EXPERIMENTS]
  if not names:
    raise gin_utils.ConfigError("--experiment names no experiment")
  unknown = [n for n in names if n not in EXPERIMENTS]
  if unknown:
    raise gin_utils.ConfigError(f"unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)}")
  for flag in ("steps", "eval_steps"):
    value = getattr(args, flag)
    if value is not None and value <= 0:
      raise gin_utils.ConfigError(f"--{flag} must be positive, got {value}")
  return names, args


@common.command
def main(argv: Sequence[str]) -> int:
  names, args = parse_args(argv)
  run(names, os.path.abspath(args.out), args.steps, args.eval_steps, args.measure_only)
  return 0


if __name__ == "__main__":
  sys.exit(main())
