"""Evaluates a training checkpoint on a split of the run's dataset (``scripts/eval.py``).

Uses the same gin files as training (model and run)::

  python scripts/eval.py --gin_file=configs/t5/runs/cpu_smoke.gin --checkpoint=/tmp/topk_t5_smoke \
      [--split=validation] [--eval_steps=50] [--json=out.json]

Prints loss, token accuracy and the percentage of nonzero MLP activations per
layer; ``--json`` writes the same. ViT runs (``vit.model.ClassificationModel``)
add the paper's Table 1 measurements (:func:`evaluate_vit`, ``robustness.py``):
top-1 accuracy, ECE over 15 confidence bins with its reliability diagram
(``RUN_DIR/reliability_diagram.png``), and accuracy under each corruption
averaged over severities 1-5 (gaussian, shot and impulse noise, plus any named
by ``evaluate.evaluate_vit.corruptions`` in gin), written to
``RUN_DIR/eval_results.json`` for ``scripts/robustness_table.py``::

  python scripts/eval.py --gin_file=configs/vit/runs/cpu_smoke.gin --checkpoint=/tmp/topk_vit_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import gin
import jax
import flax.linen as nn
import numpy as np

from topk_transformers import checkpoints, gin_utils, partitioning, robustness, sparsity
from topk_transformers import train as train_lib


def build_from_gin(binding: str) -> Any:
  """Builds the object bound to a gin parameter such as ``train.train.dataset``."""
  try:
    value = gin.query_parameter(binding)
  except ValueError:
    raise gin_utils.ConfigError(f"{binding} is not bound: give the run's gin file") from None
  try:
    return gin_utils._evaluate(value)  # pylint: disable=protected-access
  except Exception as e:
    raise gin_utils.ConfigError(f"building {binding}: {gin_utils.one_line(e)}") from None


class LoadedRun:
  """MODEL, dataset, partitioner and restored params of a run, from gin + a checkpoint."""

  def __init__(self, checkpoint: str, batch_size: Optional[int] = None):
    self.model = gin_utils.get_macro("MODEL")
    self.dataset = build_from_gin("train.train.dataset")
    self.partitioner = partitioning.Partitioner()
    self.batch_size = batch_size or gin_utils.get_macro("BATCH_SIZE", default=8)
    dp = self.partitioner.data_parallel_size
    self.batch_size = max(dp, (self.batch_size // dp) * dp)
    self.host_batch = self.batch_size // jax.process_count()
    ds = self.dataset.get_dataset(self.dataset.eval_split, self.host_batch, shuffle=False, repeat=False)
    self.input_shapes = {k: (self.batch_size,) + tuple(v.shape[1:]) for k, v in ds.element_spec.items()}
    abstract = jax.eval_shape(lambda r: self.model.get_initial_variables(r, self.input_shapes), jax.random.PRNGKey(0))
    self.params_shardings = self.partitioner.logical_shardings(abstract["params"])
    self.params, self.step = checkpoints.restore_params(checkpoint, nn.meta.unbox(abstract["params"]),
                                                        self.params_shardings)
    self.batch_shardings = {k: self.partitioner.data_sharding(len(s)) for k, s in self.input_shapes.items()}

  def eval_step(self):
    return train_lib.make_eval_step(self.model, self.partitioner, self.params_shardings, self.batch_shardings)


def evaluate(run: LoadedRun, split: str, eval_steps: Optional[int]) -> Dict[str, Any]:
  metrics, acc = train_lib.evaluate_split(run.eval_step(), run.params, run.dataset, split, run.host_batch,
                                          run.partitioner, eval_steps)
  return {
      "step": run.step,
      "split": split,
      "metrics": metrics,
      "percent_nonzero": acc.percent_nonzero() if acc else {},
      "tokens_counted": acc.token_counts() if acc else {},
  }


def is_classification_run(run: LoadedRun) -> bool:
  from topk_transformers.vit import model as vit_model  # pylint: disable=g-import-not-at-top

  return isinstance(run.model, vit_model.ClassificationModel)


def run_directory(checkpoint: str) -> str:
  """The run directory of ``checkpoint`` (a run directory or ``.../checkpoints/<step>``)."""
  ckpt_dir, _ = checkpoints.locate(checkpoint)
  return os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir


@gin.configurable(denylist=["run", "results_dir"])
def evaluate_vit(run: LoadedRun, results_dir: Optional[str],
                 corruptions: Sequence[str] = robustness.DEFAULT_CORRUPTIONS,
                 severities: Sequence[int] = (1, 2, 3, 4, 5), name: Optional[str] = None,
                 corruption_seed: int = 0) -> Dict[str, Any]:
  """Table 1's measurements of a restored ViT run (``robustness.evaluate``); writes ``eval_results.json``.

  Args:
    run: the restored run (its MODEL must be a ``vit.model.ClassificationModel``).
    results_dir: where ``eval_results.json`` and ``reliability_diagram.png`` go (``None``: nowhere).
    corruptions: corrupted copies to evaluate (gin: ``evaluate.evaluate_vit.corruptions``);
      datasets without any (e.g. ImageNet-21k) must set ``[]``.
    severities: severities averaged per corruption.
    name: the Table 1 column (default ``'dense'`` or ``'top{k}'``).
    corruption_seed: seed of the corruptions this project makes itself (digits).
  """
  module = run.model.module
  image_sharding = run.batch_shardings["image"]

  @jax.jit
  def probs_fn(params, images):
    return jax.nn.softmax(module.apply({"params": params}, images, train=False))

  def predict(images):
    images = jax.device_put(np.asarray(images, np.float32), image_sharding)
    return np.asarray(jax.device_get(probs_fn(run.params, images)))

  top_k = getattr(module, "top_k", None)
  seed = gin_utils.get_macro("RANDOM_SEED", default=None)
  results = robustness.evaluate(
      predict, run.dataset, run.batch_size, corruptions=tuple(corruptions), severities=tuple(severities),
      run_dir=results_dir, name=name, seed=seed, top_k=top_k, corruption_seed=corruption_seed,
      extra={"step": run.step, "mlp_activation": getattr(module, "mlp_activation", None),
             "variant": getattr(module, "variant", None)})
  if results_dir is not None:
    results["results_file"] = robustness.write_results(results_dir, results)
  return results


def format_robustness(results: Dict[str, Any]) -> str:
  """One line: top-1, ECE and the mean accuracy under each corruption, in %."""
  parts = [f"top-1 {100 * results['accuracy']:.2f}%", f"ECE {100 * results['ece']:.2f}%"]
  parts += [f"{c} {100 * v['mean']:.2f}%" for c, v in results.get("corruptions", {}).items()]
  return f"{results['name']} (label noise {results['label_noise']:g}): " + " | ".join(parts)


@gin_utils.exit_on_config_error
def main(argv: Sequence[str]) -> Dict[str, Any]:
  rest = gin_utils.configure_from_argv(argv)
  parser = argparse.ArgumentParser(prog="eval.py", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="run directory (latest step) or .../checkpoints/<step>")
  parser.add_argument("--split", default=None, help="dataset split (default: the run's eval split)")
  parser.add_argument("--eval_steps", type=int, default=None, help="batches to evaluate (default: all)")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--results_dir", default=None,
                      help="ViT: where eval_results.json and the reliability diagram go (default: the run directory)")
  args = parser.parse_args(rest)
  try:
    run = LoadedRun(args.checkpoint, args.batch_size)
  except checkpoints.CheckpointError as e:
    raise gin_utils.ConfigError(str(e)) from None
  split = args.split or run.dataset.eval_split
  result = evaluate(run, split, args.eval_steps)
  print(f"step {result['step']} on {split!r}: " + " | ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
  print(sparsity.format_table(result["percent_nonzero"]))
  if is_classification_run(run):
    results_dir = args.results_dir or run_directory(args.checkpoint)
    result["robustness"] = gin.get_configurable(evaluate_vit)(run, results_dir)
    print(format_robustness(result["robustness"]))
    print(f"wrote {result['robustness']['results_file']} and "
          f"{os.path.join(results_dir, result['robustness']['reliability_diagram'])}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
