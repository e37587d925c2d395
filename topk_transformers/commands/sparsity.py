"""``topk-sparsity``: the activation sparsity of a checkpoint: per-layer % nonzero, per-neuron firing, % over training.

  topk-sparsity --gin_file=t5/runs/cpu_smoke.gin --checkpoint=/tmp/topk_t5_smoke \
      [--split=train,validation] [--eval_steps=20] [--run_dir=DIR] [--over_steps=events|checkpoints] --out=/tmp/report

``--checkpoint=init`` measures the parameters training starts from. Writes
report.json, per_layer.png, firing_*.png and (given a run directory)
over_steps.png, and prints a table (``sparsity_report.report``).
"""

from __future__ import annotations

import argparse

from topk_transformers.commands import common


@common.command
def main(argv) -> int:
  from topk_transformers import runs, sparsity_report  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = common.gin_flags(argv)
  parser = common.ArgumentParser(prog="topk-sparsity", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True,
                      help="run directory (newest step), .../checkpoints/<step>, or 'init' (step-0 params)")
  parser.add_argument("--split", default=None, help="comma-separated splits (default: the run's train and eval splits)")
  parser.add_argument("--eval_steps", type=int, default=20, help="batches per split (0: the whole split)")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--with_init", action=argparse.BooleanOptionalAction, default=True,
                      help="also measure the step-0 params on the same splits (init vs trained)")
  parser.add_argument("--run_dir", default=None,
                      help="run directory for %% nonzero over training (default: --checkpoint if it holds events)")
  parser.add_argument("--over_steps", choices=sparsity_report.SOURCES, default="events",
                      help="read the curves from the logged events, or re-measure every checkpoint")
  parser.add_argument("--title", default="")
  parser.add_argument("--out", required=True, help="output directory for report.json and the PNGs")
  args = parser.parse_args(rest)
  if args.eval_steps < 0:
    raise common.ConfigError(f"--eval_steps must be >= 0, got {args.eval_steps}")
  splits = [s.strip() for s in args.split.split(",") if s.strip()] if args.split else None
  run = runs.load_run(args.checkpoint, gin_files=gin_files, bindings=bindings, batch_size=args.batch_size)
  written = sparsity_report.report(run, args.out, splits, args.eval_steps or None, args.with_init, args.run_dir,
                                   args.over_steps, args.title)
  print(written["text"])
  print(f"wrote report.json and {', '.join(sorted(written['figures'].values()))} in {args.out}")
  return 0
