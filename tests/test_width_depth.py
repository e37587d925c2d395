"""experiments/width_depth/run.py: the sweep's plan, its gin stacks, resumable measuring, intervals and JSON."""

import json
import os

import gin
import numpy as np
import pytest

import experiment_runners

from topk_transformers import gin_utils, intervals
from topk_transformers import sparsity_report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def wd():
  return experiment_runners.load("width_depth")


def test_plan_is_the_two_sweeps_seed_by_seed_sharing_the_base_model(wd):
  sizes = wd.sizes()
  assert [(s.d_ff, s.layers) for s in sizes] == [(256, 2), (512, 2), (1024, 2), (2048, 2), (4096, 2),
                                                 (1024, 1), (1024, 4), (1024, 6)]
  assert sizes[2].sweeps == ("width", "depth") and sizes[0].sweeps == ("width",) and sizes[5].sweeps == ("depth",)
  todo = wd.plan()
  assert len(todo) == 24 and [seed for _, seed in todo[:8]] == [0] * 8 and todo[8][1] == 1
  assert [(s.d_ff, s.layers) for s, _ in todo[:8]] == [(256, 2), (512, 2), (1024, 1), (1024, 2), (2048, 2),
                                                        (1024, 4), (1024, 6), (4096, 2)]  # the cheaper first
  assert set(todo[:8]) == {(s, 0) for s in sizes}
  names = [wd.run_spec(size, seed).name for size, seed in todo]
  assert len(set(names)) == 24 and names[0] == "t5_wd_dff256_layers2_seed0"


@pytest.mark.parametrize("size,seed", [((4096, 2), 2), ((1024, 6), 1), ((256, 2), 0)])
def test_every_runs_gin_stack_binds_its_size_seed_and_the_one_rate_and_budget(wd, size, seed):
  spec = wd.run_spec(wd.Size(*size), seed)
  gin_utils.configure(*spec.configuration("/tmp/unused", None))
  try:
    from topk_transformers.t5 import network  # noqa: F401  (registers T5Config for the query)
    assert gin.query_parameter("network.T5Config.mlp_dim") == size[0]
    assert gin.query_parameter("network.T5Config.num_encoder_layers") == size[1]
    assert gin.query_parameter("network.T5Config.num_decoder_layers") == size[1]
    assert gin.query_parameter("network.T5Config.emb_dim") == 128
    assert gin_utils.get_macro("RANDOM_SEED") == seed and gin_utils.get_macro("TOP_K") is None
    assert gin_utils.get_macro("TRAIN_STEPS") == 3000
    assert gin.query_parameter("train.rsqrt_schedule.warmup_steps") == 4000
    assert wd._tokens_per_step() == 16 * (64 + 16)  # pylint: disable=protected-access
  finally:
    gin.clear_config()


class _FakeRuns:
  """Stands in for training and measuring: a run's % nonzero falls with d_ff and depth, plus seed and batch noise."""

  def __init__(self, sparsity_module, batches=12):
    self.sparsity = sparsity_module
    self.batches = batches
    self.trained, self.measured = [], []

  def train_run(self, spec, out, steps=None):
    run_dir = os.path.join(out, "runs", spec.name)
    os.makedirs(os.path.join(run_dir, "checkpoints", str(steps)), exist_ok=True)
    gin_utils.configure(*spec.configuration(run_dir, steps))
    self.trained.append(spec.name)
    return run_dir, 1.5

  def measure_run(self, spec, run_dir, eval_steps, steps=None, with_init=True, splits="both"):
    gin_utils.configure(*spec.configuration(None, steps))
    d_ff = gin.query_parameter("network.T5Config.mlp_dim")
    layers = gin.query_parameter("network.T5Config.num_encoder_layers")
    seed = gin_utils.get_macro("RANDOM_SEED")
    self.measured.append(spec.name)
    rng = np.random.default_rng(1000 * d_ff + 10 * layers + seed)
    level = 40.0 - 4.0 * np.log2(d_ff / 256) - 2.0 * layers + rng.normal(0, 1.0)
    names = [f"{stack}/layers_{i}" for stack in ("encoder", "decoder") for i in range(layers)]
    n = eval_steps or self.batches
    tokens = rng.integers(900, 1024, n).astype(float)
    per_layer = {name: level + i + rng.normal(0, 2.0, n) for i, name in enumerate(names)}
    loss = 5.0 - 0.1 * np.log2(d_ff / 256) + rng.normal(0, 0.05, n)
    pct = {name: float((v * tokens).sum() / tokens.sum()) for name, v in per_layer.items()}
    freq = {name: np.linspace(0.0, 0.4, 8) for name in names}
    m = report_lib.Measurement(
        label="step 2", split="validation", step=2, metrics={"loss": float(loss.mean()), "accuracy": 0.1},
        percent_nonzero=pct, token_count={name: float(tokens.sum()) for name in names}, firing_frequency=freq,
        per_batch={"weight": (tokens / 4).tolist(), "metrics": {"loss": loss.tolist()},
                   "percent_nonzero": {k: v.tolist() for k, v in per_layer.items()},
                   "token_count": {name: tokens.tolist() for name in names}})
    return [m], 1000 * d_ff * layers


