"""Shared Flax linen layers, laid out like T5X so its checkpoints and axis rules map one to one.

Parameters carry T5X's logical axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``joined_kv``, ``vocab``) through ``nn.with_logical_partitioning``; the trainer
maps them onto the device mesh (see ``partitioning.py``).

``MlpBlock`` is the one MLP of every model here (T5 v1.0 / v1.1 and ViT). Its
``top_k`` argument is the paper's change; see ``topk.py``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers import autotune
from topk_transformers import mlp_steps
from topk_transformers import topk as topk_lib

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

TRANSPOSED = "transposed"
"""The collection of kernels laid out ``[out..., in...]`` for decoding (``t5.decoding.transpose_for_decoding``):
where a layer finds its kernel there, it reads that one, and its ``params`` need not hold the kernel."""

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_attention_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _normalize_axes(axes: Iterable[int], ndim: int) -> Tuple[int, ...]:
  return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


def _canonicalize_tuple(x):
  return tuple(x) if isinstance(x, Iterable) else (x,)


class DenseGeneral(nn.Module):
  """A linear map over arbitrary axes, with T5X's kernel layout and logical axes.

  The kernel is initialised as if it were 2-D ``[prod(in), prod(out)]`` (fan-in
  over all contracted axes), as T5X does.
  """

  features: Union[int, Sequence[int]]
  axis: Union[int, Sequence[int]] = -1
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init
  kernel_axes: Tuple[str, ...] = ()
  use_bias: bool = False
  bias_init: Initializer = nn.initializers.zeros
  bias_axes: Optional[Tuple[str, ...]] = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    features = _canonicalize_tuple(self.features)
    axis = _normalize_axes(_canonicalize_tuple(self.axis), inputs.ndim)
    kernel_shape = tuple(inputs.shape[ax] for ax in axis) + features
    flat_shape = (int(np.prod([inputs.shape[ax] for ax in axis])), int(np.prod(features)))

    def init(rng, shape, dtype=jnp.float32):
      del shape
      return jnp.reshape(self.kernel_init(rng, flat_shape, dtype), kernel_shape)

    inputs = jnp.asarray(inputs, self.dtype)
    if not self.is_initializing() and self.has_variable(TRANSPOSED, "kernel"):
      y = mlp_steps.transposed_product(inputs, jnp.asarray(self.get_variable(TRANSPOSED, "kernel"), self.dtype),
                                       axis)
    else:
      kernel = self.param(
          "kernel", nn.with_logical_partitioning(init, self.kernel_axes or None), kernel_shape, jnp.float32
      )
      kernel = jnp.asarray(kernel, self.dtype)
      contract = tuple(range(len(axis)))
      y = jax.lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))
    if self.use_bias:
      bias_axes = self.bias_axes if self.bias_axes is not None else self.kernel_axes[-len(features):]
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, bias_axes or None), features, jnp.float32)
      y = y + jnp.asarray(bias, self.dtype)
    return y


resolve_activation = mlp_steps.resolve_activation


class Weights(nn.Module):
  """A kernel ``[in, out]`` and, with ``use_bias``, a bias ``[out]``, declared as ``DenseGeneral`` declares them.

  Same names, logical axes, initialisers and order (the same rng gives the same values), but returned rather than
  applied, so that each of ``MlpBlock``'s paths reads the parameters it needs through Flax. ``kernel=False``
  declares the bias alone: the predicted decoding step reads ``wi`` from its row layout instead. A kernel found in
  the ``transposed`` collection is returned as ``kernel_t`` ``[out, in]`` in place of ``kernel``.
  """

  shape: Tuple[int, int]
  kernel_axes: Tuple[str, str]
  kernel_init: Initializer = default_kernel_init
  use_bias: bool = False
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, kernel: bool = True) -> Dict[str, Array]:
    out = {}
    if kernel and not self.is_initializing() and self.has_variable(TRANSPOSED, "kernel"):
      out["kernel_t"] = self.get_variable(TRANSPOSED, "kernel")
    elif kernel:
      out["kernel"] = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                                 self.shape, jnp.float32)
    if self.use_bias:
      out["bias"] = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.kernel_axes[-1:]),
                               self.shape[-1:], jnp.float32)
    return out


class MlpBlock(nn.Module):
  """Transformer MLP, ``wo(TopK(prod_i act_i(wi_i(x))))``.

  One activation gives T5 v1.0 / ViT (``wi``, ``wo``); several give the gated
  T5 v1.1 MLP (``wi_0``, ``wi_1``, ``wo``), whose Top-k acts on the product and
  ranks by magnitude since the product can be negative.

  ``top_k_method`` (``topk.METHODS``; default ``"auto"``, the fastest exact
  method for the backend and shape) chooses how the k units are found; every
  exact method keeps the same units, so training, evaluation and the sown
  statistics below do not depend on it.

  Sows into the ``intermediates`` collection (when it is mutable), per call, the
  ``mlp_steps.Statistics``: ``nonzero_count``, ``token_count`` and
  ``neuron_fire_count`` (``[mlp]``). ``mask`` (``[batch, length]``, nonzero for
  real tokens) excludes padding from these counts. The forward result does not
  depend on whether anything is sown.

  Decoding (``decode=True``) with an active Top-k takes one of the steps of
  ``mlp_steps.py``, on the same parameters, with the same statistics:

  * ``mlp_steps.sparse_step`` reads only the ``k`` selected rows of ``wo``.
    ``sparse_decode``: ``None`` chooses it by measuring both on the device
    (``autotune``, cached), or with ``TOPK_AUTOTUNE=0`` by the rule measured on
    XLA:CPU, ``tokens * k <= d_ff / 4`` (tokens = all positions of the call,
    e.g. batch x beams in a decoding step; the gather reads each row at lower
    throughput than a streaming matmul); ``True`` / ``False`` force it on / off.
  * ``mlp_steps.predicted_step``, with ``decode_candidates = c`` and a predictor
    in this block's ``predictors`` collection (``predictors.py``: ``a``, ``b``,
    ``wi_rows`` and, for gated blocks, ``b_cols``), computes only the ``c``
    candidates' hidden units. It reads ``wi`` from ``wi_rows`` alone, so the
    ``wi`` kernels may be left out of the parameters (``predictors.prepare``).
    Without a predictor (or with ``c = None``) nothing changes.

  Neither is taken while dropout is active (forcing one is then an error), nor by
  ``init``. ``use_row_kernels=False`` reads their rows with XLA's gather everywhere.
  """

  intermediate_dim: int = 2048
  activations: Sequence[Union[str, Callable]] = ("relu",)
  kernel_init: Initializer = default_kernel_init
  intermediate_dropout_rate: float = 0.1
  dtype: DType = jnp.float32
  use_bias: bool = False
  bias_init: Initializer = nn.initializers.zeros
  top_k: Optional[int] = None
  top_k_method: str = topk_lib.DEFAULT_METHOD
  top_k_recall_target: float = topk_lib.DEFAULT_RECALL_TARGET
  sparse_decode: Optional[bool] = None
  decode_candidates: Optional[int] = None
  use_row_kernels: bool = True

  def __post_init__(self):
    # Bad k is an error when the model is built, not deep inside a jitted step.
    topk_lib.validate_top_k(self.top_k, self.top_k_method, self.top_k_recall_target)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: Array, decode: bool = False, deterministic: bool = False,
               mask: Optional[Array] = None) -> Array:
    path = self._path(inputs, decode, deterministic)
    params = self._params(inputs.shape[-1], wi_kernels=path != "predicted")
    stats = None
    if path == "sparse":
      y, stats = mlp_steps.sparse_step(params, inputs, self.step_settings(), mask)
    elif path == "predicted":
      predictor = {name: self.get_variable("predictors", name) for name in ("a", "b", "b_cols", "wi_rows")
                   if self.has_variable("predictors", name)}
      y, stats = mlp_steps.predicted_step(params, predictor, inputs, self.step_settings(), mask)
    else:
      h = mlp_steps.hidden(params, inputs, self.activations, self.dtype)
      h = topk_lib.topk(h, self.top_k, self.top_k_method, self.top_k_recall_target,
                        by_magnitude=len(self.activations) > 1)
      if self.is_mutable_collection("intermediates"):
        stats = mlp_steps.statistics(h, mask)
      h = nn.with_logical_constraint(h, ("batch", "length", "mlp")) if h.ndim == 3 else h
      h = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
      y = mlp_steps.linear(h, params["wo"], self.dtype)
    if stats is not None and self.is_mutable_collection("intermediates"):
      for name, value in stats._asdict().items():
        self.sow("intermediates", name, value)
    return y

  def step_settings(self) -> mlp_steps.Settings:
    """The settings of this block's decoding steps."""
    return mlp_steps.Settings(
        top_k=self.top_k, activations=tuple(self.activations), method=self.top_k_method,
        recall_target=self.top_k_recall_target, candidates=self.decode_candidates, dtype=self.dtype,
        row_kernels=self.use_row_kernels)

  def _params(self, width: int, wi_kernels: bool = True) -> Dict[str, Dict[str, Array]]:
    """``{'wi' | 'wi_i': ..., 'wo': ...}``, each ``{'kernel', 'bias'?}``: T5X's names, shapes and logical axes."""
    out = {}
    for name in mlp_steps.branch_names(len(self.activations)):
      out[name] = Weights((width, self.intermediate_dim), ("embed", "mlp"), self.kernel_init, self.use_bias,
                          self.bias_init, name=name)(kernel=wi_kernels)
    out["wo"] = Weights((self.intermediate_dim, width), ("mlp", "embed"), self.kernel_init, self.use_bias,
                        self.bias_init, name="wo")()
    return out

  def _path(self, inputs: Array, decode: bool, deterministic: bool) -> str:
    """``'dense'``, ``'sparse'`` or ``'predicted'``: static, from shapes, settings and the variables present."""
    if not decode or self.is_initializing() or not topk_lib.is_active(self.top_k, self.intermediate_dim):
      return "dense"  # init creates the parameters through the dense path
    dropout_on = not deterministic and self.intermediate_dropout_rate > 0.0
    if self.decode_candidates is not None and self.has_variable("predictors", "a"):
      if dropout_on:
        raise ValueError(f"predicted decoding needs deterministic=True (intermediate dropout "
                         f"{self.intermediate_dropout_rate} is active)")
      return "predicted"
    if self.sparse_decode is None:
      if dropout_on:
        return "dense"
      tokens = int(np.prod(inputs.shape[:-1]))
      rule = "sparse" if 4 * tokens * self.top_k <= self.intermediate_dim else "dense"  # measured on XLA:CPU
      return autotune.decode_path(inputs.shape, self.intermediate_dim, self.step_settings(), default=rule)
    if self.sparse_decode and dropout_on:
      raise ValueError(f"sparse_decode=True needs deterministic=True (intermediate dropout "
                       f"{self.intermediate_dropout_rate} is active)")
    return "sparse" if self.sparse_decode else "dense"


