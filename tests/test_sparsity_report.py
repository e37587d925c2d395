"""Sparsity reports: the numbers equal a direct count, the trainer's logs read back, the files are written."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from topk_transformers import checkpoints, layers, sparsity_report, train
from topk_transformers import partitioning
from topk_transformers import runs as runs_lib
from topk_transformers.commands import sparsity as sparsity_command
from topk_transformers.t5 import model as t5_model
from topk_transformers.t5 import network
from toy import ToyDataset, ToyModel

SEED = 3
BATCH = 32
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "sparsity")


def _train_toy(model_dir, steps):
  return train.train(model=ToyModel(), dataset=ToyDataset(), model_dir=str(model_dir), train_steps=steps,
                     batch_size=BATCH, optimizer=optax.adam, learning_rate=lambda s: 3e-2, eval_period=3,
                     eval_steps=2, log_period=2, checkpoint_period=3, keep_checkpoints=None, seed=SEED)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A 6-step toy run: train sparsity logged every 2 steps; eval (2 batches) and checkpoints at 3 and 6."""
  model_dir = tmp_path_factory.mktemp("toy_run")
  return str(model_dir), _train_toy(model_dir, 6)


@pytest.fixture(scope="module")
def runs(toy_run):
  """The toy model at init and after training (one compiled eval step for both)."""
  init = runs_lib.load_run("init", batch_size=BATCH, seed=SEED, model=ToyModel(), dataset=ToyDataset())
  return {"init": init, "trained": init.with_params(toy_run[0])}


def _direct_toy_counts(params, eval_steps):
  """relu(x @ embed @ wi) counted from the params, batch by batch: (per-neuron fire counts, tokens)."""
  ds = ToyDataset().get_dataset("validation", BATCH, shuffle=False, repeat=False)
  fires, tokens = 0, 0
  for i, batch in enumerate(ds.as_numpy_iterator()):
    if i >= eval_steps:
      break
    h = jnp.dot(jnp.asarray(batch["x"]), params["embed"]["kernel"])
    a = jnp.maximum(jnp.dot(h, params["mlp"]["wi"]["kernel"]), 0.0)
    fires = fires + np.asarray(a != 0, np.int64).sum(0)
    tokens += len(batch["x"])
  return fires, tokens


@pytest.mark.parametrize("source", ["init", "trained"])
def test_toy_measurement_equals_direct_count(runs, source):
  run = runs[source]
  assert run.step == (0 if source == "init" else 6)
  m = sparsity_report.measure(run, "validation", eval_steps=3)
  fires, tokens = _direct_toy_counts(run.params, 3)
  assert m.token_count == {"mlp": float(tokens)} and tokens == 3 * BATCH
  np.testing.assert_array_equal(np.round(m.firing_frequency["mlp"] * tokens), fires)
  width = fires.size
  assert m.percent_nonzero["mlp"] == pytest.approx(100.0 * fires.sum() / (tokens * width), rel=1e-12)
  assert 0.0 < m.percent_nonzero["mlp"] < 100.0  # a count that could be wrong either way


def test_histogram_sums_to_neurons_and_fire_counts_to_nonzero_count(runs):
  m = sparsity_report.measure(runs["trained"], "validation", eval_steps=3)
  freq, tokens = m.firing_frequency["mlp"], m.token_count["mlp"]
  summary = m.summary(bins=10)["firing"]["mlp"]
  assert sum(summary["histogram"]) == freq.size == 64
  # Every neuron's fire count is a whole number of the counted tokens, and they add up to the nonzeros.
  fire_counts = freq * tokens
  np.testing.assert_allclose(fire_counts, np.round(fire_counts), atol=1e-9)
  assert fire_counts.sum() == pytest.approx(m.percent_nonzero["mlp"] / 100.0 * tokens * freq.size, rel=1e-12)
  assert summary["mean"] == pytest.approx(m.percent_nonzero["mlp"] / 100.0, rel=1e-12)
  counts, edges = sparsity_report.firing_histogram(np.array([0.0, 0.05, 0.5, 0.999, 1.0]), bins=4)
  assert counts.tolist() == [2, 0, 1, 2] and edges.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_firing_shares_on_hand_built_frequencies_with_the_10pct_boundary_excluded():
  tokens = 20
  fires = np.array([0, 0, 1, 2, 3, 20, 1, 0])  # 2/20 is exactly 10%: not "fewer than 10%"
  freq = fires / tokens
  assert sparsity_report.fraction_firing_below(freq) == 5 / 8  # three 0s and two 1/20s (never-firing included)
  assert sparsity_report.fraction_never_firing(freq) == 3 / 8
  # float32 frequencies, as a device might give them: exactly 10% stays out, just under is in.
  f32 = np.array([100, 99, 0, 101], np.float32) / np.float32(1000)
  assert sparsity_report.fraction_firing_below(f32) == 2 / 4
  assert sparsity_report.fraction_firing_below(np.array([0.1, 0.0999999, 0.2])) == 1 / 3
  summary = sparsity_report.firing_summary(freq)
  assert summary["fraction_firing_below_10pct"] == 5 / 8 and summary["fraction_never_firing"] == 3 / 8
  # The default 20-bin histogram's first two bins are exactly the units below 10%.
  assert sum(summary["histogram"][:2]) / summary["num_neurons"] == summary["fraction_firing_below_10pct"]
  assert sparsity_report.fraction_firing_below(np.ones(5)) == 0.0
  assert sparsity_report.fraction_never_firing(np.zeros(5)) == 1.0
  for bad in (np.array([]), np.zeros((2, 3))):
    with pytest.raises(ValueError, match="non-empty"):
      sparsity_report.fraction_firing_below(bad)


