"""Evaluating params on a split: the jitted eval step and the loop over batches.

The trainer's periodic evaluation, ``topk-eval``, the sparsity report and the
experiments all run these two functions, so their figures agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from topk_transformers import sparsity


def make_eval_step(model, params_shardings, batch_shardings) -> Callable:
  """The jitted, sharded ``model.eval_fn``: ``(params, batch) -> eval output``."""
  return jax.jit(model.eval_fn, in_shardings=(params_shardings, batch_shardings))


@dataclasses.dataclass
class SplitResult:
  """What an evaluation of one split measured."""

  metrics: Dict[str, float]
  """The model's metrics for the whole split (``model.finalize_eval`` of the weighted means and the sums)."""
  sparsity: sparsity.SparsityAccumulator
  """The MLPs' nonzero and firing counts, summed over the split (padding excluded)."""
  weight: float
  """The summed weights (target tokens or examples)."""


def evaluate_split(eval_step: Callable, params: Any, model: Any, dataset: Any, split: str, host_batch: int,
                   partitioner: Any, eval_steps: Optional[int] = None, seed: int = 0,
                   on_batch: Optional[Callable[[dict, dict], None]] = None) -> SplitResult:
  """Runs ``eval_step`` over (the first ``eval_steps`` batches of) ``split``.

  Scalar metrics are averaged with each batch weighted by its ``"weight"`` (so
  padding does not count); ``"sums"`` are added up; the model then finishes
  the metrics from both. ``on_batch(batch, metrics)`` sees every host batch.
  """
  shard_id, num_shards = partitioner.host_shard_info()
  ds = dataset.get_dataset(split, host_batch, shard_id, num_shards, seed=seed, shuffle=False, repeat=False)
  acc = sparsity.SparsityAccumulator()
  weighted: Dict[str, float] = {}
  sums: Dict[str, Any] = {}
  total = 0.0
  for i, batch in enumerate(ds.as_numpy_iterator()):
    if eval_steps is not None and i >= eval_steps:
      break
    out = eval_step(params, partitioner.shard_batch(batch))
    metrics, weight, batch_sums = jax.device_get((out["metrics"], out["weight"], out.get("sums", {})))
    if on_batch is not None:
      on_batch(batch, metrics)
    weight = float(weight)
    for name, value in metrics.items():
      weighted[name] = weighted.get(name, 0.0) + float(value) * weight
    for name, value in batch_sums.items():  # each sum is a tree of arrays (e.g. calibration bins)
      value = jax.tree_util.tree_map(np.asarray, value)
      sums[name] = jax.tree_util.tree_map(np.add, sums[name], value) if name in sums else value
    total += weight
    acc.add(out["intermediates"])
  means = {name: value / max(total, 1e-9) for name, value in weighted.items()}
  return SplitResult(metrics=model.finalize_eval(means, sums), sparsity=acc, weight=total)
