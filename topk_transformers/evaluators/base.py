"""The evaluator contract, big_vision style, and how a list of them is built and run.

An evaluator is built from ``(model, dataset, split)``, the :class:`~topk_transformers.eval_loop.EvalLoop`
it shares with the others of one evaluation, and its own settings; ``run(params)`` yields
``(name, value)`` pairs. Gin's ``EVALUATORS`` macro lists the evaluator classes
(``[@evaluators.MetricsEvaluator, @evaluators.SparsityEvaluator]``, without ``()``:
they are built here). The trainer runs the list at every evaluation
(``train.train.evaluators = %EVALUATORS``) and ``topk-eval`` runs the same list.

Names: the model's metrics by their own names (``loss``, ``accuracy``, ``ece``),
``sparsity/<layer>`` for the per-layer % nonzero; values that are not numbers
(per-layer token counts, firing frequencies, reliability bins, Table 1's dict)
are for reports, and the trainer logs only the numbers.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from topk_transformers import eval_loop
from topk_transformers.errors import ConfigError

SPARSITY_PREFIX = "sparsity/"


@dataclasses.dataclass(eq=False)
class Evaluator(abc.ABC):
  """Measures params on one split of a dataset; ``run(params)`` yields ``(name, value)`` pairs.

  Args:
    model: the ``models.BaseModel``.
    dataset: the run's dataset.
    split: the split to evaluate.
    loop: the pass over the split shared by the evaluators of one evaluation.
    results_dir: where an evaluator that writes files writes them (``None``: nowhere).
    step: the step of the params evaluated, for the records an evaluator writes.
  """

  during_training: ClassVar[bool] = True
  """Whether the trainer runs it at every evaluation; ``False`` for measurements of a finished run only."""
  key: ClassVar[Optional[str]] = None
  """The name of the one report section it yields (``topk-eval``'s JSON lists these); ``None``: metrics only."""

  model: Any
  dataset: Any
  split: str
  _: dataclasses.KW_ONLY
  loop: eval_loop.EvalLoop
  results_dir: Optional[str] = None
  step: Optional[int] = None

  @abc.abstractmethod
  def run(self, params: Any) -> Iterator[Tuple[str, Any]]:
    """The measurements of ``params``, as ``(name, value)`` pairs."""


Factory = Callable[..., Evaluator]


def build(factories: Sequence[Factory], model: Any, dataset: Any, split: str, *, loop: eval_loop.EvalLoop,
          results_dir: Optional[str] = None, step: Optional[int] = None) -> List[Evaluator]:
  """The evaluators of ``factories`` (classes, or gin's configured classes), all on the same ``loop``."""
  built = []
  for factory in factories:
    if isinstance(factory, Evaluator) or not callable(factory):
      raise ConfigError(f"EVALUATORS lists evaluator classes, e.g. @evaluators.MetricsEvaluator without (), "
                        f"got {factory!r}")
    built.append(factory(model, dataset, split, loop=loop, results_dir=results_dir, step=step))
  return built


def for_run(run: Any, factories: Sequence[Factory], split: Optional[str] = None, eval_steps: Optional[int] = None,
            results_dir: Optional[str] = None) -> List[Evaluator]:
  """The evaluators of a ``runs.Run`` on ``split`` (default: its eval split), sharing one pass."""
  split = split or run.dataset.eval_split
  return build(factories, run.model, run.dataset, split, loop=run.eval_loop(split, eval_steps),
               results_dir=results_dir, step=run.step)


def run_all(evaluators: Sequence[Evaluator], params: Any) -> Dict[str, Any]:
  """Runs each evaluator on ``params``; their pairs in order, as a dict (a name given twice is an error)."""
  results: Dict[str, Any] = {}
  for evaluator in evaluators:
    for name, value in evaluator.run(params):
      if name in results:
        raise ConfigError(f"two evaluators report {name!r}: list each evaluator once in EVALUATORS")
      results[name] = value
  return results


def is_number(value: Any) -> bool:
  """A scalar the trainer logs (not a report's dict, array or string)."""
  if isinstance(value, (bool, str, bytes, Mapping)) or value is None:
    return False
  return np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number)


def split_results(results: Mapping[str, Any]) -> Tuple[Dict[str, float], Dict[str, float]]:
  """``(metrics, percent nonzero per layer)``: the numbers among ``results``, sparsity apart."""
  metrics, sparsity = {}, {}
  for name, value in results.items():
    if not is_number(value):
      continue
    if name.startswith(SPARSITY_PREFIX):
      sparsity[name[len(SPARSITY_PREFIX):]] = float(value)
    else:
      metrics[name] = float(value)
  return metrics, sparsity
