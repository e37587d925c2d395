"""The model's own eval metrics over a split (loss, accuracy): the weighted means of its ``eval_fn``."""

from __future__ import annotations

from typing import Any, Iterator, Tuple

from topk_transformers.evaluators import base


class MetricsEvaluator(base.Evaluator):
  """Yields each of the model's scalar eval metrics, averaged over the split with each batch weighted
  by its ``"weight"`` (target tokens or examples), so padding does not count."""

  def run(self, params: Any) -> Iterator[Tuple[str, float]]:
    yield from self.loop(params).means.items()
