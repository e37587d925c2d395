"""The Top-k activation of Li et al. (2022): keep the k largest hidden units per token.

Every MLP in this project computes ``wo(TopK(act(wi(x))))``. This module is the
one place where ``TopK`` lives:

* :func:`topk` zeroes all but the ``k`` selected entries along the last (hidden)
  axis. A token never keeps more than ``k`` entries, whatever the ties, and
  gradients reach only the kept entries (the gradient is the indicator of the
  kept set). Methods, chosen by ``top_k_method``:

  - ``"exact"``: ``lax.top_k``, then the kept values scattered back by index.
  - ``"approx"``: ``lax.approx_max_k`` with a recall target, the paper's TPU
    choice. On CPU and GPU XLA finds the k largest values exactly, but ranks
    with a plain ``>``: ties (``-0.0 == +0.0`` included) may go to other
    positions than ``lax.top_k``'s, and NaN has no defined place.
  - ``"threshold"``: sort-free and exact (:func:`keep_mask`): each row's k-th
    largest score is found by radix selection over bit planes, and the entries
    above it, plus the first tied ones by position, are kept. It keeps exactly
    the set that ``lax.top_k`` keeps, ties, ``-0.0``, ``inf`` and NaN included.
  - ``"auto"`` (the default): the faster exact method for the backend and shape,
    measured on the device (``autotune``) or by the rules (:func:`resolve_method`).

* :func:`select` returns the selected ``(values, indices)`` themselves, which is
  what the sparse decoding path multiplies with the ``k`` gathered rows of ``wo``.

``k=None`` (or ``k >= d_ff``) is the vanilla MLP: the input is returned unchanged.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers.errors import ConfigError

METHODS = ("auto", "exact", "approx", "threshold")
DEFAULT_METHOD = "auto"
DEFAULT_RECALL_TARGET = 0.95

# "auto" on CPU takes "threshold" from this many rows and scores per call up (see resolve_method).
CPU_THRESHOLD_MIN_ROWS = 8
CPU_THRESHOLD_MIN_ELEMENTS = 1 << 14
# XLA:GPU runs lax.top_k with k <= 16 as a dedicated kernel and sorts every row for a larger k.
GPU_TOP_K_KERNEL_MAX_K = 16

_logged_noop: set = set()


def validate_top_k(top_k, method: str = DEFAULT_METHOD, recall_target: float = DEFAULT_RECALL_TARGET) -> None:
  """Raises a one-line ``ConfigError`` (a ``ValueError``) naming the bad setting; ``None`` is fine."""
  if top_k is not None:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
      raise ConfigError(f"top_k must be a positive integer or None, got {top_k!r} ({type(top_k).__name__})")
    if top_k <= 0:
      raise ConfigError(f"top_k must be a positive integer or None, got {top_k!r}")
  if method not in METHODS:
    raise ConfigError(f"top_k_method must be one of {METHODS}, got {method!r}")
  if not 0.0 < float(recall_target) <= 1.0:
    raise ConfigError(f"top_k_recall_target must be in (0, 1], got {recall_target!r}")


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


def resolve_method(method: str, shape: Tuple[int, ...], k: int, dtype, backend: Optional[str] = None) -> str:
  """The concrete method (``exact``, ``approx`` or ``threshold``) that ``method`` means for this call.

  ``"auto"`` picks the faster of the two exact methods; both keep the same set,
  so the choice changes speed only, never a result. ``"threshold"`` needs a
  16- or 32-bit float (anything else takes ``exact``). By backend:

  * CPU, measured (selection forward and backward): ``threshold`` from
    ``CPU_THRESHOLD_MIN_ROWS`` (8) rows and ``CPU_THRESHOLD_MIN_ELEMENTS``
    (16384) scores per call, ``exact`` below. ``lax.top_k`` costs a little per
    score, more for a larger k; the threshold method has a fixed cost (its
    ~50 small sequential steps) and a smaller one per score, so it wins on
    training batches and loses on a decoding step (a few rows), which
    therefore takes ``exact``.
  * GPU, assumed (not measured here): XLA:GPU has a fast ``top_k`` kernel for
    k <= 16 and sorts every row for a larger k, so ``exact`` for k <= 16,
    ``threshold`` above.
  * TPU, assumed (not measured here): ``top_k`` is a sort there as well (the
    paper used ``approx_max_k`` to avoid it), so ``threshold``.

  These are the rules. On the backend that runs the call (``backend`` None or
  the default one), ``autotune`` replaces them by a measurement: the first time
  a shape is traced both exact methods are timed on the device and the faster
  is cached on disk (``TOPK_AUTOTUNE=0``: the rules).
  """
  if method != "auto":
    return method
  if jnp.dtype(dtype) not in _KEY_DTYPES:
    return "exact"
  rule = _rule(shape, k, backend or jax.default_backend())
  if backend is None or backend == jax.default_backend():
    from topk_transformers import autotune  # pylint: disable=g-import-not-at-top  # autotune imports this module
    return autotune.selection_method(math.prod(shape[:-1]), shape[-1], k, dtype, default=rule)
  return rule


def _rule(shape: Tuple[int, ...], k: int, backend: str) -> str:
  """``resolve_method``'s rules by backend, for a 16- or 32-bit float."""
  if backend == "cpu":
    rows = math.prod(shape[:-1])
    big = rows >= CPU_THRESHOLD_MIN_ROWS and rows * shape[-1] >= CPU_THRESHOLD_MIN_ELEMENTS
    return "threshold" if big else "exact"
  if backend in ("gpu", "cuda", "rocm"):
    return "exact" if k <= GPU_TOP_K_KERNEL_MAX_K else "threshold"
  return "threshold"