@pytest.fixture
def fake(wd, monkeypatch):
  runs = _FakeRuns(wd.sparsity)
  monkeypatch.setattr(wd.sparsity, "train_run", runs.train_run)
  monkeypatch.setattr(wd.sparsity, "measure_run", runs.measure_run)
  return runs


def test_sweep_writes_intervals_json_and_figure_and_a_rerun_measures_nothing_again(wd, fake, tmp_path, capsys):
  kwargs = dict(widths=(256, 1024), depths=(1, 2), seeds=(0, 1, 2))
  payload = wd.width_depth(str(tmp_path), steps=2, **kwargs)
  assert len(fake.trained) == len(fake.measured) == 9 and not payload["partial"]
  assert payload["runs_done"] == payload["runs_planned"] == 9 and payload["eval_batches"] == 12
  saved = json.loads((tmp_path / "width_depth" / "width_depth.json").read_text())
  assert saved == json.loads(json.dumps(payload))
  assert (tmp_path / "width_depth" / "width_depth.png").read_bytes()[:8] == PNG
  points = {(p["d_ff"], p["layers"]): p for p in saved["points"]}
  assert set(points) == {(256, 2), (1024, 2), (1024, 1)} and points[(1024, 2)]["sweeps"] == ["width", "depth"]
  # The interval is the hierarchical bootstrap of the runs' per-batch values, recomputed here from the JSON.
  runs = [r for r in saved["runs"] if (r["d_ff"], r["layers"]) == (256, 2)]
  layer = runs[0]["last_decoder_layer"]
  assert layer == "decoder/layers_1"
  direct = intervals.hierarchical_interval([r["per_batch"]["percent_nonzero"][layer] for r in runs],
                                           [r["per_batch"]["token_count"][layer] for r in runs],
                                           n_resamples=wd.RESAMPLES, seed=0)
  iv = points[(256, 2)]["last_decoder_layer"]
  assert (iv["estimate"], iv["low"], iv["high"]) == pytest.approx((direct.estimate, direct.low, direct.high), abs=1e-4)
  assert iv["n_seeds"] == 3 and iv["over"] == "seeds and batches" and len(iv["batch_only_half_width"]) == 3
  # Token-weighted batch values give back each run's own % for that layer.
  for r, seed_mean in zip(runs, iv["seed_means"]):
    assert seed_mean == pytest.approx(r["percent_nonzero"][layer], abs=1e-3)
  # The fake's % falls with d_ff: the wider model's interval lies below.
  assert points[(1024, 2)]["mean_of_layers"]["high"] < points[(256, 2)]["mean_of_layers"]["low"]
  # Largest minus smallest of each sweep, paired by seed and batch: the fake's drop is resolved in both sweeps.
  contrast = {c["sweep"]: c for c in saved["contrasts"]}
  assert contrast["width"]["from"] == {"d_ff": 256, "layers": 2} and contrast["width"]["to"]["d_ff"] == 1024
  assert contrast["depth"]["from"]["layers"] == 1 and contrast["depth"]["seeds"] == [0, 1, 2]
  width = contrast["width"]["mean_of_layers"]
  assert width["high"] < 0 and width["estimate"] == pytest.approx(
      points[(1024, 2)]["mean_of_layers"]["estimate"] - points[(256, 2)]["mean_of_layers"]["estimate"], abs=1e-3)
  assert "95% intervals over seeds and eval batches" in capsys.readouterr().out
  # Resumed: every run is done and measured (measurement.json), so nothing is trained or measured again.
  fake.trained.clear(), fake.measured.clear()
  again = wd.width_depth(str(tmp_path), steps=2, **kwargs)
  assert fake.measured == [] and again["points"] == payload["points"]


