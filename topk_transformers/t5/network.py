"""T5 encoder-decoder (v1.0 and v1.1) with Top-k MLPs, laid out like T5X's example network.

Parameter names and logical axes are T5X's (``token_embedder``,
``encoder/layers_{i}/attention/{query,key,value,out}``, ``mlp/{wi,wo}`` or
``mlp/{wi_0,wi_1,wo}``, ``relpos_bias``, ``encoder_norm``, ``decoder_norm``,
``logits_dense``), so T5X checkpoints map one to one. The paper's change is only
``T5Config.top_k``, passed to every ``MlpBlock``.

Decoding with the KV cache (see ``Transformer.decode``)::

  # 1. create the cache for max length L (the token values are ignored):
  _, v = model.apply({'params': params}, enc_tokens, jnp.ones((B, L), jnp.int32), jnp.ones((B, L), jnp.int32),
                     enable_dropout=False, decode=True, mutable=['cache'])
  cache = v['cache']
  encoded = model.apply({'params': params}, enc_tokens, enable_dropout=False, method=Transformer.encode)
  # 2. one step: tokens [B, 1] -> logits [B, 1, vocab]
  logits, v = model.apply({'params': params, 'cache': cache}, encoded, enc_tokens, tokens, tokens,
                          enable_dropout=False, decode=True, max_decode_length=L, mutable=['cache'],
                          method=Transformer.decode)
  cache = v['cache']

Cross-attention keys and values are computed once per input, explicitly, and passed to every step (the step then
reads only the ``query`` and ``out`` kernels of the cross-attention)::

  cross_kv = model.apply({'params': params}, encoded, method=Transformer.cross_attention_kv)
  logits, v = model.apply({'params': params, 'cache': cache}, None, enc_tokens, tokens, tokens, enable_dropout=False,
                          decode=True, max_decode_length=L, cross_kv=cross_kv, mutable=['cache'],
                          method=Transformer.decode)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from topk_transformers import layers
from topk_transformers import topk as topk_lib
from topk_transformers.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5 network (T5X's ``T5Config`` plus the Top-k settings)."""

  vocab_size: int
  """Rows of the token embedding (32128 for T5's 32000-piece vocabulary plus 100 sentinels, padded to 128)."""
  dtype: Any = jnp.float32
  """Activation dtype (``'bfloat16'`` on TPU); parameters are always stored in float32."""
  emb_dim: int = 512
  """Width of the residual stream (``d_model``)."""
  num_heads: int = 8
  """Attention heads per attention layer."""
  num_encoder_layers: int = 6
  """Encoder blocks."""
  num_decoder_layers: int = 6
  """Decoder blocks."""
  head_dim: int = 64
  """Width of each attention head (``d_kv``); ``num_heads * head_dim`` need not equal ``emb_dim``."""
  mlp_dim: int = 2048
  """Hidden width of every MLP (``d_ff``), the axis Top-k selects over."""
  mlp_activations: Sequence[str] = ("relu",)
  """``('relu',)`` for T5 v1.0; ``('gelu', 'linear')`` for v1.1's gated GELU (wi_0, wi_1)."""
  dropout_rate: float = 0.1
  """Dropout after embeddings, sublayers, on attention weights and MLP hidden units."""
  logits_via_embedding: bool = False
  """Tie the output layer to ``token_embedder`` (v1.0; logits scaled by ``1/sqrt(emb_dim)``); else ``logits_dense``."""
  float32_attention_logits: bool = False
  """Compute attention logits and softmax in float32 whatever ``dtype`` is."""
  top_k: Optional[int] = None
  """Keep the k largest MLP hidden activations per token; ``None`` (or ``k >= mlp_dim``) is the dense MLP."""
  top_k_method: str = topk_lib.DEFAULT_METHOD
  """``'auto'`` (the fastest exact method for the backend and shape), ``'exact'`` (``lax.top_k``), ``'threshold'``
  (sort-free, exact) or ``'approx'`` (``lax.approx_max_k``); see ``topk.py``."""
  top_k_recall_target: float = topk_lib.DEFAULT_RECALL_TARGET
  """Recall target of the approximate method."""
  sparse_decode: Optional[bool] = None
  """Decoding steps compute each Top-k MLP from the k selected rows of ``wo`` (``MlpBlock.sparse_decode``):
  ``None`` = when ``tokens * top_k <= mlp_dim / 4``, ``True`` / ``False`` = always / never."""
  decode_candidates: Optional[int] = None
  """Predicted-neuron decoding: with predictors in the ``predictors`` collection (``predictors.py``), each decoder
  MLP step computes only the ``decode_candidates`` units its predictor proposes, then the Top-k among them
  (``MlpBlock.decode_candidates``). ``None``, or no predictors given: the exact path."""
  decode_row_kernels: bool = True
  """The sparse and predicted decoding steps read their rows of ``wi`` and ``wo`` through the CPU row kernels
  (``row_kernels.py``) where they apply (CPU, float32); ``False``: XLA's gather (the benchmark compares both)."""
  relpos_num_buckets: int = 32
  """Relative-position buckets (T5: 32)."""
  relpos_max_distance: int = 128
  """Distance beyond which relative positions share the last bucket (T5: 128)."""

  def __post_init__(self):
    topk_lib.validate_top_k(self.top_k, self.top_k_method, self.top_k_recall_target)
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"T5Config.{name} must be a positive integer, got {value!r}")
    if self.decode_candidates is not None:
      c = self.decode_candidates
      if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c <= 0:
        raise ConfigError(f"T5Config.decode_candidates must be a positive integer or None, got {c!r}")
      if self.top_k is not None and c < self.top_k:
        raise ConfigError(f"T5Config.decode_candidates ({c}) must be at least top_k ({self.top_k})")
    for name in ("num_encoder_layers", "num_decoder_layers"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"T5Config.{name} must be a non-negative integer, got {value!r}")
    buckets, distance = self.relpos_num_buckets, self.relpos_max_distance
    if isinstance(buckets, bool) or not isinstance(buckets, numbers.Integral) or buckets < 4:
      raise ConfigError(f"T5Config.relpos_num_buckets must be an integer >= 4, got {buckets!r}")
    # The decoder's buckets are exact up to buckets // 2 and logarithmic from there to max_distance.
    if isinstance(distance, bool) or not isinstance(distance, numbers.Integral) or distance <= buckets // 2:
      raise ConfigError(f"T5Config.relpos_max_distance must be an integer above relpos_num_buckets // 2 "
                        f"({buckets // 2}), got {distance!r}")
    if not 0.0 <= float(self.dropout_rate) < 1.0:
      raise ConfigError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    activations = (self.mlp_activations,) if isinstance(self.mlp_activations, str) else tuple(self.mlp_activations)
    if not activations:
      raise ConfigError("T5Config.mlp_activations must name at least one activation")
    for act in activations:
      layers.resolve_activation(act)  # unknown name -> ValueError
    # Hashable, canonical values (gin may hand over lists or dtype names).
    object.__setattr__(self, "mlp_activations", activations)
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))


