"""Table 1 of the paper for a classification run: accuracy, ECE, and accuracy under corruptions.

The measurements are ``robustness.evaluate``'s: top-1 accuracy and ECE over 15
confidence bins with the reliability diagram on the clean split, and accuracy
under each corruption averaged over severities 1-5, written to
``RESULTS_DIR/eval_results.json`` for ``topk-robustness-table``. They read the
model's predictions (``predict_batch``) on the clean and the corrupted copies.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np

from topk_transformers import robustness
from topk_transformers.evaluators import base


class CorruptionEvaluator(base.Evaluator):
  """Yields ``robustness``: Table 1's dict for these params (``robustness.evaluate``), with a printable
  ``"summary"``; with a ``results_dir`` it writes ``eval_results.json`` and the reliability diagram there.

  It measures a finished run (``topk-eval``), not every evaluation of the trainer: its
  ``eval_results.json`` marks a run as done for the robustness experiment.

  Args (gin settings):
    corruptions: corrupted copies to evaluate; datasets without any (e.g. ImageNet-21k) set ``[]``.
    severities: the severities averaged per corruption.
    name: the Table 1 column (default ``'dense'`` or ``'top{k}'``).
    seed: the run's seed, recorded in the results (gin: ``%RANDOM_SEED``).
    corruption_seed: the seed of the corruptions this project makes itself (digits).
  """

  during_training = False
  key = "robustness"

  def __init__(self, model: Any, dataset: Any, split: str, *,
               corruptions: Sequence[str] = robustness.DEFAULT_CORRUPTIONS, severities: Sequence[int] = (1, 2, 3, 4, 5),
               name: Optional[str] = None, seed: Optional[int] = None, corruption_seed: int = 0, **kwargs):
    super().__init__(model, dataset, split, **kwargs)
    self.corruptions = tuple(corruptions)
    self.severities = tuple(severities)
    self.name = name
    self.seed = seed
    self.corruption_seed = corruption_seed

  def run(self, params: Any) -> Iterator[Tuple[str, Dict[str, Any]]]:
    image_sharding = self.loop.batch_shardings["image"]
    probs_fn = jax.jit(self.model.predict_batch)

    def predict(images):
      images = jax.device_put(np.asarray(images, np.float32), image_sharding)
      return np.asarray(jax.device_get(probs_fn(params, {"image": images})))

    facts = self.model.describe()
    results = robustness.evaluate(
        predict, self.dataset, self.loop.batch_size, corruptions=self.corruptions, severities=self.severities,
        run_dir=self.results_dir, name=self.name, seed=self.seed, top_k=facts.top_k,
        corruption_seed=self.corruption_seed, split=self.split,
        extra={"step": self.step, "mlp_activation": facts.mlp_activation, "variant": facts.variant})
    results["summary"] = summary(results)
    if self.results_dir is not None:
      results["results_file"] = robustness.write_results(self.results_dir, results)
      results["summary"] += f"\nwrote {results['results_file']}"
    yield self.key, results


def summary(results: Dict[str, Any]) -> str:
  """One line: top-1, ECE and the mean accuracy under each corruption, in %."""
  parts = [f"top-1 {100 * results['accuracy']:.2f}%", f"ECE {100 * results['ece']:.2f}%"]
  parts += [f"{c} {100 * v['mean']:.2f}%" for c, v in results.get("corruptions", {}).items()]
  return f"{results['name']} (label noise {results['label_noise']:g}): " + " | ".join(parts)
