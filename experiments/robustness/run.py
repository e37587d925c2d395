#!/usr/bin/env python
"""The paper's Table 1 on digits: dense ReLU ViT vs Top-k ViT, label noise, corruptions, ECE, over seeds.

One command trains and evaluates every run in sequence, then writes the table (README.md)::

    python experiments/robustness/run.py --out=/tmp/topk_vit_robustness \
        [--seeds 0 1 2] [--label_noise 0 0.4 0.8] [--gin.TRAIN_STEPS=800]

    # the memorisation regime: no augmentation, long enough that dense fits its noisy labels
    python experiments/robustness/run.py --setting=memorisation --out=/tmp/topk_vit_memorisation
    python experiments/robustness/run.py --setting=memorisation --out=/tmp/topk_vit_memorisation \
        --label_noise 0.4 --models dense top2 top5 top10 top20 --name=k_sweep

    # with power: d_ff 256, dense against k = 54 (its own level) and k = 27, paired intervals over 10 seeds
    python experiments/robustness/run.py --setting=power --out=runs/robustness_power \
        --seeds 0 1 2 3 4 5 6 7 8 9 --label_noise 0.4 0.8 0
    python experiments/robustness/run.py --setting=power --out=runs/robustness_power ... --table_only

Each run is the packaged ``vit/runs/cpu_smoke.gin`` (the Top-k ViT, k = 5), or that file
plus ``vit/relu.gin`` (the dense ReLU ViT); model ``top<k>`` is the Top-k ViT with
``TOP_K = k``. ``--setting=memorisation`` stacks this directory's ``memorisation.gin`` on
top; ``--setting=power`` stacks ``memorisation.gin`` and ``power.gin`` (d_ff 256). Runs are trained by ``train.train`` and evaluated by ``evaluate.evaluate`` (the
run's ``EVALUATORS``: ``evaluators.CorruptionEvaluator``), in this process. Run
``{model}_noise{p}_seed{s}`` uses ``RANDOM_SEED = LABEL_NOISE_SEED = s``: at a given seed
every model starts from the same initialiser seed and sees the same noisy labels.
Corruptions and ECE are measured on the clean-label runs only (as the table uses them).
A run whose ``eval_results.json`` exists is skipped, so an interrupted experiment resumes;
``--overwrite`` redoes everything.

Writes ``OUT/<name>.md`` and ``OUT/<name>.json`` (``robustness.build_table``, plus the
machine with its load average at the start, per-run wall times and the command) and prints
the table. In the memorisation setting every run also gets ``memorisation.json`` (test
accuracy and noisy-label training accuracy over steps, the step of best test accuracy,
exact training-set measurements and per-layer % nonzero on train vs test data, at the end
and at that step) and ``best/eval_results.json`` (Table 1's measurements at that step);
the table JSON then holds Table 1 at the end and at the best step, paired differences
against dense and the memorisation summary, and ``<name>_curves.png`` plots test accuracy
over steps per model (and ``<name>_k.png`` the accuracies against k when several Top-k
models ran). In the power setting the paired differences carry their 95% bootstrap interval over seeds
(``intervals.paired_difference_interval``) and ``<name>_differences.png`` draws them. ``--table_only`` trains nothing:
it tabulates the finished runs, with ``runs_planned``, ``runs_done`` and ``complete``. ``--remeasure`` trains
nothing either: it measures again, from their checkpoints, the % nonzero of finished runs whose ``memorisation.json``
counted the zero images that pad a split's last batch (written before ``sparsity_padding_excluded``), then writes the
table; stopped, the same command goes on where it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from topk_transformers import startup

startup.quiet_start()  # before the imports below bring in TensorFlow, so that it prints no banners

# pylint: disable=g-import-not-at-top,wrong-import-position
import gin  # noqa: E402
import jax  # noqa: E402

from topk_transformers import evaluate, gin_utils, intervals, plotting, robustness, runs, train  # noqa: E402
from topk_transformers import sparsity_report as report_lib  # noqa: E402
from topk_transformers.benchmarks import machine  # noqa: E402
from topk_transformers.commands import common  # noqa: E402
from topk_transformers.commands.train import exit_if_preempted  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))

MODELS = {
    # name -> packaged gin files; names are the table's columns. 'top<k>' is "topk" with TOP_K = k.
    "dense": ["vit/runs/cpu_smoke.gin", "vit/relu.gin"],
    "topk": ["vit/runs/cpu_smoke.gin"],
}
_TOP_K_MODEL = re.compile(r"^top([1-9][0-9]*)$")

SETTINGS = {
    # name -> this directory's gin files stacked over the model's.
    "table": [],
    "memorisation": [os.path.join(HERE, "memorisation.gin")],
    # The memorisation regime with d_ff 256: k near the dense model's own % nonzero and at half of it.
    "power": [os.path.join(HERE, "memorisation.gin"), os.path.join(HERE, "power.gin")],
}


TIMING_FILE = "timing.json"
# The power setting's models: k at the dense model's own level (21.1% of d_ff 256, measured first on seed 0 at 0% and
# 40% noise: 22.2% and 20.1%) and at half of it (README.md).
POWER_MODELS = ("dense", "top54", "top27")
# Settings that follow each run over training (memorisation.json, the best step).
MEMORISATION_SETTINGS = ("memorisation", "power")


def model_type(name: str) -> str:
  """``argparse`` type of ``--models``: a name of ``MODELS`` or ``top<k>``."""
  if name in MODELS or _TOP_K_MODEL.match(name):
    return name
  raise argparse.ArgumentTypeError(f"invalid model {name!r} (choose from {', '.join(MODELS)} or top<k>, e.g. top5)")


def model_gin(model: str, setting: str = "table") -> Tuple[List[str], List[str]]:
  """``(gin files, bindings)`` of a model in a setting."""
  match = _TOP_K_MODEL.match(model)
  files = MODELS["topk" if match else model]
  bindings = [f"TOP_K = {int(match.group(1))}"] if match else []
  return list(files) + SETTINGS[setting], bindings


def run_name(model: str, noise: float, seed: int) -> str:
  return f"{model}_noise{noise:g}_seed{seed}"


def run_bindings(model: str, noise: float, seed: int, run_dir: str) -> list:
  """The bindings that make one run of the table out of the model's gin files."""
  bindings = [f"MODEL_DIR = '{run_dir}'", f"RANDOM_SEED = {seed}", f"LABEL_NOISE = {noise!r}",
              f"LABEL_NOISE_SEED = {seed}", f"evaluators.CorruptionEvaluator.name = '{model}'"]
  if noise > 0:  # The table reads corruptions off the clean-label runs only.
    bindings.append("evaluators.CorruptionEvaluator.corruptions = []")
  return bindings


