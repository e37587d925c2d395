"""The project's figures, drawn with matplotlib's Agg backend (PNG files, no display needed).

matplotlib is imported when a figure is drawn, not when this module is imported,
so that measuring and tabulating never pay for it. Every plot takes its data as
plain numbers and a PNG path, and returns the path::

  plotting.plot_per_layer({'init, train': {...}, 'step 400, validation': {...}}, 'per_layer.png')
  plotting.plot_over_steps({'train': {'encoder/layers_0': (steps, percents)}}, 'over_steps.png')

An experiment that needs a figure of its own builds it on :func:`pyplot` and :func:`save`.

Layer names are paths such as ``'encoder/layers_3'`` or ``'Transformer/encoderblock_1'``:
their first part (the stack) chooses the panel, their trailing number labels the layer.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

DPI = 110

Curve = Tuple[Sequence[int], Sequence[float]]


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend (works without a display)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save(fig, path: str, dpi: int = DPI) -> str:
  """Writes ``fig`` as a PNG at ``path`` (creating its directory), closes it, returns ``path``."""
  plt = pyplot()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def log_axis(ax) -> None:
  """A log y-axis labelled 1, 2, 3, 5, 10, 20, 30, 50 (plain numbers, not 5x10^1)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  ax.set_yscale("log")
  ax.yaxis.set_major_locator(ticker.LogLocator(base=10.0, subs=(1.0, 2.0, 3.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _stack(layer: str) -> str:
  return layer.split("/")[0]


def _stacks(layers) -> List[str]:
  return list(dict.fromkeys(_stack(name) for name in layers))


def _short(layer: str) -> str:
  """``'encoder/layers_3'`` -> ``'3'``; ``'Transformer/encoderblock_5'`` -> ``'5'``."""
  tail = layer.split("/")[-1]
  return tail.rpartition("_")[2] if tail.rpartition("_")[2].isdigit() else tail


def _finish(fig, axes, ylabel: str, title: str) -> None:
  axes[0][0].set_ylabel(ylabel)
  if title:
    fig.suptitle(title)
  fig.tight_layout()


# ---------------------------------------------------------------------------
# Activation sparsity
# ---------------------------------------------------------------------------

def plot_per_layer(series: Mapping[str, Mapping[str, float]], path: str, title: str = "",
                   log_scale: bool = True, styles: Optional[Mapping[str, Mapping[str, Any]]] = None) -> str:
  """The paper's per-layer view: % nonzero against layer index, one line per series, one panel per stack.

  ``series`` maps a label (e.g. ``'init, train'``, ``'step 600, validation'``) to ``{layer: percent}``;
  ``styles`` optionally maps a label to matplotlib ``plot`` keywords (color, linestyle, marker).
  """
  plt = pyplot()
  layers = list(dict.fromkeys(name for values in series.values() for name in values))
  if not layers:
    raise ValueError("no layers to plot")
  stacks = _stacks(layers)
  outside = len(series) > 4  # a long legend goes right of the panels, not over the lines
  fig, axes = plt.subplots(1, len(stacks), figsize=(4.2 * len(stacks) + 0.8 + 3.2 * outside, 3.6), sharey=True,
                           squeeze=False)
  markers = "osD^vx*"
  for ax, stack in zip(axes[0], stacks):
    names = [n for n in layers if _stack(n) == stack]
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
  if outside:
    axes[0][-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
  else:
    axes[0][-1].legend(fontsize="small")
  _finish(fig, axes, "% nonzero MLP activations", title)
  return save(fig, path)


def plot_firing_histogram(histograms: Mapping[str, Tuple[np.ndarray, np.ndarray]], path: str,
                          title: str = "") -> str:
  """Per stack, the distribution of per-neuron firing frequency: one step histogram per layer.

  ``histograms`` maps a layer to ``(counts, edges)``: how many of its hidden units fire on a
  fraction of tokens within each bin of [0, 1] (``sparsity_report.firing_histogram``).
  """
  plt = pyplot()
  if not histograms:
    raise ValueError("no layers to plot")
  stacks = _stacks(histograms)
  fig, axes = plt.subplots(1, len(stacks), figsize=(4.2 * len(stacks) + 0.8, 3.6), sharey=True, squeeze=False)
  for ax, stack in zip(axes[0], stacks):
    names = [n for n in histograms if _stack(n) == stack]
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(names), 1)))
    for color, name in zip(colors, names):
      counts, edges = histograms[name]
      # Empty bins are drawn at 0.5 on the log axis, below the lowest nonempty bin (1 neuron).
      ax.stairs(np.maximum(counts, 0.5), edges, color=color, label=f"layer {_short(name)}", baseline=0.5)
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of tokens on which a neuron fires")
    ax.set_title(stack)
    ax.legend(fontsize="x-small", ncol=2)
  _finish(fig, axes, "neurons", title)
  return save(fig, path)


def plot_over_steps(curves: Mapping[str, Mapping[str, Curve]], path: str, title: str = "",
                    log_x: bool = False) -> str:
  """Figure 1 of the paper: % nonzero (log axis) against training step, one line per layer.

  ``curves`` is ``{kind: {layer: (steps, percents)}}`` with kinds such as ``'train'`` and
  ``'eval'``; there is one panel per kind and stack. ``log_x`` puts the steps on a log axis too
  (for runs of many thousand steps, whose early fall would otherwise be squeezed to the left).
  """
  plt = pyplot()
  panels = []
  for kind, layers in curves.items():
    for stack in _stacks(layers):
      panels.append((kind, stack, {n: c for n, c in layers.items() if _stack(n) == stack}))
  if not panels:
    raise ValueError("no sparsity curves to plot (no train/sparsity or eval/sparsity scalars found)")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.8, 3.6), sharey=True, squeeze=False)
  for ax, (kind, stack, layers) in zip(axes[0], panels):
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(layers), 1)))
    for color, (name, (steps, values)) in zip(colors, layers.items()):
      ax.plot(steps, values, color=color, marker="." if len(steps) < 30 else None, label=f"layer {_short(name)}")
    log_axis(ax)
    if log_x:
      ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_title(f"{stack} ({kind})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
  _finish(fig, axes, "% nonzero MLP activations", title)
  return save(fig, path)


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------

def reliability_diagram(rel: Mapping[str, Sequence[float]], path: str, title: Optional[str] = None,
                        ece: Optional[float] = None) -> str:
  """Accuracy per confidence bin against the diagonal, over the fraction of examples per bin.

  ``rel`` holds per-bin ``accuracy``, ``confidence`` and ``count`` and the ``bin_edges``
  (``robustness.reliability``).
  """
  plt = pyplot()
  edges = np.asarray(rel["bin_edges"])
  acc, conf, count = (np.asarray(rel[k]) for k in ("accuracy", "confidence", "count"))
  left, width = edges[:-1], np.diff(edges)
  nonempty = count > 0
  fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(4.5, 5.5), gridspec_kw={"height_ratios": [3, 1]})
  top.bar(left[nonempty], acc[nonempty], width=width[nonempty], align="edge", color="tab:blue",
          edgecolor="black", label="accuracy")
  # The gap to the mean confidence of each bin: what ECE sums, weighted by count.
  top.bar(left[nonempty], conf[nonempty] - acc[nonempty], bottom=acc[nonempty], width=width[nonempty],
          align="edge", facecolor=(1.0, 0.0, 0.0, 0.15), edgecolor="tab:red", hatch="//",
          label="gap to mean confidence")
  top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
  top.set_ylim(0, 1)
  top.set_ylabel("accuracy")
  top.legend(loc="upper left", fontsize="small")
  label = title or ""
  if ece is not None:
    label = f"{label}  ECE {100 * ece:.2f}%".strip()
  top.set_title(label)
  bottom.bar(left, count / max(count.sum(), 1), width=width, align="edge", color="gray", edgecolor="black")
  bottom.set_xlim(0, 1)
  bottom.set_xlabel("confidence")
  bottom.set_ylabel("fraction")
  fig.tight_layout()
  return save(fig, path, dpi=100)


