"""The contract between a model and everything that trains, evaluates or decodes it.

In the spirit of T5X's ``BaseModel``: the trainer, the run loader, the
evaluators and the decoders only ever call these methods, so nothing outside a
model branches on its type. ``t5.model.EncoderDecoderModel`` and
``vit.model.ClassificationModel`` implement it.

Batches are dicts of arrays. ``aux`` (from :meth:`BaseModel.loss_fn`) and the
output of :meth:`BaseModel.eval_fn` hold:

* ``"metrics"``: scalars. Over a dataset they are averaged, each batch weighted
  by ``"weight"``;
* ``"weight"``: the batch's weight in that average (target tokens for T5,
  examples for ViT), so that padding does not count;
* ``"sums"`` (eval only): arrays that add up over batches, such as calibration
  bins. :meth:`BaseModel.finalize_eval` turns the dataset's means and sums into
  the final metrics (for example the ECE from the summed bins);
* ``"intermediates"``: the statistics every Top-k ``MlpBlock`` sows
  (``sparsity.py`` reads them).
"""

from __future__ import annotations

import abc
from typing import Any, Dict, Mapping, Optional, Tuple

import jax

Array = jax.Array
Batch = Mapping[str, Array]
Shapes = Mapping[str, Tuple[int, ...]]


class BaseModel(abc.ABC):
  """A trainable model: a Flax ``module`` plus its loss, metrics and prediction."""

  module: Any
  """The Flax network (``t5.network.Transformer``, ``vit.network.ViT``)."""

  @abc.abstractmethod
  def get_initial_variables(self, rng: Array, input_shapes: Shapes,
                            input_types: Optional[Mapping[str, Any]] = None) -> Any:
    """Variables for batches of ``input_shapes`` (params boxed with their logical axis names)."""

  @abc.abstractmethod
  def loss_fn(self, params: Any, batch: Batch, dropout_rng: Optional[Array]) -> Tuple[Array, Dict[str, Any]]:
    """``(loss, aux)``; dropout is on exactly when ``dropout_rng`` is given."""

  @abc.abstractmethod
  def eval_fn(self, params: Any, batch: Batch) -> Dict[str, Any]:
    """The deterministic forward pass: ``{"metrics", "weight", "sums", "intermediates"}``."""

  def finalize_eval(self, metrics: Dict[str, float], sums: Mapping[str, Any]) -> Dict[str, float]:
    """Metrics of a whole dataset from its weighted means and its summed ``"sums"`` (default: the means)."""
    del sums
    return dict(metrics)

  @abc.abstractmethod
  def predict_batch(self, params: Any, batch: Batch, **kwargs) -> Any:
    """The model's predictions for ``batch`` (T5: decoded tokens; ViT: class probabilities)."""

  @abc.abstractmethod
  def default_input_shapes(self, batch_size: int = 1) -> Dict[str, Tuple[int, ...]]:
    """Small batch shapes that fix every parameter's shape (for abstract inits such as ``topk-model-info``)."""

  @abc.abstractmethod
  def describe(self) -> Dict[str, Any]:
    """Facts for reports: ``"config"`` (the network's settings, JSON-able), ``"mlp"`` (``d``, ``ff``,
    ``n_wi`` wi branches, ``top_k``, ``stacks``: layers per stack) and ``"top_k"``."""