# ---------------------------------------------------------------------------
# Embedding, T5 layer norm, attention with a KV cache, relative position biases.
# ---------------------------------------------------------------------------

default_embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


class Embed(nn.Module):
  """Token embedding ``[vocab, embed]`` (param ``embedding``); ``attend`` gives tied logits.

  ``one_hot=True`` does the lookup as a one-hot matmul (T5X's choice for old
  SPMD partitioners); the default gather gives the same values.
  """

  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  attend_dtype: Optional[DType] = None
  embedding_init: Initializer = default_embed_init
  one_hot: bool = False

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32,
    )

  def __call__(self, inputs: Array) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"Embed needs integer token ids, got dtype {inputs.dtype}")
    table = jnp.asarray(self.embedding, self.dtype)
    if self.one_hot:
      one_hot = jax.nn.one_hot(inputs, self.num_embeddings, dtype=self.dtype)
      return jnp.dot(one_hot, table)
    return jnp.take(table, inputs, axis=0)

  def attend(self, query: Array) -> Array:
    """``query @ embedding.T``: logits over the vocabulary from ``[..., embed]``."""
    dtype = self.attend_dtype if self.attend_dtype is not None else self.dtype
    query = jnp.asarray(query, dtype)
    # Contracted as the table lies: written as query @ embedding.T, XLA:CPU fuses the transpose into the
    # product and reads the table at two thirds of the rate in a decoding step.
    return jax.lax.dot_general(query, jnp.asarray(self.embedding, dtype), (((query.ndim - 1,), (1,)), ((), ())))