def train_and_evaluate(model: str, noise: float, seed: int, run_dir: str, extra_bindings: Sequence[str],
                       setting: str = "table") -> dict:
  """Trains one run into ``run_dir`` and writes its ``eval_results.json``; returns wall times.

  In the memorisation setting it also writes ``memorisation.json`` and ``best/eval_results.json``.
  """
  start = time.time()
  files, bindings = model_gin(model, setting)
  gin_utils.configure(files, bindings + run_bindings(model, noise, seed, run_dir) + list(extra_bindings))
  os.makedirs(run_dir, exist_ok=True)
  result = gin.get_configurable(train.train)()
  # Stopped by SIGTERM with its checkpoint written: evaluating would write eval_results.json, which marks a
  # finished run, so a resumed table would skip it. The same command resumes it instead.
  exit_if_preempted(result, os.path.basename(run_dir))
  with open(os.path.join(run_dir, "config.gin"), "w") as f:
    f.write(gin.operative_config_str())
  trained = time.time()
  final = None
  if setting in MEMORISATION_SETTINGS:
    _, final = write_memorisation(run_dir)  # before eval_results.json, whose presence marks a finished run
  result = evaluate.evaluate(final or runs.load_run(run_dir), results_dir=run_dir)
  for key in result["evaluators"]:
    print(result[key]["summary"], flush=True)
  done = time.time()
  return {"train_seconds": trained - start, "eval_seconds": done - trained}


# ---------------------------------------------------------------------------
# The memorisation setting: curves, the best-test step, exact training-set measurements
# ---------------------------------------------------------------------------

MEMORISATION_FILE = "memorisation.json"


def _curve(scalars: Dict[str, Dict[int, float]], tag: str) -> Dict[str, list]:
  points = scalars.get(tag, {})
  steps = sorted(points)
  return {"steps": steps, "values": [float(points[s]) for s in steps]}


