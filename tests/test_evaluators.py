"""The evaluators (topk_transformers/evaluators/) against hand computations, and the trainer and topk-eval
running the same list to the same numbers."""

import json

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from topk_transformers import evaluate, evaluators, runs, train
from topk_transformers.errors import ConfigError
from topk_transformers.vit import model as vit_model
from topk_transformers.vit import network as vit_network
from toy import ToyDataset, ToyModel, ToyNet

K = 8  # of ToyNet's 64 hidden units
BATCH = 32


def _toy_run(checkpoint=runs.INIT, **kw):
  return runs.load_run(checkpoint, model=ToyModel(ToyNet(top_k=K)), dataset=ToyDataset(), batch_size=BATCH, **kw)


def _batches(dataset, split, n):
  ds = dataset.get_dataset(split, BATCH, shuffle=False, repeat=False)
  return list(ds.take(n).as_numpy_iterator())


def _toy_by_hand(params, batches):
  """ToyNet's loss, accuracy and MLP counts written out in numpy: x @ embed, ReLU(h @ wi) with the K largest
  kept per example, + h, @ head."""
  p = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(params))
  losses, accs, nonzero, fired, tokens = [], [], 0.0, np.zeros(64), 0.0
  for b in batches:
    h = b["x"] @ p["embed"]["kernel"]
    hidden = np.maximum(h @ p["mlp"]["wi"]["kernel"], 0.0)
    kth = np.sort(hidden, axis=-1)[:, -K][:, None]
    hidden = np.where(hidden >= kth, hidden, 0.0)
    logits = (h + hidden @ p["mlp"]["wo"]["kernel"]) @ p["head"]["kernel"]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    losses.append(-np.mean(logp[np.arange(len(b["y"])), b["y"]]))
    accs.append(np.mean(logits.argmax(-1) == b["y"]))
    nonzero += np.sum(hidden > 0)
    fired += np.sum(hidden > 0, axis=0)
    tokens += len(b["y"])
  return {"loss": np.mean(losses), "accuracy": np.mean(accs)}, 100 * nonzero / (tokens * 64), fired / tokens, tokens


def test_metrics_and_sparsity_evaluators_match_a_hand_computation():
  run = _toy_run()
  built = evaluators.for_run(run, [evaluators.MetricsEvaluator, evaluators.SparsityEvaluator], "validation",
                             eval_steps=3)
  results = evaluators.run_all(built, run.params)
  metrics, percent, frequency, tokens = _toy_by_hand(run.params, _batches(run.dataset, "validation", 3))
  assert set(results) == {"loss", "accuracy", "sparsity/mlp", "tokens_counted", "firing_frequency"}
  np.testing.assert_allclose(results["loss"], metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(results["accuracy"], metrics["accuracy"], rtol=1e-6)
  np.testing.assert_allclose(results["sparsity/mlp"], percent, rtol=1e-6)
  assert 0 < results["sparsity/mlp"] <= 100 * K / 64  # Top-k is on: at most K of 64 units per example
  assert results["tokens_counted"] == {"mlp": tokens} == {"mlp": 3 * BATCH}
  np.testing.assert_allclose(results["firing_frequency"]["mlp"], frequency, rtol=1e-6)


def test_evaluators_of_one_evaluation_share_one_pass():
  run = _toy_run()
  loop = run.eval_loop("validation", eval_steps=2)
  calls = []
  step = loop.eval_step
  loop.eval_step = lambda params, batch: calls.append(1) or step(params, batch)
  built = evaluators.build(evaluators.DEFAULT, run.model, run.dataset, "validation", loop=loop)
  evaluators.run_all(built, run.params)
  assert len(calls) == 2  # three evaluators, two batches, one pass
  evaluators.run_all(built, run.with_params(runs.INIT).params)  # other params: a new pass
  assert len(calls) == 4


class _Images:
  """Random 8x8 images with labels; the eval split's last batch is padded with weight 0."""

  train_split, eval_split = "train", "test"
  label_noise, tfds_name = 0.0, "random"

  def __init__(self, n=40, seed=0):
    rng = np.random.RandomState(seed)
    self.images = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    self.labels = rng.randint(0, 10, size=n).astype(np.int32)

  def _ds(self, images, labels, batch_size):
    pad = -len(labels) % batch_size
    weight = np.concatenate([np.ones(len(labels), np.float32), np.zeros(pad, np.float32)])
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels, "weight": weight}).batch(batch_size)

  def get_dataset(self, split, batch_size, shard_id=0, num_shards=1, seed=0, shuffle=False, repeat=False):
    return self._ds(self.images, self.labels, batch_size)

  def get_corrupted_dataset(self, corruption, severity, batch_size, seed=0):
    assert corruption == "negated"
    return self._ds(-self.images * severity, self.labels, batch_size)


def _vit_run(tmp_path=None):
  module = vit_network.ViT(variant="Test/2", num_classes=10, image_size=8, top_k=5, pool_type="gap")
  return runs.load_run(runs.INIT, model=vit_model.ClassificationModel(module), dataset=_Images(), batch_size=16)