class LayerNorm(nn.Module):
  """T5's layer norm: RMS scaling only (no mean subtraction, no bias), computed in float32."""

  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * jax.lax.rsqrt(mean2 + self.epsilon), self.dtype)
    scale = self.param("scale", nn.with_logical_partitioning(self.scale_init, ("embed",)), (x.shape[-1],), jnp.float32)
    return y * jnp.asarray(scale, self.dtype)


def dot_product_attention(query: Array, key: Array, value: Array, bias: Optional[Array] = None,
                          dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False,
                          dtype: DType = jnp.float32, float32_logits: bool = False,
                          kv_layout: str = "bkhd") -> Array:
  """``softmax(q . k + bias) v``; ``query [batch, q_length, heads, head_dim]``.

  ``key`` and ``value`` are ``[batch, kv_length, heads, head_dim]`` (``kv_layout="bkhd"``, as projected) or
  ``[batch, heads, head_dim, kv_length]`` (``"bhdk"``, the decoding caches' layout, T5X's: a step's products
  with the cache then read it as it lies, where XLA:CPU would transpose and copy a ``bkhd`` cache in every step).

  No ``1/sqrt(head_dim)`` factor: T5 folds it into the query initialisation
  (see ``MultiHeadDotProductAttention``), so pretrained T5 weights expect none.
  Dropout on the attention weights is broadcast over the query axis, as T5.
  """
  if kv_layout not in ("bkhd", "bhdk"):
    raise ValueError(f"kv_layout must be 'bkhd' or 'bhdk', got {kv_layout!r}")
  kv = "bkhd" if kv_layout == "bkhd" else "bhdk"
  if float32_logits:
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
  logits = jnp.einsum(f"bqhd,{kv}->bhqk", query, key)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  weights = jax.nn.softmax(logits).astype(dtype)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = list(weights.shape)
    shape[-2] = 1
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (jnp.broadcast_to(keep, weights.shape).astype(dtype) / jnp.asarray(keep_prob, dtype))
  return jnp.einsum(f"bhqk,{kv}->bqhd", weights, value.astype(dtype))


