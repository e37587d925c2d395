"""ViT as a trainable model: classification loss, accuracy, and calibration (ECE).

:class:`ClassificationModel` implements ``models.BaseModel``, with
``input_shapes = {"image": (B, H, W, C)}`` and batches
``{"image": float [B, H, W, C], "label": int [B]}`` plus an optional
``"weight"`` ``[B]`` (0 for padding examples). Its evaluation gives each
batch's calibration bins, which ``evaluators.CalibrationEvaluator`` sums over
the split and finishes with the ECE.

Calibration follows Guo et al. (2017), as in the paper's Table 1: confidences
(the top softmax probability) fall into ``num_bins`` equal-width bins, bin ``m``
holding ``((m-1)/M, m/M]``, and ``ECE = sum_m |acc_m - conf_m| * n_m / n``.
:func:`calibration_bins` returns per-bin sums that add up across batches, so an
evaluator can accumulate them over a whole dataset and finish with
:func:`ece_from_bins` / :func:`reliability_from_bins`.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from topk_transformers import models

Array = jax.Array
Batch = Mapping[str, Array]

DEFAULT_NUM_BINS = 15


def calibration_bins(probs: Array, labels: Array, weights: Optional[Array] = None,
                     num_bins: int = DEFAULT_NUM_BINS) -> dict:
  """Per-bin ``count``, ``confidence_sum`` and ``correct_sum`` (each ``[num_bins]``), additive over batches.

  Args:
    probs: ``[batch, num_classes]`` predicted probabilities.
    labels: ``[batch]`` integer labels.
    weights: optional ``[batch]`` example weights (0 drops an example, e.g. padding).
    num_bins: number of equal-width confidence bins over ``[0, 1]``.
  """
  if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins <= 0:
    raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
  if weights is None:
    weights = jnp.ones(jnp.shape(labels), jnp.float32)
  return _calibration_bins(probs, labels, weights, num_bins)


@functools.partial(jax.jit, static_argnames="num_bins")
def _calibration_bins(probs: Array, labels: Array, weights: Array, num_bins: int) -> dict:
  probs = jnp.asarray(probs, jnp.float32)
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  # Right-closed bins ((m-1)/M, m/M]; a confidence of exactly 0 joins the first bin.
  index = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  one_hot = jax.nn.one_hot(index, num_bins, dtype=jnp.float32) * weights[:, None]
  return {
      "count": jnp.sum(one_hot, axis=0),
      "confidence_sum": confidence @ one_hot,
      "correct_sum": correct @ one_hot,
  }


def ece_from_bins(bins: Mapping[str, Array]) -> Array:
  """Expected calibration error in ``[0, 1]`` from (accumulated) :func:`calibration_bins` sums."""
  count = jnp.asarray(bins["count"], jnp.float32)
  gap = jnp.abs(jnp.asarray(bins["correct_sum"]) - jnp.asarray(bins["confidence_sum"]))
  # sum_m |acc_m - conf_m| * n_m / n == sum_m |correct_m - confidence_m| / n.
  return jnp.sum(gap) / jnp.maximum(jnp.sum(count), 1e-12)


def reliability_from_bins(bins: Mapping[str, Array]) -> dict:
  """Reliability-diagram data: per-bin ``accuracy``, ``confidence``, ``count`` and ``bin_edges``.

  Empty bins have accuracy and confidence 0 (and count 0, so a plot can skip them).
  """
  count = jnp.asarray(bins["count"], jnp.float32)
  safe = jnp.maximum(count, 1e-12)
  nonempty = count > 0
  num_bins = count.shape[0]
  return {
      "accuracy": jnp.where(nonempty, jnp.asarray(bins["correct_sum"]) / safe, 0.0),
      "confidence": jnp.where(nonempty, jnp.asarray(bins["confidence_sum"]) / safe, 0.0),
      "count": count,
      "bin_edges": jnp.linspace(0.0, 1.0, num_bins + 1),
  }


def expected_calibration_error(probs: Array, labels: Array, num_bins: int = DEFAULT_NUM_BINS,
                               weights: Optional[Array] = None) -> Array:
  """ECE in ``[0, 1]`` of ``probs`` ``[batch, num_classes]`` against integer ``labels`` ``[batch]``."""
  return ece_from_bins(calibration_bins(probs, labels, weights, num_bins))


def reliability_diagram(probs: Array, labels: Array, num_bins: int = DEFAULT_NUM_BINS,
                        weights: Optional[Array] = None) -> dict:
  """Per-bin ``accuracy``, ``confidence``, ``count`` and ``bin_edges`` for a reliability diagram."""
  return reliability_from_bins(calibration_bins(probs, labels, weights, num_bins))


def _weights(batch: Batch) -> Array:
  if "weight" in batch:
    return jnp.asarray(batch["weight"], jnp.float32)
  return jnp.ones(jnp.shape(batch["label"]), jnp.float32)


class ClassificationModel(models.BaseModel):
  """Wraps ``vit.network.ViT`` (or any ``module(images, train=..., example_mask=...) -> logits``) with a softmax
  loss.

  Args:
    module: the Flax network.
    label_smoothing: targets are ``(1 - s) * one_hot + s / num_classes``.
  """

  def __init__(self, module: nn.Module, label_smoothing: float = 0.0):
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    self.module = module
    self.label_smoothing = label_smoothing

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Tuple[int, ...]],
                            input_types: Optional[Mapping[str, Any]] = None) -> Any:
    """Initial variables (params boxed with logical axis names) for images of ``input_shapes["image"]``."""
    dtype = (input_types or {}).get("image", jnp.float32)
    images = jnp.zeros(tuple(input_shapes["image"]), dtype)
    params_rng, dropout_rng = jax.random.split(rng)
    # Flax's init leaves out 'intermediates', so no sown statistics end up in the variables.
    return self.module.init({"params": params_rng, "dropout": dropout_rng}, images, train=False)

  def _apply(self, params: Any, batch: Batch, dropout_rng: Optional[Array]) -> Tuple[Array, Any]:
    """Logits and the sown statistics, which count the images of nonzero ``"weight"`` only."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    mask = {"example_mask": jnp.asarray(batch["weight"], jnp.float32)} if "weight" in batch else {}
    logits, state = self.module.apply(
        {"params": params}, batch["image"], train=dropout_rng is not None, rngs=rngs, mutable=["intermediates"],
        **mask)
    return logits, state.get("intermediates", {})

  def _metrics(self, logits: Array, batch: Batch) -> Tuple[Array, dict, Array]:
    labels = jnp.asarray(batch["label"], jnp.int32)
    weights = _weights(batch)
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if self.label_smoothing:
      targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
    per_example = -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
    total = jnp.sum(weights)
    denom = jnp.maximum(total, 1e-12)
    loss = jnp.sum(per_example * weights) / denom
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    metrics = {"loss": loss, "accuracy": jnp.sum(correct * weights) / denom}
    return loss, metrics, total

  def loss_fn(self, params: Any, batch: Batch, dropout_rng: Optional[Array]) -> Tuple[Array, dict]:
    """Weighted mean softmax cross-entropy; dropout is on iff ``dropout_rng`` is given.

    Returns ``(loss, {"metrics": {loss, accuracy, num_examples}, "weight", "intermediates"})``.
    """
    logits, intermediates = self._apply(params, batch, dropout_rng)
    loss, metrics, total = self._metrics(logits, batch)
    metrics["num_examples"] = total
    return loss, {"metrics": metrics, "weight": total, "intermediates": intermediates}

  def eval_fn(self, params: Any, batch: Batch, num_bins: int = DEFAULT_NUM_BINS) -> dict:
    """Deterministic forward pass: loss and accuracy, and this batch's calibration bins in ``"sums"``.

    The bins (:func:`calibration_bins`) add up over batches; the calibration evaluator
    takes the split's ECE from their sum, since a mean of per-batch ECEs is not the ECE.
    """
    logits, intermediates = self._apply(params, batch, None)
    _, metrics, total = self._metrics(logits, batch)
    bins = calibration_bins(jax.nn.softmax(logits), batch["label"], _weights(batch), num_bins)
    return {"metrics": metrics, "weight": total, "sums": {"calibration": bins}, "intermediates": intermediates}

  def predict_batch(self, params: Any, batch: Batch, **kwargs) -> Array:
    """Class probabilities ``[B, num_classes]`` for ``batch["image"]`` (no dropout)."""
    del kwargs
    logits, _ = self._apply(params, batch, None)
    return jax.nn.softmax(logits.astype(jnp.float32))

  def default_input_shapes(self, batch_size: int = 1):
    size = self.module.image_size or 224
    return {"image": (batch_size, size, size, 3)}

  def with_top_k(self, k: Optional[int]) -> "ClassificationModel":
    out = copy.copy(self)
    out.module = self.module.clone(top_k=k)
    return out

  def describe(self) -> models.ModelDescription:
    m = self.module
    config = {name: getattr(m, name) for name in ("variant", "num_classes", "top_k", "top_k_method",
                                                   "mlp_activation", "pool_type", "representation_size")}
    config.update(m.shape)
    mlp = models.MlpDescription(d=m.shape["width"], ff=m.shape["mlp_dim"], n_wi=1, top_k=m.top_k,
                                stacks={"encoder": m.shape["depth"]})
    return models.ModelDescription(config=config, mlp=mlp, top_k=m.top_k, variant=m.variant,
                                   mlp_activation=m.mlp_activation)
