"""End-of-run report for T5 pretraining: decode held-out examples, print per-layer sparsity."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from topk_transformers import sparsity as sparsity_lib
from topk_transformers.data import tasks
from topk_transformers.t5.text import render


def heldout_examples(task_name: str, feature_lengths: Mapping[str, int], split: str, n: int):
  """The first ``n`` (unpacked) examples of a split: ``(inputs [n, L_in], targets list)``."""
  task = tasks.get_task(task_name)
  ds = task.get_dataset(sequence_length=dict(feature_lengths), split=split, shuffle=False, seed=0)
  inputs = np.zeros((n, feature_lengths["inputs"]), np.int32)
  targets = []
  for i, ex in enumerate(ds.take(n).as_numpy_iterator()):
    inputs[i, :len(ex["inputs"])] = ex["inputs"]
    targets.append(ex["targets"])
  return inputs[:len(targets)], targets


def end_of_training_report(*, model: Any, params: Any, dataset: Any, partitioner: Any,
                           sparsity: Mapping[str, float], num_examples: int = 2) -> None:
  """Greedy-decodes ``num_examples`` held-out examples and prints them with the per-layer sparsity."""
  del partitioner
  feature_lengths = dataset.task_feature_lengths
  inputs, targets = heldout_examples(dataset.mixture_or_task_name, feature_lengths, dataset.eval_split,
                                     num_examples)
  vocab = model.output_vocabulary
  if len(targets):
    decoded = np.asarray(model.predict_batch(params, {"encoder_input_tokens": inputs},
                                             max_decode_length=feature_lengths["targets"]))
    for i in range(len(targets)):
      print(f"\n--- held-out example {i} ({dataset.eval_split})")
      print(f"input:      {render(inputs[i], vocab)[:400]}")
      print(f"target:     {render(targets[i], vocab)}")
      print(f"prediction: {render(decoded[i], vocab)}")
  print("\nPercentage of nonzero MLP activations per layer (last evaluation):")
  print(sparsity_lib.format_table(sparsity))

