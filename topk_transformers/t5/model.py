"""T5 as a trainable model: loss (cross-entropy + z-loss), eval metrics, prediction.

:class:`EncoderDecoderModel` implements ``models.BaseModel``, the contract the
trainer, the evaluators and the decoders use; ``FEATURE_CONVERTER_CLS`` tells
seqio how to turn a Task's examples into its batches.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import seqio

from topk_transformers import models
from topk_transformers.t5 import convert
from topk_transformers.t5 import decoding


class EncoderDecoderModel(models.BaseModel):
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

  def get_initial_variables(self, rng: jax.Array, input_shapes: Mapping[str, Any],
                            input_types: Optional[Mapping[str, Any]] = None) -> Any:
    """Variables (params boxed with logical axes) for batches of these shapes (token ids are int32)."""
    del input_types
    enc_shape = tuple(input_shapes["encoder_input_tokens"])
    dec_shape = tuple(input_shapes["decoder_input_tokens"])
    return self.module.init(
        {"params": rng, "dropout": rng},
        jnp.ones(enc_shape, jnp.int32),
        jnp.ones(dec_shape, jnp.int32),
        jnp.ones(dec_shape, jnp.int32),
        enable_dropout=False,
    )

  def _forward(self, params, batch, dropout_rng=None):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    logits, state = self.module.apply(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        enable_dropout=dropout_rng is not None,
        rngs=rngs,
        mutable=["intermediates"],
    )
    return logits, state.get("intermediates", {})

  def _loss_and_aux(self, params, batch, dropout_rng):
    logits, intermediates = self._forward(params, batch, dropout_rng)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = (targets > 0).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    loss_sum, z_loss_sum = cross_entropy_with_z_loss(
        logits, targets, weights, z_loss=self.z_loss, label_smoothing=self.label_smoothing)
    num_tokens = jnp.sum(weights)
    normalizer = self.loss_normalizing_factor or jnp.maximum(num_tokens, 1.0)
    loss = loss_sum / normalizer
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weights)
    metrics = {
        "loss": loss,
        "z_loss": z_loss_sum / normalizer,
        "cross_ent_loss": (loss_sum - z_loss_sum) / jnp.maximum(num_tokens, 1.0),
        "accuracy": correct / jnp.maximum(num_tokens, 1.0),
    }
    return loss, {"metrics": metrics, "weight": num_tokens, "intermediates": intermediates}

  def loss_fn(self, params, batch, dropout_rng):
    """Mean per-token cross-entropy plus z-loss (``loss_normalizing_factor`` overrides the token count).

    The train metrics also count the target and input tokens (``num_tokens``, ``num_input_tokens``),
    from which the progress line computes tokens per second.
    """
    loss, aux = self._loss_and_aux(params, batch, dropout_rng)
    aux["metrics"].update(num_tokens=aux["weight"],
                          num_input_tokens=jnp.sum(batch["encoder_input_tokens"] > 0).astype(jnp.float32))
    return loss, aux

  def eval_fn(self, params, batch):
    """The same metrics without dropout, weighted by the batch's target tokens."""
    return self._loss_and_aux(params, batch, None)[1]

  def predict_batch(self, params, batch, **kwargs):
    """Decodes ``batch['encoder_input_tokens']``: ``t5.decoding.predict_batch`` with this model's network."""
    return decoding.predict_batch(self.module, params, batch, **kwargs)

  def default_input_shapes(self, batch_size: int = 1):
    return {"encoder_input_tokens": (batch_size, 1), "decoder_input_tokens": (batch_size, 1)}

  def describe(self) -> models.ModelDescription:
    c = self.module.config
    config = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    config.update(dtype=str(config["dtype"]), mlp_activations=list(config["mlp_activations"]))
    mlp = models.MlpDescription(d=c.emb_dim, ff=c.mlp_dim, n_wi=len(c.mlp_activations), top_k=c.top_k,
                                stacks={"encoder": c.num_encoder_layers, "decoder": c.num_decoder_layers})
    return models.ModelDescription(config=config, mlp=mlp, top_k=c.top_k)

  def with_top_k(self, k: Optional[int]) -> "EncoderDecoderModel":
    out = copy.copy(self)
    out.module = self.module.clone(config=dataclasses.replace(self.module.config, top_k=k))
    return out

  def load_initial_params(self, path: str, fmt: str, abstract_params: Any, shardings: Any) -> Any:
    """Reads a Hugging Face, T5X or project checkpoint (``fmt``: ``'hf'``, ``'t5x'``, ``'project'``, ``'auto'``).

    ``t5.convert`` checks the checkpoint's architecture against this model's config field by field.
    """
    del abstract_params  # convert checks every shape against the config itself
    _, params = convert.load(path, fmt, self.module.config)
    return jax.device_put(params, shardings)

  def check_checkpoint(self, checkpoints_dir: str) -> None:
    """``topk-convert``'s checkpoints record their ``T5Config``: a model that disagrees is named by field."""
    convert.check_recorded_config(checkpoints_dir, self.module.config)

  def score_batch(self, params, batch) -> jax.Array:
    """Sum of target log-likelihoods per example (padding excluded)."""
    logits, _ = self._forward(params, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    tgt = batch["decoder_target_tokens"]
    ll = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    return jnp.sum(ll * (tgt > 0), -1)


def cross_entropy_with_z_loss(logits, targets, weights, z_loss: float = 0.0, label_smoothing: float = 0.0):
  """Summed weighted cross-entropy and z-loss (``z_loss * log(Z)^2``, Mesh TF / T5X style).

  Returns ``(total_loss_sum, z_loss_sum)``; the total includes the z-loss.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  # Gather the target logit instead of a [batch, length, vocab] one-hot.
  target_logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
  ce = -target_logp
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    sum_logp = jnp.sum(logits, axis=-1) - vocab * log_z
    ce = -(confidence * target_logp + low * (sum_logp - target_logp))
    # Subtract the entropy of the smoothed target so a perfect model has loss 0.
    ce = ce + (confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  zl = z_loss * jnp.square(log_z)
  return jnp.sum((ce + zl) * weights), jnp.sum(zl * weights)
