#!/usr/bin/env python
"""Infinite data: the dense ReLU ViT on random images drawn afresh at every step, against a fixed set of them.

One resumable command trains and measures every run, then writes the comparison (README.md)::

    python experiments/infinite_data/run.py --out=/tmp/infinite_data [--seeds 0 1 2] [--steps 4000]

Both kinds of run are experiment 3's dense ViT (``experiments/sparsity/vit_dense.gin``: ``Test/2``, d_ff 64,
4000 steps of batch 128, no augmentation) on uniform-noise 8x8 images with uniformly random labels:

* ``finite``: ``experiments/sparsity/vit_random_images.gin``, 1437 fixed training images (356 epochs);
* ``infinite``: ``vit_infinite_images.gin`` here, ``random_images.InfiniteRandomImageDataset``: 512,000 training
  images, none seen twice.

Run ``{data}_seed{s}`` sets ``RANDOM_SEED = s`` and the dataset's ``seed = s``. At seed 0 the finite run is
experiment 3's committed ``vit_random_images`` run. Each run checkpoints every ``--eval_period`` steps and
resumes from its checkpoint when restarted; a run stopped by SIGTERM ends the command with exit status 143 and
the same command resumes it. A run with its ``measurement.json`` is done and skipped; ``--remeasure`` measures
such runs again from their checkpoints and trains nothing.

Measured per run, with the whole eval split (360 held-out images) and the "training" split (the finite set's
1437 images; for the infinite stream its first 1437 images): per-layer % nonzero, the share of units firing on
fewer than 10% of tokens and the share never firing, accuracy; over training, the eval % nonzero every
``--eval_period`` steps, and the % nonzero of the units that fire at all (mean of layers: dead units apart). Writes
``OUT/infinite_data.json`` (per run and per data kind: mean and 95% bootstrap
interval over seeds, ``intervals.seed_interval``; infinite - finite: ``intervals.unpaired_difference_interval``)
and ``OUT/infinite_data.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from topk_transformers import startup

startup.quiet_start()

# pylint: disable=g-import-not-at-top,wrong-import-position
import gin  # noqa: E402

from topk_transformers import gin_utils, intervals, plotting, runs, train  # noqa: E402
from topk_transformers import sparsity_report as report_lib  # noqa: E402
from topk_transformers.benchmarks import machine  # noqa: E402
from topk_transformers.commands import common  # noqa: E402
from topk_transformers.commands.train import exit_if_preempted  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
EXPERIMENTS = os.path.dirname(HERE)
DATA = {
    # kind -> (gin files, the configurable whose seed the run sets)
    "finite": ([os.path.join(EXPERIMENTS, "sparsity", "vit_dense.gin"),
                os.path.join(EXPERIMENTS, "sparsity", "vit_random_images.gin")], "random_images.RandomImageDataset"),
    "infinite": ([os.path.join(EXPERIMENTS, "sparsity", "vit_dense.gin"), os.path.join(HERE, "vit_infinite_images.gin")],
                 "random_images.InfiniteRandomImageDataset"),
}
RESULT_FILE = "measurement.json"
RARE = 0.1  # the paper's statistic: units firing on fewer than 10% of tokens


def run_name(data: str, seed: int) -> str:
  return f"{data}_seed{seed}"


def configure(data: str, seed: int, run_dir: Optional[str], steps: Optional[int], eval_period: int) -> None:
  files, configurable = DATA[data]
  bindings = [f"RANDOM_SEED = {seed}", f"{configurable}.seed = {seed}", f"EVAL_PERIOD = {eval_period}",
              f"CHECKPOINT_PERIOD = {eval_period}", "KEEP_CHECKPOINTS = 2"]
  if run_dir is not None:
    bindings.append(f"MODEL_DIR = '{run_dir}'")
  if steps is not None:
    bindings.append(f"TRAIN_STEPS = {steps}")
  gin_utils.configure(files, bindings)


def firing_shares(m: report_lib.Measurement) -> Dict[str, Dict[str, float]]:
  """Per layer: the share of units firing on fewer than 10% of the tokens, and the share never firing."""
  out = {}
  for layer, freq in m.firing_frequency.items():
    freq = np.asarray(freq, np.float64)
    out[layer] = {"below_10pct": float(np.mean(freq < RARE)), "never": float(np.mean(freq == 0.0))}
  return out


def train_and_measure(data: str, seed: int, run_dir: str, steps: Optional[int], eval_period: int) -> Dict[str, Any]:
  """Trains (or resumes) one run and writes its ``measurement.json``; returns its dict."""
  configure(data, seed, run_dir, steps, eval_period)
  train_steps = int(gin_utils.get_macro("TRAIN_STEPS"))
  os.makedirs(run_dir, exist_ok=True)
  start = time.time()
  result = gin.get_configurable(train.train)()
  exit_if_preempted(result, run_name(data, seed), train_steps)
  return measure(data, seed, run_dir, steps, eval_period, time.time() - start)


def measure(data: str, seed: int, run_dir: str, steps: Optional[int], eval_period: int,
            seconds: float) -> Dict[str, Any]:
  """Measures one trained run (its newest checkpoint) and writes its ``measurement.json``; returns its dict.
  ``seconds``: the training time to record."""
  configure(data, seed, run_dir, steps, eval_period)
  train_steps = int(gin_utils.get_macro("TRAIN_STEPS"))
  run = runs.load_run(run_dir)
  measured = {}
  for split in (run.dataset.train_split, run.dataset.eval_split):
    m = report_lib.measure(run, split)
    measured[split] = {"percent_nonzero": dict(m.percent_nonzero),
                       "mean_percent_nonzero": float(np.mean(list(m.percent_nonzero.values()))),
                       "firing": firing_shares(m), "metrics": {k: float(v) for k, v in m.metrics.items()},
                       "tokens": {k: float(v) for k, v in m.token_count.items()}}
  scalars = report_lib.read_event_scalars(run_dir)
  curves = {tag: {"steps": sorted(points), "values": [float(points[s]) for s in sorted(points)]}
            for tag, points in scalars.items()
            if tag.startswith("eval/sparsity/") or tag in ("train/loss", "train/accuracy", "eval/accuracy")}
  payload = {"data": data, "seed": seed, "train_steps": train_steps, "step": run.step,
             "batch_size": int(gin_utils.get_macro("BATCH_SIZE")), "train_seconds_this_invocation": round(seconds, 1),
             "splits": {"train": run.dataset.train_split, "eval": run.dataset.eval_split},
             "measured": measured, "curves": curves}
  with open(os.path.join(run_dir, RESULT_FILE), "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  return payload


def _iv(values: Sequence[float]) -> Optional[dict]:
  if len(values) < 2:
    return {"estimate": float(values[0]), "n_seeds": 1} if values else None
  return intervals.seed_interval(values).as_dict(4)


def summarise(results: Dict[tuple, Dict[str, Any]], seeds: Sequence[int]) -> Dict[str, Any]:
  """Per data kind over seeds: mean of layers and per layer, % nonzero (eval and train splits), firing shares."""
  kinds: Dict[str, Any] = {}
  for data in DATA:
    rs = [results[(data, s)] for s in seeds if (data, s) in results]
    if not rs:
      continue
    row: Dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
    for which in ("eval", "train"):
      ms = [r["measured"][r["splits"][which]] for r in rs]
      layers = list(ms[0]["percent_nonzero"])
      row[which] = {
          "mean_percent_nonzero": _iv([m["mean_percent_nonzero"] for m in ms]),
          "percent_nonzero": {l: _iv([m["percent_nonzero"][l] for m in ms]) for l in layers},
          "firing_below_10pct": {l: _iv([m["firing"][l]["below_10pct"] for m in ms]) for l in layers},
          "never_firing": {l: _iv([m["firing"][l]["never"] for m in ms]) for l in layers},
          "accuracy": _iv([m["metrics"]["accuracy"] for m in ms]),
          # % nonzero among the units that fire at all: tells rarely-firing units from dead ones.
          "live_unit_percent_nonzero": _iv([float(np.mean([m["percent_nonzero"][l] / (1 - m["firing"][l]["never"])
                                                           for l in layers if m["firing"][l]["never"] < 1]))
                                            for m in ms]),
      }
    kinds[data] = row
  out: Dict[str, Any] = {"by_data": kinds}
  both = [s for s in seeds if ("finite", s) in results and ("infinite", s) in results]
  if len(both) >= 2:
    # Different data streams: the seeds are not matched, so the difference is unpaired.
    pick = lambda d: [[results[(d, s)]["measured"][results[(d, s)]["splits"]["eval"]]["mean_percent_nonzero"]]
                      for s in both]
    out["infinite_minus_finite_eval_mean_percent_nonzero"] = intervals.unpaired_difference_interval(
        pick("infinite"), pick("finite")).as_dict(4)
  return out


def plot(results: Dict[tuple, Dict[str, Any]], seeds: Sequence[int], path: str) -> str:
  """Eval % nonzero (mean of the layers) over training: each kind's mean over seeds, band min-max."""
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 3.8))
  for i, data in enumerate(DATA):
    rs = [results[(data, s)] for s in seeds if (data, s) in results]
    if not rs:
      continue
    per_run = []
    for r in rs:
      tags = [t for t in r["curves"] if t.startswith("eval/sparsity/")]
      steps = r["curves"][tags[0]]["steps"]
      per_run.append((steps, np.mean([r["curves"][t]["values"] for t in tags], axis=0)))
    steps = per_run[0][0]
    values = np.array([v for s, v in per_run if s == steps])
    ax.plot(steps, values.mean(0), "-o", color=f"C{i}", label=f"{data} ({len(values)} seeds)")
    if len(values) > 1:
      ax.fill_between(steps, values.min(0), values.max(0), color=f"C{i}", alpha=0.2, linewidth=0)
  ax.set_xlabel("training step")
  ax.set_ylabel("% nonzero, held-out images (mean of layers)")
  ax.set_title("Dense ReLU ViT on random images: fixed set vs fresh at every step", fontsize="medium")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  return plotting.save(fig, path)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = common.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="/tmp/infinite_data", help="OUT/runs/<data>_seed<s>, and the JSON and PNG")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
  parser.add_argument("--steps", type=int, default=None, help="TRAIN_STEPS of every run (default: the gin's 4000)")
  parser.add_argument("--eval_period", type=int, default=500, help="steps between evaluations and checkpoints")
  parser.add_argument("--name", default="infinite_data", help="OUT/<name>.json and .png")
  parser.add_argument("--remeasure", action="store_true",
                      help="measure the runs that have a measurement.json again (e.g. after a change in how "
                           "sparsity is counted), keeping their recorded training time; nothing trains")
  args = parser.parse_args(argv)
  if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
    raise gin_utils.ConfigError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
  if args.steps is not None and args.steps < 1 or args.eval_period < 1:
    raise gin_utils.ConfigError("--steps and --eval_period must be positive")
  return args