def test_measurement_reports_the_firing_shares_per_layer_and_in_its_table(runs):
  m = sparsity_report.measure(runs["trained"], "validation", eval_steps=3)
  fires, tokens = _direct_toy_counts(runs["trained"].params, 3)
  below, never = np.mean(fires * 10 < tokens), np.mean(fires == 0)  # counted in integers
  summary = m.summary()
  assert summary["fraction_firing_below_10pct"] == {"mlp": pytest.approx(below, abs=0)}
  assert summary["fraction_never_firing"] == {"mlp": pytest.approx(never, abs=0)}
  assert summary["firing"]["mlp"]["fraction_firing_below_10pct"] == below
  table = sparsity_report.format_report([m])
  assert "% of units firing on < 10% of tokens / never firing" in table
  assert f"{100 * below:.1f} / {100 * never:.1f}" in table.split("never firing")[-1]


def test_per_batch_figures_add_up_to_the_pass_and_equal_a_direct_count_of_each_batch(runs):
  m = sparsity_report.measure(runs["trained"], "validation", eval_steps=3)
  pb = m.per_batch
  assert len(pb["weight"]) == len(pb["percent_nonzero"]["mlp"]) == 3
  tokens = np.array(pb["token_count"]["mlp"])
  pct = np.array(pb["percent_nonzero"]["mlp"])
  assert tokens.tolist() == [BATCH] * 3
  assert float((pct * tokens).sum() / tokens.sum()) == pytest.approx(m.percent_nonzero["mlp"], rel=1e-12)
  loss = np.array(pb["metrics"]["loss"])
  assert float((loss * pb["weight"]).sum() / np.sum(pb["weight"])) == pytest.approx(m.metrics["loss"], rel=1e-9)
  for i in range(3):  # batch i alone: the direct count of its first i+1 batches minus the first i
    upto, _ = _direct_toy_counts(runs["trained"].params, i + 1)
    before, _ = _direct_toy_counts(runs["trained"].params, i) if i else (0, 0)
    assert pct[i] == pytest.approx(100.0 * (upto - before).sum() / (BATCH * 64), rel=1e-12)
  assert len(set(np.round(pct, 9))) > 1  # the batches differ, so a spread over them is measurable
  assert m.summary()["per_batch"] == pb


def test_init_is_the_trainers_step_zero(runs, tmp_path):
  _train_toy(tmp_path, 0)  # writes only the step-0 checkpoint
  init = runs["init"].params
  saved, step = checkpoints.restore_params(str(tmp_path), init, runs["init"].params_shardings)
  assert step == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(saved), jax.device_get(init))
  other = runs_lib.init_params(ToyModel(), runs["init"].input_shapes, SEED + 1)
  assert not np.array_equal(other["mlp"]["wi"]["kernel"], saved["mlp"]["wi"]["kernel"])


def test_event_curves_are_the_trainers_logged_values(toy_run, runs):
  model_dir, result = toy_run
  curves = sparsity_report.read_event_sparsity(model_dir)
  steps, values = curves["train"]["mlp"]
  assert steps == [step for step, _ in result.log] and {2, 4, 6} <= set(steps)
  np.testing.assert_allclose(values, [metrics["sparsity/mlp"] for _, metrics in result.log], rtol=1e-6)
  eval_steps, eval_values = curves["eval"]["mlp"]
  assert eval_steps == [3, 6]
  assert eval_values[-1] == pytest.approx(result.sparsity["mlp"], rel=1e-6)
  # The trainer's eval (2 batches of the eval split) is what measure() computes on the final params.
  m = sparsity_report.measure(runs["trained"], "validation", eval_steps=2)
  assert m.percent_nonzero["mlp"] == pytest.approx(eval_values[-1], rel=1e-6)


