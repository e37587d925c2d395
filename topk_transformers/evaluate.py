"""Evaluating a loaded run with its evaluators (``topk-eval``).

``topk-eval`` (``commands/eval.py``) calls :func:`evaluate` on a ``runs.Run``:
the evaluators that the run's gin files list in ``EVALUATORS`` (by default the
model's metrics, the per-layer sparsity and, where the model has it,
calibration), the same list the trainer runs at every evaluation. The ViT run
files add ``evaluators.CorruptionEvaluator``, the measurements of the paper's
Table 1, written to ``RESULTS_DIR/eval_results.json`` for ``topk-robustness-table``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

from topk_transformers import checkpoints, evaluators as evaluators_lib, runs


def run_directory(checkpoint: str) -> Optional[str]:
  """The run directory of ``checkpoint`` (a run directory or ``.../checkpoints/<step>``); ``None`` for init."""
  if checkpoint == runs.INIT:
    return None
  ckpt_dir, _ = checkpoints.locate(checkpoint)
  return os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir


def evaluate(run: runs.Run, split: Optional[str] = None, eval_steps: Optional[int] = None,
             results_dir: Optional[str] = None, evaluators: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
  """Runs the evaluators on the run's params over ``split`` (default: its eval split).

  Args:
    run: from ``runs.load_run``.
    split, eval_steps: what to evaluate (``eval_steps=None``: the whole split).
    results_dir: where evaluators write their files (default: the checkpoint's run directory).
    evaluators: evaluator classes instead of gin's ``EVALUATORS``.

  Returns:
    ``{"step", "split", "metrics", "percent_nonzero", "tokens_counted", "evaluators"}`` and, under the
    ``key`` of each evaluator that has one (listed in ``"evaluators"``), its results with a printable
    ``"summary"``.
  """
  split = split or run.dataset.eval_split
  factories = evaluators_lib.from_gin() if evaluators is None else evaluators
  if results_dir is None:
    results_dir = run_directory(run.checkpoint)
  built = evaluators_lib.for_run(run, factories, split, eval_steps, results_dir=results_dir)
  results = evaluators_lib.run_all(built, run.params)
  metrics, percent_nonzero = evaluators_lib.split_results(results)
  out: Dict[str, Any] = {
      "step": run.step,
      "split": split,
      "metrics": metrics,
      "percent_nonzero": percent_nonzero,
      "tokens_counted": results.get("tokens_counted", {}),
      "evaluators": [],
  }
  for evaluator in built:
    if evaluator.key is not None:
      out[evaluator.key] = results[evaluator.key]
      out["evaluators"].append(evaluator.key)
  return out
