"""``topk-eval``: evaluates a checkpoint with the run's own gin files.

  topk-eval --gin_file=t5/runs/cpu_smoke.gin --checkpoint=/tmp/topk_t5_smoke [--split=validation] \
      [--eval_steps=50] [--json=out.json]

Runs the evaluators that the gin files list in ``EVALUATORS``, the list the
trainer runs at every evaluation (default: metrics, sparsity, calibration), and
prints the model's metrics (loss, token accuracy; ViT: top-1 and ECE), the
percentage of nonzero MLP activations per layer and each report's summary (ViT:
Table 1's robustness measurements, written to ``RUN_DIR/eval_results.json``).
"""

from __future__ import annotations

from topk_transformers.commands import common


@common.command
def main(argv) -> int:
  from topk_transformers import evaluate, runs, sparsity  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = common.gin_flags(argv)
  parser = common.ArgumentParser(prog="topk-eval", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="run directory (newest step) or .../checkpoints/<step>")
  parser.add_argument("--split", default=None, help="dataset split (default: the run's eval split)")
  parser.add_argument("--eval_steps", type=int, default=None, help="batches to evaluate (default: all)")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--results_dir", default=None,
                      help="where evaluators write their files (default: the run directory)")
  args = parser.parse_args(rest)
  run = runs.load_run(args.checkpoint, gin_files=gin_files, bindings=bindings, batch_size=args.batch_size)
  result = evaluate.evaluate(run, args.split, args.eval_steps, results_dir=args.results_dir)
  print(f"step {result['step']} on {result['split']!r}: "
        + " | ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))
  print(sparsity.format_table(result["percent_nonzero"]))
  for key in result["evaluators"]:
    print(result[key]["summary"])
  common.write_json(args.json, result)
  return 0
