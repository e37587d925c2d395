"""Evaluators as objects, big_vision style: each measures params on a split and yields ``(name, value)``.

* :class:`MetricsEvaluator`: the model's eval metrics (loss, accuracy);
* :class:`SparsityEvaluator`: per-layer % nonzero MLP activations and per-unit firing;
* :class:`CalibrationEvaluator`: ECE from the summed confidence bins, and the reliability data;
* :class:`CorruptionEvaluator`: Table 1 (accuracy under corruptions), written to ``eval_results.json``.

Gin's ``EVALUATORS`` lists them; the trainer (``train.train.evaluators``) and
``topk-eval`` run the same list, and :data:`DEFAULT` where a run lists none.
Those built for one evaluation share one pass of the model's eval over the split
(``eval_loop.EvalLoop``); the corruption evaluator reads the model's predictions
on its own clean and corrupted copies.
"""

from __future__ import annotations

from typing import Any, Sequence

from topk_transformers.errors import ConfigError
from topk_transformers.evaluators.base import (Evaluator, build, for_run, is_number, run_all, split_results,
                                               SPARSITY_PREFIX)
from topk_transformers.evaluators.calibration import CalibrationEvaluator
from topk_transformers.evaluators.corruption import CorruptionEvaluator
from topk_transformers.evaluators.metrics import MetricsEvaluator
from topk_transformers.evaluators.sparsity import SparsityEvaluator

DEFAULT = (MetricsEvaluator, SparsityEvaluator, CalibrationEvaluator)
"""Where a run lists no evaluators: the model's metrics, sparsity, and calibration when the model has it."""


def from_gin(default: Sequence[Any] = DEFAULT) -> tuple:
  """The evaluator classes that gin's ``EVALUATORS`` macro lists (``default`` when it is unbound)."""
  import gin  # pylint: disable=g-import-not-at-top  # evaluators built in code need no gin

  try:
    value = gin.query_parameter("%EVALUATORS")
  except ValueError:
    return tuple(default)
  factories = []
  for item in value if isinstance(value, (list, tuple)) else [value]:
    if isinstance(item, gin.config.ConfigurableReference):
      if item.evaluate:
        raise ConfigError(f"EVALUATORS lists evaluator classes: write {str(item)[:-2]} without ()")
      item = item.scoped_configurable_fn
    factories.append(item)
  return tuple(factories)