@common.command
def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  host = machine.machine_info()
  start = time.time()
  results: Dict[tuple, Dict[str, Any]] = {}
  if args.remeasure:
    unfinished = [run_name(d, s) for s in args.seeds for d in args.data
                  if not os.path.exists(os.path.join(os.path.abspath(args.out), "runs", run_name(d, s), RESULT_FILE))]
    if unfinished:
      raise gin_utils.ConfigError(f"--remeasure: {', '.join(unfinished)} not measured yet; run the command without "
                                  "--remeasure to train it")
  # Seeds outermost: a partial experiment already compares the two kinds.
  for seed in args.seeds:
    for data in args.data:
      run_dir = os.path.join(os.path.abspath(args.out), "runs", run_name(data, seed))
      done = os.path.join(run_dir, RESULT_FILE)
      if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
          results[(data, seed)] = json.load(f)
        if args.remeasure:
          seconds = results[(data, seed)]["train_seconds_this_invocation"]
          results[(data, seed)] = measure(data, seed, run_dir, args.steps, args.eval_period, seconds)
          print(f"== {run_name(data, seed)}: measured again", flush=True)
        else:
          print(f"== {run_name(data, seed)}: measured, skipped", flush=True)
        continue
      print(f"== {run_name(data, seed)}", flush=True)
      results[(data, seed)] = train_and_measure(data, seed, run_dir, args.steps, args.eval_period)
      ev = results[(data, seed)]["measured"][results[(data, seed)]["splits"]["eval"]]
      print(f"== {run_name(data, seed)}: held-out % nonzero {ev['mean_percent_nonzero']:.1f} (mean of layers)",
            flush=True)
  payload = {
      "experiment": "infinite_data", "seeds": args.seeds, "data": args.data,
      "gin_files": {d: [os.path.relpath(f, os.path.dirname(EXPERIMENTS)) for f in DATA[d][0]] for d in args.data},
      "runs": [results[(d, s)] for s in args.seeds for d in args.data],
      **summarise(results, args.seeds),
      "figure": os.path.basename(plot(results, args.seeds, os.path.join(args.out, f"{args.name}.png"))),
      "machine": host, "wall_seconds_this_invocation": round(time.time() - start, 1),
      "command": " ".join(["experiments/infinite_data/run.py"] + [a for a in argv if a != "--remeasure"]),
  }
  with open(os.path.join(args.out, f"{args.name}.json"), "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  for data, row in payload["by_data"].items():
    ev = row["eval"]["mean_percent_nonzero"]
    print(f"{data}: held-out % nonzero (mean of layers) {ev['estimate']:.2f}"
          + (f" [{ev['low']:.2f}, {ev['high']:.2f}]" if "low" in ev else "") + f", {len(row['seeds'])} seeds")
  print(f"wrote {os.path.join(args.out, args.name + '.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