def select(
    x: jax.Array,
    k: int,
    method: str = DEFAULT_METHOD,
    recall_target: float = DEFAULT_RECALL_TARGET,
    by_magnitude: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """Selects ``k`` entries per row of the last axis of ``x``.

  Args:
    x: ``[..., d_ff]`` hidden activations.
    k: how many to keep, ``0 < k <= d_ff``.
    method: ``"approx"`` uses ``lax.approx_max_k``; every exact method
      (``"exact"``, ``"threshold"``, ``"auto"``) uses ``lax.top_k``, which gives
      the indices directly. Deriving them from the threshold's mask needs a
      compaction (``nonzero``) that costs more than it saves (measured on
      XLA:CPU for decoding steps of one to a few rows). The set is the same
      either way.
    recall_target: recall of the approximate method (TPU only; on CPU and GPU
      XLA finds the k largest values exactly, ties in any order).
    by_magnitude: rank by ``|x|`` (gated MLPs, whose product can be negative)
      instead of by value.

  Returns:
    ``(values, indices)``, each ``[..., k]``; ``values`` are taken from ``x``
    (signed), so ``values`` carries gradients to the selected entries of ``x``.
  """
  score = jnp.abs(x) if by_magnitude else x
  _, idx = _top_k_indices(score, k, method, recall_target)
  # Re-gather so gradients flow through a plain gather for every method.
  return jnp.take_along_axis(x, jax.lax.stop_gradient(idx), axis=-1), idx


def _top_k_indices(score, k, method, recall_target):
  if method not in METHODS:
    raise ValueError(f"top_k_method must be one of {METHODS}, got {method!r}")
  if method == "approx":
    return jax.lax.approx_max_k(score, k, recall_target=recall_target)
  return jax.lax.top_k(score, k)


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
    method: str = DEFAULT_METHOD,
    recall_target: float = DEFAULT_RECALL_TARGET,
    by_magnitude: bool = False,
) -> jax.Array:
  """Keeps the ``k`` largest entries of each row of the last axis of ``x``, zeroes the rest.

  ``k=None`` or ``k >= x.shape[-1]`` returns ``x`` itself (the vanilla MLP, bit for bit).
  Ties are broken by position (the lower index first, as ``lax.top_k``), so each
  row keeps exactly ``k`` entries (of which some may be zero when fewer than
  ``k`` are positive). The gradient is the identity on the kept entries and
  zero elsewhere. Every exact method gives the same array, bit for bit.
  """
  validate_top_k(k, method, recall_target)
  if not is_active(k, x.shape[-1]):
    return x
  method = resolve_method(method, x.shape, k, x.dtype)
  if method == "threshold":
    score = jnp.abs(x) if by_magnitude else x
    return jnp.where(keep_mask(jax.lax.stop_gradient(score), k), x, jnp.zeros((), x.dtype))
  values, idx = select(x, k, method, recall_target, by_magnitude)
  return scatter(values, idx, x.shape[-1])


# ---------------------------------------------------------------------------
# The sort-free exact selection ("threshold").
# ---------------------------------------------------------------------------

_KEY_DTYPES = {jnp.dtype(jnp.float32): jnp.uint32, jnp.dtype(jnp.bfloat16): jnp.uint16,
               jnp.dtype(jnp.float16): jnp.uint16}
