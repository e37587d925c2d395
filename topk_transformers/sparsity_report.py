"""Activation-sparsity reports: per-layer % nonzero, per-neuron firing frequency, % over training.

What the paper measures (Li et al., 2022, Figures 1-2): after the ReLU of every
Transformer MLP, the percentage of hidden units that are nonzero, per layer
(T5's encoder and decoder apart), on training and held-out data, at
initialisation and after training. This module measures it for a run's
checkpoint (or for its step-0 parameters), and per hidden unit the fraction of
tokens on which it fires; it also reads the per-layer percentage over training
from the TensorBoard events the trainer writes (``train/sparsity/<layer>``,
``eval/sparsity/<layer>``) or, re-measuring, from the run's checkpoints::

  run = load_run('/tmp/run')                    # gin already configured with the run's files
  m = measure(run, 'validation', eval_steps=20)  # Measurement: percent_nonzero, firing_frequency, ...
  curves = read_event_sparsity('/tmp/run')      # {'train': {layer: (steps, values)}, 'eval': {...}}
  plot_per_layer({'trained': m.percent_nonzero}, 'per_layer.png')

``scripts/sparsity_report.py`` is the command line (``report.json`` + PNGs).
Counts come from the statistics every ``layers.MlpBlock`` sows (padding excluded).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from topk_transformers import sparsity as sparsity_lib

INIT = "init"
SOURCES = ("events", "checkpoints")
_EVENT_PREFIXES = {"train": "train/sparsity/", "eval": "eval/sparsity/"}


# ---------------------------------------------------------------------------
# Loading a run: MODEL + dataset from gin, params from a checkpoint or the trainer's init.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """What a measurement needs: the model, its dataset and params, and how to shard a batch."""

  model: Any
  dataset: Any
  params: Any
  step: int
  partitioner: Any
  batch_size: int
  params_shardings: Any
  batch_shardings: Any
  input_shapes: Dict[str, tuple]
  checkpoint: str = INIT
  seed: int = 0
  _eval_step: Any = dataclasses.field(default=None, repr=False)

  @property
  def host_batch(self) -> int:
    import jax  # pylint: disable=g-import-not-at-top
    return self.batch_size // jax.process_count()

  def eval_step(self) -> Any:
    """The jitted eval step, made once and shared by runs that only differ in params (one compilation)."""
    if self._eval_step is None:
      from topk_transformers import train as train_lib  # pylint: disable=g-import-not-at-top
      self._eval_step = train_lib.make_eval_step(self.model, self.partitioner, self.params_shardings,
                                                 self.batch_shardings)
    return self._eval_step


def init_params(model: Any, input_shapes: Mapping[str, tuple], seed: int = 0) -> Any:
  """The trainer's step-0 parameters for ``seed`` (``train.train`` splits ``PRNGKey(seed)`` the same way)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  return nn.meta.unbox(jax.jit(lambda r: model.get_initial_variables(r, input_shapes))(init_rng)["params"])


def _gin_value(binding: str, default: Any) -> Any:
  import gin  # pylint: disable=g-import-not-at-top
  from topk_transformers import evaluate  # pylint: disable=g-import-not-at-top

  try:
    gin.query_parameter(binding)
  except ValueError:
    return default
  return evaluate.build_from_gin(binding)


