"""Vision Transformer (Dosovitskiy et al., 2021) with the paper's Top-k MLPs.

One model, named by a compact variant string as in big_vision: ``"B/16"`` is the
Base width/depth with 16x16 patches; any ``"<size>/<patch>"`` works. The MLP is
the shared :class:`topk_transformers.layers.MlpBlock`, so ``top_k`` and
``mlp_activation='relu'`` give the paper's Top-k ViT, and every MLP sows the
sparsity statistics (``nonzero_count``, ``token_count``, ``neuron_fire_count``)
into ``intermediates`` when that collection is mutable.

Parameter tree (ViT's own names, so ViT / big_vision checkpoints map over with
only the MLP renamed ``Dense_0/Dense_1 -> wi/wo``)::

  embedding/{kernel,bias}              patch projection, a PxP stride-P conv
  cls                                  class token ('token' pooling only)
  pos_embedding                        learned, one row per token (cls included)
  Transformer/encoderblock_{i}/
    LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
    LayerNorm_1, mlp/{wi,wo}
  Transformer/encoder_norm
  pre_logits                           Dense + tanh, only with representation_size
  head                                 zero-initialised classifier

With 224x224 inputs, 1000 classes and token pooling the counts are the published
ones (``vit_jax/models_test.py``): ViT-B/16 has 86,567,656 parameters.
"""

from __future__ import annotations

import dataclasses

import re
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from topk_transformers import layers
from topk_transformers import topk as topk_lib
from topk_transformers.errors import ConfigError

Array = jax.Array

# name -> (width, depth, mlp_dim, num_heads), the published ViT shapes.
# "Test" is not a published model: a tiny shape for fast CPU tests.
VARIANTS = {
    "Test": (32, 2, 64, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}

POOL_TYPES = ("token", "gap")
MLP_ACTIVATIONS = ("gelu", "relu")

# ViT's initialisers: xavier-uniform kernels and near-zero MLP biases.
_xavier = nn.initializers.xavier_uniform()
_tiny_normal = nn.initializers.normal(stddev=1e-6)


def _param_init(init, axes: Tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(init, axes)


def decode_variant(variant: str) -> dict:
  """``"B/16"`` -> ``dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)``."""
  match = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant) if isinstance(variant, str) else None
  if match is None or match.group(1) not in VARIANTS or int(match.group(2)) <= 0:
    raise ConfigError(f"ViT variant must look like 'B/16' with size in {tuple(VARIANTS)}, got {variant!r}")
  width, depth, mlp_dim, num_heads = VARIANTS[match.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=int(match.group(2)))


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=1e-6, dtype=dtype, name=name,
      scale_init=_param_init(nn.initializers.ones, ("embed",)),
      bias_init=_param_init(nn.initializers.zeros, ("embed",)),
  )


class _BlockSettings(nn.Module):
  """The settings an encoder block and the stack of blocks share."""

  mlp_dim: int
  num_heads: int
  mlp_activation: str = "gelu"
  top_k: Optional[int] = None
  top_k_method: str = topk_lib.DEFAULT_METHOD
  top_k_recall_target: float = topk_lib.DEFAULT_RECALL_TARGET
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32