# Masks of the bit-matrix transpose (Hacker's Delight 7-3), by the width j of the swapped blocks.
_TRANSPOSE_MASKS = {16: 0x0000FFFF, 8: 0x00FF00FF, 4: 0x0F0F0F0F, 2: 0x33333333, 1: 0x55555555}


def order_key(score: jax.Array) -> jax.Array:
  """Unsigned integers whose order is the total order ``lax.top_k`` ranks floats by.

  ``-NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN``: flip every bit of a
  negative float and only the sign bit of a positive one.
  """
  utype = _KEY_DTYPES.get(jnp.dtype(score.dtype))
  if utype is None:
    raise ValueError(f"the threshold Top-k needs float32, bfloat16 or float16 scores, got {score.dtype}")
  bits = jax.lax.bitcast_convert_type(score, utype)
  sign = utype(1 << (8 * jnp.dtype(utype).itemsize - 1))
  return jnp.where(bits >= sign, ~bits, bits | sign)


def _bit_planes(key: jax.Array) -> jax.Array:
  """``[R, B, W]`` B-bit keys -> ``[R, B, W]`` planes: bit ``i`` of ``planes[r, b, w]`` is bit ``b`` of ``key[r, i, w]``.

  Each ``[B, B]`` block of bits is transposed in ``log2(B)`` steps, each
  exchanging ``j x j`` sub-blocks between the rows ``i`` and ``i ^ j`` by
  shift / xor / and (Hacker's Delight 7-3). A step reads its partner row through
  a reversal, which XLA fuses into the step (a concatenation of halves would be
  a slower fusion root), and the word index ``w`` is the minor axis, so each
  step is a plain vectorised loop. The steps go in pairs, each pair one pass
  over the array; the first pass also computes the keys (and the activation
  before them). The later passes run as the branches of a loop so that XLA
  does not fuse them all into one, which would compute each step ``2^n`` times
  over: 3 passes for float32, 2 for 16-bit keys (measured on XLA:CPU: pairs are
  ~10% faster than one step per pass, triples slower).
  """
  rows, width, words = key.shape

  def exchange(j, key):
    m = key.dtype.type(_TRANSPOSE_MASKS[j] & ((1 << width) - 1))
    v = key.reshape(rows, width // (2 * j), 2, j, words)
    partner = jnp.flip(v, axis=2)
    upper = jax.lax.broadcasted_iota(jnp.int32, v.shape, 2) == 1
    t = jnp.where(upper, (partner >> j) ^ v, (v >> j) ^ partner) & m
    return jnp.where(upper, v ^ t, v ^ (t << j)).reshape(rows, width, words)

  steps = [width >> (n + 1) for n in range(width.bit_length() - 1)]  # 16, 8, 4, 2, 1 for B = 32
  passes = [functools.partial(lambda js, key: functools.reduce(lambda a, j: exchange(j, a), js, key), steps[n:n + 2])
            for n in range(0, len(steps), 2)]
  key = passes[0](key)
  return jax.lax.fori_loop(0, len(passes) - 1, lambda n, key: jax.lax.switch(n, passes[1:], key), key)


def _popcount_rows(words: jax.Array) -> jax.Array:
  return jnp.sum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)


