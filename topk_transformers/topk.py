"""The Top-k activation of Li et al. (2022): keep the k largest hidden units per token.

Every MLP in this project computes ``wo(TopK(act(wi(x))))``. This module is the
one place where ``TopK`` lives:

* :func:`topk` zeroes all but the ``k`` selected entries along the last (hidden)
  axis. Selection is exact (``jax.lax.top_k``) or approximate
  (``jax.lax.approx_max_k`` with a recall target, the paper's TPU choice).
  The kept entries are scattered back by *index*, so a token never keeps more
  than ``k`` nonzeros, whatever the ties; gradients reach only the kept entries.
* :func:`select` returns the selected ``(values, indices)`` themselves, which is
  what the sparse decoding path multiplies with the ``k`` gathered rows of ``wo``.

``k=None`` (or ``k >= d_ff``) is the vanilla MLP: the input is returned unchanged.
"""

from __future__ import annotations

import logging
import numbers
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

METHODS = ("exact", "approx")
DEFAULT_RECALL_TARGET = 0.95

_logged_noop: set = set()


def validate_top_k(top_k, method: str = "exact", recall_target: float = DEFAULT_RECALL_TARGET) -> None:
  """Raises a one-line ``ValueError`` naming the bad setting; ``None`` is fine."""
  if top_k is not None:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
      raise ValueError(f"top_k must be a positive integer or None, got {top_k!r} ({type(top_k).__name__})")
    if top_k <= 0:
      raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
  if method not in METHODS:
    raise ValueError(f"top_k_method must be one of {METHODS}, got {method!r}")
  if not 0.0 < float(recall_target) <= 1.0:
    raise ValueError(f"top_k_recall_target must be in (0, 1], got {recall_target!r}")


def is_active(top_k: Optional[int], hidden_dim: int) -> bool:
  """Whether a Top-k with this k changes an MLP of width ``hidden_dim``.

  Logs one line the first time a k >= d_ff is seen, since a layered gin config
  (``topk.gin`` on ``tiny.gin``) can ask for a k that keeps everything.
  """
  if top_k is None:
    return False
  if top_k >= hidden_dim:
    key = (int(top_k), int(hidden_dim))
    if key not in _logged_noop:
      _logged_noop.add(key)
      logging.info("top_k=%d >= mlp width %d: Top-k keeps every unit, the MLP is vanilla.", top_k, hidden_dim)
    return False
  return True


