#!/usr/bin/env python
"""The paper's Table 1 on digits: dense ReLU ViT vs Top-k ViT, label noise, corruptions, ECE, over seeds.

One command trains and evaluates every run in sequence, then writes the table::

    python scripts/robustness_experiment.py --out_dir=/tmp/topk_vit_robustness \
        [--seeds 0 1 2] [--label_noise 0 0.4 0.8] [--gin.TRAIN_STEPS=800]

Each run is ``configs/vit/runs/cpu_smoke.gin`` (the Top-k ViT), or that file plus
``configs/vit/relu.gin`` (the dense ReLU ViT), trained with ``scripts/train.py``'s
trainer and evaluated with ``scripts/eval.py``'s ViT branch, in this process. Run
``{model}_noise{p}_seed{s}`` uses ``RANDOM_SEED = LABEL_NOISE_SEED = s``: at a given
seed the dense and the Top-k model start from the same initialiser seed and see the
same noisy labels. Corruptions and ECE are measured on the clean-label runs only (as
the table uses them). A run whose ``eval_results.json`` exists is skipped, so an
interrupted experiment resumes; ``--overwrite`` redoes everything.

Writes ``OUT_DIR/table.md`` and ``OUT_DIR/table.json`` (``robustness.build_table``,
plus the machine, per-run wall times and the command) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    # name -> gin files; names are the table's columns.
    "dense": ["configs/vit/runs/cpu_smoke.gin", "configs/vit/relu.gin"],
    "topk": ["configs/vit/runs/cpu_smoke.gin"],
}


def _machine() -> dict:
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "load_average_at_start": load}


def run_name(model: str, noise: float, seed: int) -> str:
  return f"{model}_noise{noise:g}_seed{seed}"


def train_and_evaluate(model: str, noise: float, seed: int, run_dir: str, extra_bindings) -> dict:
  """Trains one run into ``run_dir`` and writes its ``eval_results.json``; returns wall times."""
  import gin  # pylint: disable=g-import-not-at-top
  from topk_transformers import evaluate, gin_utils, train  # pylint: disable=g-import-not-at-top

  files = MODELS[model]
  bindings = [f"MODEL_DIR = '{run_dir}'", f"RANDOM_SEED = {seed}", f"LABEL_NOISE = {noise!r}",
              f"LABEL_NOISE_SEED = {seed}", f"evaluate.evaluate_vit.name = '{model}'"]
  if noise > 0:  # The table reads corruptions off the clean-label runs only.
    bindings.append("evaluate.evaluate_vit.corruptions = []")
  bindings += list(extra_bindings)
  start = time.time()
  gin_utils.configure(files, bindings)
  os.makedirs(run_dir, exist_ok=True)
  gin.get_configurable(train.train)()
  with open(os.path.join(run_dir, "config.gin"), "w") as f:
    f.write(gin.operative_config_str())
  trained = time.time()
  flags = [f"--gin_file={f}" for f in files] + [f"--gin_bindings={b}" for b in bindings]
  evaluate.main(flags + [f"--checkpoint={run_dir}"])
  done = time.time()
  return {"train_seconds": trained - start, "eval_seconds": done - trained}


def main(argv=None) -> int:
  from topk_transformers import gin_utils  # pylint: disable=g-import-not-at-top

  gin_files, bindings, rest = gin_utils.parse_gin_flags(sys.argv[1:] if argv is None else argv)
  if gin_files:
    raise SystemExit("error: the models' gin files are fixed (cpu_smoke.gin [+ relu.gin]); use --gin.NAME=VALUE")
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out_dir", default="/tmp/topk_vit_robustness")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--label_noise", type=float, nargs="+", default=[0.0, 0.4, 0.8])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--overwrite", action="store_true", help="retrain runs that already have results")
  args = parser.parse_args(rest)
  for p in args.label_noise:
    if not 0.0 <= p <= 1.0:
      raise SystemExit(f"error: --label_noise values must be in [0, 1], got {p}")

  from topk_transformers import cli  # pylint: disable=g-import-not-at-top

  cli._quiet_tf()  # pylint: disable=protected-access
  cli._setup_logging()  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top

  # Runs differ only in seeds and labels: one XLA compile per model serves all of them.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.out_dir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from topk_transformers import robustness  # pylint: disable=g-import-not-at-top

  os.makedirs(args.out_dir, exist_ok=True)
  machine = _machine()
  timings = {}
  start = time.time()
  # Seeds outermost: a partial experiment already pairs dense and Top-k at every noise level.
  for seed in args.seeds:
    for noise in args.label_noise:
      for model in args.models:
        name = run_name(model, noise, seed)
        run_dir = os.path.join(args.out_dir, name)
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

  run_dirs = [os.path.join(args.out_dir, run_name(m, p, s))
              for s in args.seeds for p in args.label_noise for m in args.models]
  table = robustness.build_table([robustness.load_results(d) for d in run_dirs])
  markdown = robustness.table_markdown(table)
  table.update({
      "run_dirs": run_dirs, "machine": machine, "wall_seconds_this_invocation": wall, "run_seconds": timings,
      "command": " ".join([os.path.basename(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv)),
      "seeds": args.seeds, "label_noise": args.label_noise, "extra_bindings": bindings,
  })
  with open(os.path.join(args.out_dir, "table.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(args.out_dir, "table.json"), "w", encoding="utf-8") as f:
    json.dump(table, f, indent=2)
  sys.stdout.write(markdown)
  print(f"{len(timings)} runs in {wall / 60:.1f} min on {machine['cpu_count']} x {machine['cpu']}; "
        f"wrote {os.path.join(args.out_dir, 'table.md')} and table.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