def load_run(checkpoint: str, batch_size: Optional[int] = None, seed: Optional[int] = None, model: Any = None,
             dataset: Any = None) -> Run:
  """The MODEL and dataset of a run with the params of ``checkpoint``.

  ``checkpoint`` is a run directory (its latest step), ``.../checkpoints/<step>``, or
  ``'init'``: the parameters the trainer starts from (seed ``train.train.seed``, or ``seed``).
  ``model``, ``dataset``, ``batch_size`` and the seed default to gin's ``MODEL``,
  ``train.train.dataset``, ``BATCH_SIZE`` and ``train.train.seed``, so gin must then hold
  the run's configuration (e.g. ``gin_utils.configure``).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from topk_transformers import checkpoints, evaluate, gin_utils, partitioning  # pylint: disable=g-import-not-at-top

  model = gin_utils.get_macro("MODEL") if model is None else model
  dataset = evaluate.build_from_gin("train.train.dataset") if dataset is None else dataset
  partitioner = partitioning.Partitioner()
  batch_size = batch_size or gin_utils.get_macro("BATCH_SIZE", default=8)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  dp = partitioner.data_parallel_size
  batch_size = max(dp, (batch_size // dp) * dp)
  host_batch = batch_size // jax.process_count()
  ds = dataset.get_dataset(dataset.eval_split, host_batch, shuffle=False, repeat=False)
  input_shapes = {k: (batch_size,) + tuple(v.shape[1:]) for k, v in ds.element_spec.items()}
  abstract = jax.eval_shape(lambda r: model.get_initial_variables(r, input_shapes), jax.random.PRNGKey(0))
  params_shardings = partitioner.logical_shardings(abstract["params"])
  seed = int(_gin_value("train.train.seed", 0) if seed is None else seed)
  if checkpoint == INIT:
    params = jax.device_put(init_params(model, input_shapes, seed), params_shardings)
    step = 0
  else:
    params, step = checkpoints.restore_params(checkpoint, nn.meta.unbox(abstract["params"]), params_shardings)
  batch_shardings = {k: partitioner.data_sharding(len(s)) for k, s in input_shapes.items()}
  return Run(model=model, dataset=dataset, params=params, step=int(step), partitioner=partitioner,
             batch_size=batch_size, params_shardings=params_shardings, batch_shardings=batch_shardings,
             input_shapes=input_shapes, checkpoint=checkpoint, seed=seed)


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
        "firing": {name: firing_summary(freq, bins) for name, freq in self.firing_frequency.items()},
    }


def measure(run: Run, split: str, eval_steps: Optional[int] = None, label: Optional[str] = None) -> Measurement:
  """Runs the model's eval over (the first ``eval_steps`` batches of) ``split``; collects the sown MLP statistics."""
  from topk_transformers import train as train_lib  # pylint: disable=g-import-not-at-top

  metrics, acc = train_lib.evaluate_split(run.eval_step(), run.params, run.dataset, split, run.host_batch,
                                          run.partitioner, eval_steps)
  if not acc:
    raise ValueError(f"no MLP statistics recorded on split {split!r} (empty split, or a model without MlpBlocks)")
  return Measurement(
      label=label or (INIT if run.checkpoint == INIT else f"step {run.step}"), split=split, step=run.step,
      metrics=metrics, percent_nonzero=acc.percent_nonzero(), token_count=acc.token_counts(),
      firing_frequency=acc.neuron_firing_frequency())


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