def training_set_measurement(run: runs.Run) -> Dict[str, Any]:
  """Predictions on the whole training split against its noisy and its true labels, and % nonzero.

  ``accuracy_noisy_labels``: agreement with the labels the model trained on;
  ``accuracy_true_labels``: with the clean ones; ``memorised``: of the examples whose label the
  noise changed, the fraction predicted as the noisy label (1 when the model has fitted all of
  them); ``percent_nonzero``: per layer, on the training split (``sparsity_report.measure``).
  """
  dataset = run.dataset
  clean = dataclasses.replace(dataset, label_noise=0.0)
  image_sharding = run.batch_shardings["image"]
  probs_fn = jax.jit(run.model.predict_batch)
  preds, noisy, true = [], [], []
  stream = zip(dataset.get_dataset(dataset.train_split, run.host_batch, shuffle=False, repeat=False)
               .as_numpy_iterator(),
               clean.get_dataset(clean.train_split, run.host_batch, shuffle=False, repeat=False).as_numpy_iterator())
  for batch, clean_batch in stream:
    keep = batch["weight"] > 0
    images = jax.device_put(np.asarray(batch["image"], np.float32), image_sharding)
    probs = np.asarray(jax.device_get(probs_fn(run.params, {"image": images})))
    preds.append(probs.argmax(-1)[keep])
    noisy.append(batch["label"][keep])
    true.append(clean_batch["label"][keep])
  preds, noisy, true = (np.concatenate(x) for x in (preds, noisy, true))
  changed = noisy != true
  sparsity = report_lib.measure(run, dataset.train_split).percent_nonzero
  return {
      "step": run.step,
      "num_examples": int(preds.size),
      "num_labels_changed": int(changed.sum()),
      "accuracy_noisy_labels": float(np.mean(preds == noisy)),
      "accuracy_true_labels": float(np.mean(preds == true)),
      "memorised": float(np.mean(preds[changed] == noisy[changed])) if changed.any() else None,
      "accuracy_unchanged_labels": float(np.mean(preds[~changed] == true[~changed])) if (~changed).any() else None,
      "percent_nonzero_train": {k: float(v) for k, v in sparsity.items()},
  }


def write_memorisation(run_dir: str) -> Tuple[Dict[str, Any], runs.Run]:
  """``memorisation.json`` and ``best/eval_results.json`` of a trained run (gin configured for it).

  Returns the JSON's dict and the loaded final run.
  """
  scalars = report_lib.read_event_scalars(run_dir)
  test_acc = _curve(scalars, "eval/accuracy")
  if not test_acc["steps"]:
    raise gin_utils.ConfigError(f"run {run_dir} logged no eval/accuracy: train it for at least EVAL_PERIOD steps")
  saved = set(report_lib.checkpoint_steps(run_dir))
  # The best test accuracy among the evaluated steps that have a checkpoint (the earliest on a tie).
  candidates = [(v, -s) for s, v in zip(test_acc["steps"], test_acc["values"]) if s in saved]
  if not candidates:
    raise gin_utils.ConfigError(f"run {run_dir}: no checkpoint at an evaluated step (CHECKPOINT_PERIOD must "
                                "divide EVAL_PERIOD's steps)")
  best_step = -max(candidates)[1]
  final = runs.load_run(run_dir)
  best = final.with_params(os.path.join(run_dir, "checkpoints", str(best_step)))
  test_sparsity = {}
  for r in (final, best):
    measured = report_lib.measure(r, r.dataset.eval_split)
    test_sparsity[r.step] = {k: float(v) for k, v in measured.percent_nonzero.items()}
  payload = {
      "run_dir": run_dir,
      "train_steps": int(gin_utils.get_macro("TRAIN_STEPS")),
      "seed": int(gin_utils.get_macro("RANDOM_SEED")),
      "label_noise": float(gin_utils.get_macro("LABEL_NOISE")),
      "top_k": gin_utils.get_macro("TOP_K", default=None),
      "best_step": best_step,
      "best_test_accuracy": float(dict(zip(test_acc["steps"], test_acc["values"]))[best_step]),
      "final_test_accuracy": test_acc["values"][-1],
      # Its % nonzero leaves out the zero images that pad a split's last batch (older runs counted them).
      "sparsity_padding_excluded": True,
      "curves": {
          "test_accuracy": test_acc,
          "test_loss": _curve(scalars, "eval/loss"),
          # The mean over each LOG_PERIOD window of training batches, against their (noisy) labels.
          "train_accuracy_noisy_labels": _curve(scalars, "train/accuracy"),
          "train_loss": _curve(scalars, "train/loss"),
      },
  }
  for key, r in (("final", final), ("best", best)):
    payload[key] = training_set_measurement(r)
    payload[key]["percent_nonzero_test"] = test_sparsity[r.step]
  with open(os.path.join(run_dir, MEMORISATION_FILE), "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  best_dir = os.path.join(run_dir, "best")
  result = evaluate.evaluate(best, results_dir=best_dir)
  for key in result["evaluators"]:
    print(f"best step {best_step}: " + result[key]["summary"], flush=True)
  return payload, final


def remeasure_sparsity(run_dir: str) -> Dict[str, Any]:
  """Measures again the % nonzero in a finished run's ``memorisation.json`` (gin configured for it).

  Both checkpoints it describes (the final step and the best-test step), on the training and the test split;
  its accuracies and curves are left as they are. Returns the rewritten dict.
  """
  path = os.path.join(run_dir, MEMORISATION_FILE)
  with open(path, encoding="utf-8") as f:
    payload = json.load(f)
  final = runs.load_run(run_dir)
  best = final.with_params(os.path.join(run_dir, "checkpoints", str(payload["best_step"])))
  for key, r in (("final", final), ("best", best)):
    for field, split in (("percent_nonzero_train", r.dataset.train_split),
                         ("percent_nonzero_test", r.dataset.eval_split)):
      payload[key][field] = {k: float(v) for k, v in report_lib.measure(r, split).percent_nonzero.items()}
  payload["sparsity_padding_excluded"] = True
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  os.replace(path + ".tmp", path)  # stopped halfway, the run keeps its old file and a rerun measures it again
  return payload


def _stats(values: Sequence[Optional[float]]) -> Optional[Dict[str, Any]]:
  values = [float(v) for v in values if v is not None]
  if not values:
    return None
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
          "n": len(values), "values": values}


