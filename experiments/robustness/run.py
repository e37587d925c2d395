#!/usr/bin/env python
"""The paper's Table 1 on digits: dense ReLU ViT vs Top-k ViT, label noise, corruptions, ECE, over seeds.

One command trains and evaluates every run in sequence, then writes the table (README.md)::

    python experiments/robustness/run.py --out=/tmp/topk_vit_robustness \
        [--seeds 0 1 2] [--label_noise 0 0.4 0.8] [--gin.TRAIN_STEPS=800]

Each run is the packaged ``vit/runs/cpu_smoke.gin`` (the Top-k ViT), or that file
plus ``vit/relu.gin`` (the dense ReLU ViT), trained by ``train.train`` and evaluated
by ``evaluate.evaluate`` (the run's ``EVALUATORS``: ``RobustnessEvaluator``), in this
process. Run ``{model}_noise{p}_seed{s}`` uses ``RANDOM_SEED = LABEL_NOISE_SEED = s``:
at a given seed the dense and the Top-k model start from the same initialiser seed
and see the same noisy labels. Corruptions and ECE are measured on the clean-label
runs only (as the table uses them). A run whose ``eval_results.json`` exists is
skipped, so an interrupted experiment resumes; ``--overwrite`` redoes everything.

Writes ``OUT/table.md`` and ``OUT/table.json`` (``robustness.build_table``, plus the
machine with its load average at the start, per-run wall times and the command) and prints the table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Sequence

from topk_transformers import startup

startup.quiet_start()  # before the imports below bring in TensorFlow, so that it prints no banners

# pylint: disable=g-import-not-at-top,wrong-import-position
import gin  # noqa: E402
import jax  # noqa: E402

from topk_transformers import evaluate, gin_utils, robustness, runs, train  # noqa: E402
from topk_transformers.benchmarks import machine  # noqa: E402
from topk_transformers.commands import common  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

MODELS = {
    # name -> packaged gin files; names are the table's columns.
    "dense": ["vit/runs/cpu_smoke.gin", "vit/relu.gin"],
    "topk": ["vit/runs/cpu_smoke.gin"],
}


def run_name(model: str, noise: float, seed: int) -> str:
  return f"{model}_noise{noise:g}_seed{seed}"


def run_bindings(model: str, noise: float, seed: int, run_dir: str) -> list:
  """The bindings that make one run of the table out of the model's gin files."""
  bindings = [f"MODEL_DIR = '{run_dir}'", f"RANDOM_SEED = {seed}", f"LABEL_NOISE = {noise!r}",
              f"LABEL_NOISE_SEED = {seed}", f"evaluate.RobustnessEvaluator.name = '{model}'"]
  if noise > 0:  # The table reads corruptions off the clean-label runs only.
    bindings.append("evaluate.RobustnessEvaluator.corruptions = []")
  return bindings


def train_and_evaluate(model: str, noise: float, seed: int, run_dir: str, extra_bindings: Sequence[str]) -> dict:
  """Trains one run into ``run_dir`` and writes its ``eval_results.json``; returns wall times."""
  start = time.time()
  gin_utils.configure(MODELS[model], run_bindings(model, noise, seed, run_dir) + list(extra_bindings))
  os.makedirs(run_dir, exist_ok=True)
  gin.get_configurable(train.train)()
  with open(os.path.join(run_dir, "config.gin"), "w") as f:
    f.write(gin.operative_config_str())
  trained = time.time()
  result = evaluate.evaluate(runs.load_run(run_dir), results_dir=run_dir)
  for key in result["evaluators"]:
    print(result[key]["summary"], flush=True)
  done = time.time()
  return {"train_seconds": trained - start, "eval_seconds": done - trained}


def parse_args(argv: Sequence[str]):
  """``(arguments, extra gin bindings)``; a bad value is a ``ConfigError``."""
  gin_files, bindings, rest = gin_utils.parse_gin_flags(argv)
  if gin_files:
    raise gin_utils.ConfigError("the models' gin files are fixed (vit/runs/cpu_smoke.gin [+ vit/relu.gin]); "
                                "use --gin.NAME=VALUE")
  parser = common.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="/tmp/topk_vit_robustness", help="one directory per run, and the table")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--label_noise", type=float, nargs="+", default=[0.0, 0.4, 0.8])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--overwrite", action="store_true", help="retrain runs that already have results")
  args = parser.parse_args(rest)
  for p in args.label_noise:
    if not 0.0 <= p <= 1.0:
      raise gin_utils.ConfigError(f"--label_noise values must be in [0, 1], got {p:g}")
  for flag in ("seeds", "label_noise", "models"):
    values = getattr(args, flag)
    if len(set(values)) != len(values):
      raise gin_utils.ConfigError(f"--{flag} repeats a value: {' '.join(map(str, values))}")
  return args, bindings


@common.command
def main(argv: Sequence[str]) -> int:
  args, bindings = parse_args(argv)

  # Runs differ only in seeds and labels: one XLA compile per model serves all of them.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

  os.makedirs(args.out, exist_ok=True)
  host = machine.machine_info()
  timings = {}
  start = time.time()
  # Seeds outermost: a partial experiment already pairs dense and Top-k at every noise level.
  for seed in args.seeds:
    for noise in args.label_noise:
      for model in args.models:
        name = run_name(model, noise, seed)
        run_dir = os.path.join(args.out, name)
        if os.path.exists(os.path.join(run_dir, robustness.RESULTS_FILE)) and not args.overwrite:
          print(f"== {name}: results exist, skipped", flush=True)
          continue
        if os.path.exists(run_dir):
          shutil.rmtree(run_dir)  # A half-finished run restarts from scratch.
        print(f"== {name}", flush=True)
        timings[name] = train_and_evaluate(model, noise, seed, run_dir, bindings)
        print(f"== {name}: train {timings[name]['train_seconds']:.0f} s, eval {timings[name]['eval_seconds']:.0f} s",
              flush=True)
  wall = time.time() - start

  run_dirs = [os.path.join(args.out, run_name(m, p, s))
              for s in args.seeds for p in args.label_noise for m in args.models]
  table = robustness.build_table([robustness.load_results(d) for d in run_dirs])
  markdown = robustness.table_markdown(table)
  table.update({
      "run_dirs": run_dirs, "machine": host, "wall_seconds_this_invocation": wall, "run_seconds": timings,
      "command": " ".join(["experiments/robustness/run.py"] + argv),
      "seeds": args.seeds, "label_noise": args.label_noise, "extra_bindings": bindings,
  })
  with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(args.out, "table.json"), "w", encoding="utf-8") as f:
    json.dump(table, f, indent=2)
  sys.stdout.write(markdown)
  print(f"{len(timings)} runs in {wall / 60:.1f} min on {host['cores']} x {host['cpu']}; "
        f"wrote {os.path.join(args.out, 'table.md')} and table.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
