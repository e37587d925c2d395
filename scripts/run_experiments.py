#!/usr/bin/env python
"""Runs the paper's sparsity experiments at CPU scale (see docs/reproduction.md).

  python scripts/run_experiments.py --experiment=emergence --out=/tmp/sparsity_experiments
  python scripts/run_experiments.py --experiment=scale,random_data,topk --out=/tmp/sparsity_experiments

Experiments: emergence (1), scale (2), random_data (3), topk (4). Each trains its runs
into OUT/runs/<name> (a finished run is reused) and writes OUT/<experiment>/<experiment>.json
and PNGs. --steps overrides every run's TRAIN_STEPS (e.g. a quick --steps=20 check).
See topk_transformers/experiments.py.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experiment", required=True,
                      help="comma-separated: emergence, scale, random_data, topk (or 'all')")
  parser.add_argument("--out", required=True, help="output root (runs/ and one directory per experiment)")
  parser.add_argument("--steps", type=int, default=None, help="override every run's TRAIN_STEPS")
  args = parser.parse_args(argv)
  import logging  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from topk_transformers import experiments, gin_utils  # pylint: disable=g-import-not-at-top

  names = [n.strip() for n in args.experiment.split(",") if n.strip()]
  if names == ["all"]:
    names = list(experiments.EXPERIMENTS)
  unknown = [n for n in names if n not in experiments.EXPERIMENTS]
  if unknown:
    print(f"error: unknown experiment {unknown[0]!r}; choose from {', '.join(experiments.EXPERIMENTS)}",
          file=sys.stderr)
    sys.exit(2)
  if args.steps is not None and args.steps <= 0:
    print(f"error: --steps must be positive, got {args.steps}", file=sys.stderr)
    sys.exit(2)
  gin_utils.exit_on_config_error(experiments.run)(names, os.path.abspath(args.out), args.steps)


if __name__ == "__main__":
  main(sys.argv[1:])