def memorisation_summary(memo: Dict[Tuple[str, float, int], Dict[str, Any]], models: Sequence[str],
                         noises: Sequence[float], seeds: Sequence[int]) -> List[Dict[str, Any]]:
  """Per model and noise level, over seeds: best step, test accuracies and training-set fit."""
  rows = []
  for noise in noises:
    for model in models:
      ms = [memo[(model, noise, s)] for s in seeds if (model, noise, s) in memo]
      if not ms:
        continue
      row = {"model": model, "label_noise": noise, "seeds": [m["seed"] for m in ms]}
      row["best_step"] = _stats([m["best_step"] for m in ms])
      row["best_test_accuracy"] = _stats([m["best_test_accuracy"] for m in ms])
      row["final_test_accuracy"] = _stats([m["final_test_accuracy"] for m in ms])
      for at in ("final", "best"):
        for key in ("accuracy_noisy_labels", "accuracy_true_labels", "memorised"):
          row[f"{at}_train_{key}"] = _stats([m[at][key] for m in ms])
        layers = list(ms[0][at]["percent_nonzero_test"])
        for split in ("train", "test"):
          row[f"{at}_percent_nonzero_{split}"] = {
              layer: _stats([m[at][f"percent_nonzero_{split}"][layer] for m in ms]) for layer in layers}
      rows.append(row)
  return rows


def paired_differences(results: Dict[Tuple[str, float, int], Dict[str, Any]], models: Sequence[str],
                       noises: Sequence[float], seeds: Sequence[int], baseline: str = "dense") -> Dict[str, Any]:
  """Per row of Table 1 and model, the per-seed differences model minus ``baseline`` (fractions)."""
  out: Dict[str, Any] = {}
  clean = 0.0 in noises

  def pick_rows():
    if clean:
      yield "accuracy", 0.0, lambda r: r["accuracy"]
    for p in noises:
      if p > 0:
        yield f"label_noise_{p:g}", p, lambda r: r["accuracy"]
    if clean:
      corruptions = next((list(r.get("corruptions", {})) for (m, p, s), r in results.items() if p == 0.0), [])
      for c in corruptions:
        yield f"corruption_{c}", 0.0, lambda r, c=c: r.get("corruptions", {}).get(c, {}).get("mean")
      yield "ece", 0.0, lambda r: r.get("ece")

  for key, noise, pick in pick_rows():
    for model in models:
      if model == baseline:
        continue
      diffs = {}
      for s in seeds:
        a, b = results.get((model, noise, s)), results.get((baseline, noise, s))
        if a is not None and b is not None and pick(a) is not None and pick(b) is not None:
          diffs[s] = float(pick(a) - pick(b))
      if diffs:
        cell = {"per_seed": diffs, **_stats(list(diffs.values()))}
        if len(diffs) >= 2:
          # 95% percentile-bootstrap interval of the mean paired difference over seeds (the shared test images
          # are not resampled: each seed's difference is on the same 360 images).
          ds = sorted(diffs)
          cell["interval"] = intervals.paired_difference_interval(
              [pick(results[(model, noise, s)]) for s in ds], [pick(results[(baseline, noise, s)]) for s in ds]
          ).as_dict(6)
        out.setdefault(key, {})[model] = cell
  return out


def _pct(cell: Optional[Dict[str, Any]], scale: float = 100.0, digits: int = 1) -> str:
  if cell is None:
    return "–"
  text = f"{scale * cell['mean']:.{digits}f}"
  if cell["n"] > 1:
    text += f" ± {scale * cell['std']:.{digits}f}"
  return text