# ---------------------------------------------------------------------------
# Decoding benchmark
# ---------------------------------------------------------------------------

def plot_decode_speedups(rows: Sequence[Dict[str, Any]], path: str) -> str:
  """Latency and speedup over dense against k, one column per model size.

  ``rows`` are the decoding benchmark's result rows: ``size``, ``version``, ``dtype``,
  ``variant`` (``'dense'``, ``'sparse'``, ``'dense_topk'``), ``method``, ``k``,
  ``s_per_token``, ``speedup``, ``bound``, ``truncated``, ``num_decoder_layers`` and
  ``published_decoder_layers``.
  """
  plt = pyplot()
  if not rows:
    raise ValueError("no benchmark rows to plot")
  sizes = list(dict.fromkeys(r["size"] for r in rows))
  fig, axes = plt.subplots(2, len(sizes), figsize=(4.5 * len(sizes), 7), squeeze=False)
  for col, size in enumerate(sizes):
    lat, spd = axes[0][col], axes[1][col]
    for dtype in dict.fromkeys(r["dtype"] for r in rows if r["size"] == size):
      sel = [r for r in rows if r["size"] == size and r["dtype"] == dtype]
      dense = next(r for r in sel if r["variant"] == "dense")
      lat.axhline(dense["s_per_token"] * 1e3, ls="--", color="gray", lw=1)
      lat.annotate(f"dense {dtype}", (0.02, dense["s_per_token"] * 1e3), xycoords=("axes fraction", "data"),
                   fontsize=7, va="bottom")
      for kind in ("sparse", "dense_topk"):
        for method in dict.fromkeys(r["method"] for r in sel if r["variant"] == kind):
          line = sorted((r for r in sel if r["variant"] == kind and r["method"] == method), key=lambda r: r["k"])
          ks = [r["k"] for r in line]
          label = f"{kind} {method} {dtype}"
          lat.plot(ks, [r["s_per_token"] * 1e3 for r in line], "o-", label=label)
          spd.plot(ks, [r["speedup"] for r in line], "o-", label=f"measured {label}")
          if kind == "sparse" and not spd.get_legend_handles_labels()[1].count("bytes bound"):
            # The bound is a ratio of byte counts: the same for every dtype and method.
            spd.plot(ks, [r["bound"] for r in line], "k:", marker="x", label="bytes bound")
    title = f"T5 v{rows[0]['version']} {size}"
    first = next(r for r in rows if r["size"] == size)
    if first["truncated"]:
      title += f" ({first['num_decoder_layers']}/{first['published_decoder_layers']} layers)"
    lat.set_title(title)
    lat.set_ylabel("ms per token")
    spd.set_ylabel("speedup over dense")
    spd.set_xlabel("k")
    for ax in (lat, spd):
      ax.set_xscale("log", base=2)
      ax.legend(fontsize=7)
  fig.tight_layout()
  return save(fig, path)