def test_checkpoint_curves_remeasure_init_and_every_saved_step(toy_run, runs):
  model_dir, _ = toy_run
  curves = sparsity_report.checkpoint_sparsity(model_dir, "validation", 2, BATCH, seed=SEED, model=ToyModel(),
                                               dataset=ToyDataset())
  steps, values = curves["validation"]["mlp"]
  assert steps == [0, 3, 6]
  _, logged = sparsity_report.read_event_sparsity(model_dir)["eval"]["mlp"]
  np.testing.assert_allclose(values[1:], logged, rtol=1e-6)
  init = sparsity_report.measure(runs["init"], "validation", eval_steps=2)
  assert values[0] == pytest.approx(init.percent_nonzero["mlp"], rel=1e-12)


def test_event_reader_keeps_a_restarted_runs_later_value(tmp_path):
  from clu import metric_writers

  for i, value in enumerate((10.0, 20.0)):  # a restart rewrites step 5
    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    writer.write_scalars(5 + 5 * i, {"train/sparsity/decoder/layers_10": value, "train/loss": 1.0})
    writer.write_scalars(5, {"train/sparsity/decoder/layers_10": value + 1, "eval/sparsity/encoder/layers_2": 7.0})
    writer.close()
    if i == 0:
      import time
      time.sleep(1.1)  # event file names carry the second they were opened
  curves = sparsity_report.read_event_sparsity(str(tmp_path))
  assert curves["train"] == {"decoder/layers_10": ([5, 10], [21.0, 20.0])}
  assert curves["eval"] == {"encoder/layers_2": ([5], [7.0])}
  with pytest.raises(ValueError, match="not a directory"):
    sparsity_report.read_event_sparsity(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------
# T5: encoder and decoder apart, padding excluded, counted by hand.
# ---------------------------------------------------------------------------

VOCAB = 40


class PaddedT5Data:
  """Three fixed batches of 2 with encoder and target padding."""

  train_split = eval_split = "validation"

  def get_dataset(self, split, batch_size, shard_id=0, num_shards=1, seed=0, shuffle=True, repeat=True):
    rng = np.random.RandomState(7)
    n, enc_len, dec_len = 3 * batch_size, 10, 6
    enc = rng.randint(1, VOCAB, (n, enc_len)).astype(np.int32)
    tgt = rng.randint(1, VOCAB, (n, dec_len)).astype(np.int32)
    for i in range(n):  # every other example is padded, by a different amount
      if i % 2:
        enc[i, enc_len - i % 7 - 1:] = 0
        tgt[i, dec_len - i % 4 - 1:] = 0
    dec_in = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], 1)
    ds = tf.data.Dataset.from_tensor_slices(dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in,
                                                 decoder_target_tokens=tgt))
    return ds.batch(batch_size)


def test_t5_measurement_equals_hand_count_per_stack_without_padding(tiny_t5_config):
  cfg = tiny_t5_config(vocab_size=VOCAB, num_decoder_layers=2, mlp_dim=24, logits_via_embedding=True)
  model = t5_model.EncoderDecoderModel(network.Transformer(cfg), z_loss=0.0)
  run = runs_lib.load_run("init", batch_size=2, seed=0, model=model, dataset=PaddedT5Data())
  m = sparsity_report.measure(run, "validation", eval_steps=2)
  assert list(m.percent_nonzero) == ["encoder/layers_0", "decoder/layers_0", "decoder/layers_1"]
  fires, tokens = {}, {}
  is_mlp_input = lambda mdl, name: isinstance(mdl, layers.LayerNorm) and mdl.name == "pre_mlp_layer_norm"

  @jax.jit
  def mlp_inputs(params, batch):  # the inputs of every MLP, captured from the pre-MLP layer norms
    _, state = model.module.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                  batch["decoder_target_tokens"], enable_dropout=False,
                                  capture_intermediates=is_mlp_input, mutable=["intermediates"])
    return state["intermediates"]

  for batch in list(PaddedT5Data().get_dataset("validation", 2).as_numpy_iterator())[:2]:
    captured = mlp_inputs(run.params, batch)
    real_tokens = {"encoder": batch["encoder_input_tokens"] > 0, "decoder": batch["decoder_target_tokens"] > 0}
    for stack, real in real_tokens.items():
      for name, sub in captured[stack].items():
        y = sub["pre_mlp_layer_norm"]["__call__"][0]
        a = jnp.maximum(jnp.dot(y, run.params[stack][name]["mlp"]["wi"]["kernel"]), 0.0)
        fired = np.asarray(a != 0, np.int64)[real]  # real tokens only
        key = f"{stack}/{name}"
        fires[key] = fires.get(key, 0) + fired.sum(0)
        tokens[key] = tokens.get(key, 0) + int(real.sum())
  for key in m.percent_nonzero:
    assert m.token_count[key] == tokens[key]
    np.testing.assert_array_equal(np.round(m.firing_frequency[key] * tokens[key]), fires[key])
    assert m.percent_nonzero[key] == pytest.approx(100.0 * fires[key].sum() / (tokens[key] * 24), rel=1e-12)
  assert tokens["encoder/layers_0"] < 2 * 2 * 10 and tokens["decoder/layers_0"] < 2 * 2 * 6  # padding was there
  assert m.metrics["loss"] > 0
  means = sparsity_report.stack_means(m.percent_nonzero)
  assert means["decoder"] == pytest.approx(np.mean([m.percent_nonzero[f"decoder/layers_{i}"] for i in range(2)]))
  assert 25.0 < means["all"] < 75.0  # random ReLU features fire about half the time at init


