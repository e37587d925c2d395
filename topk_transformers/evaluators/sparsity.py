"""Activation sparsity over a split: per-layer % nonzero and per-unit firing, from the sown statistics.

Every ``layers.MlpBlock`` sows ``nonzero_count``, ``token_count`` and
``neuron_fire_count`` (``[d_ff]``); the shared pass adds them up over the split
(padding excluded), and this evaluator turns the sums into per-layer figures.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import numpy as np

from topk_transformers import sparsity as sparsity_lib
from topk_transformers.evaluators import base


def summed_layer_stats(intermediates: Any) -> Dict[str, Dict[str, np.ndarray]]:
  """Per layer, the summed counts (float64) of a pass's ``intermediates``."""
  return {name: {k: np.asarray(v, np.float64) for k, v in s.items()}
          for name, s in sparsity_lib.layer_stats(intermediates).items()}


class SparsityEvaluator(base.Evaluator):
  """Yields ``sparsity/<layer>``: 100 * nonzero hidden activations / (counted tokens * d_ff), per layer;
  ``tokens_counted``: ``{layer: tokens}``; ``firing_frequency``: ``{layer: [d_ff]}``, the fraction of
  counted tokens on which each hidden unit was nonzero. A model without Top-k MLP statistics yields nothing."""

  def run(self, params: Any) -> Iterator[Tuple[str, Any]]:
    figures = sparsity_lib.summed_figures(summed_layer_stats(self.loop(params).intermediates))
    if not figures:
      return
    for name, f in figures.items():
      yield f"{base.SPARSITY_PREFIX}{name}", f["percent_nonzero"]
    yield "tokens_counted", {name: f["tokens"] for name, f in figures.items()}
    yield "firing_frequency", {name: f["firing_frequency"] for name, f in figures.items()}
