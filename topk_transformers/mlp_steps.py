"""The MLP's decoding steps, as pure functions ``(params, x, settings) -> (y, statistics)``.

``layers.MlpBlock`` declares the parameters and chooses the path; the algorithms live here, in JAX without Flax
state, so each can be called and tested on its own:

* :func:`sparse_step`: the hidden units in full, the Top-k of them, then only those ``k`` rows of ``wo``
  (``sum_j v_j * wo[i_j, :]``) instead of the scatter and the whole ``wo`` product.
* :func:`predicted_step`: a low-rank predictor scores every unit (``x @ a @ b``), the ``c`` best are the candidates,
  their hidden activations come from their ``c`` rows of ``wi`` (row layout, ``predictors.prepare``), then the Top-k
  among them and its ``k`` rows of ``wo``. With ``c >= d_ff``, or a predictor that ranks the units as they are, the
  result is the sparse step's.

Both read their rows through ``row_kernels`` (on CPU in float32 a kernel that reads each row once; on GPU and TPU
Pallas kernels where measured faster; elsewhere XLA's gather). Every path, the dense one included, counts its units
with :func:`statistics` and adds its biases with :func:`add_bias`.

``params`` is the MLP's parameter dict, as ``MlpBlock`` declares it: ``{'wi': {'kernel', 'bias'?}, 'wo': ...}``, or
``wi_0``, ``wi_1`` for the gated v1.1 MLP; kernels ``[in, out]``. A layer without ``'bias'`` has none.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from topk_transformers import row_kernels
from topk_transformers import topk as topk_lib
from topk_transformers.errors import ConfigError

Array = jax.Array
Params = Mapping[str, Mapping[str, Array]]


def resolve_activation(fn_or_string: Union[str, Callable]) -> Callable:
  """A callable from an activation name (``'relu'``, ``'gelu'``, ``'gelu_exact'``, ``'linear'``, any ``nn`` name)."""
  if callable(fn_or_string):
    return fn_or_string
  if fn_or_string == "linear":
    return lambda x: x
  if fn_or_string == "gelu_exact":
    return functools.partial(nn.gelu, approximate=False)
  if hasattr(nn, fn_or_string):
    return getattr(nn, fn_or_string)
  raise ConfigError(f"unknown MLP activation {fn_or_string!r}")


def branch_names(branches: int) -> Tuple[str, ...]:
  """The ``wi`` parameters of an MLP of this many branches: ``('wi',)``, or ``('wi_0', 'wi_1', ...)`` (gated)."""
  return ("wi",) if branches == 1 else tuple(f"wi_{i}" for i in range(branches))


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a decoding step selects its units and reads its rows (``MlpBlock``'s fields of the same meaning)."""

  top_k: int
  """Hidden units kept per token; the steps need an active Top-k (``0 < top_k < d_ff``)."""
  activations: Tuple[Union[str, Callable], ...] = ("relu",)
  """One per ``wi`` branch; several are multiplied (gated v1.1), and the Top-k then ranks by magnitude."""
  method: str = topk_lib.DEFAULT_METHOD
  """How the k units are found (``topk.METHODS``)."""
  recall_target: float = topk_lib.DEFAULT_RECALL_TARGET
  """Recall target of the ``approx`` method."""
  candidates: Optional[int] = None
  """Units the predictor proposes per token (:func:`predicted_step`; at least ``top_k``); unused by the sparse step."""
  dtype: Any = jnp.float32
  """Computation dtype; parameters are cast to it as they are read."""
  row_kernels: bool = True
  """Read rows through the CPU row kernels where they apply; ``False``: XLA's gather everywhere."""

  def __post_init__(self):
    if self.top_k is None:
      raise ConfigError("the sparse and predicted MLP steps need a top_k")
    topk_lib.validate_top_k(self.top_k, self.method, self.recall_target)
    activations = (self.activations,) if isinstance(self.activations, str) else tuple(self.activations)
    if not activations:
      raise ConfigError("an MLP step needs at least one activation")
    for act in activations:
      resolve_activation(act)
    object.__setattr__(self, "activations", activations)
    c = self.candidates
    if c is not None and (isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < self.top_k):
      raise ConfigError(f"candidates must be an integer of at least top_k ({self.top_k}) or None, got {c!r}")

  @property
  def gated(self) -> bool:
    return len(self.activations) > 1

  @property
  def native(self) -> Optional[bool]:
    """``row_kernels``' ``native`` argument."""
    return None if self.row_kernels else False


class Statistics(NamedTuple):
  """What an MLP call sows into ``intermediates`` (padding excluded)."""

  nonzero_count: Array
  """Nonzero hidden activations summed over the counted tokens."""
  token_count: Array
  """Counted tokens."""
  neuron_fire_count: Array
  """``[mlp]``: on how many counted tokens each hidden unit was nonzero."""