def to_cache_layout(x: Array) -> Array:
  """``[batch, length, heads, head_dim]`` -> the caches' ``[batch, heads, head_dim, length]``."""
  return jnp.transpose(x, (0, 2, 3, 1))


class MultiHeadDotProductAttention(nn.Module):
  """T5 multi-head attention with an optional autoregressive KV cache.

  Kernels are stored like T5X's example network: ``query``/``key``/``value``
  ``[embed, heads * head_dim]`` with axes ``('embed', 'joined_kv')`` and ``out``
  ``[heads * head_dim, embed]`` with ``('joined_kv', 'embed')``, so T5X checkpoints
  load as they are. The query kernel is initialised ``1/sqrt(head_dim)`` smaller
  instead of scaling the logits.

  ``decode=True``: the first call (no ``cache`` variables yet, e.g. ``init`` or
  ``apply(..., mutable=['cache'])``) creates ``cached_key``/``cached_value``
  ``[batch, heads, head_dim, length]`` (T5X's layout, which a step reads as it
  lies) for the full input length and a scalar
  ``cache_index``, and computes ordinary attention. Each later call takes one
  position ``[batch, 1, embed]``, writes its key and value at ``cache_index``,
  attends to positions ``<= cache_index`` and advances the index. ``bias`` in a
  decoding step is the ``[..., 1, length]`` row of the current position.
  """

  num_heads: int
  head_dim: int
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: Initializer = default_attention_kernel_init
  float32_logits: bool = False

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array] = None,
               bias: Optional[Array] = None, *, decode: bool = False, deterministic: bool = False) -> Array:
    joined = self.num_heads * self.head_dim
    depth_scaling = jnp.sqrt(self.head_dim).astype(jnp.float32)

    def query_init(*args):
      return self.kernel_init(*args) / depth_scaling

    def project(x, name, init):
      y = DenseGeneral(joined, dtype=self.dtype, kernel_init=init, kernel_axes=("embed", "joined_kv"), name=name)(x)
      y = y.reshape(y.shape[:-1] + (self.num_heads, self.head_dim))
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    query = project(inputs_q, "query", query_init)
    key = project(inputs_kv, "key", self.kernel_init)
    value = project(inputs_kv, "value", self.kernel_init)

    kv_layout = "bkhd"
    if decode:
      initialized = self.has_variable("cache", "cached_key")
      shape = (key.shape[0], key.shape[2], key.shape[3], key.shape[1])  # [batch, heads, head_dim, length]
      cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
      if initialized:
        batch, heads, depth, length = cached_key.value.shape
        if query.shape != (batch, 1, heads, depth):
          raise ValueError(f"decoding step expects one position of shape {(batch, 1, heads, depth)}, "
                           f"got query shape {query.shape}")
        cur = cache_index.value
        zero = jnp.array(0, dtype=jnp.int32)
        at = (zero, zero, zero, cur)
        key = jax.lax.dynamic_update_slice(cached_key.value, to_cache_layout(key).astype(cached_key.value.dtype), at)
        value = jax.lax.dynamic_update_slice(
            cached_value.value, to_cache_layout(value).astype(cached_value.value.dtype), at)
        cached_key.value = key
        cached_value.value = value
        cache_index.value = cur + 1
        kv_layout = "bhdk"
        # The single query sees the positions written so far, not the zeros after them.
        step_mask = jnp.broadcast_to(jnp.arange(length) <= cur, (batch, 1, 1, length))
        mask = combine_masks(mask, step_mask)

    attention_bias = None
    if mask is not None:
      attention_bias = jnp.where(mask > 0, 0.0, -1e10).astype(self.dtype)
    attention_bias = combine_biases(attention_bias, bias)

    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    x = dot_product_attention(query, key, value, bias=attention_bias, dropout_rng=dropout_rng,
                              dropout_rate=self.dropout_rate, deterministic=deterministic, dtype=self.dtype,
                              float32_logits=self.float32_logits, kv_layout=kv_layout)
    x = x.reshape(x.shape[:-2] + (joined,))
    return DenseGeneral(inputs_q.shape[-1], dtype=self.dtype, kernel_init=self.kernel_init,
                        kernel_axes=("joined_kv", "embed"), name="out")(x)