def _mlp(cfg: T5Config) -> layers.MlpBlock:
  return layers.MlpBlock(
      intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations, intermediate_dropout_rate=cfg.dropout_rate,
      dtype=cfg.dtype, top_k=cfg.top_k, top_k_method=cfg.top_k_method, top_k_recall_target=cfg.top_k_recall_target,
      sparse_decode=cfg.sparse_decode, decode_candidates=cfg.decode_candidates,
      use_row_kernels=cfg.decode_row_kernels, name="mlp",
  )


def _attention(cfg: T5Config, name: str) -> layers.MultiHeadDotProductAttention:
  return layers.MultiHeadDotProductAttention(
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.dtype, dropout_rate=cfg.dropout_rate,
      float32_logits=cfg.float32_attention_logits, name=name,
  )


def _relpos(cfg: T5Config) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(
      num_heads=cfg.num_heads, num_buckets=cfg.relpos_num_buckets, max_distance=cfg.relpos_max_distance,
      dtype=cfg.dtype, name="relpos_bias",
  )


def _dropout(cfg: T5Config, x, deterministic: bool):
  # Broadcast over length, as T5.
  return nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention block and MLP block, each with a residual."""

  config: T5Config

  @nn.compact
  def __call__(self, inputs, encoder_mask=None, encoder_bias=None, deterministic=False, token_mask=None):
    cfg = self.config
    x = layers.LayerNorm(dtype=cfg.dtype, name="pre_attention_layer_norm")(inputs)
    x = _attention(cfg, "attention")(x, x, encoder_mask, encoder_bias, deterministic=deterministic)
    x = _dropout(cfg, x, deterministic) + inputs
    y = layers.LayerNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(x)
    y = _mlp(cfg)(y, deterministic=deterministic, mask=token_mask)
    return _dropout(cfg, y, deterministic) + x


class CachedCrossAttention(nn.Module):
  """Attention to the encoder from keys and values computed once per input (:meth:`Transformer.cross_attention_kv`).

  Same parameters as the ``MultiHeadDotProductAttention`` it replaces in decoding steps (``query``, ``out``; the
  ``key`` and ``value`` kernels were applied at encode time), same result. The cached ``key`` / ``value`` are
  ``[batch, heads, head_dim, in_length]`` (the decoding caches' layout, read as it lies), one per input; the step's
  ``rows = batch * n`` queries (beams or samples, row ``b * n + j`` for decode ``j`` of input ``b``, as
  ``decoding.expand_batch`` lays them out) attend to their input's keys as ``n`` query positions of one attention,
  so the beams share them: nothing is copied per beam, and beam search never reorders them.
  """

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  float32_logits: bool = False
  kernel_init: Any = layers.default_attention_kernel_init

  @nn.compact
  def __call__(self, inputs_q, key, value, key_mask):
    """``inputs_q [rows, q_len, embed]``, ``key``/``value [batch, heads, head_dim, in_length]``, ``key_mask
    [batch, in_length]`` (nonzero: a real input token) -> ``[rows, q_len, embed]``."""
    joined = self.num_heads * self.head_dim
    depth_scaling = jnp.sqrt(self.head_dim).astype(jnp.float32)
    query = layers.DenseGeneral(joined, dtype=self.dtype, kernel_init=lambda *a: self.kernel_init(*a) / depth_scaling,
                                kernel_axes=("embed", "joined_kv"), name="query")(inputs_q)
    rows, qlen = inputs_q.shape[:2]
    batch = key.shape[0]
    if rows % batch:
      raise ValueError(f"{rows} decoder rows do not divide over the {batch} inputs of the cross-attention cache")
    query = query.reshape(batch, rows // batch * qlen, self.num_heads, self.head_dim)
    bias = jnp.where(key_mask[:, None, None, :] > 0, 0.0, -1e10).astype(self.dtype)
    x = layers.dot_product_attention(query, key, value, bias=bias, deterministic=True, dtype=self.dtype,
                                     float32_logits=self.float32_logits, kv_layout="bhdk")
    x = x.reshape(rows, qlen, joined)
    return layers.DenseGeneral(inputs_q.shape[-1], dtype=self.dtype, kernel_init=self.kernel_init,
                               kernel_axes=("joined_kv", "embed"), name="out")(x)


class DecoderLayer(nn.Module):
  """Causal self-attention, attention to the encoder, MLP; pre-norm with residuals.

  ``cross_kv`` (decoding steps): this layer's ``{'key', 'value'}`` from :meth:`Transformer.cross_attention_kv`;
  ``encoded`` is then unused and ``encoder_decoder_mask`` is the ``[batch, in_length]`` mask of real input tokens.
  """

  config: T5Config

  @nn.compact
  def __call__(self, inputs, encoded, decoder_mask=None, encoder_decoder_mask=None, decoder_bias=None,
               deterministic=False, decode=False, token_mask=None, cross_kv=None):
    cfg = self.config
    x = layers.LayerNorm(dtype=cfg.dtype, name="pre_self_attention_layer_norm")(inputs)
    x = _attention(cfg, "self_attention")(x, x, decoder_mask, decoder_bias, deterministic=deterministic, decode=decode)
    x = _dropout(cfg, x, deterministic) + inputs
    y = layers.LayerNorm(dtype=cfg.dtype, name="pre_cross_attention_layer_norm")(x)
    if cross_kv is not None:
      y = CachedCrossAttention(num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.dtype,
                               float32_logits=cfg.float32_attention_logits, name="encoder_decoder_attention")(
                                   y, cross_kv["key"], cross_kv["value"], encoder_decoder_mask)
    else:
      y = _attention(cfg, "encoder_decoder_attention")(y, encoded, encoder_decoder_mask, deterministic=deterministic)
    y = _dropout(cfg, y, deterministic) + x
    z = layers.LayerNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(y)
    z = _mlp(cfg)(z, decode=decode, deterministic=deterministic, mask=token_mask)
    return _dropout(cfg, z, deterministic) + y


class Encoder(nn.Module):
  """Embedding, ``num_encoder_layers`` blocks sharing one ``relpos_bias`` table, ``encoder_norm``."""

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_mask=None, encoder_positions=None, deterministic=False):
    cfg = self.config
    length = encoder_input_tokens.shape[-1]
    positions = encoder_positions
    bias = _relpos(cfg)(length, length, True, query_positions=positions, key_positions=positions)
    x = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))
    x = _dropout(cfg, x, deterministic).astype(cfg.dtype)
    token_mask = encoder_input_tokens > 0  # sparsity statistics skip padding
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(config=cfg, name=f"layers_{i}")(x, encoder_mask, bias, deterministic, token_mask)
    x = layers.LayerNorm(dtype=cfg.dtype, name="encoder_norm")(x)
    return nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Embedding, ``num_decoder_layers`` blocks, ``decoder_norm``, logits (tied or ``logits_dense``)."""

  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, decoder_positions=None, decoder_mask=None,
               encoder_decoder_mask=None, deterministic=False, decode=False, max_decode_length=None,
               token_mask=None, cross_kv=None):
    cfg = self.config
    length = decoder_input_tokens.shape[-1]
    relpos = _relpos(cfg)
    if decode:
      stepping = "relpos_bias" in self.variables.get("cache", {})
      if stepping and max_decode_length is None:
        max_decode_length = self._cache_length()
      klen = max_decode_length if stepping else length
      bias = relpos(length, klen, False, decode=True)
    else:
      bias = relpos(length, length, False, query_positions=decoder_positions, key_positions=decoder_positions)
    y = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
    y = _dropout(cfg, y, deterministic).astype(cfg.dtype)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(config=cfg, name=f"layers_{i}")(
          y, encoded, decoder_mask=decoder_mask, encoder_decoder_mask=encoder_decoder_mask, decoder_bias=bias,
          deterministic=deterministic, decode=decode, token_mask=token_mask,
          cross_kv=None if cross_kv is None else cross_kv[f"layers_{i}"])
    y = layers.LayerNorm(dtype=cfg.dtype, name="decoder_norm")(y)
    y = _dropout(cfg, y, deterministic)
    if cfg.logits_via_embedding:
      # T5 rescales tied logits so they do not grow with the embedding width.
      return self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1]).astype(jnp.float32)
    return layers.DenseGeneral(cfg.vocab_size, dtype=jnp.float32, kernel_axes=("embed", "vocab"),
                               name="logits_dense")(y)

  def _cache_length(self) -> int:
    """The length the KV cache was created with, when a step omits ``max_decode_length``."""
    cache = self.variables.get("cache", {})
    if "layers_0" in cache:
      return cache["layers_0"]["self_attention"]["cached_key"].shape[-1]  # [batch, heads, head_dim, length]
    raise ValueError("decoding steps need max_decode_length (no decoder layer cache to infer it from)")


