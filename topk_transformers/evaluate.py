"""Evaluating a loaded run: the model's metrics and per-layer sparsity, then the run's evaluators.

``topk-eval`` (``commands/eval.py``) calls :func:`evaluate` on a ``runs.Run``.
Every run gets its model's metrics on a split (loss and accuracy; ECE for ViT)
and the percentage of nonzero MLP activations per layer. Beyond that, a run's
gin files list evaluators in the macro ``EVALUATORS``, big_vision style: each
is an object with ``run(run, results_dir) -> dict``. The ViT run files list
:class:`RobustnessEvaluator`, the measurements of the paper's Table 1: top-1
accuracy, ECE over 15 confidence bins with its reliability diagram, and
accuracy under each corruption averaged over severities 1-5, written to
``RESULTS_DIR/eval_results.json`` for ``topk-robustness-table``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import gin
import jax
import numpy as np

from topk_transformers import checkpoints, gin_utils, robustness, runs


def run_directory(checkpoint: str) -> Optional[str]:
  """The run directory of ``checkpoint`` (a run directory or ``.../checkpoints/<step>``); ``None`` for init."""
  if checkpoint == runs.INIT:
    return None
  ckpt_dir, _ = checkpoints.locate(checkpoint)
  return os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir


@gin.configurable
class RobustnessEvaluator:
  """Table 1 of the paper for a classification run: accuracy, ECE, corruptions (``robustness.evaluate``).

  Args:
    corruptions: corrupted copies to evaluate; datasets without any (e.g. ImageNet-21k) set ``[]``.
    severities: the severities averaged per corruption.
    name: the Table 1 column (default ``'dense'`` or ``'top{k}'``).
    corruption_seed: the seed of the corruptions this project makes itself (digits).
  """

  key = "robustness"

  def __init__(self, corruptions: Sequence[str] = robustness.DEFAULT_CORRUPTIONS,
               severities: Sequence[int] = (1, 2, 3, 4, 5), name: Optional[str] = None, corruption_seed: int = 0):
    self.corruptions = tuple(corruptions)
    self.severities = tuple(severities)
    self.name = name
    self.corruption_seed = corruption_seed

  def run(self, run: runs.Run, results_dir: Optional[str]) -> Dict[str, Any]:
    image_sharding = run.batch_shardings["image"]
    probs_fn = jax.jit(run.model.predict_batch)

    def predict(images):
      images = jax.device_put(np.asarray(images, np.float32), image_sharding)
      return np.asarray(jax.device_get(probs_fn(run.params, {"image": images})))

    facts = run.model.describe()
    results = robustness.evaluate(
        predict, run.dataset, run.batch_size, corruptions=self.corruptions, severities=self.severities,
        run_dir=results_dir, name=self.name, seed=gin_utils.get_macro("RANDOM_SEED", default=None),
        top_k=facts.top_k, corruption_seed=self.corruption_seed,
        extra={"step": run.step, "mlp_activation": facts.mlp_activation, "variant": facts.variant})
    results["summary"] = self.summary(results)
    if results_dir is not None:
      results["results_file"] = robustness.write_results(results_dir, results)
      results["summary"] += f"\nwrote {results['results_file']}"
    return results

  @staticmethod
  def summary(results: Dict[str, Any]) -> str:
    """One line: top-1, ECE and the mean accuracy under each corruption, in %."""
    parts = [f"top-1 {100 * results['accuracy']:.2f}%", f"ECE {100 * results['ece']:.2f}%"]
    parts += [f"{c} {100 * v['mean']:.2f}%" for c, v in results.get("corruptions", {}).items()]
    return f"{results['name']} (label noise {results['label_noise']:g}): " + " | ".join(parts)


def evaluate(run: runs.Run, split: Optional[str] = None, eval_steps: Optional[int] = None,
             results_dir: Optional[str] = None, evaluators: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
  """The run's metrics and sparsity on ``split`` (default: its eval split), then its evaluators.

  Args:
    run: from ``runs.load_run``.
    split, eval_steps: what to evaluate (``eval_steps=None``: the whole split).
    results_dir: where evaluators write their files (default: the checkpoint's run directory).
    evaluators: instead of gin's ``EVALUATORS``.

  Returns:
    ``{"step", "split", "metrics", "percent_nonzero", "tokens_counted", "evaluators"}`` and, under each
    evaluator's ``key`` (listed in ``"evaluators"``), its results with a printable ``"summary"``.
  """
  split = split or run.dataset.eval_split
  result = run.evaluate(split, eval_steps)
  out: Dict[str, Any] = {
      "step": run.step,
      "split": split,
      "metrics": result.metrics,
      "percent_nonzero": result.sparsity.percent_nonzero(),
      "tokens_counted": result.sparsity.token_counts(),
      "evaluators": [],
  }
  if evaluators is None:
    evaluators = gin_utils.get_macro("EVALUATORS", default=())
  if results_dir is None:
    results_dir = run_directory(run.checkpoint)
  for evaluator in evaluators:
    out[evaluator.key] = evaluator.run(run, results_dir)
    out["evaluators"].append(evaluator.key)
  return out