def relative_position_bucket(relative_position, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
  """T5's bucket of ``memory_position - query_position`` (NumPy, int32).

  Half the buckets (per direction when bidirectional) are exact distances, the
  rest grow logarithmically up to ``max_distance``; farther is the last bucket.
  Unidirectional (decoder) maps every key after the query to bucket 0.
  """
  n = -np.asarray(relative_position, dtype=np.int32)
  ret = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide="ignore"):
    val_if_large = max_exact + (
        np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
        / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """T5's relative position biases ``[batch|1, heads, q_len, k_len]`` (param ``rel_embedding``).

  Called once per stack (the table is shared by all layers of the encoder, and
  of the decoder). Buckets come from :func:`relative_position_bucket` evaluated
  in NumPy, so they match T5 bit for bit; for traced positions (packed
  examples, decoding) the bucket of every distance in ``[-max_distance,
  max_distance]`` is tabulated once and looked up, since farther distances all
  share the last bucket.
  """

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: DType = jnp.float32
  embedding_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

  def _table(self):
    table = self.param("rel_embedding", nn.with_logical_partitioning(self.embedding_init, ("heads", "relpos_buckets")),
                       (self.num_heads, self.num_buckets), jnp.float32)
    return jnp.asarray(table, self.dtype)

  def _bucket_traced(self, relative_position: Array, bidirectional: bool) -> Array:
    distances = np.arange(-self.max_distance, self.max_distance + 1)
    lookup = jnp.asarray(relative_position_bucket(distances, bidirectional, self.num_buckets, self.max_distance))
    clipped = jnp.clip(relative_position, -self.max_distance, self.max_distance) + self.max_distance
    return lookup[clipped]

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True, query_positions: Optional[Array] = None,
               key_positions: Optional[Array] = None, decode: bool = False) -> Array:
    """Biases for query positions ``0..qlen-1`` and keys ``0..klen-1``.

    Args:
      qlen, klen: lengths, used when positions are not given.
      bidirectional: False for the decoder's causal self-attention.
      query_positions, key_positions: ``[batch, len]`` positions within each
        packed example; the bias then has a batch axis.
      decode: decoding steps: the first call (cache not created yet) returns the
        full ``[1, heads, qlen, klen]`` bias and creates ``cache/cache_index``;
        later calls return the row ``[1, heads, 1, klen]`` of the current
        position and advance the index.
    """
    table = self._table()
    if decode:
      initialized = self.has_variable("cache", "cache_index")
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
      if initialized:
        cur = index.value
        index.value = cur + 1
        buckets = self._bucket_traced(jnp.arange(klen, dtype=jnp.int32)[None, :] - cur, bidirectional)
        return jnp.take(table, buckets, axis=1)[None]
    if query_positions is None and key_positions is None:
      rel = np.arange(klen, dtype=np.int32)[None, :] - np.arange(qlen, dtype=np.int32)[:, None]
      buckets = relative_position_bucket(rel, bidirectional, self.num_buckets, self.max_distance)
      return jnp.take(table, jnp.asarray(buckets), axis=1)[None]
    if query_positions is None or key_positions is None:
      raise ValueError("RelativePositionBiases needs both query_positions and key_positions, or neither")
    rel = key_positions[:, None, :].astype(jnp.int32) - query_positions[:, :, None].astype(jnp.int32)
    buckets = self._bucket_traced(rel, bidirectional)  # [batch, q, k]
    return jnp.moveaxis(jnp.take(table, buckets, axis=1), 1, 0)  # [batch, heads, q, k]


