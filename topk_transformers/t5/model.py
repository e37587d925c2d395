"""T5 as a trainable model: loss (cross-entropy + z-loss), eval metrics, prediction.

The trainer (``topk_transformers/train.py``) talks to every model through the
same small interface, which ``vit/model.py`` implements too:

* ``get_initial_variables(rng, input_shapes) -> variables`` (params boxed with
  logical axis names),
* ``loss_fn(params, batch, dropout_rng) -> (loss, aux)`` where ``aux`` holds
  ``"metrics"`` (dict of scalar arrays) and ``"intermediates"`` (sown MLP stats),
* ``eval_fn(params, batch) -> aux`` (same structure, no dropout),
* ``FEATURE_CONVERTER_CLS`` for seqio.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import seqio


class EncoderDecoderModel:
  """Wraps ``t5.network.Transformer`` with T5's pretraining loss."""

  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter

  def __init__(
      self,
      module: nn.Module,
      input_vocabulary: Optional[seqio.Vocabulary] = None,
      output_vocabulary: Optional[seqio.Vocabulary] = None,
      z_loss: float = 1e-4,
      label_smoothing: float = 0.0,
      loss_normalizing_factor: Optional[float] = None,
  ):
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.loss_normalizing_factor = loss_normalizing_factor