def memorisation_markdown(table_end: Dict[str, Any], table_best: Dict[str, Any], diffs_end: Dict[str, Any],
                          diffs_best: Dict[str, Any], summary: List[Dict[str, Any]]) -> str:
  """Table 1 at the end and at the best-test step, paired differences, the memorisation summary."""
  lines = ["## Table 1 at the end of training", "", robustness.table_markdown(table_end),
           "## Table 1 at the step of best test accuracy (per run)", "", robustness.table_markdown(table_best)]
  for title, diffs in (("end of training", diffs_end), ("best test step", diffs_best)):
    if not diffs:
      continue
    models = list(dict.fromkeys(m for row in diffs.values() for m in row))
    lines += [f"## Paired differences against dense, {title} (points; mean ± sample std over seeds)", "",
              "| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for key, row in diffs.items():
      cells = [f"{_pct(row[m], digits=2)} (n={row[m]['n']})" if m in row else "–" for m in models]
      lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Memorisation (training split, exact; % mean ± sample std over seeds)", "",
            "| model | noise | best step | test acc at best | test acc at end | train acc, noisy labels, end "
            "| changed labels fitted, end | train acc, true labels, end |",
            "|---|---|---|---|---|---|---|---|"]
  for row in summary:
    lines.append(f"| {row['model']} | {100 * row['label_noise']:g}% | {_pct(row['best_step'], 1.0, 0)} | "
                 f"{_pct(row['best_test_accuracy'])} | {_pct(row['final_test_accuracy'])} | "
                 f"{_pct(row['final_train_accuracy_noisy_labels'])} | {_pct(row['final_train_memorised'])} | "
                 f"{_pct(row['final_train_accuracy_true_labels'])} |")
  lines.append("")
  return "\n".join(lines) + "\n"


def plot_curves(memo: Dict[Tuple[str, float, int], Dict[str, Any]], models: Sequence[str], noises: Sequence[float],
                seeds: Sequence[int], path: str) -> str:
  """One panel per noise level: test accuracy (solid) and noisy-label training accuracy (dashed) over steps.

  Each model's line is the mean over seeds, with the band between the lowest and highest seed.
  """
  plt = plotting.pyplot()
  fig, axes = plt.subplots(1, len(noises), figsize=(4.6 * len(noises), 3.8), sharey=True, squeeze=False)
  colors = plt.cm.tab10(np.arange(10))
  for ax, noise in zip(axes[0], noises):
    for i, model in enumerate(models):
      ms = [memo[(model, noise, s)] for s in seeds if (model, noise, s) in memo]
      if not ms:
        continue
      for key, style, what in (("test_accuracy", "-", "test"), ("train_accuracy_noisy_labels", "--", "train")):
        curves = [m["curves"][key] for m in ms]
        steps = curves[0]["steps"]
        values = np.array([c["values"] for c in curves if c["steps"] == steps]) * 100
        ax.plot(steps, values.mean(0), style, color=colors[i % 10],
                label=f"{model}, {what} ({'clean' if what == 'test' else 'noisy'} labels)")
        if len(values) > 1 and what == "test":
          ax.fill_between(steps, values.min(0), values.max(0), color=colors[i % 10], alpha=0.2, linewidth=0)
    ax.set_title(f"{100 * noise:g}% label noise")
    ax.set_xlabel("training step")
    ax.grid(True, alpha=0.3)
  axes[0][0].set_ylabel("accuracy (%)")
  axes[0][-1].legend(fontsize="x-small")
  fig.suptitle(f"ViT on digits: test accuracy (band: min-max over {len(seeds)} seeds)\n"
               "and training accuracy on the noisy labels", fontsize="medium")
  fig.tight_layout()
  return plotting.save(fig, path)


def plot_layer_sparsity(summary: List[Dict[str, Any]], path: str) -> str:
  """The paper's per-layer view at the end of training: % nonzero on training data (solid) against test data
  (dotted), mean over seeds, one colour per model and noise level."""
  series, styles = {}, {}
  for i, row in enumerate(summary):
    for split, style in (("train", "-"), ("test", ":")):
      key = f"{row['model']}, {100 * row['label_noise']:g}% noise, {split}"
      series[key] = {layer: cell["mean"] for layer, cell in row[f"final_percent_nonzero_{split}"].items() if cell}
      styles[key] = {"color": f"C{i % 10}", "linestyle": style, "marker": "o" if split == "train" else "s"}
  return plotting.plot_per_layer(series, path, "ViT on digits, end of training: training vs test data",
                                 styles=styles)


