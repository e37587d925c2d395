"""The paper's Table 1 measurements: accuracy, ECE with its reliability diagram, accuracy under corruptions.

:func:`evaluate` runs a ``predict_fn(images) -> probs`` over an
:class:`~topk_transformers.data.vision.ImageDataset`'s eval split and over the
corrupted copies, and returns one JSON-able dict per run, which
:func:`write_results` stores as ``RUN_DIR/eval_results.json``::

    {
      "format": 1,
      "name": "top16",            # the model: runs sharing it are seeds of one column
      "seed": 0, "top_k": 16, "label_noise": 0.4,     # label noise of *training*
      "dataset": "digits", "split": "test", "num_examples": 360,
      "accuracy": 0.95,           # fractions in [0, 1]
      "ece": 0.031, "ece_num_bins": 15,
      "reliability": {"accuracy": [...], "confidence": [...], "count": [...], "bin_edges": [...]},
      "reliability_diagram": "reliability_diagram.png",   # relative to RUN_DIR (plotting.reliability_diagram)
      "corruption_constants": "cifar10",                    # only for locally corrupted data
      "corruptions": {"gaussian_noise": {"1": 0.9, ..., "5": 0.6, "mean": 0.75}, ...}
    }

:func:`build_table` turns several such dicts into Table 1 (rows: natural
accuracy, one row per label-noise level, one per corruption, ECE; columns: the
``name``s, mean and spread over runs sharing a name), and
:func:`table_markdown` renders it. ECE is :mod:`topk_transformers.vit.model`'s
(15 equal-width confidence bins, Guo et al. 2017), accumulated over the dataset.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from topk_transformers import plotting
from topk_transformers.gin_utils import ConfigError
from topk_transformers.data import corruptions as corruptions_lib

FORMAT = 1
RESULTS_FILE = "eval_results.json"
DIAGRAM_FILE = "reliability_diagram.png"
DEFAULT_CORRUPTIONS = corruptions_lib.CORRUPTIONS
NUM_BINS = 15  # The paper's; vit.model.DEFAULT_NUM_BINS.


def _vit_model():
  # Imported when evaluating, so that tabulating results needs neither JAX nor Flax.
  from topk_transformers.vit import model

  return model

PredictFn = Callable[[np.ndarray], Any]


def evaluate_dataset(predict_fn: PredictFn, dataset: Iterable[Mapping[str, np.ndarray]],
                     num_bins: int = NUM_BINS) -> Dict[str, Any]:
  """Accuracy, ECE and the reliability data of ``predict_fn`` over weighted batches.

  Args:
    predict_fn: ``images [B, H, W, C] -> probs [B, num_classes]`` (softmax outputs).
    dataset: a ``tf.data.Dataset`` or iterable of ``{"image", "label", "weight"}``
      batches; examples of weight 0 (padding) are left out.
    num_bins: confidence bins of the ECE.

  Returns:
    ``{"accuracy", "ece", "num_examples", "bins"}``, ``bins`` the summed
    :func:`~topk_transformers.vit.model.calibration_bins`.
  """
  batches = dataset.as_numpy_iterator() if hasattr(dataset, "as_numpy_iterator") else dataset
  totals = None
  for batch in batches:
    probs = np.asarray(predict_fn(batch["image"]), np.float32)
    labels = np.asarray(batch["label"])
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
      raise ValueError(f"predict_fn must return probs [batch, classes], got shape {probs.shape} "
                       f"for {labels.shape[0]} images")
    if probs.min() < -1e-6 or np.abs(probs.sum(-1) - 1.0).max() > 1e-3:
      raise ValueError("predict_fn must return probabilities (rows summing to 1), got values in "
                       f"[{probs.min():.3g}, {probs.max():.3g}]; apply a softmax to logits")
    weights = np.asarray(batch.get("weight", np.ones(labels.shape)), np.float32)
    bins = _vit_model().calibration_bins(probs, labels, weights, num_bins)
    bins = {k: np.asarray(v, np.float64) for k, v in bins.items()}
    totals = bins if totals is None else {k: totals[k] + bins[k] for k in totals}
  if totals is None or totals["count"].sum() == 0:
    raise ValueError("the dataset yielded no examples of nonzero weight")
  n = float(totals["count"].sum())
  return {
      "accuracy": float(totals["correct_sum"].sum() / n),
      "ece": float(_vit_model().ece_from_bins(totals)),
      "num_examples": int(round(n)),
      "bins": totals,
  }


def reliability(bins: Mapping[str, np.ndarray]) -> Dict[str, List[float]]:
  """Per-bin accuracy, confidence, count and bin edges (lists, for JSON) from accumulated bins."""
  return {k: np.asarray(v, np.float64).tolist() for k, v in _vit_model().reliability_from_bins(bins).items()}


def evaluate(predict_fn: PredictFn, image_dataset, batch_size: int, corruptions: Sequence[str] = DEFAULT_CORRUPTIONS,
             severities: Sequence[int] = corruptions_lib.SEVERITIES, num_bins: int = NUM_BINS,
             run_dir: Optional[str] = None, name: Optional[str] = None, seed: Optional[int] = None,
             top_k: Optional[int] = None, label_noise: Optional[float] = None, corruption_seed: int = 0,
             extra: Optional[Mapping[str, Any]] = None, split: Optional[str] = None) -> Dict[str, Any]:
  """Table 1's measurements of one trained model, as the dict in the module docstring.

  Args:
    predict_fn: ``images -> probs``, e.g. ``jax.jit`` of ``softmax(model.apply(...))``.
    image_dataset: the :class:`~topk_transformers.data.vision.ImageDataset` the model
      trained on; ``split`` (default its ``eval_split``) is evaluated clean (no label noise),
      and its corrupted copies via ``get_corrupted_dataset``.
    batch_size: eval batch size (the last batch is padded).
    corruptions, severities: the corrupted copies; accuracy is averaged over severities.
    run_dir: if given, the reliability diagram PNG is written there (and named in the dict).
    name, seed, top_k: identify the run (``name`` groups seeds in the table; it
      defaults to ``"dense"`` or ``"top{k}"``).
    label_noise: the *training* label noise; defaults to ``image_dataset.label_noise``.
    corruption_seed: seed of the locally made corruptions (digits).
    extra: more JSON-able keys to store.
  """
  split = split or image_dataset.eval_split
  clean = evaluate_dataset(predict_fn, image_dataset.get_dataset(split, batch_size, shuffle=False, repeat=False),
                           num_bins)
  results: Dict[str, Any] = {
      "format": FORMAT,
      "name": name or ("dense" if top_k is None else f"top{top_k}"),
      "seed": seed,
      "top_k": top_k,
      "label_noise": float(image_dataset.label_noise if label_noise is None else label_noise),
      "dataset": image_dataset.tfds_name,
      "split": split,
      "num_examples": clean["num_examples"],
      "accuracy": clean["accuracy"],
      "ece": clean["ece"],
      "ece_num_bins": num_bins,
      "reliability": reliability(clean["bins"]),
  }
  if run_dir is not None:
    os.makedirs(run_dir, exist_ok=True)
    plotting.reliability_diagram(results["reliability"], os.path.join(run_dir, DIAGRAM_FILE),
                                 title=results["name"], ece=results["ece"])
    results["reliability_diagram"] = DIAGRAM_FILE
  if corruptions:
    from topk_transformers.data import vision  # Late: robustness tables need no TensorFlow.

    if image_dataset.tfds_name in vision.LOCALLY_CORRUPTED:
      results["corruption_constants"] = image_dataset.corruption_constants
    results["corruptions"] = {}
    for corruption in corruptions:
      accs = {}
      for severity in severities:
        ds = image_dataset.get_corrupted_dataset(corruption, severity, batch_size, seed=corruption_seed)
        accs[str(severity)] = evaluate_dataset(predict_fn, ds, num_bins)["accuracy"]
      accs["mean"] = float(np.mean([accs[str(s)] for s in severities]))
      results["corruptions"][corruption] = accs
  results.update(extra or {})
  return results


def write_results(run_dir: str, results: Mapping[str, Any]) -> str:
  """Writes ``results`` to ``run_dir/eval_results.json``; returns the path."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, RESULTS_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  return path


