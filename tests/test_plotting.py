"""The figures: every plot writes a PNG, and importing the module does not import matplotlib."""

import subprocess
import sys

import numpy as np
import pytest

from topk_transformers import plotting

PNG = b"\x89PNG\r\n\x1a\n"
T5_LAYERS = ["encoder/layers_0", "encoder/layers_1", "decoder/layers_0"]


def _assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG and len(data) > 1000  # a drawn figure, not an empty file


def test_importing_plotting_leaves_matplotlib_unimported():
  code = "import sys; import topk_transformers.plotting; print('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "False"


def test_pyplot_is_agg_and_save_makes_the_directory(tmp_path):
  plt = plotting.pyplot()
  assert plt.get_backend().lower() == "agg"
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  path = tmp_path / "new" / "dir" / "line.png"
  assert plotting.save(fig, str(path)) == str(path)
  _assert_png(path)
  assert not plt.get_fignums()  # save closes the figure


def test_per_layer_one_panel_per_stack_with_styles(tmp_path):
  series = {"init, train": {n: 50.0 for n in T5_LAYERS}, "step 400, validation": dict(zip(T5_LAYERS, (40, 30, 20)))}
  path = plotting.plot_per_layer(series, str(tmp_path / "per_layer.png"), "toy",
                                 styles={"init, train": {"linestyle": "--", "color": "gray"}})
  _assert_png(path)
  # More than four series put the legend outside; a linear axis works too.
  many = {f"run {i}": {"Transformer/encoderblock_0": 10.0 + i} for i in range(6)}
  _assert_png(plotting.plot_per_layer(many, str(tmp_path / "many.png"), log_scale=False))
  with pytest.raises(ValueError, match="no layers"):
    plotting.plot_per_layer({}, str(tmp_path / "empty.png"))


def test_firing_histogram_from_counts_and_edges(tmp_path):
  rng = np.random.RandomState(0)
  histograms = {}
  for name in T5_LAYERS:
    counts, edges = np.histogram(rng.uniform(0, 1, 64), bins=np.linspace(0.0, 1.0, 21))
    histograms[name] = (counts, edges)
  histograms["decoder/layers_0"] = (np.zeros(20, int), histograms["decoder/layers_0"][1])  # empty bins are drawn
  _assert_png(plotting.plot_firing_histogram(histograms, str(tmp_path / "firing.png"), "toy"))
  with pytest.raises(ValueError, match="no layers"):
    plotting.plot_firing_histogram({}, str(tmp_path / "empty.png"))


def test_over_steps_one_panel_per_kind_and_stack_on_a_log_axis(tmp_path):
  steps = [20, 40, 60, 80]
  curves = {"train": {n: (steps, [50.0, 40.0, 30.0, 25.0]) for n in T5_LAYERS},
            "eval": {"encoder/layers_0": ([50, 100], [45.0, 35.0])}}
  _assert_png(plotting.plot_over_steps(curves, str(tmp_path / "over_steps.png"), "toy"))
  with pytest.raises(ValueError, match="no sparsity curves"):
    plotting.plot_over_steps({}, str(tmp_path / "empty.png"))


def test_log_axis_labels_plain_numbers():
  plt = plotting.pyplot()
  fig, ax = plt.subplots()
  ax.plot([1, 2], [3.0, 50.0])
  plotting.log_axis(ax)
  assert ax.get_yscale() == "log"
  assert ax.yaxis.get_major_formatter()(20.0, 0) == "20"
  plt.close(fig)


def test_reliability_diagram(tmp_path):
  edges = np.linspace(0.0, 1.0, 16)
  count = np.array([0] * 10 + [3, 5, 8, 20, 64], float)
  rel = {"bin_edges": edges.tolist(), "count": count.tolist(),
         "accuracy": np.where(count > 0, np.linspace(0.3, 1.0, 15), 0.0).tolist(),
         "confidence": np.where(count > 0, (edges[:-1] + edges[1:]) / 2, 0.0).tolist()}
  _assert_png(plotting.reliability_diagram(rel, str(tmp_path / "reliability.png"), title="topk", ece=0.031))


def _decode_rows(size, truncated):
  rows = [dict(size=size, version="1.0", dtype="float32", variant="dense", method="exact", k=None,
               s_per_token=0.02, speedup=1.0, bound=1.0, truncated=truncated, num_decoder_layers=2,
               published_decoder_layers=24)]
  for variant in ("sparse", "dense_topk"):
    for k in (64, 128, 256):
      rows.append(dict(rows[0], variant=variant, k=k, s_per_token=0.015 + k * 1e-5, speedup=1.3 - k / 1000,
                       bound=1.5 - k / 1000))
  return rows


def test_decode_speedups_one_column_per_size(tmp_path):
  rows = _decode_rows("large", False) + _decode_rows("3B", True)
  _assert_png(plotting.plot_decode_speedups(rows, str(tmp_path / "decode.png")))
  with pytest.raises(ValueError, match="no benchmark rows"):
    plotting.plot_decode_speedups([], str(tmp_path / "empty.png"))