class EncoderBlock(_BlockSettings):
  """Pre-LN Transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

  @nn.compact
  def __call__(self, x: Array, deterministic: bool, example_mask: Optional[Array] = None) -> Array:
    y = _layer_norm(self.dtype, "LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dtype=self.dtype,
        broadcast_dropout=False,
        dropout_rate=self.attention_dropout_rate,
        kernel_init=_param_init(_xavier, ("embed", "heads", "kv")),
        bias_init=_param_init(nn.initializers.zeros, ("heads", "kv")),
        out_kernel_init=_param_init(_xavier, ("heads", "kv", "embed")),
        out_bias_init=_param_init(nn.initializers.zeros, ("embed",)),
        name="MultiHeadDotProductAttention_0",
    )(y, deterministic=deterministic)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    x = x + y

    y = _layer_norm(self.dtype, "LayerNorm_1")(x)
    # Every token of a real image (patches and the class token) counts in the sown statistics.
    token_mask = None if example_mask is None else example_mask[:, None]
    y = layers.MlpBlock(
        intermediate_dim=self.mlp_dim,
        activations=(self.mlp_activation,),
        kernel_init=_xavier,
        bias_init=_tiny_normal,
        use_bias=True,
        intermediate_dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        top_k=self.top_k,
        top_k_method=self.top_k_method,
        top_k_recall_target=self.top_k_recall_target,
        name="mlp",
    )(y, deterministic=deterministic, mask=token_mask)
    # ViT drops out the MLP output too; MlpBlock only drops its hidden layer.
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    return x + y


class Encoder(_BlockSettings):
  """A stack of ``depth`` encoder blocks followed by the final LayerNorm."""

  depth: int = 1

  @nn.compact
  def __call__(self, x: Array, deterministic: bool, example_mask: Optional[Array] = None) -> Array:
    block = {f.name: getattr(self, f.name) for f in dataclasses.fields(_BlockSettings) if f.name not in ("parent", "name")}
    for i in range(self.depth):
      x = EncoderBlock(**block, name=f"encoderblock_{i}")(x, deterministic, example_mask)
    return _layer_norm(self.dtype, "encoder_norm")(x)


class ViT(nn.Module):
  """Vision Transformer classifier; ``__call__(images, train=...)`` returns logits ``[batch, num_classes]``.

  ``example_mask`` (``[batch]``, 0 for a padding image) keeps padding out of the MLPs' sown statistics; the
  logits do not depend on it.

  Attributes:
    variant: ``"<size>/<patch>"``, size one of ``VARIANTS`` (``"Ti/16"``, ``"B/16"``, ``"H/14"``...).
    num_classes: outputs of the classifier head.
    top_k: hidden units kept per token in every MLP (the paper's Top-k); ``None`` is the vanilla MLP.
    top_k_method: ``"auto"`` (the default, as in T5: the faster exact method, see
      ``topk.resolve_method``), ``"threshold"``, ``"exact"`` (``lax.top_k``) or
      ``"approx"`` (``lax.approx_max_k``).
    top_k_recall_target: recall of the approximate method.
    mlp_activation: ``"gelu"`` (ViT) or ``"relu"`` (the paper's sparse ViT).
    pool_type: ``"token"`` (class token) or ``"gap"`` (mean over patch tokens, no class token).
    representation_size: width of the optional ``pre_logits`` Dense + tanh layer; ``None`` skips it.
    dropout_rate: dropout after the position embedding, attention and in/after every MLP.
    attention_dropout_rate: dropout on the attention weights.
    dtype: computation dtype (parameters stay float32; logits are returned in float32).
    image_size: if set, inputs must be ``image_size x image_size``; otherwise the
      size is taken from the input at initialisation (it fixes ``pos_embedding``).
    mlp_dim: if set, the MLP's hidden width instead of the variant's (big_vision's override), e.g. a
      ``Test/2`` with 256 hidden units so that k / d_ff can sit at the dense model's own level.
  """

  variant: str = "B/16"
  num_classes: int = 1000
  top_k: Optional[int] = None
  top_k_method: str = topk_lib.DEFAULT_METHOD
  top_k_recall_target: float = topk_lib.DEFAULT_RECALL_TARGET
  mlp_activation: str = "gelu"
  pool_type: str = "token"
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  image_size: Optional[int] = None
  mlp_dim: Optional[int] = None

  def __post_init__(self):
    # Configuration errors surface when the model is built (e.g. by gin), not inside a jitted step.
    decode_variant(self.variant)
    topk_lib.validate_top_k(self.top_k, self.top_k_method, self.top_k_recall_target)
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ConfigError(f"mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
    if self.pool_type not in POOL_TYPES:
      raise ConfigError(f"pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
    for name in ("num_classes", "representation_size", "image_size", "mlp_dim"):
      value = getattr(self, name)
      if value is None and name != "num_classes":
        continue
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
    super().__post_init__()

  @property
  def shape(self) -> dict:
    """``width``, ``depth``, ``mlp_dim``, ``num_heads``, ``patch_size`` of this variant (``mlp_dim`` overridden)."""
    shape = decode_variant(self.variant)
    if self.mlp_dim is not None:
      shape["mlp_dim"] = self.mlp_dim
    return shape

  @nn.compact
  def __call__(self, images: Array, *, train: bool, example_mask: Optional[Array] = None) -> Array:
    cfg = self.shape
    dtype = jnp.dtype(self.dtype)
    deterministic = not train
    if images.ndim != 4:
      raise ValueError(f"ViT expects images [batch, height, width, channels], got shape {images.shape}")
    _, height, width, _ = images.shape
    patch = cfg["patch_size"]
    if self.image_size is not None and (height, width) != (self.image_size, self.image_size):
      raise ValueError(f"ViT was configured for {self.image_size}x{self.image_size} images, got {height}x{width}")
    if height % patch or width % patch:
      raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")

    x = nn.Conv(
        cfg["width"], (patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype,
        kernel_init=_param_init(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=_param_init(nn.initializers.zeros, ("embed",)),
        name="embedding",
    )(jnp.asarray(images, dtype))
    batch = x.shape[0]
    x = jnp.reshape(x, (batch, -1, cfg["width"]))

    if self.pool_type == "token":
      cls = self.param("cls", _param_init(nn.initializers.zeros, (None, None, "embed")), (1, 1, cfg["width"]))
      x = jnp.concatenate([jnp.tile(jnp.asarray(cls, dtype), (batch, 1, 1)), x], axis=1)

    pos = self.param(
        "pos_embedding", _param_init(nn.initializers.normal(stddev=0.02), (None, None, "embed")),
        (1, x.shape[1], cfg["width"]),
    )
    x = x + jnp.asarray(pos, dtype)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)

    x = Encoder(
        depth=cfg["depth"], mlp_dim=cfg["mlp_dim"], num_heads=cfg["num_heads"],
        mlp_activation=self.mlp_activation, top_k=self.top_k, top_k_method=self.top_k_method,
        top_k_recall_target=self.top_k_recall_target, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, dtype=dtype, name="Transformer",
    )(x, deterministic, example_mask)

    x = x[:, 0] if self.pool_type == "token" else jnp.mean(x, axis=1)

    if self.representation_size is not None:
      x = nn.Dense(
          self.representation_size, dtype=dtype,
          kernel_init=_param_init(nn.initializers.lecun_normal(), ("embed", None)),
          bias_init=_param_init(nn.initializers.zeros, (None,)),
          name="pre_logits",
      )(x)
      x = jnp.tanh(x)

    # A zero head makes every class equally likely at step 0, as ViT does. 'classes' is
    # left out of the sharding rules on purpose: the head is small and class counts
    # such as 21843 do not divide a model axis.
    logits = nn.Dense(
        self.num_classes, dtype=dtype,
        kernel_init=_param_init(nn.initializers.zeros, (None, "classes")),
        bias_init=_param_init(nn.initializers.zeros, ("classes",)),
        name="head",
    )(x)
    return jnp.asarray(logits, jnp.float32)
