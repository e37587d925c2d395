#!/usr/bin/env python
"""Width and depth, separately: % nonzero of matched layers against d_ff and against depth, 3 seeds, intervals.

  nohup nice -n 19 python experiments/width_depth/run.py --out=/work/main/runs/width_depth &   # train + measure
  python experiments/width_depth/run.py --out=/work/main/runs/width_depth --measure_only        # what is done so far
  python experiments/width_depth/run.py --plot_only=experiments/width_depth/results/width_depth.json

The dense ReLU T5 of experiments/sparsity (d_model 128, 4 heads, 64 / 16 tokens, the embedded corpus) in two sweeps:
d_ff 256, 512, 1024, 2048, 4096 at 2+2 layers, and 1, 2, 4, 6 layers per stack at d_ff 1024 (the 1024 / 2+2 model
is in both). Seeds 0, 1, 2; every run has the same learning-rate rule and token budget (t5_width_depth.gin). The
runs go seed by seed, the cheaper first, so that an unfinished sweep has whole curves for its first seeds.

Every finished run is measured on the whole held-out split (``--eval_steps`` batches if given), batch by batch,
and the measurement is kept beside its checkpoints (``measurement.json``). After each run the experiment's JSON,
``OUT/width_depth/width_depth.json``, is rewritten with every run measured so far (``"partial": true`` until all
are), with, per size: the % nonzero of the last decoder layer and the mean over the layers, and the held-out loss,
each with a 95% bootstrap interval over the seeds and the eval batches (``topk_transformers/intervals.py``); at the
end the figure ``width_depth.png`` is drawn from that JSON (``--plot_only`` redraws it). Resumable: the same
command skips what is done and continues a stopped run from its checkpoint (SIGTERM: exit 143 after the checkpoint
is written).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SPARSITY = os.path.join(os.path.dirname(HERE), "sparsity")


def _sparsity_runner():
  """experiments/sparsity/run.py (its RunSpec, train_run, measure_run), loaded by path: the runners are scripts."""
  name = "experiment_sparsity_run"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, os.path.join(SPARSITY, "run.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


sparsity = _sparsity_runner()  # also quiets TensorFlow's start-up, before the imports below

# pylint: disable=g-import-not-at-top,wrong-import-position
from topk_transformers import gin_utils, intervals, plotting  # noqa: E402
from topk_transformers import sparsity_report as report_lib  # noqa: E402
from topk_transformers.benchmarks import machine  # noqa: E402
from topk_transformers.commands import common  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

WIDTHS = (256, 512, 1024, 2048, 4096)
"""d_ff of the width sweep, at ``BASE_LAYERS`` layers per stack."""
DEPTHS = (1, 2, 4, 6)
"""Layers per stack of the depth sweep, at d_ff ``BASE_WIDTH``."""
BASE_WIDTH, BASE_LAYERS = 1024, 2
SEEDS = (0, 1, 2)
GIN_FILES = (os.path.join(SPARSITY, "t5_dense.gin"), os.path.join(SPARSITY, "t5_short.gin"),
             os.path.join(HERE, "t5_width_depth.gin"))
LEARNING_RATE_RULE = ("T5's rsqrt schedule with a 4000-step warm-up for every size: a constant 1/sqrt(4000) = 0.0158 "
                      "up to step 4000")
MATCHED = ("last_decoder_layer", "mean_of_layers")
RESAMPLES = 10_000


@dataclasses.dataclass(frozen=True)
class Size:
  d_ff: int
  layers: int
  """Per stack (encoder and decoder alike)."""

  @property
  def sweeps(self) -> Tuple[str, ...]:
    return tuple(s for s, ok in (("width", self.layers == self.base[1]), ("depth", self.d_ff == self.base[0])) if ok)

  base: Tuple[int, int] = (BASE_WIDTH, BASE_LAYERS)


def sizes(widths: Sequence[int] = WIDTHS, depths: Sequence[int] = DEPTHS, base_width: int = BASE_WIDTH,
          base_layers: int = BASE_LAYERS) -> List[Size]:
  """The width sweep's sizes, then the depth sweep's that it does not already hold."""
  out = [Size(w, base_layers, (base_width, base_layers)) for w in widths]
  out += [Size(base_width, d, (base_width, base_layers)) for d in depths
          if d != base_layers or base_width not in widths]
  return list(dict.fromkeys(out))


def run_spec(size: Size, seed: int, gin_files: Sequence[str] = GIN_FILES, extra: Sequence[str] = ()) -> Any:
  return sparsity.RunSpec(
      f"t5_wd_dff{size.d_ff}_layers{size.layers}_seed{seed}", tuple(gin_files),
      (f"network.T5Config.mlp_dim = {size.d_ff}", f"network.T5Config.num_encoder_layers = {size.layers}",
       f"network.T5Config.num_decoder_layers = {size.layers}", f"RANDOM_SEED = {seed}", *extra),
      label=f"d_ff {size.d_ff}, {size.layers}+{size.layers} layers, seed {seed}")


def plan(seeds: Sequence[int] = SEEDS, **size_kwargs) -> List[Tuple[Size, int]]:
  """Every (size, seed), seed by seed, and within a seed the cheaper first (by d_ff x layers, then the width
  sweep's), so that an unfinished sweep has its first seeds' curves and as many sizes as it could afford."""
  order = sorted(sizes(**size_kwargs), key=lambda s: (s.d_ff * s.layers, s.layers != s.base[1]))
  return [(size, seed) for seed in seeds for size in order]


# ---------------------------------------------------------------------------
# Measuring one run, and the intervals over seeds and batches
# ---------------------------------------------------------------------------

def _round_list(values, digits=5):
  return [round(float(v), digits) for v in values]


def measure(spec: Any, run_dir: str, eval_steps: Optional[int], steps: Optional[int]) -> dict:
  """The run's held-out measurement, batch by batch; cached in ``run_dir/measurement.json`` for its step."""
  cache = os.path.join(run_dir, "measurement.json")
  step = max(report_lib.checkpoint_steps(run_dir))
  if os.path.exists(cache):
    with open(cache) as f:
      saved = json.load(f)
    if saved["step"] == step and saved["eval_steps"] == eval_steps:
      return saved
  (m,), n_params = sparsity.measure_run(spec, run_dir, eval_steps, steps, with_init=False, splits="eval")
  layers = list(m.percent_nonzero)
  pb = m.per_batch
  decoder = [l for l in layers if report_lib.stack_of(l) == "decoder"]
  row = {
      "name": spec.name, "step": step, "eval_steps": eval_steps, "split": m.split, "parameters": n_params,
      "eval_batches": len(pb["weight"]), "held_out_loss": float(m.metrics["loss"]),
      "held_out_accuracy": float(m.metrics["accuracy"]),
      "percent_nonzero": {l: round(v, 4) for l, v in m.percent_nonzero.items()},
      "mean_percent_nonzero": {k: round(v, 4) for k, v in report_lib.stack_means(m.percent_nonzero).items()},
      "fraction_firing_below_10pct": {l: round(v, 5) for l, v in m.summary()["fraction_firing_below_10pct"].items()},
      "fraction_never_firing": {l: round(v, 5) for l, v in m.summary()["fraction_never_firing"].items()},
      "last_decoder_layer": decoder[-1],
      "per_batch": {"weight": _round_list(pb["weight"], 1), "loss": _round_list(pb["metrics"]["loss"]),
                    "percent_nonzero": {l: _round_list(v, 4) for l, v in pb["percent_nonzero"].items()},
                    "token_count": {l: _round_list(v, 1) for l, v in pb["token_count"].items()}},
  }
  with open(cache, "w") as f:
    json.dump(row, f)
  return row


def batch_values(row: dict, quantity: str) -> Tuple[np.ndarray, np.ndarray]:
  """``(values, weights)`` per eval batch of a measured run.

  ``last_decoder_layer``: that layer's % nonzero, weighted by its tokens (their weighted mean is the pass's %).
  ``mean_of_layers``: the mean over layers of each batch's %, weighted by the batch's tokens averaged over the
  layers (close to, not exactly, the mean of the layers' pass-level %: batches weigh alike in every layer).
  ``held_out_loss``: the batch's loss, weighted by its target tokens.
  """
  pb = row["per_batch"]
  if quantity == "last_decoder_layer":
    layer = row["last_decoder_layer"]
    return np.asarray(pb["percent_nonzero"][layer]), np.asarray(pb["token_count"][layer])
  if quantity == "mean_of_layers":
    pct = np.asarray(list(pb["percent_nonzero"].values()))
    tokens = np.asarray(list(pb["token_count"].values()))
    return pct.mean(0), tokens.mean(0)
  if quantity == "held_out_loss":
    return np.asarray(pb["loss"]), np.asarray(pb["weight"])
  raise ValueError(f"unknown quantity {quantity!r}")


def interval_over(rows: Sequence[dict], quantity: str, seed: int = 0) -> dict:
  """The 95% interval of a quantity over the runs (seeds) of one size, resampling seeds and then batches.

  One seed: the interval over its batches only (``"over": "batches"``), the measurement's own spread.
  Also the batch-only half-width of each seed (how much the eval batches alone move it).
  """
  pairs = [batch_values(r, quantity) for r in rows]
  batch_only = [intervals.batch_interval(v, w, n_resamples=2000, seed=seed).half_width for v, w in pairs]
  if len(rows) >= 2:
    iv = intervals.hierarchical_interval([v for v, _ in pairs], [w for _, w in pairs], n_resamples=RESAMPLES,
                                         seed=seed)
    over = "seeds and batches"
  else:
    iv = intervals.batch_interval(*pairs[0], n_resamples=RESAMPLES, seed=seed)
    over = "batches"
  out = iv.as_dict(4)
  out.update(over=over, batch_only_half_width=_round_list(batch_only, 4))
  return out


def summarise(rows: Sequence[dict], size_list: Sequence[Size]) -> List[dict]:
  """Per size (with at least one measured seed): its sweeps, seeds, parameters and the three intervals."""
  points = []
  for size in size_list:
    mine = sorted((r for r in rows if r["d_ff"] == size.d_ff and r["layers"] == size.layers), key=lambda r: r["seed"])
    if not mine:
      continue
    points.append({"d_ff": size.d_ff, "layers": size.layers, "sweeps": list(size.sweeps),
                   "seeds": [r["seed"] for r in mine], "parameters": mine[0]["parameters"],
                   **{q: interval_over(mine, q) for q in MATCHED + ("held_out_loss",)}})
  return points


def contrasts(rows: Sequence[dict], size_list: Sequence[Size], seed: int = 0) -> List[dict]:
  """Per sweep, the largest size minus the smallest, paired by seed (the same initial seed and data order) and by
  eval batch (the same held-out batches): ``paired_difference_interval`` of each quantity, where both sizes have at
  least 2 seeds in common."""
  out = []
  for sweep, key in (("width", "d_ff"), ("depth", "layers")):
    members = sorted((s for s in size_list if sweep in s.sweeps), key=lambda s: getattr(s, key))
    if len(members) < 2:
      continue
    small, large = members[0], members[-1]
    by_seed = {}
    for r in rows:
      for tag, size in (("small", small), ("large", large)):
        if (r["d_ff"], r["layers"]) == (size.d_ff, size.layers):
          by_seed.setdefault(r["seed"], {})[tag] = r
    common_seeds = sorted(s for s, pair in by_seed.items() if len(pair) == 2)
    if len(common_seeds) < 2:
      continue
    entry = {"sweep": sweep, "from": {"d_ff": small.d_ff, "layers": small.layers},
             "to": {"d_ff": large.d_ff, "layers": large.layers}, "seeds": common_seeds}
    for q in MATCHED + ("held_out_loss",):
      a = [batch_values(by_seed[s]["large"], q) for s in common_seeds]
      b = [batch_values(by_seed[s]["small"], q) for s in common_seeds]
      iv = intervals.paired_difference_interval([v for v, _ in a], [v for v, _ in b], [w for _, w in a],
                                                [w for _, w in b], n_resamples=RESAMPLES, seed=seed)
      entry[q] = iv.as_dict(4)
    out.append(entry)
  return out


# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------

def width_depth(out: str, steps: Optional[int] = None, eval_steps: Optional[int] = None,
                measure_only: bool = False, seeds: Sequence[int] = SEEDS, gin_files: Sequence[str] = GIN_FILES,
                extra_bindings: Sequence[str] = (), command: Optional[str] = None, **size_kwargs) -> dict:
  """Trains (unless ``measure_only``) and measures every (size, seed); writes the JSON and figure after each run."""
  host = machine.machine_info()
  todo = plan(seeds, **size_kwargs)
  size_list = sizes(**size_kwargs)
  rows: List[dict] = []
  exp_dir = os.path.join(out, "width_depth")
  payload: Dict[str, Any] = {}
  for size, seed in todo:
    spec = run_spec(size, seed, gin_files, extra_bindings)
    run_dir = os.path.join(out, "runs", spec.name)
    if measure_only:
      gin_utils.configure(*spec.configuration(run_dir, steps))
      planned = int(gin_utils.get_macro("TRAIN_STEPS"))
      if planned not in report_lib.checkpoint_steps(run_dir):
        continue  # not finished: nothing unfinished is measured
      timing = os.path.join(run_dir, "train_seconds.json")
      seconds = json.load(open(timing))["train_seconds"] if os.path.exists(timing) else None
    else:
      run_dir, seconds = sparsity.train_run(spec, out, steps)
    row = measure(spec, run_dir, eval_steps, steps)
    row.update(d_ff=size.d_ff, layers=size.layers, seed=seed,
               train_seconds=None if seconds is None else round(float(seconds), 1))
    rows.append(row)
    payload = {
        "experiment": "width_depth", "command": command, "partial": len(rows) < len(todo), "runs_done": len(rows),
        "runs_planned": len(todo), "train_steps": int(gin_utils.get_macro("TRAIN_STEPS")),
        "tokens_per_step": _tokens_per_step(), "learning_rate_rule": LEARNING_RATE_RULE,
        "gin_files": [os.path.relpath(f, os.path.dirname(os.path.dirname(HERE))) for f in gin_files],
        "seeds": list(seeds), "widths": sorted({s.d_ff for s in size_list if "width" in s.sweeps}),
        "depths": sorted({s.layers for s in size_list if "depth" in s.sweeps}),
        "base": {"d_ff": size_list[0].base[0], "layers": size_list[0].base[1]},
        "eval_steps": eval_steps, "eval_batches": row["eval_batches"], "interval": {
            "level": 0.95, "resamples": RESAMPLES,
            "method": "percentile bootstrap: seeds resampled, then each drawn seed's eval batches"},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": host,
        "points": summarise(rows, size_list), "contrasts": contrasts(rows, size_list), "runs": rows,
    }
    write(payload, exp_dir)
    print(f"[width_depth] {len(rows)} of {len(todo)} runs measured; {spec.name}: held-out loss "
          f"{row['held_out_loss']:.4f}, % nonzero last decoder layer "
          f"{row['percent_nonzero'][row['last_decoder_layer']]:.2f}, mean {row['mean_percent_nonzero']['all']:.2f}",
          flush=True)
  if not rows:
    raise gin_utils.ConfigError(f"no finished run under {os.path.join(out, 'runs')} to measure")
  plot(payload, os.path.join(exp_dir, "width_depth.png"))  # of a stopped sweep: --measure_only or --plot_only
  print(format_points(payload["points"]))
  return payload


def _tokens_per_step() -> int:
  lengths = gin_utils.get_macro("TASK_FEATURE_LENGTHS")
  return int(gin_utils.get_macro("BATCH_SIZE")) * (int(lengths["inputs"]) + int(lengths["targets"]))


def write(payload: dict, exp_dir: str) -> None:
  os.makedirs(exp_dir, exist_ok=True)
  path = os.path.join(exp_dir, "width_depth.json")
  # A temporary file of its own: two sweep processes (one per core) may write at once.
  with tempfile.NamedTemporaryFile("w", dir=exp_dir, prefix="width_depth.json.", delete=False) as f:
    json.dump(payload, f, indent=1)
  os.replace(f.name, path)  # a reader never sees half a file


def format_points(points: Sequence[dict]) -> str:
  def cell(iv):
    return f"{iv['estimate']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"

  lines = [f"{'d_ff':>5} {'layers':>6} {'seeds':>6}  {'% nonzero, last decoder layer':>30}  "
           f"{'% nonzero, mean of layers':>26}  {'held-out loss':>24}"]
  for p in points:
    lines.append(f"{p['d_ff']:>5} {p['layers']:>6} {len(p['seeds']):>6}  {cell(p['last_decoder_layer']):>30}  "
                 f"{cell(p['mean_of_layers']):>26}  {cell(p['held_out_loss']):>24}")
  return "95% intervals over seeds and eval batches\n" + "\n".join(lines)


def plot(payload: dict, path: str) -> str:
  """Top: the width sweep; bottom: the depth sweep. Left: % nonzero (intervals, and each seed as a dot); right:
  the held-out loss. Drawn from the JSON alone (``--plot_only``)."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(11.0, 7.5))
  styles = {"last_decoder_layer": ("o", "tab:red", "last decoder layer"),
            "mean_of_layers": ("s", "tab:blue", "mean of the layers")}
  for row, (sweep, key, label) in enumerate((("width", "d_ff", "d_ff (2+2 layers)"),
                                            ("depth", "layers", "layers per stack (d_ff 1024)"))):
    points = sorted((p for p in payload["points"] if sweep in p["sweeps"]), key=lambda p: p[key])
    left, right = axes[row]
    xs = [p[key] for p in points]
    for q, (marker, color, name) in styles.items():
      est = np.array([p[q]["estimate"] for p in points])
      err = np.array([[p[q]["estimate"] - p[q]["low"], p[q]["high"] - p[q]["estimate"]] for p in points]).T
      if points:
        left.errorbar(xs, est, yerr=err, marker=marker, color=color, capsize=3, label=name)
        for p in points:
          left.scatter([p[key]] * len(p[q]["seed_means"]), p[q]["seed_means"], color=color, s=8, alpha=0.4)
    if points:
      est = np.array([p["held_out_loss"]["estimate"] for p in points])
      err = np.array([[p["held_out_loss"]["estimate"] - p["held_out_loss"]["low"],
                       p["held_out_loss"]["high"] - p["held_out_loss"]["estimate"]] for p in points]).T
      right.errorbar(xs, est, yerr=err, marker="o", color="k", capsize=3)
    for ax in (left, right):
      ax.set_xscale("log", base=2)
      ax.set_xticks(xs or [1])
      ax.set_xticklabels([str(x) for x in xs] or [""])
      ax.set_xlabel(label)
      ax.grid(True, alpha=0.3)
    left.set_ylabel("% nonzero, held-out (95% interval)")
    left.set_ylim(bottom=0)
    right.set_ylabel("held-out loss (95% interval)")
    if points:
      left.legend(fontsize="small")
  state = (f"partial: {payload['runs_done']} of {payload['runs_planned']} runs" if payload.get("partial")
           else f"{payload['runs_done']} runs")
  fig.suptitle(f"Dense ReLU T5: width and depth apart, {payload['train_steps']} steps, seeds "
               f"{', '.join(map(str, payload['seeds']))} ({state})", fontsize="medium")
  fig.tight_layout()
  return plotting.save(fig, path)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = common.ArgumentParser(prog="run.py", description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="output root (runs/ and width_depth/)")
  parser.add_argument("--steps", type=int, default=None, help="override TRAIN_STEPS (a quick check)")
  parser.add_argument("--eval_steps", type=int, default=None,
                      help="held-out batches measured per run (default: the whole split)")
  parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
  parser.add_argument("--measure_only", action="store_true", help="measure the finished runs, train nothing")
  parser.add_argument("--plot_only", default=None, metavar="JSON", help="redraw width_depth.png beside this JSON")
  args = parser.parse_args(argv)
  if args.plot_only is None and not args.out:
    raise gin_utils.ConfigError("--out is required (or --plot_only=JSON)")
  for flag in ("steps", "eval_steps"):
    value = getattr(args, flag)
    if value is not None and value <= 0:
      raise gin_utils.ConfigError(f"--{flag} must be positive, got {value}")
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    raise gin_utils.ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
  if not args.seeds:
    raise gin_utils.ConfigError("--seeds names no seed")
  return args


@common.command
def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  if args.plot_only:
    with open(args.plot_only) as f:
      payload = json.load(f)
    print(f"wrote {plot(payload, os.path.join(os.path.dirname(os.path.abspath(args.plot_only)), 'width_depth.png'))}")
    return 0
  command = " ".join(["python experiments/width_depth/run.py",
                      *[a for a in argv if not a.startswith("--measure_only")]])
  width_depth(os.path.abspath(args.out), args.steps, args.eval_steps, args.measure_only, args.seeds, command=command)
  return 0


if __name__ == "__main__":
  sys.exit(main())
