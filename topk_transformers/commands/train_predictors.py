"""``topk-train-predictors``: fits decoding predictors from a checkpoint's own activations, and reports their quality.

  topk-train-predictors --gin_file=t5/runs/cpu_smoke.gin --checkpoint=RUN [--out=RUN/predictors] --rank=8,16,32 \
      [--batches=50] [--report=quality.json --candidates=128,256 --eval_batches=10 --decode_batches=2 --plot=q.png]

Writes ``r<r>.npz`` per rank into ``--out`` (default: beside the checkpoint, ``RUN/predictors``); decode with them
through ``topk-decode --predictors=RUN/predictors/r<r>.npz --candidates=C``. With ``--report``, also measures recall,
held-out loss and accuracy and greedy agreement against exact Top-k decoding for every (rank, candidates)
(``predictor_training.py``).
"""

from __future__ import annotations

import os

from topk_transformers.commands import common


@common.command
def main(argv) -> int:
  from topk_transformers import checkpoints, predictor_training, predictors, runs  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = common.gin_flags(argv)
  p = common.ArgumentParser(prog="topk-train-predictors", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="run directory (newest step) or RUN_DIR/checkpoints/<step>")
  p.add_argument("--out", default=None, help="directory for r<rank>.npz (default: RUN_DIR/predictors)")
  p.add_argument("--rank", default="32", help="comma list of predictor ranks")
  p.add_argument("--split", default=None, help="split to fit on (default: the run's train split)")
  p.add_argument("--batches", type=int, default=50, help="batches of MLP inputs to fit on")
  p.add_argument("--ridge", type=float, default=1e-6, help="ridge added to the input covariance, relative")
  p.add_argument("--report", default=None, help="also write a quality report (JSON) here")
  p.add_argument("--candidates", default="", help="comma list of candidate counts c for the report")
  p.add_argument("--eval_batches", type=int, default=10, help="held-out batches for recall, loss and accuracy")
  p.add_argument("--decode_batches", type=int, default=2, help="held-out batches decoded greedily")
  p.add_argument("--plot", default=None, help="PNG of quality against the Large-shape speedup bound")
  p.add_argument("--speedups", default=None,
                 help="a topk-bench-decode --predicted JSON: its measured speedups go into the report and the plot")
  p.add_argument("--batch_size", type=int, default=None)
  args = p.parse_args(rest)
  ranks = common.comma_list(args.rank, int)
  if not ranks or min(ranks) <= 0:
    raise common.ConfigError(f"--rank must list positive integers, got {args.rank!r}")
  for name in ("batches", "eval_batches"):
    if getattr(args, name) <= 0:
      raise common.ConfigError(f"--{name} must be positive, got {getattr(args, name)}")
  bench = _read_json(args.speedups) if args.speedups else None  # read first: a bad file fails before the fit
  run = runs.load_run(args.checkpoint, gin_files=gin_files, bindings=bindings, batch_size=args.batch_size)
  out = args.out or os.path.join(os.path.dirname(checkpoints.locate(args.checkpoint)[0]), "predictors")
  paths = predictor_training.train(run, ranks, out, split=args.split, num_batches=args.batches, ridge=args.ridge)
  for r, path in sorted(paths.items()):
    print(f"rank {r}: wrote {path}")
  if args.report:
    candidates = common.comma_list(args.candidates, int) or [2 * run.model.describe().top_k]
    sets = {r: predictors.restore(path, run.params)[0] for r, path in paths.items()}
    result = predictor_training.quality(run, sets, candidates, num_batches=args.eval_batches,
                                        decode_batches=args.decode_batches)
    result["command"] = " ".join(["topk-train-predictors", *argv])
    if bench is not None:
      matched = predictor_training.attach_measured_speedups(result["rows"], bench, run.model.describe().top_k)
      print(f"{matched} setting(s) matched a measured speedup in {args.speedups}")
    print(predictor_training.format_table(result))
    common.write_json(args.report, result)
    print(f"wrote {args.report}")
    if args.plot:
      from topk_transformers import plotting  # pylint: disable=g-import-not-at-top

      plotting.plot_predictor_quality(result["rows"], args.plot)
      print(f"wrote {args.plot}")
  return 0


def _read_json(path):
  """A ``topk-bench-decode`` result, or a one-line ``ConfigError``."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
  except (OSError, ValueError) as e:
    raise common.ConfigError(f"--speedups {path!r}: {e}") from None
  if not isinstance(result, dict) or not isinstance(result.get("results"), list):
    raise common.ConfigError(f"--speedups {path!r} is not a topk-bench-decode JSON (no 'results' list)")
  return result