def select(
    x: jax.Array,
    k: int,
    method: str = "exact",
    recall_target: float = DEFAULT_RECALL_TARGET,
    by_magnitude: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """Selects ``k`` entries per row of the last axis of ``x``.

  Args:
    x: ``[..., d_ff]`` hidden activations.
    k: how many to keep, ``0 < k <= d_ff``.
    method: ``"exact"`` (``lax.top_k``) or ``"approx"`` (``lax.approx_max_k``).
    recall_target: recall of the approximate method (TPU only; on CPU and GPU
      XLA computes it exactly).
    by_magnitude: rank by ``|x|`` (gated MLPs, whose product can be negative)
      instead of by value.

  Returns:
    ``(values, indices)``, each ``[..., k]``; ``values`` are taken from ``x``
    (signed), so ``values`` carries gradients to the selected entries of ``x``.
  """
  score = jnp.abs(x) if by_magnitude else x
  if method == "exact":
    top_scores, idx = jax.lax.top_k(score, k)
  elif method == "approx":
    top_scores, idx = jax.lax.approx_max_k(score, k, recall_target=recall_target)
  else:
    raise ValueError(f"top_k_method must be one of {METHODS}, got {method!r}")
  if by_magnitude:
    values = jnp.take_along_axis(x, idx, axis=-1)
  else:
    # Re-gather so gradients flow through a plain gather for both methods.
    values = jnp.take_along_axis(x, jax.lax.stop_gradient(idx), axis=-1)
    del top_scores
  return values, idx


def scatter(values: jax.Array, idx: jax.Array, hidden_dim: int) -> jax.Array:
  """Writes ``values`` at ``idx`` along the last axis of a zero ``[..., hidden_dim]`` array."""
  lead = values.shape[:-1]
  k = values.shape[-1]
  flat_vals = values.reshape(-1, k)
  flat_idx = idx.reshape(-1, k)
  rows = jnp.arange(flat_vals.shape[0])[:, None]
  out = jnp.zeros((flat_vals.shape[0], hidden_dim), values.dtype)
  out = out.at[rows, flat_idx].set(flat_vals, unique_indices=True, indices_are_sorted=False)
  return out.reshape(*lead, hidden_dim)


def topk(
    x: jax.Array,
    k: Optional[int],
    method: str = "exact",
    recall_target: float = DEFAULT_RECALL_TARGET,
    by_magnitude: bool = False,
) -> jax.Array:
  """Keeps the ``k`` largest entries of each row of the last axis of ``x``, zeroes the rest.

  ``k=None`` or ``k >= x.shape[-1]`` returns ``x`` itself (the vanilla MLP, bit for bit).
  Ties are broken by position, so each row keeps exactly ``k`` entries (of which
  some may be zero when fewer than ``k`` are positive). The gradient is the
  identity on the kept entries and zero elsewhere.
  """
  validate_top_k(k, method, recall_target)
  if not is_active(k, x.shape[-1]):
    return x
  values, idx = select(x, k, method, recall_target, by_magnitude)
  return scatter(values, idx, x.shape[-1])


# ---------------------------------------------------------------------------
# The sparse product of the decoding path (see docs/decoding.md for the study
# of formulations that led to these choices).
# ---------------------------------------------------------------------------


def select_f32(
    x: jax.Array,
    k: int,
    method: str = "exact",
    recall_target: float = DEFAULT_RECALL_TARGET,
    by_magnitude: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """:func:`select`, ranking float32 copies of the scores; ``values`` keep ``x``'s dtype.

  Upcasting is exact for bfloat16 / float16, so the order (and, for the exact
  method, the tie-breaking by position) is that of :func:`select`. It matters for
  speed: XLA:CPU runs ``top_k`` on float32 with a dedicated kernel but sorts the
  whole row for other dtypes (a ``[1, 16384]`` bfloat16 row: ~23 ms against
  ~0.2 ms as float32 on the project's CPU).
  """
  score = jnp.abs(x) if by_magnitude else x
  score = score.astype(jnp.float32)
  if method == "exact":
    _, idx = jax.lax.top_k(score, k)
  elif method == "approx":
    _, idx = jax.lax.approx_max_k(score, k, recall_target=recall_target)
  else:
    raise ValueError(f"top_k_method must be one of {METHODS}, got {method!r}")
  return jnp.take_along_axis(x, idx, axis=-1), idx


def sparse_matmul(values: jax.Array, idx: jax.Array, kernel: jax.Array, dtype=None) -> jax.Array:
  """``sum_j values[..., j] * kernel[idx[..., j], :]``: the MLP output from its k selected units.

  Equals ``scatter(values, idx, d_ff) @ kernel`` but reads only the ``k`` selected
  rows of ``kernel`` (``[d_ff, d]``, T5X's ``wo`` layout, where a row is
  contiguous). ``idx`` must lie in ``[0, d_ff)`` (as :func:`select` guarantees):
  the gather promises XLA it is in bounds, which spares it the clamping.

  Args:
    values: ``[..., k]`` selected activations.
    idx: ``[..., k]`` their positions along the hidden axis.
    kernel: ``[d_ff, d]``.
    dtype: computation dtype (default: ``values``'s); rows are cast after the
      gather, so a float32 kernel used in bfloat16 converts ``k`` rows, not all.

  Returns:
    ``[..., d]``.
  """
  if kernel.ndim != 2:
    raise ValueError(f"sparse_matmul needs a 2-D [d_ff, d] kernel, got shape {kernel.shape}")
  if values.shape != idx.shape:
    raise ValueError(f"values and idx must have the same shape, got {values.shape} and {idx.shape}")
  dtype = values.dtype if dtype is None else dtype
  rows = kernel.at[idx].get(mode="promise_in_bounds")  # [..., k, d]
  return jnp.einsum("...k,...kd->...d", values.astype(dtype), rows.astype(dtype))