def firing_histogram(frequency: np.ndarray, bins: int = 20) -> Tuple[np.ndarray, np.ndarray]:
  """``(counts, edges)``: how many hidden units fire on a fraction of tokens in each of ``bins`` bins of [0, 1]."""
  if bins <= 0:
    raise ValueError(f"bins must be positive, got {bins}")
  frequency = np.asarray(frequency, np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  counts, _ = np.histogram(np.clip(frequency, 0.0, 1.0), bins=edges)
  return counts, edges


def firing_summary(frequency: np.ndarray, bins: int = 20) -> dict:
  """Per-layer firing statistics: histogram, never-firing and mostly-firing units, quantiles."""
  frequency = np.asarray(frequency, np.float64)
  counts, edges = firing_histogram(frequency, bins)
  return {
      "num_neurons": int(frequency.size),
      "histogram": counts.tolist(),
      "bin_edges": edges.tolist(),
      "mean": float(frequency.mean()) if frequency.size else 0.0,
      "median": float(np.median(frequency)) if frequency.size else 0.0,
      "never_fire": float(np.mean(frequency == 0.0)) if frequency.size else 0.0,
      "fire_over_half": float(np.mean(frequency > 0.5)) if frequency.size else 0.0,
  }


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
      order = sparsity_lib._sort_key  # pylint: disable=protected-access
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

  ``load_kwargs`` go to :func:`load_run` (``seed``, ``model``, ``dataset``). Returns ``{split: {layer: (steps, %)}}``.
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
    run = load_run(source, batch_size, **load_kwargs) if run is None else with_params(run, source)
    m = measure(run, split, eval_steps)
    for name, pct in m.percent_nonzero.items():
      layers.setdefault(name, ([], []))
      layers[name][0].append(run.step)
      layers[name][1].append(pct)
  return {split: layers}


def with_params(run: Run, checkpoint: str) -> Run:
  """``run`` with the params of another checkpoint of the same model (or ``'init'``)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from topk_transformers import checkpoints  # pylint: disable=g-import-not-at-top

  if checkpoint == INIT:
    params = init_params(run.model, run.input_shapes, run.seed)
    return dataclasses.replace(run, params=jax.device_put(params, run.params_shardings), step=0, checkpoint=INIT)
  abstract = jax.eval_shape(lambda p: p, run.params)
  params, step = checkpoints.restore_params(checkpoint, nn.meta.unbox(abstract), run.params_shardings)
  return dataclasses.replace(run, params=params, step=int(step), checkpoint=checkpoint)


# ---------------------------------------------------------------------------
# Plots (matplotlib Agg)
# ---------------------------------------------------------------------------

def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def log_axis(ax) -> None:
  """A log y-axis labelled 1, 2, 3, 5, 10, 20, 30, 50 (plain numbers, not 5x10^1)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  ax.set_yscale("log")
  ax.yaxis.set_major_locator(ticker.LogLocator(base=10.0, subs=(1.0, 2.0, 3.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _stacks(layers: Iterable[str]) -> List[str]:
  out: List[str] = []
  for name in layers:
    if stack_of(name) not in out:
      out.append(stack_of(name))
  return out


def _short(layer: str) -> str:
  """``'encoder/layers_3'`` -> ``'3'``; ``'Transformer/encoderblock_5'`` -> ``'5'``."""
  tail = layer.split("/")[-1]
  return tail.rpartition("_")[2] if tail.rpartition("_")[2].isdigit() else tail


def plot_per_layer(series: Mapping[str, Mapping[str, float]], path: str, title: str = "",
                   log_scale: bool = True, styles: Optional[Mapping[str, Mapping[str, Any]]] = None) -> str:
  """The paper's per-layer view: % nonzero against layer index, one line per series, one panel per stack.

  ``series`` maps a label (e.g. ``'init, train'``, ``'trained, validation'``) to ``{layer: percent}``;
  ``styles`` optionally maps a label to matplotlib ``plot`` keywords (color, linestyle, marker).
  """
  plt = _pyplot()
  layers = list(dict.fromkeys(name for values in series.values() for name in values))
  stacks = _stacks(layers)
  outside = len(series) > 4  # a long legend goes right of the panels, not over the lines
  fig, axes = plt.subplots(1, len(stacks), figsize=(4.2 * len(stacks) + 0.8 + 3.2 * outside, 3.6), sharey=True,
                           squeeze=False)
  markers = "osD^vx*"
  for ax, stack in zip(axes[0], stacks):
    names = [n for n in layers if stack_of(n) == stack]
    x = np.arange(len(names))
    for i, (label, values) in enumerate(series.items()):
      ys = [values.get(n, np.nan) for n in names]
      style = {"marker": markers[i % len(markers)], **dict((styles or {}).get(label, {}))}
      ax.plot(x, ys, label=label, **style)
    ax.set_xticks(x)
    ax.set_xticklabels([_short(n) for n in names])
    ax.set_xlabel(f"{stack} layer")
    ax.grid(True, which="both", alpha=0.3)
    if log_scale:
      log_axis(ax)
  axes[0][0].set_ylabel("% nonzero MLP activations")
  if outside:
    axes[0][-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
  else:
    axes[0][-1].legend(fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def plot_firing_histogram(frequencies: Mapping[str, np.ndarray], path: str, title: str = "", bins: int = 50) -> str:
  """Per stack, the distribution of per-neuron firing frequency, one step histogram per layer."""
  plt = _pyplot()
  stacks = _stacks(frequencies)
  fig, axes = plt.subplots(1, len(stacks), figsize=(4.2 * len(stacks) + 0.8, 3.6), sharey=True, squeeze=False)
  for ax, stack in zip(axes[0], stacks):
    names = [n for n in frequencies if stack_of(n) == stack]
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(names), 1)))
    for color, name in zip(colors, names):
      counts, edges = firing_histogram(frequencies[name], bins)
      ax.stairs(np.maximum(counts, 0.5), edges, color=color, label=f"layer {_short(name)}", baseline=0.5)
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of tokens on which a neuron fires")
    ax.set_title(stack)
    ax.legend(fontsize="x-small", ncol=2)
  axes[0][0].set_ylabel("neurons")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def plot_over_steps(curves: Curves, path: str, title: str = "") -> str:
  """Figure 1 of the paper: % nonzero against training step, one line per layer, one panel per stack and kind."""
  plt = _pyplot()
  panels = []
  for kind, layers in curves.items():
    for stack in _stacks(layers):
      panels.append((kind, stack, {n: c for n, c in layers.items() if stack_of(n) == stack}))
  if not panels:
    raise ValueError("no sparsity curves to plot (no train/sparsity or eval/sparsity scalars found)")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.8, 3.6), sharey=True, squeeze=False)
  for ax, (kind, stack, layers) in zip(axes[0], panels):
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(layers), 1)))
    for color, (name, (steps, values)) in zip(colors, layers.items()):
      ax.plot(steps, values, color=color, marker="." if len(steps) < 30 else None, label=f"layer {_short(name)}")
    log_axis(ax)
    ax.set_xlabel("training step")
    ax.set_title(f"{stack} ({kind})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
  axes[0][0].set_ylabel("% nonzero MLP activations")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path: str) -> str:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


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
    figures["per_layer"] = plot_per_layer({series_label(m): m.percent_nonzero for m in measurements},
                                          os.path.join(out_dir, "per_layer.png"), title)
    for m in measurements:
      key = f"firing_{_slug(m.label)}_{_slug(m.split)}"
      figures[key] = plot_firing_histogram(
          m.firing_frequency, os.path.join(out_dir, key + ".png"),
          f"{title + ': ' if title else ''}per-neuron firing frequency, {m.label}, {m.split}")
  if curves:
    report["over_steps"] = curves_json(curves)
    figures["over_steps"] = plot_over_steps(curves, os.path.join(out_dir, "over_steps.png"), title)
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
  lines = [f"{'layer':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(heads, cols))]
  for name in layers:
    lines.append(f"{name:<{width}}  " + "  ".join(
        f"{m.percent_nonzero.get(name, float('nan')):>{c}.3f}" for m, c in zip(measurements, cols)))
  lines.append(f"{'mean (all)':<{width}}  " + "  ".join(
      f"{stack_means(m.percent_nonzero).get('all', float('nan')):>{c}.3f}" for m, c in zip(measurements, cols)))
  return "% nonzero MLP activations per layer\n" + "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line (scripts/sparsity_report.py)
# ---------------------------------------------------------------------------

def _has_events(path: str) -> bool:
  return bool(glob.glob(os.path.join(path, "events.out.tfevents.*")))


def main(argv: Sequence[str]) -> dict:
  """``sparsity_report.py --gin_file=... --checkpoint=DIR|init [--split=...] --out=DIR``; see the script."""
  import argparse  # pylint: disable=g-import-not-at-top
  from topk_transformers import checkpoints, gin_utils  # pylint: disable=g-import-not-at-top

  rest = gin_utils.configure_from_argv(argv)
  parser = argparse.ArgumentParser(prog="sparsity_report.py",
                                   description="Per-layer activation sparsity of a checkpoint: report.json + PNGs.")
  parser.add_argument("--checkpoint", required=True,
                      help="run directory (latest step), .../checkpoints/<step>, or 'init' (step-0 params)")
  parser.add_argument("--split", default=None,
                      help="comma-separated splits (default: the run's train and eval splits)")
  parser.add_argument("--eval_steps", type=int, default=20, help="batches per split (0: the whole split)")
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--with_init", action=argparse.BooleanOptionalAction, default=True,
                      help="also measure the step-0 params on the same splits (init vs trained)")
  parser.add_argument("--run_dir", default=None,
                      help="run directory for %% nonzero over training (default: --checkpoint if it holds events)")
  parser.add_argument("--over_steps", choices=SOURCES, default="events",
                      help="read the curves from the logged events, or re-measure every checkpoint")
  parser.add_argument("--title", default="")
  parser.add_argument("--out", required=True, help="output directory for report.json and the PNGs")
  args = parser.parse_args(rest)
  if args.eval_steps < 0:
    raise gin_utils.ConfigError(f"--eval_steps must be >= 0, got {args.eval_steps}")
  eval_steps = args.eval_steps or None
  try:
    run = load_run(args.checkpoint, args.batch_size)
  except checkpoints.CheckpointError as e:
    raise gin_utils.ConfigError(str(e)) from None
  splits = ([s.strip() for s in args.split.split(",") if s.strip()] if args.split
            else list(dict.fromkeys([run.dataset.train_split, run.dataset.eval_split])))
  runs = [run]
  if args.with_init and args.checkpoint != INIT:
    runs.insert(0, with_params(run, INIT))
  measurements = []
  for r in runs:
    for split in splits:
      try:
        measurements.append(measure(r, split, eval_steps))
      except ValueError as e:
        raise gin_utils.ConfigError(gin_utils.one_line(e)) from None
  run_dir = args.run_dir
  if run_dir is None and args.checkpoint != INIT and _has_events(args.checkpoint.rstrip("/")):
    run_dir = args.checkpoint
  curves = None
  if run_dir:
    if args.over_steps == "events":
      curves = read_event_sparsity(run_dir)
    else:
      curves = checkpoint_sparsity(run_dir, splits[-1], eval_steps, args.batch_size)
  extra = {"checkpoint": args.checkpoint, "step": run.step, "splits": splits, "eval_steps": eval_steps,
           "batch_size": run.batch_size, "run_dir": run_dir, "over_steps_source": args.over_steps if run_dir else None}
  report = write_report(measurements, args.out, curves, args.title, extra)
  print(format_report(measurements))
  print(f"wrote {os.path.join(args.out, 'report.json')} and {', '.join(sorted(report['figures'].values()))}")
  return report
