"""Tests for topk_transformers/vit/model.py: loss, metrics, calibration."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers.errors import ConfigError
from topk_transformers.vit import model as model_lib
from topk_transformers.vit import network

# Six examples, three classes, five bins ((0,.2], (.2,.4], (.4,.6], (.6,.8], (.8,1]).
HAND_PROBS = np.array([
    [0.70, 0.20, 0.10],  # label 0: conf .70, bin 3, correct
    [0.30, 0.65, 0.05],  # label 0: conf .65, bin 3, wrong
    [0.90, 0.05, 0.05],  # label 0: conf .90, bin 4, correct
    [0.05, 0.05, 0.90],  # label 1: conf .90, bin 4, wrong
    [0.95, 0.03, 0.02],  # label 0: conf .95, bin 4, correct
    [0.50, 0.30, 0.20],  # label 2: conf .50, bin 2, wrong
], np.float32)
HAND_LABELS = np.array([0, 0, 0, 1, 0, 2])


def test_ece_hand_computed():
  # bin 2: n=1, acc 0,   conf .5    -> |0 - .5|      * 1/6
  # bin 3: n=2, acc 1/2, conf .675  -> |.5 - .675|   * 2/6
  # bin 4: n=3, acc 2/3, conf 2.75/3 -> |2/3 - 2.75/3| * 3/6
  # ECE = (.5 + .35 + .75) / 6 = 1.6 / 6
  ece = model_lib.expected_calibration_error(HAND_PROBS, HAND_LABELS, num_bins=5)
  np.testing.assert_allclose(float(ece), 1.6 / 6, rtol=1e-6)
  # Dropping the last example by weight: (.35 + .75) / 5.
  weighted = model_lib.expected_calibration_error(HAND_PROBS, HAND_LABELS, num_bins=5,
                                                  weights=np.array([1, 1, 1, 1, 1, 0]))
  np.testing.assert_allclose(float(weighted), 1.1 / 5, rtol=1e-6)


def test_reliability_diagram_hand_computed():
  diagram = model_lib.reliability_diagram(HAND_PROBS, HAND_LABELS, num_bins=5)
  np.testing.assert_array_equal(np.asarray(diagram["count"]), [0, 0, 1, 2, 3])
  np.testing.assert_allclose(np.asarray(diagram["accuracy"]), [0, 0, 0, 0.5, 2 / 3], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(diagram["confidence"]), [0, 0, 0.5, 0.675, 2.75 / 3], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(diagram["bin_edges"]), np.linspace(0, 1, 6), atol=1e-7)


def _reference_ece(probs, labels, num_bins):
  """Guo et al.'s definition, one bin at a time."""
  conf = probs.max(-1)
  correct = probs.argmax(-1) == labels
  total = 0.0
  for m in range(num_bins):
    lo, hi = m / num_bins, (m + 1) / num_bins
    in_bin = (conf > lo) & (conf <= hi)
    if in_bin.any():
      total += abs(correct[in_bin].mean() - conf[in_bin].mean()) * in_bin.mean()
  return total


def test_ece_matches_reference_and_accumulates_over_batches():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 10)) * rng.uniform(0.5, 4.0, size=(500, 1))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = rng.integers(0, 10, size=500)
  ece = float(model_lib.expected_calibration_error(probs, labels))
  np.testing.assert_allclose(ece, _reference_ece(probs, labels, 15), rtol=1e-5)
  assert 0.0 < ece < 1.0
  halves = [model_lib.calibration_bins(probs[s], labels[s]) for s in (slice(0, 250), slice(250, 500))]
  summed = jax.tree_util.tree_map(lambda a, b: a + b, *halves)
  np.testing.assert_allclose(float(model_lib.ece_from_bins(summed)), ece, rtol=1e-5)


def test_ece_bin_edges():
  # Confidence 1.0 is in the last bin; a perfectly confident, correct model has ECE 0.
  probs = np.eye(4, dtype=np.float32)
  bins = model_lib.calibration_bins(probs, np.arange(4), num_bins=15)
  assert float(bins["count"][-1]) == 4
  assert float(model_lib.ece_from_bins(bins)) == 0.0
  # All wrong at confidence 1.0: ECE 1.
  assert float(model_lib.expected_calibration_error(probs, np.array([1, 2, 3, 0]))) == 1.0


def test_num_bins_must_be_positive():
  with pytest.raises(ValueError, match="num_bins must be a positive integer, got 0"):
    model_lib.calibration_bins(HAND_PROBS, HAND_LABELS, num_bins=0)


# --- ClassificationModel ------------------------------------------------------------
# The trainer jits loss_fn / eval_fn; so do these tests (one compile per model beats
# JAX's per-operation compiles on CPU).

NUM_CLASSES = 5
SMOOTHING = 0.2


def _model(label_smoothing=0.0, **vit_kwargs):
  vit = network.ViT(variant="Test/4", num_classes=NUM_CLASSES, **vit_kwargs)
  return model_lib.ClassificationModel(vit, label_smoothing=label_smoothing)


