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
  bins; an evaluator finishes the dataset's sums (for example the ECE from the
  summed bins, ``evaluators/calibration.py``);
* ``"intermediates"``: the statistics every Top-k ``MlpBlock`` sows
  (the sparsity evaluator reads them).

Initial parameters from an imported checkpoint and the check that a checkpoint
fits the model are methods too, so that the trainer and the run loader never
ask which model they hold; :meth:`BaseModel.describe` returns the typed
:class:`ModelDescription` that reports and evaluators read.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import jax

from topk_transformers.errors import ConfigError

Array = jax.Array
Batch = Mapping[str, Array]
Shapes = Mapping[str, Tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class MlpDescription:
  """The shape of a model's Top-k MLPs (what ``model_info`` counts FLOPs of)."""

  d: int
  """The model width, the MLP's input and output size."""
  ff: int
  """The hidden width ``d_ff``."""
  n_wi: int
  """The number of ``wi`` branches (2 for a gated MLP such as T5 v1.1's)."""
  top_k: Optional[int]
  """The units kept per token; ``None`` for a dense MLP."""
  stacks: Mapping[str, int]
  """Layers per stack, e.g. ``{"encoder": 12, "decoder": 12}``."""


@dataclasses.dataclass(frozen=True)
class ModelDescription:
  """Facts about a model for reports and evaluators (:meth:`BaseModel.describe`)."""

  config: Mapping[str, Any]
  """The network's settings, JSON-able (``topk-model-info`` prints them)."""
  mlp: MlpDescription
  """The shape of its MLPs."""
  top_k: Optional[int]
  """The Top-k of its MLPs; ``None`` when dense."""
  variant: Optional[str] = None
  """The named size, e.g. ViT's ``"B/16"``; ``None`` where the model has no variant table."""
  mlp_activation: Optional[str] = None
  """The MLP's activation where the model names one (ViT); ``None`` otherwise."""


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

  @abc.abstractmethod
  def predict_batch(self, params: Any, batch: Batch, **kwargs) -> Any:
    """The model's predictions for ``batch`` (T5: decoded tokens; ViT: class probabilities)."""

  @abc.abstractmethod
  def default_input_shapes(self, batch_size: int = 1) -> Dict[str, Tuple[int, ...]]:
    """Small batch shapes that fix every parameter's shape (for abstract inits such as ``topk-model-info``)."""

  @abc.abstractmethod
  def describe(self) -> ModelDescription:
    """Facts for reports: the network's settings, its MLPs' shape and Top-k."""

  def with_top_k(self, k: Optional[int]) -> "BaseModel":
    """A copy of this model whose MLPs keep the ``k`` largest units per token (``None``: dense).

    The copy has the same parameters, so it evaluates the same checkpoint (``topk-topk-sweep``).
    """
    raise ConfigError(f"{type(self).__name__} has no top_k setting to sweep")

  def load_initial_params(self, path: str, fmt: str, abstract_params: Any, shardings: Any) -> Any:
    """The params of checkpoint ``path`` for this model, placed with ``shardings`` (T5X's ``initial_checkpoint_path``).

    Args:
      path: the checkpoint.
      fmt: its format, ``'auto'`` or one the model reads; by default only the project's own checkpoints
        (``'project'``), which a model that imports other formats (T5: Hugging Face, T5X) overrides.
      abstract_params, shardings: the params' shapes and where they go.

    Raises:
      ConfigError: a format this model does not read.
      checkpoints.CheckpointError: no checkpoint there, or one that does not fit.
    """
    if fmt not in ("auto", "project"):
      raise ConfigError(f"initial_checkpoint_format={fmt!r}: {type(self).__name__} reads project checkpoints only")
    # Imported here: the running layer (orbax, TensorFlow's gfile) only when a checkpoint is read.
    from topk_transformers import checkpoints  # pylint: disable=g-import-not-at-top
    return checkpoints.restore_params(path, abstract_params, shardings)[0]

  def check_checkpoint(self, checkpoints_dir: str) -> None:
    """Raises a one-line error if the checkpoints in ``checkpoints_dir`` (``RUN/checkpoints``) are not of this model.

    Called before any data is built. By default nothing is checked ahead: restoring a checkpoint of
    other shapes is itself a one-line ``CheckpointError``. A model whose checkpoints record their
    configuration names the fields that differ.
    """
    del checkpoints_dir
