"""The one loop over a split: the jitted eval step over its batches, summed on the host.

Every evaluation runs through :class:`EvalLoop`: the trainer's periodic
evaluation, ``topk-eval``, the sparsity report, the Top-k sweep and the
experiments, so their figures agree. The evaluators (``evaluators/``) built on
one loop share its pass: the first to ask for a set of params runs it, the
others read the same result.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np

from topk_transformers import distributed
from topk_transformers import sparsity as sparsity_lib


def make_eval_step(model, params_shardings, batch_shardings) -> Callable:
  """The jitted, sharded ``model.eval_fn``: ``(params, batch) -> eval output``."""
  return jax.jit(model.eval_fn, in_shardings=(params_shardings, batch_shardings))


@dataclasses.dataclass
class SplitResult:
  """What one pass of the model's eval over a split measured."""

  means: Dict[str, float]
  """The model's scalar metrics, each batch weighted by its ``"weight"`` (so padding does not count)."""
  sums: Dict[str, Any]
  """The eval output's ``"sums"`` (e.g. calibration bins), added up over the batches."""
  intermediates: Any
  """The sown ``intermediates`` (the MLPs' counts), added up over the batches in float64 on the host."""
  weight: float
  """The summed weights (target tokens or examples)."""
  batches: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  """Per batch, in order: ``{"weight", "metrics": {name: mean}, "counts": {layer: (nonzero, tokens)}}``, so that
  a spread over the eval batches can be measured (``intervals.py``); the MLP counts are scalars (no ``[d_ff]``)."""


def _add(total: Any, value: Any) -> Any:
  value = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), value)
  return value if total is None else jax.tree_util.tree_map(np.add, total, value)


@dataclasses.dataclass
class EvalLoop:
  """The model's eval pass over (the first ``eval_steps`` batches of) one split, for any params.

  The result of the last params evaluated is kept (keyed by the params object
  itself), so that several evaluators reading the same forward pass run it once.
  """

  model: Any
  """The ``models.BaseModel``."""
  dataset: Any
  """``get_dataset(split, batch_size, shard_id, num_shards, seed, shuffle, repeat)``."""
  split: str
  batch_size: int
  """The global batch size."""
  partitioner: Any
  """The mesh: it gives this host's shard of the data and places the batches."""
  eval_step: Callable
  """``make_eval_step``'s jitted step (shared, so that it compiles once)."""
  batch_shardings: Dict[str, Any]
  eval_steps: Optional[int] = None
  """Batches to evaluate; ``None``: the whole split."""
  seed: int = 0
  _last: Optional[tuple] = dataclasses.field(default=None, repr=False)

  @property
  def host_batch(self) -> int:
    return self.batch_size // self.partitioner.host_shard_info()[1]

  def __call__(self, params: Any) -> SplitResult:
    """The pass over the split with ``params`` (run once per params object)."""
    if self._last is not None and self._last[0] is params:
      return self._last[1]
    result = self._run(params)
    self._last = (params, result)
    return result

  def _run(self, params: Any) -> SplitResult:
    shard_id, num_shards = self.partitioner.host_shard_info()
    ds = self.dataset.get_dataset(self.split, self.host_batch, shard_id, num_shards, seed=self.seed, shuffle=False,
                                  repeat=False)
    weighted: Dict[str, float] = {}
    sums: Dict[str, Any] = {}
    intermediates = None
    total = 0.0
    batches: List[Dict[str, Any]] = []
    stream = ds.as_numpy_iterator()
    for i in itertools.count():
      if self.eval_steps is not None and i >= self.eval_steps:
        break
      batch = next(stream, None)
      # Every process runs the same number of batches (each is a collective): the pass ends at the first batch
      # that some process does not have, where the hosts' shards of the split differ in length.
      short = distributed.processes_where(batch is None) if jax.process_count() > 1 else [0] * (batch is None)
      if short:
        if len(short) < jax.process_count():
          logging.warning("eval of %s ends after %d batches, where process(es) %s ran out of data", self.split, i,
                          ", ".join(map(str, short)))
        break
      out = self.eval_step(params, self.partitioner.shard_batch(batch))
      metrics, weight, batch_sums, stats = jax.device_get(
          (out["metrics"], out["weight"], out.get("sums", {}), out.get("intermediates", {})))
      weight = float(weight)
      for name, value in metrics.items():
        weighted[name] = weighted.get(name, 0.0) + float(value) * weight
      for name, value in batch_sums.items():  # each sum is a tree of arrays (e.g. calibration bins)
        value = jax.tree_util.tree_map(np.asarray, value)
        sums[name] = jax.tree_util.tree_map(np.add, sums[name], value) if name in sums else value
      intermediates = _add(intermediates, stats)
      total += weight
      batches.append({"weight": weight, "metrics": {name: float(value) for name, value in metrics.items()},
                      "counts": _layer_counts(stats)})
    means = {name: value / max(total, 1e-9) for name, value in weighted.items()}
    return SplitResult(means=means, sums=sums, intermediates=intermediates or {}, weight=total, batches=batches)


def _layer_counts(stats: Any) -> Dict[str, tuple]:
  """``{layer: (nonzero activations, counted tokens)}`` of one batch's sown MLP statistics."""
  return {name: (float(np.sum(s["nonzero_count"])), float(np.sum(s["token_count"])))
          for name, s in sparsity_lib.layer_stats(stats).items()} if stats else {}