def keep_mask(score: jax.Array, k: int) -> jax.Array:
  """The boolean mask of the entries ``lax.top_k(score, k)`` selects in each row of the last axis.

  Without sorting: with ``B`` = 32 (float32) or 16 (bfloat16, float16) and
  ``W = ceil(d / B)``, entry ``i * W + w`` of a row becomes bit ``i`` of word
  ``w``, one such word array per bit of the order key (:func:`order_key`):
  ``B`` bit planes of ``W`` words, made in 3 (float32) or 2 vectorised passes. Radix
  selection then fixes the row's k-th largest key ``T`` from its top bit down,
  one round per bit: a round counts (popcount) the candidates that have the
  next bit set; if with those already above ``T`` they make ``k``, ``T`` has
  the bit and they stay candidates, else they are above ``T`` and the others
  stay. The rounds stop once every row has as many candidates left as places
  (all are kept), at the latest after ``B`` rounds; the candidates left then
  equal ``T``, and a row with more of them than places keeps the first by
  position, found by bisection over the position in ``log2(d)`` rounds (run only
  when some row needs it). Every round reads ``W`` words per row, ``1/B`` of the
  scores. The kept set comes out as ``W`` words per row, expanded to the mask
  inside a ``cond``, so the mask is stored once: XLA would otherwise recompute
  it inside each consumer, the gradient's transposing copy included, at more
  than the cost of the MLP itself on XLA:CPU.
  Positions past ``d`` (padding to ``B * W``) never count.

  Args:
    score: ``[..., d]`` float32, bfloat16 or float16 scores.
    k: ``1 <= k <= d``.

  Returns:
    ``[..., d]`` bool, exactly ``k`` true entries per row.
  """
  *lead, d = score.shape
  if not 1 <= k <= d:
    raise ValueError(f"the threshold Top-k needs 1 <= k <= {d}, got k={k}")
  key = order_key(score).reshape(-1, d)
  rows, utype = key.shape[0], key.dtype.type
  width = 8 * key.dtype.itemsize
  words = -(-d // width)
  if words * width != d:
    key = jnp.pad(key, ((0, 0), (0, words * width - d)))
  planes = _bit_planes(key.reshape(rows, width, words))

  position = np.arange(width)[:, None] * words + np.arange(words)[None, :]  # [B, W]
  valid = ((position < d).astype(np.uint64) << np.arange(width, dtype=np.uint64)[:, None]).sum(0)
  alive = jnp.broadcast_to(jnp.asarray(valid.astype(key.dtype)), (rows, words))

  def radix_round(state):
    i, alive, above, n_alive, n_above = state
    plane = jax.lax.dynamic_index_in_dim(planes, width - 1 - i, axis=1, keepdims=False)
    ones = alive & plane
    n_ones = _popcount_rows(ones)
    bit_set = (n_above + n_ones >= k)[:, None]  # T has this bit: the candidates with it stay, the rest fall below
    return (i + 1, jnp.where(bit_set, ones, alive & ~plane), jnp.where(bit_set, above, above | ones),
            jnp.where(bit_set[:, 0], n_ones, n_alive - n_ones), jnp.where(bit_set[:, 0], n_above, n_above + n_ones))

  def undecided(state):  # some row has more candidates left than places: T's next bit matters
    i, _, _, n_alive, n_above = state
    return (i < width) & jnp.any(n_above + n_alive > k)

  zeros = jnp.zeros((rows,), jnp.int32)
  state = (jnp.int32(0), alive, jnp.zeros_like(alive), jnp.full((rows,), d, jnp.int32), zeros)
  _, tied, above, n_tied, n_above = jax.lax.while_loop(undecided, radix_round, state)
  need = k - n_above  # 1 <= need <= n_tied places left for the entries equal to T
  word_index = jnp.arange(words, dtype=jnp.int32)

  def up_to(p):  # the words' bits of positions <= p (p = q * W + s: bits below q, and bit q for w <= s)
    q, s = (p // words).astype(key.dtype)[:, None], (p % words)[:, None]
    return ((utype(1) << q) - utype(1)) | ((word_index <= s).astype(key.dtype) << q)

  def first_ties():
    steps = max(1, math.ceil(math.log2(d)))

    def bisect(i, last_short):  # the largest p with fewer than `need` ties at positions <= p
      p = jnp.minimum(last_short + jnp.left_shift(1, steps - 1 - i), d - 1)
      return jnp.where(_popcount_rows(tied & up_to(p)) < need, p, last_short)

    return expand(above | (tied & up_to(jax.lax.fori_loop(0, steps, bisect, zeros - 1) + 1)))

  def expand(keep):  # [R, W] words -> [R, d] bool
    bit = jnp.arange(width, dtype=key.dtype)[None, :, None]
    return ((keep[:, None, :] >> bit) & utype(1)).astype(bool).reshape(rows, width * words)[:, :d]

  mask = jax.lax.cond(jnp.any(n_tied > need), first_ties, lambda: expand(above | tied))
  return mask.reshape(*lead, d)


# ---------------------------------------------------------------------------
# The sparse product of the decoding path (see docs/design/decoding_paths.md for the study
# of formulations that led to these choices).
# ---------------------------------------------------------------------------


def select_f32(
    x: jax.Array,
    k: int,
    method: str = DEFAULT_METHOD,
    recall_target: float = DEFAULT_RECALL_TARGET,
    by_magnitude: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """:func:`select`, ranking float32 copies of the scores; ``values`` keep ``x``'s dtype.

  Upcasting is exact for bfloat16 / float16, so the order (and, for the exact
  methods, the tie-breaking by position) is that of :func:`select`. It matters for
  speed: XLA:CPU runs ``top_k`` on float32 with a dedicated kernel but sorts the
  whole row for other dtypes, far slower on a decoding row.
  """
  score = jnp.abs(x) if by_magnitude else x
  _, idx = _top_k_indices(score.astype(jnp.float32), k, method, recall_target)
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
