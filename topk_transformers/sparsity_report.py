"""Activation-sparsity reports: per-layer % nonzero, per-neuron firing frequency, % over training.

What the paper measures (Li et al., 2022, Figures 1-2): after the ReLU of every
Transformer MLP, the percentage of hidden units that are nonzero, per layer
(T5's encoder and decoder apart), on training and held-out data, at
initialisation and after training. This module measures it for a run's
checkpoint (or for its step-0 parameters), and per hidden unit the fraction of
tokens on which it fires; it also reads the per-layer percentage over training
from the TensorBoard events the trainer writes (``train/sparsity/<layer>``,
``eval/sparsity/<layer>``) or, re-measuring, from the run's checkpoints::

  run = runs.load_run('/tmp/run', gin_files=['t5/runs/cpu_smoke.gin'])
  m = measure(run, 'validation', eval_steps=20)  # Measurement: percent_nonzero, firing_frequency, ...
  curves = read_event_sparsity('/tmp/run')      # {'train': {layer: (steps, values)}, 'eval': {...}}
  write_report([m], '/tmp/report', curves)       # report.json + PNGs (drawn by plotting.py)

``topk-sparsity`` (``commands/sparsity.py``) is the command line (``report.json`` + PNGs).
Counts come from the statistics every ``layers.MlpBlock`` sows (padding excluded).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from topk_transformers import evaluators
from topk_transformers import plotting
from topk_transformers import runs
from topk_transformers import sparsity as sparsity_lib
from topk_transformers.gin_utils import ConfigError
from topk_transformers.runs import INIT
SOURCES = ("events", "checkpoints")
_EVENT_PREFIXES = {"train": "train/sparsity/", "eval": "eval/sparsity/"}
FIGURE_BINS = 50  # bins of the firing-frequency figures (the JSON's histograms have ``bins``)
# The firing statistics live in ``sparsity`` (NumPy only, for scripts that run without TensorFlow or gin).
RARE_FIRING = sparsity_lib.RARE_FIRING
firing_histogram = sparsity_lib.firing_histogram
fraction_firing_below = sparsity_lib.fraction_firing_below
fraction_never_firing = sparsity_lib.fraction_never_firing
firing_summary = sparsity_lib.firing_summary


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Measurement:
  """Sparsity of one set of params on (the first ``eval_steps`` batches of) one split."""

  label: str
  """E.g. ``'init'`` or ``'step 600'``."""
  split: str
  step: int
  metrics: Dict[str, float]
  """The model's eval metrics on the same batches (loss, accuracy, ...)."""
  percent_nonzero: Dict[str, float]
  """Per layer: 100 * nonzero hidden activations / (counted tokens * d_ff)."""
  token_count: Dict[str, float]
  """Per layer: tokens counted (padding excluded)."""
  firing_frequency: Dict[str, np.ndarray]
  """Per layer, ``[d_ff]``: the fraction of counted tokens on which each hidden unit is nonzero."""
  per_batch: Optional[Dict[str, Any]] = None
  """The same pass batch by batch (:func:`per_batch_figures`), for intervals over the eval batches."""

  def summary(self, bins: int = 20) -> dict:
    """JSON-ready: per-layer %, stack means, token counts, firing-frequency histograms and statistics."""
    return {
        "label": self.label,
        "split": self.split,
        "step": self.step,
        "metrics": dict(self.metrics),
        "percent_nonzero": dict(self.percent_nonzero),
        "mean_percent_nonzero": stack_means(self.percent_nonzero),
        "token_count": dict(self.token_count),
        "fraction_firing_below_10pct": {name: fraction_firing_below(freq) for name, freq
                                        in self.firing_frequency.items()},
        "fraction_never_firing": {name: fraction_never_firing(freq) for name, freq in self.firing_frequency.items()},
        "firing": {name: firing_summary(freq, bins) for name, freq in self.firing_frequency.items()},
        **({"per_batch": self.per_batch} if self.per_batch is not None else {}),
    }