def _ece_by_hand(probs, labels, bins=15):
  """Guo et al.: sum over bins ((m-1)/M, m/M] of |accuracy - confidence| * n_m / n."""
  conf, pred = probs.max(-1), probs.argmax(-1)
  ece = 0.0
  for m in range(bins):
    inside = (conf > m / bins) & (conf <= (m + 1) / bins)
    if inside.any():
      ece += abs(np.mean(pred[inside] == labels[inside]) - np.mean(conf[inside])) * inside.sum() / len(labels)
  return ece


def _probs(run, images):
  logits = run.model.module.apply({"params": run.params}, images, train=False)
  return np.asarray(jax.nn.softmax(logits.astype(jnp.float32)), np.float64)


def test_calibration_evaluator_gives_the_ece_of_the_whole_split_not_a_mean_over_batches():
  run = _vit_run()
  results = evaluators.run_all(evaluators.for_run(run, [evaluators.CalibrationEvaluator]), run.params)
  data = run.dataset
  probs = _probs(run, data.images)
  np.testing.assert_allclose(results["ece"], _ece_by_hand(probs, data.labels), rtol=1e-5)
  rel = results["reliability"]
  assert sum(rel["count"]) == 40  # padding left out
  assert len(rel["bin_edges"]) == 16 and rel["bin_edges"][-1] == 1.0
  # A model whose eval gives no calibration bins yields nothing.
  toy = _toy_run()
  assert evaluators.run_all(evaluators.for_run(toy, [evaluators.CalibrationEvaluator], eval_steps=1),
                            toy.params) == {}


def test_corruption_evaluator_measures_table1_and_writes_the_results_file(tmp_path):
  run = _vit_run()
  factory = lambda *a, **kw: evaluators.CorruptionEvaluator(*a, corruptions=["negated"], severities=[1, 2],
                                                            name="topk", seed=3, **kw)
  built = evaluators.for_run(run, [factory], results_dir=str(tmp_path))
  assert not built[0].during_training
  rob = evaluators.run_all(built, run.params)["robustness"]
  data = run.dataset
  clean = _probs(run, data.images)
  assert rob["accuracy"] == pytest.approx(np.mean(clean.argmax(-1) == data.labels))
  np.testing.assert_allclose(rob["ece"], _ece_by_hand(clean, data.labels), rtol=1e-5)
  for severity in (1, 2):
    acc = np.mean(_probs(run, -data.images * severity).argmax(-1) == data.labels)
    assert rob["corruptions"]["negated"][str(severity)] == pytest.approx(acc)
  assert (rob["name"], rob["seed"], rob["top_k"], rob["step"], rob["num_examples"]) == ("topk", 3, 5, 0, 40)
  with open(tmp_path / "eval_results.json") as f:
    assert json.load(f)["corruptions"] == rob["corruptions"]
  assert (tmp_path / "reliability_diagram.png").exists()
  assert rob["summary"].startswith("topk (label noise 0): top-1 ")


def test_trainer_and_topk_eval_give_the_same_numbers_through_the_same_list(tmp_path):
  ran = []

  class FinishedRunOnly(evaluators.MetricsEvaluator):
    during_training = False
    key = "finished"

    def run(self, params):
      ran.append(self.step)
      yield "finished", {"summary": "done"}

  listed = [evaluators.MetricsEvaluator, evaluators.SparsityEvaluator, FinishedRunOnly]
  result = train.train(model=ToyModel(ToyNet(top_k=K)), dataset=ToyDataset(), model_dir=str(tmp_path), train_steps=6,
                       batch_size=BATCH, optimizer=optax.adam, learning_rate=lambda s: 1e-2, eval_period=6,
                       eval_steps=None, log_period=3, checkpoint_period=6, evaluators=listed)
  assert ran == []  # the trainer leaves a finished run's measurements to topk-eval
  evaluated = evaluate.evaluate(_toy_run(str(tmp_path)), evaluators=listed)
  assert ran == [6]
  assert evaluated["metrics"] == result.eval_metrics and set(result.eval_metrics) == {"loss", "accuracy"}
  assert evaluated["percent_nonzero"] == result.sparsity and set(result.sparsity) == {"mlp"}
  assert evaluated["evaluators"] == ["finished"] and evaluated["finished"] == {"summary": "done"}
  assert evaluated["tokens_counted"] == {"mlp": float(len(ToyDataset().y) // 8)}


def test_evaluators_macro_lists_classes_and_defaults_to_metrics_sparsity_calibration():
  gin.clear_config()
  assert evaluators.from_gin() == evaluators.DEFAULT
  gin.parse_config("from __gin__ import dynamic_registration\nfrom topk_transformers import evaluators\n"
                   "EVALUATORS = [@evaluators.MetricsEvaluator()]")
  with pytest.raises(ConfigError, match="without ()"):
    evaluators.from_gin()
  gin.clear_config()


def test_two_evaluators_reporting_one_name_is_an_error():
  run = _toy_run()
  built = evaluators.for_run(run, [evaluators.MetricsEvaluator, evaluators.MetricsEvaluator], eval_steps=1)
  with pytest.raises(ConfigError, match="two evaluators report 'accuracy'"):
    evaluators.run_all(built, run.params)