def plot_k(summary: List[Dict[str, Any]], path: str) -> Optional[str]:
  """Test accuracy at the end and at the best step against k (Top-k models), dense as horizontal lines."""
  plt = plotting.pyplot()
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), squeeze=False)
  noises = list(dict.fromkeys(r["label_noise"] for r in summary))
  for ax, key, title in ((axes[0][0], "final_test_accuracy", "end of training"),
                         (axes[0][1], "best_test_accuracy", "best test step")):
    for j, noise in enumerate(noises):
      rows = [r for r in summary if r["label_noise"] == noise]
      ks = [(int(_TOP_K_MODEL.match(r["model"]).group(1)) if _TOP_K_MODEL.match(r["model"]) else 5, r)
            for r in rows if r["model"] != "dense"]
      ks.sort(key=lambda x: x[0])
      if ks:
        ax.errorbar([k for k, _ in ks], [100 * r[key]["mean"] for _, r in ks],
                    yerr=[100 * (r[key]["std"] or 0.0) for _, r in ks], marker="o", capsize=3,
                    color=f"C{j}", label=f"Top-k, {100 * noise:g}% noise")
      for r in rows:
        if r["model"] == "dense":
          ax.axhline(100 * r[key]["mean"], color=f"C{j}", linestyle="--", label=f"dense, {100 * noise:g}% noise")
    ax.set_xscale("log")
    ax.set_xlim(1.5, 40)
    ax.set_xticks([2, 5, 10, 20])
    ax.set_xticklabels(["2", "5", "10", "20"])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("k (of 64 hidden units)")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, alpha=0.3)
  axes[0][0].set_ylabel("test accuracy (%)")
  axes[0][1].legend(fontsize="x-small")
  fig.tight_layout()
  return plotting.save(fig, path)


# ---------------------------------------------------------------------------
# The power setting: paired differences against dense with 95% intervals
# ---------------------------------------------------------------------------

_ROW_LABELS = {"accuracy": "clean accuracy", "ece": "ECE"}


def _row_label(key: str) -> str:
  if key.startswith("label_noise_"):
    return f"{100 * float(key.removeprefix('label_noise_')):g}% label noise"
  if key.startswith("corruption_"):
    return key.removeprefix("corruption_").replace("_", " ")
  return _ROW_LABELS.get(key, key)


def _run_timings(run_dirs: Sequence[str]) -> Dict[str, Any]:
  """Each finished run's wall times (``timing.json``, written when it finished)."""
  out = {}
  for d in run_dirs:
    path = os.path.join(d, TIMING_FILE)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        out[os.path.basename(d)] = json.load(f)
  return out