def measure(run: Any, split: str, eval_steps: Optional[int] = None, label: Optional[str] = None) -> Measurement:
  """Runs the default evaluators of a ``runs.Run`` over (the first ``eval_steps`` batches of) ``split``.

  The sparsity evaluator's counts; the model's metrics on the same batches (the same pass) come along.
  """
  loop = run.eval_loop(split, eval_steps)
  built = evaluators.build(evaluators.DEFAULT, run.model, run.dataset, split, loop=loop, step=run.step)
  results = evaluators.run_all(built, run.params)
  metrics, percent = evaluators.split_results(results)
  if not percent:
    raise ValueError(f"no MLP statistics recorded on split {split!r} (empty split, or a model without MlpBlocks)")
  widths = {name: int(np.size(f)) for name, f in results["firing_frequency"].items()}
  return Measurement(
      label=label or (INIT if run.checkpoint == INIT else f"step {run.step}"), split=split, step=run.step,
      metrics=metrics, percent_nonzero=percent, token_count=results["tokens_counted"],
      firing_frequency=results["firing_frequency"], per_batch=per_batch_figures(loop(run.params).batches, widths))


def per_batch_figures(batches: Sequence[Mapping[str, Any]], widths: Mapping[str, int]) -> Dict[str, Any]:
  """JSON-ready, per eval batch: its weight and metrics, and per layer its % nonzero and counted tokens.

  A layer's % nonzero over the pass is the token-weighted mean of its batches' (weights ``token_count``), and a
  metric's is the ``weight``-weighted mean, which is how ``intervals.hierarchical_interval`` takes them.
  """
  layers = list(widths)
  out = {"weight": [float(b["weight"]) for b in batches],
         "metrics": {name: [float(b["metrics"].get(name, np.nan)) for b in batches]
                     for name in dict.fromkeys(n for b in batches for n in b["metrics"])},
         "percent_nonzero": {}, "token_count": {}}
  for name in layers:
    counts = [b["counts"].get(name, (0.0, 0.0)) for b in batches]
    out["token_count"][name] = [float(t) for _, t in counts]
    out["percent_nonzero"][name] = [100.0 * nz / max(t * widths[name], 1.0) for nz, t in counts]
  return out


def stack_of(layer: str) -> str:
  """``'encoder'`` / ``'decoder'`` for T5 layers, else the first path part (``'Transformer'`` for ViT)."""
  return layer.split("/")[0]


def stack_means(percent: Mapping[str, float]) -> Dict[str, float]:
  """Mean over layers, per stack and over ``'all'`` layers (layers of a stack count the same tokens)."""
  by_stack: Dict[str, List[float]] = {}
  for name, value in percent.items():
    by_stack.setdefault(stack_of(name), []).append(float(value))
  out = {stack: float(np.mean(v)) for stack, v in by_stack.items()}
  if percent:
    out["all"] = float(np.mean([float(v) for v in percent.values()]))
  return out


# ---------------------------------------------------------------------------
# Over training: from TensorBoard events, or re-measured from checkpoints.
# ---------------------------------------------------------------------------

def _scalar_value(value) -> Optional[float]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if value.HasField("simple_value"):
    return float(value.simple_value)
  if value.HasField("tensor"):
    arr = tf.make_ndarray(value.tensor)
    if arr.size == 1 and np.issubdtype(arr.dtype, np.number):
      return float(arr.reshape(()))
  return None


def read_event_scalars(run_dir: str, prefix: str = "") -> Dict[str, Dict[int, float]]:
  """``{tag: {step: value}}`` for the scalars under ``prefix`` in ``run_dir``'s event files (not recursive).

  Files are read in name (time) order so a restarted run's later value of a step wins.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  paths = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))
  out: Dict[str, Dict[int, float]] = {}
  for path in paths:
    try:
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if not value.tag.startswith(prefix):
            continue
          v = _scalar_value(value)
          if v is not None:
            out.setdefault(value.tag, {})[int(event.step)] = v
    except tf.errors.DataLossError:  # a file cut short by a killed run: keep what was read
      continue
  return out


Curves = Dict[str, Dict[str, Tuple[List[int], List[float]]]]


def read_event_sparsity(run_dir: str) -> Curves:
  """Per-layer % nonzero over steps from the trainer's events: ``{'train'|'eval': {layer: (steps, values)}}``."""
  if not os.path.isdir(run_dir):
    raise ValueError(f"run_dir {run_dir!r} is not a directory")
  scalars = read_event_scalars(run_dir)
  curves: Curves = {}
  for kind, prefix in _EVENT_PREFIXES.items():
    layers = {}
    for tag, points in scalars.items():
      if tag.startswith(prefix):
        steps = sorted(points)
        layers[tag[len(prefix):]] = (steps, [points[s] for s in steps])
    if layers:
      order = sparsity_lib.layer_sort_key
      curves[kind] = dict(sorted(layers.items(), key=lambda kv: order(kv[0])))  # encoder, then decoder, by depth
  return curves