def test_write_report_json_and_pngs(toy_run, runs, tmp_path):
  model_dir, _ = toy_run
  init = sparsity_report.measure(runs["init"], "validation", eval_steps=2)
  trained = sparsity_report.measure(runs["trained"], "validation", eval_steps=2)
  curves = sparsity_report.read_event_sparsity(model_dir)
  report = sparsity_report.write_report([init, trained], str(tmp_path), curves, title="toy")
  with open(tmp_path / "report.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(report))
  assert [r["label"] for r in saved["measurements"]] == ["init", "step 6"]
  assert saved["measurements"][1]["percent_nonzero"]["mlp"] == pytest.approx(trained.percent_nonzero["mlp"])
  assert len(saved["neuron_firing_frequency"][1]["layers"]["mlp"]) == 64
  assert saved["over_steps"]["train"]["mlp"]["steps"] == curves["train"]["mlp"][0]
  assert set(saved["figures"]) == {"per_layer", "firing_init_validation", "firing_step_6_validation", "over_steps"}
  for name in saved["figures"].values():
    with open(tmp_path / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  table = sparsity_report.format_report([init, trained])
  assert "init/validation" in table and f"{trained.percent_nonzero['mlp']:.3f}" in table


# ---------------------------------------------------------------------------
# The command line, through gin (the random-image dataset: tests/test_experiments.py).
# ---------------------------------------------------------------------------

VIT_RANDOM_IMAGES = [f"--gin_file={os.path.join(EXPERIMENTS, name)}" for name in ("vit_dense.gin", "vit_random_images.gin")]


def test_command_init_report_on_random_images_through_gin(tmp_path, capsys):
  out = tmp_path / "report"
  assert sparsity_command.main([*VIT_RANDOM_IMAGES, "--checkpoint=init", "--eval_steps=1", "--batch_size=16",
                                f"--out={out}"]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["step"] == 0 and report["splits"] == ["train", "test"]
  assert [(m["label"], m["split"]) for m in report["measurements"]] == [("init", "train"), ("init", "test")]
  import gin
  tokens = 16 * (16 + (gin.query_parameter("%POOL") == "token"))  # 16 images x (16 patches [+ class token])
  for m in report["measurements"]:
    assert list(m["percent_nonzero"]) == ["Transformer/encoderblock_0", "Transformer/encoderblock_1"]
    assert m["token_count"]["Transformer/encoderblock_0"] == tokens
  assert (out / "per_layer.png").exists() and "over_steps" not in report["figures"]
  for m in report["measurements"]:
    for key in ("fraction_firing_below_10pct", "fraction_never_firing"):
      assert set(m[key]) == set(m["percent_nonzero"]) and all(0.0 <= v <= 1.0 for v in m[key].values())
  printed = capsys.readouterr().out
  assert "% nonzero MLP activations per layer" in printed and "firing on < 10% of tokens" in printed


def test_command_missing_checkpoint_is_one_line_and_exit_1_before_any_data_is_built(tmp_path, capsys):
  assert sparsity_command.main([*VIT_RANDOM_IMAGES, f"--checkpoint={tmp_path / 'nothing'}",
                                f"--out={tmp_path}"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: no checkpoint at") and "\n" not in err


class FourWayDataParallel:
  """A mesh's answers for 4 data-parallel devices on 2 hosts (what check_batch_size asks)."""

  data_parallel_size = 4

  def host_shard_info(self):
    return 0, 2


def test_a_batch_that_does_not_divide_over_the_devices_is_an_error_not_a_rounding():
  runs_lib.check_batch_size(8, FourWayDataParallel())
  runs_lib.check_batch_size(1, partitioning.Partitioner())
  for bad in (6, 2, 0, -4):
    with pytest.raises(runs_lib.ConfigError, match=f"batch_size={bad}"):
      runs_lib.check_batch_size(bad, FourWayDataParallel())
