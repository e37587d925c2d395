"""``topk-topk-sweep``: a dense checkpoint evaluated with Top-k at several k, without retraining.

  topk-topk-sweep --gin_file=t5/t5_1_0/base.gin --gin_file=t5/runs/finetune.gin ... \
      --checkpoint=/tmp/t5_base --k=64,128,256,512 [--split=validation] [--eval_steps=20] --out=/tmp/sweep

Prints a table (loss, token accuracy, % nonzero, each against the dense model) and
writes ``sweep.json`` and ``sweep.png`` in ``--out`` (``topk_sweep.py``).
"""

from __future__ import annotations

from topk_transformers.commands import common


@common.command
def main(argv) -> int:
  from topk_transformers import runs, topk_sweep  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = common.gin_flags(argv)
  parser = common.ArgumentParser(prog="topk-topk-sweep", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="run or project checkpoint directory, or 'init'")
  parser.add_argument("--k", required=True, help="comma-separated k, e.g. 64,128,256")
  parser.add_argument("--split", default=None, help="dataset split (default: the run's eval split)")
  parser.add_argument("--eval_steps", type=int, default=20, help="batches per k (0: the whole split)")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--title", default="")
  parser.add_argument("--out", required=True, help="directory for sweep.json and sweep.png")
  args = parser.parse_args(rest)
  if args.eval_steps < 0:
    raise common.ConfigError(f"--eval_steps must be >= 0, got {args.eval_steps}")
  ks = common.comma_list(args.k, int)
  run = runs.load_run(args.checkpoint, gin_files=gin_files, bindings=bindings, batch_size=args.batch_size)
  result = topk_sweep.sweep(run, ks, args.split, args.eval_steps or None)
  written = topk_sweep.write(result, args.out, args.title)
  print(result["text"])
  print(f"wrote {written['json']} and {written['plot']}")
  return 0