def checkpoint_steps(run_dir: str) -> List[int]:
  """The steps saved under ``run_dir/checkpoints``."""
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def checkpoint_sparsity(run_dir: str, split: str, eval_steps: Optional[int], batch_size: Optional[int] = None,
                        include_init: bool = True, **load_kwargs) -> Curves:
  """Per-layer % nonzero over steps, re-measured on ``split`` at every saved checkpoint (and at init).

  ``load_kwargs`` go to ``runs.load_run`` (``seed``, ``model``, ``dataset``); gin holds the run's configuration.
  Returns ``{split: {layer: (steps, %)}}``.
  """
  steps = checkpoint_steps(run_dir)
  if not steps:
    raise ValueError(f"no checkpoints under {os.path.join(run_dir, 'checkpoints')!r}")
  sources = ([INIT] if include_init and 0 not in steps else []) + [
      os.path.join(run_dir, "checkpoints", str(s)) for s in steps]
  layers: Dict[str, Tuple[List[int], List[float]]] = {}
  run = None
  for source in sources:
    # The model and shapes stay: only the params change (and the eval step is compiled once).
    run = runs.load_run(source, batch_size=batch_size, **load_kwargs) if run is None else run.with_params(source)
    m = measure(run, split, eval_steps)
    for name, pct in m.percent_nonzero.items():
      layers.setdefault(name, ([], []))
      layers[name][0].append(run.step)
      layers[name][1].append(pct)
  return {split: layers}


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def series_label(m: Measurement) -> str:
  """``'init, train'``, ``'step 600, validation'``."""
  return f"{m.label}, {m.split}"


def curves_json(curves: Curves) -> dict:
  return {kind: {name: {"steps": list(map(int, s)), "percent_nonzero": [float(v) for v in vals]}
                 for name, (s, vals) in layers.items()} for kind, layers in curves.items()}