def power_markdown(diffs: Dict[str, Any], summary: List[Dict[str, Any]]) -> str:
  """Paired differences at the end of training with their 95% intervals, and each model's % nonzero."""
  models = list(dict.fromkeys(m for row in diffs.values() for m in row))
  lines = ["## Paired differences against dense at the end of training, with 95% intervals", "",
           "Points (ECE: points of ECE); mean over seeds of (model - dense) at the same seed, and the 95% "
           "percentile-bootstrap interval over seeds (`intervals.paired_difference_interval`).", "",
           "| | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
  for key, row in diffs.items():
    cells = []
    for m in models:
      c = row.get(m)
      if c is None:
        cells.append("–")
      elif "interval" in c:
        iv = c["interval"]
        cells.append(f"{100 * iv['estimate']:+.2f} [{100 * iv['low']:+.2f}, {100 * iv['high']:+.2f}] (n={c['n']})")
      else:
        cells.append(f"{100 * c['mean']:+.2f} (n=1)")
    lines.append(f"| {_row_label(key)} | " + " | ".join(cells) + " |")
  lines += ["", "## % nonzero at the end (test images, mean of the 2 layers; mean ± sample std over seeds)", "",
            "| model | noise | % nonzero | seeds |", "|---|---|---|---|"]
  for row in summary:
    layers = [c for c in row["final_percent_nonzero_test"].values() if c]
    mean = np.mean([c["mean"] for c in layers])
    lines.append(f"| {row['model']} | {100 * row['label_noise']:g}% | {mean:.1f} | {len(row['seeds'])} |")
  return "\n".join(lines) + "\n"


def plot_differences(diffs: Dict[str, Any], path: str) -> str:
  """Each Top-k model's paired difference against dense per row of Table 1, with its 95% interval."""
  plt = plotting.pyplot()
  keys = list(diffs)
  models = list(dict.fromkeys(m for row in diffs.values() for m in row))
  fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(keys) * max(1, len(models)) + 1.2))
  for j, model in enumerate(models):
    for i, key in enumerate(keys):
      c = diffs[key].get(model)
      if c is None:
        continue
      y = i * (len(models) + 1) + j
      iv = c.get("interval")
      est = 100 * (iv["estimate"] if iv else c["mean"])
      err = [[est - 100 * iv["low"]], [100 * iv["high"] - est]] if iv else None
      ax.errorbar([est], [y], xerr=err, fmt="o", color=f"C{j}", capsize=3, label=model if i == 0 else None)
  ax.axvline(0.0, color="k", linewidth=0.8)
  ax.set_yticks([i * (len(models) + 1) + (len(models) - 1) / 2 for i in range(len(keys))])
  ax.set_yticklabels([_row_label(k) for k in keys])
  ax.invert_yaxis()
  ax.set_xlabel("Top-k − dense at the same seed (points), mean and 95% interval")
  ax.grid(True, axis="x", alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  return plotting.save(fig, path)


def parse_args(argv: Sequence[str]):
  """``(arguments, extra gin bindings)``; a bad value is a ``ConfigError``."""
  gin_files, bindings, rest = gin_utils.parse_gin_flags(argv)
  if gin_files:
    raise gin_utils.ConfigError("the models' gin files are fixed (vit/runs/cpu_smoke.gin [+ vit/relu.gin], "
                                "+ --setting's); use --gin.NAME=VALUE")
  parser = common.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="/tmp/topk_vit_robustness", help="one directory per run, and the table")
  parser.add_argument("--setting", default="table", choices=list(SETTINGS),
                      help="table: 800 steps with augmentation; memorisation: memorisation.gin (curves, best step); "
                           "power: memorisation.gin + power.gin (d_ff 256, paired intervals)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--label_noise", type=float, nargs="+", default=[0.0, 0.4, 0.8])
  parser.add_argument("--models", type=model_type, nargs="+", default=None,
                      help="dense, topk (k = 5) or top<k> (default: dense topk; memorisation: dense top5)")
  parser.add_argument("--name", default="table", help="the table's file names: OUT/<name>.md, .json, .png")
  parser.add_argument("--overwrite", action="store_true", help="retrain runs that already have results")
  parser.add_argument("--table_only", action="store_true",
                      help="train nothing: the table of the finished runs (partial if some are not)")
  parser.add_argument("--remeasure", action="store_true",
                      help="train nothing: measure again the %% nonzero of finished runs measured with the padding "
                           "images counted (memorisation and power settings), then write the table")
  args = parser.parse_args(rest)
  if args.models is None:
    args.models = {"memorisation": ["dense", "top5"], "power": list(POWER_MODELS)}.get(args.setting, ["dense", "topk"])
  for p in args.label_noise:
    if not 0.0 <= p <= 1.0:
      raise gin_utils.ConfigError(f"--label_noise values must be in [0, 1], got {p:g}")
  for flag in ("seeds", "label_noise", "models"):
    values = getattr(args, flag)
    if len(set(values)) != len(values):
      raise gin_utils.ConfigError(f"--{flag} repeats a value: {' '.join(map(str, values))}")
  if args.remeasure and args.setting not in MEMORISATION_SETTINGS:
    raise gin_utils.ConfigError(f"--remeasure measures memorisation.json again: it needs --setting=memorisation or "
                                f"power, not {args.setting}")
  if args.remeasure and (args.overwrite or args.table_only):
    raise gin_utils.ConfigError("--remeasure trains nothing: it takes neither --overwrite nor --table_only")
  args.out = os.path.abspath(args.out)  # orbax wants absolute checkpoint paths
  if not re.match(r"^[A-Za-z0-9_.-]+$", args.name):
    raise gin_utils.ConfigError(f"--name must be a plain file name, got {args.name!r}")
  return args, bindings