def test_an_unfinished_sweep_is_labelled_partial_and_one_seed_has_a_batch_only_interval(wd, fake, tmp_path):
  payload = wd.width_depth(str(tmp_path), steps=2, widths=(256, 512), depths=(2,), seeds=(0,), base_width=256)
  assert not payload["partial"] and payload["runs_done"] == 2
  iv = payload["points"][0]["held_out_loss"]
  assert iv["over"] == "batches" and iv["n_seeds"] == 1
  # Measure only: of a 2-seed plan, seed 1 was never trained, so it is partial.
  fake.measured.clear()
  partial = wd.width_depth(str(tmp_path), steps=2, measure_only=True, widths=(256, 512), depths=(2,), seeds=(0, 1),
                          base_width=256)
  assert partial["partial"] and partial["runs_done"] == 2 and partial["runs_planned"] == 4
  assert fake.measured == []  # cached measurements


def test_plot_only_redraws_the_figure_from_the_json(wd, fake, tmp_path):
  wd.width_depth(str(tmp_path), steps=2, widths=(256, 512), depths=(2,), seeds=(0, 1))
  json_path = tmp_path / "width_depth" / "width_depth.json"
  png = tmp_path / "width_depth" / "width_depth.png"
  png.unlink()
  assert wd.main([f"--plot_only={json_path}"]) == 0
  assert png.read_bytes()[:8] == PNG


@pytest.mark.parametrize("argv,message", [
    ([], "--out is required"), (["--out=/tmp/x", "--steps=0"], "--steps must be positive"),
    (["--out=/tmp/x", "--seeds=a"], "--seeds must be comma-separated integers"),
])
def test_argument_errors_are_one_line_and_exit_2(wd, argv, message, capsys):
  assert wd.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "\n" not in err


@pytest.mark.slow
def test_one_tiny_real_run_trains_measures_every_batch_and_resumes(wd, tmp_path, capsys):
  """The real path at toy size: gin stack with the size bound, training, the batch-by-batch measurement."""
  tiny = ("network.T5Config.emb_dim = 16", "network.T5Config.num_heads = 2", "network.T5Config.head_dim = 8",
          "BATCH_SIZE = 4", "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 8}", "EVAL_PERIOD = 2",
          "CHECKPOINT_PERIOD = 2")
  payload = wd.width_depth(str(tmp_path), steps=2, eval_steps=3, seeds=(0,), extra_bindings=tiny, widths=(8,),
                           depths=(1,), base_width=8, base_layers=1)
  (row,) = payload["runs"]
  assert row["name"] == "t5_wd_dff8_layers1_seed0" and row["step"] == 2 and row["eval_batches"] == 3
  assert list(row["percent_nonzero"]) == ["encoder/layers_0", "decoder/layers_0"]
  assert row["last_decoder_layer"] == "decoder/layers_0"
  pct, tokens = wd.batch_values(row, "last_decoder_layer")
  assert float((pct * tokens).sum() / tokens.sum()) == pytest.approx(row["percent_nonzero"]["decoder/layers_0"],
                                                                      abs=1e-3)
  assert payload["points"][0]["held_out_loss"]["over"] == "batches"
  assert (tmp_path / "width_depth" / "width_depth.png").read_bytes()[:8] == PNG
  capsys.readouterr()
  wd.width_depth(str(tmp_path), steps=2, eval_steps=3, seeds=(0,), extra_bindings=tiny, widths=(8,), depths=(1,),
                 base_width=8, base_layers=1)
  assert "already trained" in capsys.readouterr().out


def test_two_sweep_processes_writing_the_table_at_once_do_not_collide(wd, tmp_path):
  # The README runs the sweep as two processes, one per core; both rewrite width_depth.json after each run.
  import threading
  errors = []

  def writer(n):
    try:
      for i in range(200):
        wd.write({"writer": n, "i": i}, str(tmp_path))
    except Exception as e:  # noqa: BLE001 (collected and asserted on below)
      errors.append(repr(e))

  threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  assert json.load(open(tmp_path / "width_depth.json"))["i"] == 199
  assert sorted(os.listdir(tmp_path)) == ["width_depth.json"]  # no temporary file left behind