def write_report(measurements: Sequence[Measurement], out_dir: str, curves: Optional[Curves] = None,
                 title: str = "", extra: Optional[Mapping[str, Any]] = None, bins: int = 20,
                 include_frequencies: bool = True) -> dict:
  """Writes ``report.json`` and the PNGs into ``out_dir``; returns the report dict.

  PNGs: ``per_layer.png`` (every measurement as a series), ``firing_<label>_<split>.png``
  (per-neuron firing-frequency histograms), ``over_steps.png`` (when ``curves``).
  """
  import json  # pylint: disable=g-import-not-at-top

  os.makedirs(out_dir, exist_ok=True)
  report: Dict[str, Any] = dict(extra or {})
  report["measurements"] = [m.summary(bins) for m in measurements]
  if include_frequencies:
    report["neuron_firing_frequency"] = [
        {"label": m.label, "split": m.split,
         "layers": {n: np.round(np.asarray(f, np.float64), 6).tolist() for n, f in m.firing_frequency.items()}}
        for m in measurements]
  figures = {}
  if measurements:
    figures["per_layer"] = plotting.plot_per_layer({series_label(m): m.percent_nonzero for m in measurements},
                                                   os.path.join(out_dir, "per_layer.png"), title)
    for m in measurements:
      key = f"firing_{_slug(m.label)}_{_slug(m.split)}"
      figures[key] = plotting.plot_firing_histogram(
          {n: firing_histogram(f, FIGURE_BINS) for n, f in m.firing_frequency.items()},
          os.path.join(out_dir, key + ".png"),
          f"{title + ': ' if title else ''}per-neuron firing frequency, {m.label}, {m.split}")
  if curves:
    report["over_steps"] = curves_json(curves)
    figures["over_steps"] = plotting.plot_over_steps(curves, os.path.join(out_dir, "over_steps.png"), title)
  report["figures"] = {k: os.path.basename(v) for k, v in figures.items()}
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return report


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def format_report(measurements: Sequence[Measurement]) -> str:
  """A console table: one row per layer, one column per measurement."""
  if not measurements:
    return "(no measurements)"
  layers = list(dict.fromkeys(n for m in measurements for n in m.percent_nonzero))
  heads = [f"{m.label}/{m.split}" for m in measurements]
  width = max(len(n) for n in layers + ["layer", "mean (all)"])
  cols = [max(len(h), 9) for h in heads]
  fcols = [max(len(h), 13) for h in heads]
  lines = [f"{'layer':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(heads, cols))]
  for name in layers:
    lines.append(f"{name:<{width}}  " + "  ".join(
        f"{m.percent_nonzero.get(name, float('nan')):>{c}.3f}" for m, c in zip(measurements, cols)))
  lines.append(f"{'mean (all)':<{width}}  " + "  ".join(
      f"{stack_means(m.percent_nonzero).get('all', float('nan')):>{c}.3f}" for m, c in zip(measurements, cols)))
  firing = [f"{'layer':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(heads, fcols))]
  for name in layers:
    cells = []
    for m, c in zip(measurements, fcols):
      freq = m.firing_frequency.get(name)
      cell = "–" if freq is None else (
          f"{100 * fraction_firing_below(freq):.1f} / {100 * fraction_never_firing(freq):.1f}")
      cells.append(f"{cell:>{c}}")
    firing.append(f"{name:<{width}}  " + "  ".join(cells))
  return ("% nonzero MLP activations per layer\n" + "\n".join(lines) +
          "\n\n% of units firing on < 10% of tokens / never firing\n" + "\n".join(firing))


# ---------------------------------------------------------------------------
# The report of a run (topk-sparsity)
# ---------------------------------------------------------------------------

def has_events(path: str) -> bool:
  """Whether ``path`` holds the trainer's TensorBoard event files."""
  return bool(glob.glob(os.path.join(path, "events.out.tfevents.*")))


def report(run: Any, out_dir: str, splits: Optional[Sequence[str]] = None, eval_steps: Optional[int] = 20,
           with_init: bool = True, run_dir: Optional[str] = None, over_steps: str = "events",
           title: str = "") -> dict:
  """Measures a loaded run (and its step-0 params) on ``splits``, adds the curves over training, writes the report.

  Args:
    run: a ``runs.Run``.
    out_dir: where ``report.json`` and the PNGs go.
    splits: default the run's train and eval splits.
    eval_steps: batches per split (``None``: the whole split).
    with_init: also measure the step-0 params on the same splits (init vs trained).
    run_dir: a run directory for % nonzero over training (default: the checkpoint, if it holds events).
    over_steps: ``'events'`` reads the logged curves; ``'checkpoints'`` re-measures every checkpoint.
  """
  if over_steps not in SOURCES:
    raise ConfigError(f"over_steps must be one of {SOURCES}, got {over_steps!r}")
  splits = list(splits or dict.fromkeys([run.dataset.train_split, run.dataset.eval_split]))
  loaded = [run.with_params(INIT), run] if with_init and run.checkpoint != INIT else [run]
  measurements = []
  for r in loaded:
    for split in splits:
      try:
        measurements.append(measure(r, split, eval_steps))
      except ValueError as e:  # an unknown or empty split
        raise ConfigError(str(e).splitlines()[0]) from None
  if run_dir is None and run.checkpoint != INIT and has_events(run.checkpoint.rstrip("/")):
    run_dir = run.checkpoint
  curves = None
  if run_dir:
    if over_steps == "events":
      curves = read_event_sparsity(run_dir)
    else:
      curves = checkpoint_sparsity(run_dir, splits[-1], eval_steps, run.batch_size)
  extra = {"checkpoint": run.checkpoint, "step": run.step, "splits": splits, "eval_steps": eval_steps,
           "batch_size": run.batch_size, "run_dir": run_dir, "over_steps_source": over_steps if run_dir else None}
  written = write_report(measurements, out_dir, curves, title, extra)
  written["text"] = format_report(measurements)
  return written