def statistics(values: Array, mask: Optional[Array] = None, idx: Optional[Array] = None,
               units: Optional[int] = None) -> Statistics:
  """The statistics of one MLP call, from its hidden activations after the Top-k.

  ``values``: ``[..., mlp]`` (the dense path), or the ``k`` selected values ``[..., k]`` with their units ``idx``
  ``[..., k]`` of ``units`` (the decoding steps). ``mask`` (``[...]``, nonzero for real tokens) excludes padding. A
  selected zero (fewer than k units were nonzero) does not count as fired.
  """
  fired = (values != 0).reshape(-1, values.shape[-1]).astype(jnp.float32)
  if mask is None:
    weights = jnp.ones(fired.shape[:1], jnp.float32)
  else:
    weights = (jnp.broadcast_to(mask, values.shape[:-1]).reshape(-1) != 0).astype(jnp.float32)
  if idx is None:
    per_neuron = weights @ fired
  else:
    per_neuron = jnp.zeros((units,), jnp.float32).at[idx.reshape(-1)].add((fired * weights[:, None]).reshape(-1))
  return Statistics(jnp.sum(per_neuron), jnp.sum(weights), per_neuron)


def add_bias(y: Array, layer: Mapping[str, Array], dtype, units: Optional[Array] = None) -> Array:
  """The one bias rule: ``y + bias`` in ``dtype`` (``bias[units]`` when ``y`` holds only those units); a layer
  without ``'bias'`` adds nothing."""
  if "bias" not in layer:
    return y
  bias = jnp.asarray(layer["bias"], dtype)
  return y + (bias if units is None else jnp.take(bias, units))


def transposed_product(x: Array, kernel_t: Array, axis: Tuple[int, ...]) -> Array:
  """``x`` contracted over its ``axis`` with ``kernel_t [out..., in...]``: ``[rest of x..., out...]``, the product
  with the ``[in..., out...]`` kernel, read in the layout in which XLA:CPU streams a few tokens' product fastest
  (each output's weights contiguous)."""
  n_out = kernel_t.ndim - len(axis)
  y = jax.lax.dot_general(kernel_t, x, ((tuple(range(n_out, kernel_t.ndim)), tuple(axis)), ((), ())))
  return jnp.moveaxis(y, tuple(range(n_out)), tuple(range(y.ndim - n_out, y.ndim)))


def linear(x: Array, layer: Mapping[str, Array], dtype) -> Array:
  """``x @ kernel + bias`` over the last axis of ``x``, in ``dtype`` (as ``layers.DenseGeneral`` computes it);
  from ``kernel_t [out, in]`` where the layer has that instead (``t5.decoding.transpose_for_decoding``)."""
  x = jnp.asarray(x, dtype)
  if "kernel_t" in layer:
    return add_bias(transposed_product(x, jnp.asarray(layer["kernel_t"], dtype), (x.ndim - 1,)), layer, dtype)
  kernel = jnp.asarray(layer["kernel"], dtype)
  return add_bias(jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))), layer, dtype)


def hidden(params: Params, x: Array, activations, dtype) -> Array:
  """``prod_i act_i(x @ wi_i + b_i)``: every hidden unit, before the Top-k."""
  branches = [resolve_activation(act)(linear(x, params[name], dtype))
              for act, name in zip(activations, branch_names(len(activations)))]
  return functools.reduce(lambda u, v: u * v, branches)


def _wo(params: Params, width: int, units: Optional[int] = None) -> Mapping[str, Array]:
  """``params['wo']``, checked: ``[units, width]`` (any number of units when ``units`` is None)."""
  if "wo" in params and "kernel_t" in params["wo"]:
    raise ConfigError("the sparse and predicted MLP steps read rows of 'wo': leave it out of the transposed "
                      "kernels (t5.decoding.transpose_for_decoding keeps it for a model with an active Top-k)")
  if "wo" not in params or "kernel" not in params["wo"]:
    raise ConfigError("an MLP step needs the MLP's 'wo' parameters")
  shape = tuple(params["wo"]["kernel"].shape)
  units = shape[0] if units is None else units
  if shape != (units, width):
    raise ConfigError(f"'wo' kernel has shape {shape}, expected {(units, width)}")
  return params["wo"]


def _rows_of_wo(vals: Array, idx: Array, wo: Mapping[str, Array], settings: Settings) -> Array:
  """``sum_j vals_j * wo[idx_j] + bias``: the k rows of ``wo``, through ``row_kernels`` when ``wo`` is already in the
  computation dtype (its XLA path is then ``sparse_matmul``'s product; its other candidates, the CPU handler for
  float32 and the Pallas kernels on GPU and TPU, are taken where measured faster)."""
  kernel = wo["kernel"]
  if kernel.dtype == jnp.dtype(settings.dtype):
    y = row_kernels.gather_vecmat(vals.astype(kernel.dtype), kernel, idx, native=settings.native)
  else:
    y = topk_lib.sparse_matmul(vals, idx, kernel, dtype=settings.dtype)
  return add_bias(y, wo, settings.dtype)


def _select(h: Array, settings: Settings) -> Tuple[Array, Array]:
  return topk_lib.select_f32(h, settings.top_k, settings.method, settings.recall_target, settings.gated)