# ---------------------------------------------------------------------------
# Masks: 1 (or True) where attention is allowed, shaped [batch, 1, q_len, k_len].
# ---------------------------------------------------------------------------

def make_attention_mask(query_input: Array, key_input: Array, pairwise_fn: Callable = jnp.multiply,
                        extra_batch_dims: int = 0, dtype: DType = jnp.float32) -> Array:
  """``pairwise_fn(query_input[..., :, None], key_input[..., None, :])`` with a head axis added."""
  mask = pairwise_fn(jnp.expand_dims(query_input, -1), jnp.expand_dims(key_input, -2))
  mask = jnp.expand_dims(mask, -3)
  mask = jnp.expand_dims(mask, tuple(range(extra_batch_dims)))
  return mask.astype(dtype)


def make_causal_mask(x: Array, extra_batch_dims: int = 0, dtype: DType = jnp.float32) -> Array:
  """Mask letting position ``i`` see positions ``<= i`` (depends on ``x``'s shape only)."""
  idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(idxs, idxs, jnp.greater_equal, extra_batch_dims=extra_batch_dims, dtype=dtype)


def _combine(items: Sequence[Optional[Array]], op: Callable[[Array, Array], Array], what: str) -> Optional[Array]:
  """``op`` folded over the items that are not ``None`` (``None`` if all are); they must have one rank."""
  items = [x for x in items if x is not None]
  if not items:
    return None
  if any(x.ndim != items[0].ndim for x in items):
    raise ValueError(f"{what} must have the same rank, got {[x.ndim for x in items]}")
  return functools.reduce(op, items)


def combine_masks(*masks: Optional[Array], dtype: DType = jnp.float32) -> Optional[Array]:
  """Logical and of the masks that are not ``None`` (``None`` if all are)."""
  mask = _combine(masks, jnp.logical_and, "masks")
  return None if mask is None else mask.astype(dtype)


def combine_biases(*biases: Optional[Array]) -> Optional[Array]:
  """Sum of the biases that are not ``None`` (``None`` if all are)."""
  return _combine(biases, jnp.add, "biases")


def make_decoder_mask(decoder_target_tokens: Array, dtype: DType = jnp.float32,
                      decoder_segment_ids: Optional[Array] = None) -> Array:
  """Causal mask and padding mask (targets > 0), plus same-segment mask for packed examples."""
  masks = [
      make_causal_mask(decoder_target_tokens, dtype=dtype),
      make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0, dtype=dtype),
  ]
  if decoder_segment_ids is not None:
    masks.append(make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal, dtype=dtype))
  return combine_masks(*masks, dtype=dtype)