def plot_predictor_quality(rows: Sequence[Dict[str, Any]], path: str) -> str:
  """Predicted-neuron decoding: speedup against quality, one point per (rank r, candidates c).

  ``rows`` are ``predictor_training.quality`` rows with ``bound`` (the byte bound of the matching setting at
  T5-Large's shape), ``loss_vs_exact``, ``recall`` and, where a benchmark timed the setting,
  ``measured_speedup`` (``predictor_training.attach_measured_speedups``). Lines: the bound; stars: measured.
  Left: against the held-out loss increase over exact Top-k (the 1% line dashed); right: against recall.
  """
  plt = pyplot()
  pts = [r for r in rows if r.get("variant") == "predicted"]
  if not pts:
    raise ValueError("no predicted rows to plot")
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for rank in sorted({r["predictor_rank"] for r in pts}):
    line = sorted((r for r in pts if r["predictor_rank"] == rank), key=lambda r: r["candidates"])
    y = [r.get("bound", r.get("speedup")) for r in line]
    (drawn,) = left.plot([100 * r["loss_vs_exact"] for r in line], y, "o-", label=f"r={rank}, bound")
    right.plot([r["recall"] for r in line], y, "o-", color=drawn.get_color(), label=f"r={rank}, bound")
    timed = [r for r in line if "measured_speedup" in r]
    if timed:
      for ax, key in ((left, "loss_vs_exact"), (right, "recall")):
        scale = 100 if key == "loss_vs_exact" else 1
        ax.plot([scale * r[key] for r in timed], [r["measured_speedup"] for r in timed], "*", ms=11,
                color=drawn.get_color(), label=f"r={rank}, measured")
    for r, yy in zip(line, y):
      left.annotate(f"c={r['candidates']}", (100 * r["loss_vs_exact"], yy), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
  left.axvline(1.0, ls="--", color="gray", lw=1)
  left.set_xlabel("held-out loss over exact Top-k (%)")
  right.set_xlabel("recall of the exact Top-k set")
  measured_on = next((r["measured_on"] for r in pts if "measured_on" in r), None)
  for ax in (left, right):
    ax.set_ylabel("speedup over dense" + (f"\n(measured: {measured_on})" if measured_on else " (bytes bound)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Predicted-neuron decoding: speed against quality")
  fig.tight_layout()
  return save(fig, path)