def sparse_step(params: Params, x: Array, settings: Settings,
                mask: Optional[Array] = None) -> Tuple[Array, Statistics]:
  """``wo(TopK(h))`` for ``x [..., embed]`` from the k selected units: the rows of ``wo`` they index, nothing else.

  Same output as the dense Top-k MLP up to float rounding, same statistics.
  """
  h = hidden(params, x, settings.activations, settings.dtype)
  wo = _wo(params, x.shape[-1], h.shape[-1])
  vals, idx = _select(h, settings)
  return _rows_of_wo(vals, idx, wo, settings), statistics(vals, mask, idx, h.shape[-1])


def predicted_step(params: Params, predictor: Mapping[str, Array], x: Array, settings: Settings,
                   mask: Optional[Array] = None) -> Tuple[Array, Statistics]:
  """``wo(TopK(h))`` from the ``settings.candidates`` units the predictor proposes: ``c`` rows of each ``wi``,
  ``k`` rows of ``wo``.

  ``predictor``: ``a [embed, r]``, ``b [branches, r, mlp]``, ``wi_rows [branches, mlp, embed]`` (the ``wi`` kernels
  in row layout) and, optionally, ``b_cols [r, branches * mlp]`` (``predictors.prepare``). ``params`` needs ``wo``
  and the ``wi`` biases, if any, not the ``wi`` kernels (``wi_rows`` holds them).
  """
  if settings.candidates is None:
    raise ConfigError("the predicted MLP step needs settings.candidates")
  if "wi_rows" not in predictor:
    raise ConfigError("predicted decoding needs the 'wi_rows' layout of the predictors (predictors.prepare)")
  n, width = len(settings.activations), x.shape[-1]
  wo = _wo(params, width)
  ff = wo["kernel"].shape[0]
  a, b, wi_rows = predictor["a"], predictor["b"], predictor["wi_rows"]
  if b.shape[0] != n or b.shape[2] != ff or wi_rows.shape != (n, ff, width):
    raise ConfigError(f"predictor shapes b {b.shape}, wi_rows {wi_rows.shape} do not fit an MLP of {n} branch(es), "
                      f"{ff} units, width {width}")
  dtype, c = settings.dtype, min(settings.candidates, ff)
  x = jnp.asarray(x, dtype)
  acts = [resolve_activation(act) for act in settings.activations]
  if c < ff:
    low = jnp.dot(x, jnp.asarray(a, dtype))
    # Products with b as it lies: an einsum over b [n, r, mlp] makes XLA:CPU transpose and copy b in every
    # step, and so does a slice b[i] for n > 1. For v1.0, b[0] is a free reshape; for gated v1.1 prepare's
    # b_cols [r, n * mlp] (the branches side by side) gives both in one product.
    if n == 1:
      pred = [jnp.dot(low, jnp.asarray(b[0], dtype))]
    elif "b_cols" in predictor:
      both = jnp.dot(low, jnp.asarray(predictor["b_cols"], dtype))
      pred = [both[..., i * ff:(i + 1) * ff] for i in range(n)]
    else:
      pred = [jnp.dot(low, jnp.asarray(b[i], dtype)) for i in range(n)]
    # v1.0 ranks by the predicted pre-activation (ReLU is monotone); gated v1.1 by the predicted |product|.
    score = pred[0] if n == 1 else jnp.abs(functools.reduce(lambda u, v: u * v, [f(p) for f, p in zip(acts, pred)]))
    # In predicted order, not sorted: a sort would only break exact ties differently. So an exact tie of two
    # nonzero activations at the k-th place may break by predicted rank rather than by position; zeros picked when
    # fewer than k are positive add nothing to the output or the statistics.
    _, cand = jax.lax.top_k(score.astype(jnp.float32), c)
  else:
    cand = jnp.broadcast_to(jnp.arange(ff, dtype=jnp.int32), x.shape[:-1] + (ff,))
  # The c candidates' rows of each branch of wi_rows [n, mlp, embed], each contiguous, in one read: the branches
  # as one [n * mlp, embed] matrix (a free reshape; a slice wi_rows[i] would be copied whole for n > 1).
  rows = jnp.asarray(wi_rows, dtype).reshape(n * ff, width)
  both = cand if n == 1 else jnp.concatenate([cand + i * ff for i in range(n)], axis=-1)
  h_all = row_kernels.gather_matvec(x, rows, both, native=settings.native)
  hs = []
  for i, (f, name) in enumerate(zip(acts, branch_names(n))):
    h = h_all[..., i * cand.shape[-1]:(i + 1) * cand.shape[-1]]
    hs.append(f(add_bias(h, params.get(name, {}), dtype, units=cand)))
  h = functools.reduce(lambda u, v: u * v, hs)
  vals, j = _select(h, settings)
  idx = jnp.take_along_axis(cand, j, axis=-1)
  return _rows_of_wo(vals, idx, wo, settings), statistics(vals, mask, idx, ff)