class CrossAttentionKV(nn.Module):
  """Every decoder layer's cross-attention keys and values: ``{'layers_i': {'key', 'value'}}``.

  It declares the ``layers_i/encoder_decoder_attention/{key,value}`` projections of the decoder's attention and
  shares the decoder's scope (``nn.share_scope`` in ``Transformer.setup``), so it reads the decoder's own parameters
  and adds none. Each is ``[batch, heads, head_dim, in_length]``, the decoding caches' layout.
  """

  config: T5Config

  @nn.compact
  def __call__(self, encoded):
    return {f"layers_{i}": _LayerCrossKV(self.config, name=f"layers_{i}")(encoded)
            for i in range(self.config.num_decoder_layers)}


class _LayerCrossKV(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, encoded):
    return _KeyValue(self.config, name="encoder_decoder_attention")(encoded)


class _KeyValue(nn.Module):
  """The ``key`` and ``value`` projections of a ``MultiHeadDotProductAttention``, in the caches' layout."""

  config: T5Config

  @nn.compact
  def __call__(self, encoded):
    cfg = self.config
    out = {}
    for name in ("key", "value"):
      y = layers.DenseGeneral(cfg.num_heads * cfg.head_dim, dtype=cfg.dtype,
                              kernel_init=layers.default_attention_kernel_init, kernel_axes=("embed", "joined_kv"),
                              name=name)(encoded)
      out[name] = layers.to_cache_layout(y.reshape(y.shape[:-1] + (cfg.num_heads, cfg.head_dim)))
    return out


