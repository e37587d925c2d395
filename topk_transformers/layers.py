"""Shared Flax linen layers, laid out like T5X so its checkpoints and axis rules map one to one.

Parameters carry T5X's logical axis names (``embed``, ``mlp``, ``heads``, ``kv``,
``joined_kv``, ``vocab``) through ``nn.with_logical_partitioning``; the trainer
maps them onto the device mesh (see ``partitioning.py``).

``MlpBlock`` is the one MLP of every model here (T5 v1.0 / v1.1 and ViT). Its
``top_k`` argument is the paper's change; see ``topk.py``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers import topk as topk_lib

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


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

    kernel = self.param(
        "kernel", nn.with_logical_partitioning(init, self.kernel_axes or None), kernel_shape, jnp.float32
    )
    kernel = jnp.asarray(kernel, self.dtype)
    inputs = jnp.asarray(inputs, self.dtype)
    contract = tuple(range(len(axis)))
    y = jax.lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))
    if self.use_bias:
      bias_axes = self.bias_axes if self.bias_axes is not None else self.kernel_axes[-len(features):]
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, bias_axes or None), features, jnp.float32)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def _resolve_activation(fn_or_string: Union[str, Callable]) -> Callable:
  if callable(fn_or_string):
    return fn_or_string
  if fn_or_string == "linear":
    return lambda x: x
  if fn_or_string == "gelu_exact":
    return functools.partial(nn.gelu, approximate=False)
  if hasattr(nn, fn_or_string):
    return getattr(nn, fn_or_string)
  raise ValueError(f"unknown MLP activation {fn_or_string!r}")


class MlpBlock(nn.Module):
  """Transformer MLP, ``wo(TopK(prod_i act_i(wi_i(x))))``.

  One activation gives T5 v1.0 / ViT (``wi``, ``wo``); several give the gated
  T5 v1.1 MLP (``wi_0``, ``wi_1``, ``wo``), whose Top-k acts on the product and
  ranks by magnitude since the product can be negative.

  Sows into the ``intermediates`` collection (when it is mutable), per call:
  ``nonzero_count`` (nonzero hidden activations summed over the counted tokens),
  ``token_count`` (counted tokens) and ``neuron_fire_count`` (``[mlp]``, on how
  many counted tokens each hidden unit was nonzero). ``mask`` (``[batch, length]``,
  nonzero for real tokens) excludes padding from these counts. The forward result
  does not depend on whether anything is sown.
  """

  intermediate_dim: int = 2048
  activations: Sequence[Union[str, Callable]] = ("relu",)
  kernel_init: Initializer = default_kernel_init
  intermediate_dropout_rate: float = 0.1
  dtype: DType = jnp.float32
  use_bias: bool = False
  bias_init: Initializer = nn.initializers.zeros
  top_k: Optional[int] = None
  top_k_method: str = "exact"
  top_k_recall_target: float = topk_lib.DEFAULT_RECALL_TARGET

  def __post_init__(self):
    # Bad k is an error when the model is built, not deep inside a jitted step.
    topk_lib.validate_top_k(self.top_k, self.top_k_method, self.top_k_recall_target)
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: Array, decode: bool = False, deterministic: bool = False,
               mask: Optional[Array] = None) -> Array:
    del decode  # the sparse decoding path hooks in here (decoding.py)
    gated = len(self.activations) > 1
    branches = []
    for i, act in enumerate(self.activations):
      name = f"wi_{i}" if gated else "wi"
      h = DenseGeneral(
          self.intermediate_dim, dtype=self.dtype, kernel_init=self.kernel_init,
          kernel_axes=("embed", "mlp"), use_bias=self.use_bias, bias_init=self.bias_init, name=name,
      )(inputs)
      branches.append(_resolve_activation(act)(h))
    x = functools.reduce(lambda a, b: a * b, branches)
    x = topk_lib.topk(x, self.top_k, self.top_k_method, self.top_k_recall_target, by_magnitude=gated)
    self._sow_stats(x, mask)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp")) if x.ndim == 3 else x
    x = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    return DenseGeneral(
        inputs.shape[-1], dtype=self.dtype, kernel_init=self.kernel_init, kernel_axes=("mlp", "embed"),
        use_bias=self.use_bias, bias_init=self.bias_init, name="wo",
    )(x)

  def _sow_stats(self, x: Array, mask: Optional[Array]) -> None:
    if not self.is_mutable_collection("intermediates"):
      return
    fired = (x != 0).reshape(-1, x.shape[-1]).astype(jnp.float32)
    if mask is None:
      weights = jnp.ones(fired.shape[:1], jnp.float32)
    else:
      weights = (jnp.broadcast_to(mask, x.shape[:-1]).reshape(-1) != 0).astype(jnp.float32)
    per_neuron = weights @ fired
    self.sow("intermediates", "nonzero_count", jnp.sum(per_neuron))
    self.sow("intermediates", "token_count", jnp.sum(weights))
    self.sow("intermediates", "neuron_fire_count", per_neuron)