def load_results(path: str) -> Dict[str, Any]:
  """Reads ``path/eval_results.json`` (or ``path`` itself if it is a file)."""
  file = os.path.join(path, RESULTS_FILE) if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise ConfigError(f"no {RESULTS_FILE} in {path!r}")
  with open(file, encoding="utf-8") as f:
    try:
      results = json.load(f)
    except ValueError as e:
      raise ConfigError(f"{file} is not valid JSON ({e})") from None
  for key in ("name", "accuracy"):
    if key not in results:
      raise ConfigError(f"{file} has no {key!r} key")
  return results


# ---- Table 1


def _cell(values: Sequence[float]) -> Optional[Dict[str, Any]]:
  if not values:
    return None
  values = [float(v) for v in values]
  return {
      "mean": float(np.mean(values)),
      # Sample standard deviation over seeds; undefined for one run.
      "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
      "n": len(values),
      "values": values,
  }


def _noise_label(p: float) -> str:
  return f"{100 * p:g}% label noise"


def build_table(runs: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Table 1 from eval results: ``{"columns": [names], "rows": [{"key", "label", "cells": {name: cell}}]}``.

  Accuracy, the corruption rows and ECE come from each model's runs trained
  without label noise; the row of label-noise level ``p`` is the accuracy (on
  clean test data) of the runs trained with ``p``. A cell holds ``mean``, ``std``
  (sample, ``None`` for one run), ``n`` and the ``values``; ``None`` when no run fits.
  """
  if not runs:
    raise ValueError("no runs to tabulate")
  columns = list(dict.fromkeys(str(r["name"]) for r in runs))
  noise = lambda r: float(r.get("label_noise") or 0.0)
  clean = [r for r in runs if noise(r) == 0.0]
  levels = sorted({noise(r) for r in runs} - {0.0})
  corruptions = list(dict.fromkeys(c for r in clean for c in r.get("corruptions", {})))

  def row(key, label, pick, subset):
    cells = {}
    for name in columns:
      values = [pick(r) for r in subset if str(r["name"]) == name]
      cells[name] = _cell([v for v in values if v is not None])
    return {"key": key, "label": label, "cells": cells}

  rows = [row("accuracy", "Accuracy", lambda r: r["accuracy"], clean)]
  for p in levels:
    rows.append(row(f"label_noise_{p:g}", _noise_label(p), lambda r: r["accuracy"],
                    [r for r in runs if noise(r) == p]))
  for c in corruptions:
    rows.append(row(f"corruption_{c}", c.replace("_", " ").capitalize(),
                    lambda r, c=c: r.get("corruptions", {}).get(c, {}).get("mean"), clean))
  rows.append(row("ece", "ECE", lambda r: r.get("ece"), clean))
  return {"columns": columns, "rows": rows, "units": "fractions in [0, 1], as in eval_results.json"}


def _format_cell(cell: Optional[Mapping[str, Any]]) -> str:
  if cell is None:
    return "–"
  text = f"{100 * cell['mean']:.2f}"
  if cell["n"] > 1:
    text += f" ± {100 * cell['std']:.2f} (n={cell['n']})"
  return text


def table_markdown(table: Mapping[str, Any]) -> str:
  """Markdown of :func:`build_table`'s table: percentages, mean ± sample std (n) over runs."""
  columns = table["columns"]
  lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
  for row in table["rows"]:
    label = row["label"] + (" (%)" if row["key"] == "ece" else "")
    lines.append(f"| {label} | " + " | ".join(_format_cell(row["cells"][c]) for c in columns) + " |")
  lines.append("")
  lines.append("Accuracies in % on the clean or corrupted eval split (corruptions: mean over the 5 severities); "
               "label-noise rows: accuracy of models trained with that fraction of noisy labels; "
               "mean ± sample std over runs sharing a name.")
  return "\n".join(lines) + "\n"