def _batch(weight=None):
  batch = {
      "image": jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 3)),  # 2x2 patches of 4x4
      "label": jnp.arange(6) % NUM_CLASSES,
  }
  if weight is not None:
    batch["weight"] = jnp.asarray(weight, jnp.float32)
  return batch


@pytest.fixture(scope="module")
def abstract_variables():
  # Abstract (jax.eval_shape): a real initialisation compiles every initialiser, slow on CPU;
  # tests/test_vit_network.py runs the real one.
  model = _model()
  return jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), {"image": (2, 8, 8, 3)}))


def _random_params(abstract, seed, zero_head=False):
  """Gaussian params scaled by 1/sqrt(fan-in), LayerNorm scales 1; optionally ViT's zero head."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if zero_head and "head" in names:
      return jnp.zeros(leaf.shape, jnp.float32)
    if names[-1] == "scale":
      return jnp.ones(leaf.shape, jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract["params"]))


@pytest.fixture(scope="module")
def params(abstract_variables):
  return _random_params(abstract_variables, seed=1)


@pytest.fixture(scope="module")
def smoothed_loss_fn():
  model = _model(label_smoothing=SMOOTHING)
  return model, jax.jit(model.loss_fn)


def test_initial_variables_are_boxed_params_only(abstract_variables):
  assert set(abstract_variables) == {"params"}
  wi = abstract_variables["params"]["Transformer"]["encoderblock_0"]["mlp"]["wi"]["kernel"]
  assert isinstance(wi, nn.LogicallyPartitioned) and wi.names == ("embed", "mlp")
  assert wi.value.shape == (32, 64) and wi.value.dtype == jnp.float32


def test_zero_head_loss_is_log_num_classes(abstract_variables, smoothed_loss_fn):
  # ViT's zero head predicts the uniform distribution, whatever the smoothing.
  _, loss_fn = smoothed_loss_fn
  loss, _ = loss_fn(_random_params(abstract_variables, seed=2, zero_head=True), _batch(), None)
  np.testing.assert_allclose(float(loss), np.log(NUM_CLASSES), rtol=1e-6)


def _numpy_metrics(logits, labels, weight, label_smoothing):
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.eye(NUM_CLASSES)[labels] * (1 - label_smoothing) + label_smoothing / NUM_CLASSES
  per_example = -(targets * log_probs).sum(-1)
  loss = (per_example * weight).sum() / weight.sum()
  accuracy = ((logits.argmax(-1) == labels) * weight).sum() / weight.sum()
  return loss, accuracy


WEIGHT = np.array([1, 1, 0, 1, 0.5, 1], np.float32)


def test_loss_and_accuracy_match_numpy(params, smoothed_loss_fn):
  model, loss_fn = smoothed_loss_fn
  batch = _batch(weight=WEIGHT)
  loss, aux = loss_fn(params, batch, None)
  logits = model.module.apply({"params": params}, batch["image"], train=False)
  expected_loss, expected_acc = _numpy_metrics(logits, np.asarray(batch["label"]), WEIGHT, SMOOTHING)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  metrics = aux["metrics"]
  np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), expected_acc, rtol=1e-6)
  assert float(metrics["num_examples"]) == WEIGHT.sum()
  assert 0.0 < expected_acc < 1.0  # the check on accuracy is not vacuous


def test_eval_fn_metrics_calibration_sums_and_finalized_ece(params):
  model = _model()
  batch = _batch(weight=WEIGHT)
  out = jax.jit(model.eval_fn)(params, batch)
  logits = model.module.apply({"params": params}, batch["image"], train=False)
  expected_loss, expected_acc = _numpy_metrics(logits, np.asarray(batch["label"]), WEIGHT, 0.0)
  np.testing.assert_allclose(float(out["metrics"]["loss"]), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(float(out["metrics"]["accuracy"]), expected_acc, rtol=1e-6)
  assert float(out["weight"]) == WEIGHT.sum()
  bins = out["sums"]["calibration"]
  assert float(bins["count"].sum()) == WEIGHT.sum()
  expected_ece = model_lib.expected_calibration_error(jax.nn.softmax(logits), batch["label"], weights=WEIGHT)
  np.testing.assert_allclose(float(model_lib.ece_from_bins(bins)), float(expected_ece), rtol=1e-6)
  # The split's ECE comes from the summed bins: two copies of the batch give the same ECE.
  doubled = jax.tree_util.tree_map(lambda a: 2 * np.asarray(a), bins)
  np.testing.assert_allclose(float(model_lib.ece_from_bins(doubled)), float(expected_ece), rtol=1e-6)
  assert set(out["metrics"]) == {"loss", "accuracy"}
  assert set(out["intermediates"]["Transformer"]) == {"encoderblock_0", "encoderblock_1"}


def test_predict_batch_gives_the_softmax_of_the_logits(params):
  model = _model()
  batch = _batch(weight=WEIGHT)
  probs = jax.jit(model.predict_batch)(params, batch)
  logits = model.module.apply({"params": params}, batch["image"], train=False)
  np.testing.assert_allclose(np.asarray(probs), np.asarray(jax.nn.softmax(logits)), rtol=1e-5, atol=1e-6)


def test_loss_fn_returns_sparsity_intermediates_and_gradients(params):
  model = _model(top_k=3, mlp_activation="relu")
  grad_fn = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))
  (loss, aux), grads = grad_fn(params, _batch(), None)
  assert np.isfinite(float(loss))
  tokens = 6 * (4 + 1)
  for i in range(2):
    stats = aux["intermediates"]["Transformer"][f"encoderblock_{i}"]["mlp"]
    assert float(stats["token_count"][0]) == tokens
    # At init about half the ReLU units are positive, so Top-3 keeps exactly 3 per token.
    assert float(stats["nonzero_count"][0]) == 3 * tokens
  assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0
  wi_grad = grads["Transformer"]["encoderblock_0"]["mlp"]["wi"]["kernel"]
  # Only units that were kept for some token get a gradient.
  fired = np.asarray(aux["intermediates"]["Transformer"]["encoderblock_0"]["mlp"]["neuron_fire_count"][0]) > 0
  grad_per_unit = np.abs(np.asarray(wi_grad)).sum(0)
  assert np.all(grad_per_unit[~fired] == 0) and np.all(grad_per_unit[fired] > 0) and not fired.all()


def test_padding_images_of_weight_0_stay_out_of_the_sparsity_statistics(params):
  """An eval split's last batch is padded with zero images of weight 0 (``data/vision.py``): the MLP statistics
  (and so % nonzero and the firing statistic) must be those of the real images alone."""
  model = _model(mlp_activation="relu")
  eval_fn = jax.jit(model.eval_fn)
  real = _batch()
  real = {"image": real["image"][:4], "label": real["label"][:4], "weight": jnp.ones((4,), jnp.float32)}
  padded = {"image": jnp.concatenate([real["image"], jnp.zeros((2, 8, 8, 3))]),
            "label": jnp.concatenate([real["label"], jnp.zeros((2,), jnp.int32)]),
            "weight": jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)}
  alone = eval_fn(params, real)["intermediates"]["Transformer"]
  with_padding = eval_fn(params, padded)["intermediates"]["Transformer"]
  unmasked = eval_fn(params, {k: v for k, v in padded.items() if k != "weight"})["intermediates"]["Transformer"]
  for block in ("encoderblock_0", "encoderblock_1"):
    for name in ("token_count", "nonzero_count", "neuron_fire_count"):
      np.testing.assert_array_equal(np.asarray(with_padding[block]["mlp"][name][0]),
                                    np.asarray(alone[block]["mlp"][name][0]), err_msg=f"{block}/{name}")
    # Without the weights the two zero images count: 5 more tokens each.
    assert float(unmasked[block]["mlp"]["token_count"][0]) == float(alone[block]["mlp"]["token_count"][0]) + 2 * 5
  assert float(alone["encoderblock_0"]["mlp"]["token_count"][0]) == 4 * 5


def test_dropout_rng_switches_dropout_on(params):
  model = _model(dropout_rate=0.3)
  loss_fn = jax.jit(model.loss_fn)
  batch = _batch()
  no_dropout, _ = loss_fn(params, batch, None)
  logits = model.module.apply({"params": params}, batch["image"], train=False)
  expected, _ = _numpy_metrics(logits, np.asarray(batch["label"]), np.ones(6), 0.0)
  np.testing.assert_allclose(float(no_dropout), expected, rtol=1e-5)
  a, _ = loss_fn(params, batch, jax.random.PRNGKey(7))
  b, _ = loss_fn(params, batch, jax.random.PRNGKey(7))
  c, _ = loss_fn(params, batch, jax.random.PRNGKey(8))
  assert float(a) == float(b) and float(a) != float(no_dropout) and float(a) != float(c)


def test_bad_label_smoothing():
  with pytest.raises(ValueError, match="label_smoothing must be in"):
    _model(label_smoothing=1.0)


def test_contract_methods_a_vit_reads_project_checkpoints_only_and_sweeps_its_top_k():
  model = _model(top_k=3, mlp_activation="relu")
  with pytest.raises(ConfigError, match="initial_checkpoint_format='hf': ClassificationModel reads project "
                                        "checkpoints only"):
    model.load_initial_params("/nowhere", "hf", None, None)
  dense = model.with_top_k(None)
  assert (dense.module.top_k, model.module.top_k) == (None, 3)  # a copy: the model itself keeps its k
  facts = dense.describe()
  assert (facts.top_k, facts.mlp.top_k, facts.variant, facts.mlp_activation) == (None, None, "Test/4", "relu")
  with pytest.raises(dataclasses.FrozenInstanceError):
    facts.top_k = 3