@common.command
def main(argv: Sequence[str]) -> int:
  args, bindings = parse_args(argv)

  # Runs differ only in seeds and labels: one XLA compile per model serves all of them.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  os.makedirs(args.out, exist_ok=True)
  host = machine.machine_info()
  timings = {}
  start = time.time()
  # Seeds outermost: a partial experiment already pairs the models at every noise level.
  keys = [(m, p, s) for s in args.seeds for p in args.label_noise for m in args.models]
  if args.remeasure:
    unfinished = [run_name(*k) for k in keys
                  if not os.path.exists(os.path.join(args.out, run_name(*k), robustness.RESULTS_FILE))]
    if unfinished:
      raise gin_utils.ConfigError(f"--remeasure: {', '.join(unfinished)} not finished yet; run the command without "
                                  "--remeasure to train it")
  for model, noise, seed in keys:
    name = run_name(model, noise, seed)
    run_dir = os.path.join(args.out, name)
    if args.remeasure:
      with open(os.path.join(run_dir, MEMORISATION_FILE), encoding="utf-8") as f:
        if json.load(f).get("sparsity_padding_excluded", False):
          print(f"== {name}: measured without the padding images already, skipped", flush=True)
          continue
      files, model_bindings = model_gin(model, args.setting)
      gin_utils.configure(files, model_bindings + run_bindings(model, noise, seed, run_dir) + list(bindings))
      remeasure_sparsity(run_dir)
      print(f"== {name}: % nonzero measured again", flush=True)
      continue
    if os.path.exists(os.path.join(run_dir, robustness.RESULTS_FILE)) and not args.overwrite:
      print(f"== {name}: results exist, skipped", flush=True)
      continue
    if args.table_only:
      continue
    if os.path.exists(run_dir):
      shutil.rmtree(run_dir)  # A half-finished run restarts from scratch.
    print(f"== {name}", flush=True)
    timings[name] = train_and_evaluate(model, noise, seed, run_dir, bindings, args.setting)
    with open(os.path.join(run_dir, TIMING_FILE), "w", encoding="utf-8") as f:
      json.dump({**timings[name], "load_average_at_end": machine.load_average()}, f)
    print(f"== {name}: train {timings[name]['train_seconds']:.0f} s, eval {timings[name]['eval_seconds']:.0f} s",
          flush=True)
  wall = time.time() - start

  planned = len(keys)
  # Only finished runs (eval_results.json written) enter the table; a partial table says how many.
  keys = [k for k in keys if os.path.exists(os.path.join(args.out, run_name(*k), robustness.RESULTS_FILE))]
  if not keys:
    raise gin_utils.ConfigError(f"no finished run in {args.out} for these seeds, noise levels and models")
  run_dirs = [os.path.join(args.out, run_name(*k)) for k in keys]
  results = {k: robustness.load_results(d) for k, d in zip(keys, run_dirs)}
  table = robustness.build_table(list(results.values()))
  markdown = robustness.table_markdown(table)
  extra: Dict[str, Any] = {}
  if args.setting in MEMORISATION_SETTINGS:
    memo = {}
    for k, d in zip(keys, run_dirs):
      with open(os.path.join(d, MEMORISATION_FILE), encoding="utf-8") as f:
        memo[k] = json.load(f)
    best = {k: robustness.load_results(os.path.join(d, "best")) for k, d in zip(keys, run_dirs)}
    table_best = robustness.build_table(list(best.values()))
    summary = memorisation_summary(memo, args.models, args.label_noise, args.seeds)
    diffs_end = paired_differences(results, args.models, args.label_noise, args.seeds)
    diffs_best = paired_differences(best, args.models, args.label_noise, args.seeds)
    markdown = memorisation_markdown(table, table_best, diffs_end, diffs_best, summary)
    if args.setting == "power":
      figures_power = {"differences": os.path.basename(plot_differences(
          diffs_end, os.path.join(args.out, f"{args.name}_differences.png")))}
      markdown += power_markdown(diffs_end, summary)
    figures = {"curves": os.path.basename(plot_curves(memo, args.models, args.label_noise, args.seeds,
                                                      os.path.join(args.out, f"{args.name}_curves.png")))}
    figures["per_layer"] = os.path.basename(plot_layer_sparsity(
        summary, os.path.join(args.out, f"{args.name}_per_layer.png")))
    if sum(m != "dense" for m in args.models) > 1 and args.setting == "memorisation":  # its axis: k of 64
      figures["k"] = os.path.basename(plot_k(summary, os.path.join(args.out, f"{args.name}_k.png")))
    if args.setting == "power":
      figures.update(figures_power)
    train_steps = sorted({m["train_steps"] for m in memo.values()})
    extra = {"table_best_step": table_best, "paired_differences_end": diffs_end,
             "sparsity_padding_excluded": all(m.get("sparsity_padding_excluded", False) for m in memo.values()),
             "paired_differences_best_step": diffs_best, "memorisation": summary, "figures": figures,
             "train_steps": train_steps[0] if len(train_steps) == 1 else train_steps}
  table.update({
      "setting": args.setting, "models": args.models,
      "run_dirs": run_dirs, "machine": host, "wall_seconds_this_invocation": wall, "run_seconds": timings,
      "command": " ".join(["experiments/robustness/run.py"] + [a for a in argv if a != "--remeasure"]),
      "seeds": args.seeds, "label_noise": args.label_noise, "extra_bindings": bindings, **extra,
      "runs_planned": planned, "runs_done": len(keys), "complete": len(keys) == planned,
      "seeds_done": sorted({s for _, _, s in keys}), "run_timings": _run_timings(run_dirs),
  })
  with open(os.path.join(args.out, f"{args.name}.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(args.out, f"{args.name}.json"), "w", encoding="utf-8") as f:
    json.dump(table, f, indent=2)
  sys.stdout.write(markdown)
  print(f"{len(timings)} runs in {wall / 60:.1f} min on {host['cores']} x {host['cpu']}; "
        f"wrote {os.path.join(args.out, args.name + '.md')} and {args.name}.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