class Transformer(nn.Module):
  """T5 encoder-decoder sharing one ``token_embedder``."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared_embedding = layers.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim, dtype=cfg.dtype, attend_dtype=jnp.float32,
        embedding_init=nn.initializers.normal(stddev=1.0), name="token_embedder",
    )
    self.encoder = Encoder(config=cfg, shared_embedding=self.shared_embedding)
    self.decoder = Decoder(config=cfg, shared_embedding=self.shared_embedding)
    # The decoder's own key and value projections, seen from outside a decoding step: one scope, one set of
    # parameters, read through Flax.
    self.decoder_cross_kv = CrossAttentionKV(config=cfg)
    nn.share_scope(self.decoder_cross_kv, self.decoder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, enable_dropout=True):
    """``[batch, length]`` tokens (0 = padding) -> ``[batch, length, emb_dim]``."""
    cfg = self.config
    mask = layers.make_attention_mask(encoder_input_tokens > 0, encoder_input_tokens > 0, dtype=cfg.dtype)
    if encoder_segment_ids is not None:
      mask = layers.combine_masks(
          mask, layers.make_attention_mask(encoder_segment_ids, encoder_segment_ids, jnp.equal, dtype=cfg.dtype),
          dtype=cfg.dtype)
    return self.encoder(encoder_input_tokens, mask, encoder_positions, deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, enable_dropout=True,
             decode=False, max_decode_length=None, cross_kv=None):
    """Logits ``[batch, length, vocab]`` (float32) for the decoder inputs, attending to ``encoded``.

    ``encoder_input_tokens`` only gives the padding mask. With ``decode=True`` and
    no cache yet, this creates the cache for ``decoder_input_tokens.shape[1]``
    positions; with a cache, ``decoder_input_tokens`` is the one next token
    ``[batch, 1]`` (``decoder_target_tokens`` is then only used for its shape).

    ``cross_kv`` (decoding steps only): the cross-attention keys and values of
    :meth:`cross_attention_kv`, computed once per input; ``encoded`` is then not
    used (pass ``None``), and ``encoder_input_tokens`` stays ``[batch, in_length]``
    while the decoder rows may be ``batch * n`` (beams or samples, row ``b * n + j``),
    which share their input's keys and values.
    """
    cfg = self.config
    if cross_kv is not None:
      if not decode:
        raise ValueError("cross_kv is for decoding steps (decode=True)")
      if encoder_segment_ids is not None or decoder_segment_ids is not None:
        raise ValueError("packed inputs (segment ids) cannot be decoded incrementally")
      return self.decoder(
          None, decoder_input_tokens, decoder_positions=decoder_positions, decoder_mask=None,
          encoder_decoder_mask=encoder_input_tokens > 0, deterministic=not enable_dropout, decode=True,
          max_decode_length=max_decode_length, token_mask=jnp.ones_like(decoder_target_tokens), cross_kv=cross_kv)
    if decode:
      if encoder_segment_ids is not None or decoder_segment_ids is not None:
        raise ValueError("packed inputs (segment ids) cannot be decoded incrementally")
      decoder_mask = None  # the cache applies causality itself
      token_mask = jnp.ones_like(decoder_target_tokens)
    else:
      decoder_mask = layers.make_decoder_mask(decoder_target_tokens, cfg.dtype, decoder_segment_ids)
      token_mask = decoder_target_tokens > 0
    encoder_decoder_mask = layers.make_attention_mask(token_mask, encoder_input_tokens > 0, dtype=cfg.dtype)
    if encoder_segment_ids is not None:
      encoder_decoder_mask = layers.combine_masks(
          encoder_decoder_mask,
          layers.make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal, dtype=cfg.dtype),
          dtype=cfg.dtype)
    return self.decoder(
        encoded, decoder_input_tokens, decoder_positions=decoder_positions, decoder_mask=decoder_mask,
        encoder_decoder_mask=encoder_decoder_mask, deterministic=not enable_dropout, decode=decode,
        max_decode_length=max_decode_length, token_mask=token_mask)

  def cross_attention_kv(self, encoded):
    """Every decoder layer's cross-attention keys and values for ``encoded [batch, in_length, emb_dim]``.

    ``{'layers_i': {'key', 'value'}}``, each ``[batch, heads, head_dim, in_length]``: the projections of the encoder
    output by that layer's ``encoder_decoder_attention/{key,value}`` kernels, as its attention computes them. Computed
    once per input when it is encoded, then passed to every decoding step (``decode(..., cross_kv=...)``), so a step
    reads neither kernel.
    """
    return self.decoder_cross_kv(encoded)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None, *,
               enable_dropout: bool = True, decode: bool = False, max_decode_length: Optional[int] = None):
    """Teacher-forced logits ``[batch, target_length, vocab]``.

    ``decoder_input_tokens`` are the targets shifted right (0 first);
    ``decoder_target_tokens > 0`` marks real target tokens. For packed examples
    pass segment ids (attention never crosses segments) and positions (restart
    at 0 in each segment; relative positions are taken from them).
    """
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                          encoder_positions=encoder_positions, enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids=encoder_segment_ids, decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions, enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length)
