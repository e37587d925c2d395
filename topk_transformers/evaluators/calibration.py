"""Calibration over a split: the ECE from the summed confidence bins, and the reliability data.

A mean of per-batch ECEs is not the split's ECE, so the model's eval gives each
batch's bins (``vit.model.calibration_bins``: 15 equal-width confidence bins,
Guo et al. 2017) and this evaluator finishes their sum over the split.
"""

from __future__ import annotations

from typing import Any, Iterator, Tuple

import numpy as np

from topk_transformers.evaluators import base

SUMS_KEY = "calibration"


class CalibrationEvaluator(base.Evaluator):
  """Yields ``ece`` (in [0, 1]) and ``reliability`` (per-bin ``accuracy``, ``confidence``, ``count``,
  ``bin_edges``, as lists) from the ``"calibration"`` sums of the model's eval. A model whose eval gives
  no calibration bins (T5) yields nothing, so the same list serves every model."""

  def run(self, params: Any) -> Iterator[Tuple[str, Any]]:
    bins = self.loop(params).sums.get(SUMS_KEY)
    if bins is None:
      return
    from topk_transformers.vit import model as vit_model  # pylint: disable=g-import-not-at-top  # the bins' owner

    yield "ece", float(vit_model.ece_from_bins(bins))
    yield "reliability", {k: np.asarray(v, np.float64).tolist()
                          for k, v in vit_model.reliability_from_bins(bins).items()}
