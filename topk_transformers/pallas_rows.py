"""Pallas kernels for the products over gathered rows of sparse decoding (GPU: Triton; TPU: Mosaic).

The same two products as ``row_kernels.py``, whose plain-JAX expressions are the reference:

* :func:`gather_matvec` ``(x [..., d], w [n, d], idx [..., c]) -> [..., c]``: ``x . w[idx]`` (``c`` rows of ``wi``).
* :func:`gather_vecmat` ``(v [..., k], w [n, d], idx [..., k]) -> [..., d]``: ``sum_j v_j w[idx_j]`` (``k`` rows of
  ``wo``).

Each reads a selected row once, straight from ``w``, and accumulates in float32; the result has the operands'
dtype, as XLA's product does. The flattened leading axes (a batch, beams) are ``B`` rows of ``x`` / ``v``.

* **GPU (Triton).** One program per (row of ``x``, block of outputs). A program loads its indices as a vector and
  reads the selected rows with one gathered load per chunk of indices (``w_ref[rows, cols]``), so no copy of the
  rows is made. The index axis is padded to a multiple of the chunk (index 0, value 0), and blocks are powers of two.
  Not yet run on a GPU: the tests interpret it and lower it to Triton IR on the CPU.
* **TPU (Mosaic).** The indices are scalar-prefetch operands (in SMEM before the grid starts), as in
  ``jax.experimental.pallas.ops.tpu.paged_attention``: they drive one DMA per selected row from ``w`` in HBM
  (``memory_space=ANY``) into a VMEM block of rows, all started before any is awaited, and the MXU then multiplies
  that block. The grid is (row of ``x``, block of indices); ``gather_vecmat`` sums its blocks in a float32 scratch.
  Not yet run on a TPU: whether Mosaic accepts a one-row DMA at a dynamic sublane offset (bfloat16 packs two rows
  per sublane) is for the first TPU run to tell; the tests interpret it and lower it to Mosaic IR on the CPU.

Nothing here decides that a kernel is used: ``row_kernels`` offers it as one candidate where it applies, and
``autotune`` keeps it only where it measured fastest on the device (never assumed). ``interpret=True`` runs either
kernel on any backend (Pallas's interpreter; the TPU one simulates the DMAs), which is how the tests check them.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# GPU tiles, chosen for parallelism at batch 1 (d 1024: 16 vecmat programs; c 256: 8 matvec programs) with tiles of
# 2-4K values per gathered load; not tuned on a GPU yet (autotune compares the kernels with XLA's gather there).
# Indices per gathered load (vecmat: a [chunk, block_d] tile of rows).
TRITON_CHUNK = 32
# Output columns per vecmat program.
TRITON_BLOCK_D = 64
# Candidates per matvec program, and the row width per step of its loop.
TRITON_BLOCK_C = 32
TRITON_MATVEC_BLOCK_D = 128
# Indices per TPU grid step (rows held in VMEM at once): a multiple of 128, or all of them when fewer.
TPU_BLOCK_ROWS = 256

PLATFORMS = ("triton", "mosaic")


def platform_for(backend: str) -> Optional[str]:
  """The kernel flavour for a JAX backend name (``gpu``/``cuda``/``rocm``: Triton, ``tpu``: Mosaic), else None."""
  if backend in ("gpu", "cuda", "rocm"):
    return "triton"
  if backend == "tpu":
    return "mosaic"
  return None


def supported(w: jax.Array, idx: jax.Array) -> bool:
  """Whether the kernels take these operands: a 2-D ``w`` of a float dtype they handle, integer indices."""
  return (w.ndim == 2 and jnp.dtype(w.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
          and jnp.issubdtype(idx.dtype, jnp.integer) and idx.ndim >= 1)


def _pow2_divisor(d: int, cap: int) -> int:
  """The largest power of two that divides ``d``, at most ``cap``."""
  return min(cap, d & -d)


def _pad_last(a: jax.Array, multiple: int) -> jax.Array:
  extra = -a.shape[-1] % multiple
  return a if extra == 0 else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def _platform(platform: Optional[str]) -> str:
  platform = platform or platform_for(jax.default_backend())
  if platform not in PLATFORMS:
    raise ValueError(f"Pallas row kernels run on GPU (triton) or TPU (mosaic), not on {jax.default_backend()!r}; "
                     "pass platform= with interpret=True to run them elsewhere")
  return platform


def gather_vecmat(v: jax.Array, w: jax.Array, idx: jax.Array, platform: Optional[str] = None,
                  interpret: bool = False) -> jax.Array:
  """``out[..., :] = sum_j v[..., j] * w[idx[..., j], :]``; ``idx`` in ``[0, n)`` (not checked).

  ``platform``: ``"triton"`` or ``"mosaic"`` (default: the default backend's); ``interpret``: Pallas's interpreter.
  """
  if v.shape != idx.shape:
    raise ValueError(f"values and idx must have the same shape, got {v.shape} and {idx.shape}")
  lead, k = idx.shape[:-1], idx.shape[-1]
  d = w.shape[1]
  v2 = v.reshape(-1, k).astype(w.dtype)
  idx2 = idx.reshape(-1, k).astype(jnp.int32)
  fn = _vecmat_triton if _platform(platform) == "triton" else _vecmat_mosaic
  return fn(v2, w, idx2, interpret=interpret).reshape(*lead, d)


def gather_matvec(x: jax.Array, w: jax.Array, idx: jax.Array, platform: Optional[str] = None,
                  interpret: bool = False) -> jax.Array:
  """``out[..., j] = x[..., :] . w[idx[..., j], :]``; ``x`` broadcasts against ``idx``'s leading axes."""
  lead, c = idx.shape[:-1], idx.shape[-1]
  d = w.shape[1]
  x2 = jnp.broadcast_to(x, lead + (d,)).reshape(-1, d).astype(w.dtype)
  idx2 = idx.reshape(-1, c).astype(jnp.int32)
  fn = _matvec_triton if _platform(platform) == "triton" else _matvec_mosaic
  return fn(x2, w, idx2, interpret=interpret).reshape(*lead, c)


# ---------------------------------------------------------------------------
# GPU: Triton.
# ---------------------------------------------------------------------------


def _triton_params():
  # Naming Triton's parameters selects the Triton lowering (jax's default for pallas_call on GPU may be Mosaic GPU).
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  return plt.CompilerParams(num_warps=4, num_stages=2)


def _vecmat_triton(v, w, idx, interpret=False):
  rows, d = v.shape[0], w.shape[1]
  chunk = TRITON_CHUNK
  v, idx = _pad_last(v, chunk), _pad_last(idx, chunk)  # padded entries: row 0 times 0
  k = idx.shape[1]
  bd = _pow2_divisor(d, TRITON_BLOCK_D)

  def kernel(idx_ref, v_ref, w_ref, o_ref):
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * bd, bd), bd)

    def body(i, acc):
      part = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
      selected = w_ref[idx_ref[part], cols].astype(jnp.float32)  # [chunk, bd], one gathered load
      return acc + jnp.sum(v_ref[part].astype(jnp.float32)[:, None] * selected, axis=0)

    acc = jax.lax.fori_loop(0, k // chunk, body, jnp.zeros((bd,), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  return pl.pallas_call(
      kernel,
      grid=(rows, d // bd),
      in_specs=[pl.BlockSpec((None, k), lambda b, j: (b, 0)),
                pl.BlockSpec((None, k), lambda b, j: (b, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((None, bd), lambda b, j: (b, j)),
      out_shape=jax.ShapeDtypeStruct((rows, d), w.dtype),
      compiler_params=_triton_params(),
      interpret=interpret,
      name="topk_gather_vecmat",
  )(idx, v, w)


def _matvec_triton(x, w, idx, interpret=False):
  rows, d = x.shape
  c0 = idx.shape[1]
  bc = min(TRITON_BLOCK_C, pl.next_power_of_2(c0))
  idx = _pad_last(idx, bc)
  c = idx.shape[1]
  bd = _pow2_divisor(d, TRITON_MATVEC_BLOCK_D)  # a [bc, bd] tile per step

  def kernel(idx_ref, x_ref, w_ref, o_ref):
    selected_rows = idx_ref[...]

    def body(i, acc):
      cols = pl.ds(pl.multiple_of(i * bd, bd), bd)
      selected = w_ref[selected_rows, cols].astype(jnp.float32)  # [bc, bd]
      return acc + jnp.sum(selected * x_ref[cols].astype(jnp.float32)[None, :], axis=1)

    acc = jax.lax.fori_loop(0, d // bd, body, jnp.zeros((bc,), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  out = pl.pallas_call(
      kernel,
      grid=(rows, c // bc),
      in_specs=[pl.BlockSpec((None, bc), lambda b, j: (b, j)),
                pl.BlockSpec((None, d), lambda b, j: (b, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((None, bc), lambda b, j: (b, j)),
      out_shape=jax.ShapeDtypeStruct((rows, c), w.dtype),
      compiler_params=_triton_params(),
      interpret=interpret,
      name="topk_gather_matvec",
  )(idx, x, w)
  return out[:, :c0]


# ---------------------------------------------------------------------------
# TPU: Mosaic, the indices prefetched into SMEM.
# ---------------------------------------------------------------------------


def _tpu_blocks(n_idx: int):
  """(block of indices per grid step, padded index count)."""
  if n_idx <= TPU_BLOCK_ROWS:
    return n_idx, n_idx
  return TPU_BLOCK_ROWS, n_idx + (-n_idx % TPU_BLOCK_ROWS)


def _copy_rows(idx_ref, w_hbm, buf, sem, b, start, count):
  """Starts one DMA per selected row ``w[idx[b, start + j]] -> buf[j]``, then waits for all of them."""
  def copy(j):
    return _tpu().make_async_copy(w_hbm.at[pl.ds(idx_ref[b, start + j], 1)], buf.at[pl.ds(j, 1)], sem.at[0])

  def begin(j, carry):
    copy(j).start()
    return carry

  def wait(j, carry):
    copy(j).wait()
    return carry

  jax.lax.fori_loop(0, count, begin, 0)
  jax.lax.fori_loop(0, count, wait, 0)


def _tpu():
  """``jax.experimental.pallas.tpu``, imported when a TPU kernel is built."""
  from jax.experimental.pallas import tpu  # pylint: disable=g-import-not-at-top
  return tpu


def _tpu_interpret(interpret: bool):
  return _tpu().InterpretParams() if interpret else False


def _vecmat_mosaic(v, w, idx, interpret=False):
  rows, d = v.shape[0], w.shape[1]
  bk, k = _tpu_blocks(idx.shape[1])
  v, idx = _pad_last(v, bk), _pad_last(idx, bk)
  steps = k // bk
  tpu = _tpu()

  def kernel(idx_ref, v_ref, w_hbm, o_ref, buf, acc, sem):
    b, s = pl.program_id(0), pl.program_id(1)

    @pl.when(s == 0)
    def _():
      acc[...] = jnp.zeros_like(acc)

    _copy_rows(idx_ref, w_hbm, buf, sem, b, s * bk, bk)
    acc[...] += jnp.dot(v_ref[...], buf[...], preferred_element_type=jnp.float32)

    @pl.when(s == steps - 1)
    def _():
      o_ref[...] = acc[...].astype(o_ref.dtype)

  out = pl.pallas_call(
      kernel,
      grid_spec=tpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(rows, steps),
          in_specs=[pl.BlockSpec((None, 1, bk), lambda b, s, idx_ref: (b, 0, s)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((None, 1, d), lambda b, s, idx_ref: (b, 0, 0)),
          scratch_shapes=[tpu.VMEM((bk, d), w.dtype), tpu.VMEM((1, d), jnp.float32),
                          tpu.SemaphoreType.DMA((1,))]),
      out_shape=jax.ShapeDtypeStruct((rows, 1, d), w.dtype),
      compiler_params=tpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=_tpu_interpret(interpret),
      name="topk_gather_vecmat",
  )(idx, v.reshape(rows, 1, k), w)
  return out.reshape(rows, d)


def _matvec_mosaic(x, w, idx, interpret=False):
  rows, d = x.shape
  c0 = idx.shape[1]
  bc, c = _tpu_blocks(c0)
  idx = _pad_last(idx, bc)
  tpu = _tpu()

  def kernel(idx_ref, x_ref, w_hbm, o_ref, buf, sem):
    b, s = pl.program_id(0), pl.program_id(1)
    _copy_rows(idx_ref, w_hbm, buf, sem, b, s * bc, bc)
    # [1, d] x [bc, d]^T -> [1, bc]: the MXU contracts both last axes.
    o_ref[...] = jax.lax.dot_general(x_ref[...], buf[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32).astype(o_ref.dtype)

  out = pl.pallas_call(
      kernel,
      grid_spec=tpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(rows, c // bc),
          in_specs=[pl.BlockSpec((None, 1, d), lambda b, s, idx_ref: (b, 0, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((None, 1, bc), lambda b, s, idx_ref: (b, 0, s)),
          scratch_shapes=[tpu.VMEM((bc, d), w.dtype), tpu.SemaphoreType.DMA((1,))]),
      out_shape=jax.ShapeDtypeStruct((rows, 1, c), w.dtype),
      compiler_params=tpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=_tpu_interpret(interpret),
      name="topk_gather_matvec",
  )(idx, x.reshape(rows, 1, d), w)
  return out.reshape(rows, c)[:, :c0]


def reference_vecmat(v, w, idx):
  """The plain-JAX product (``row_kernels``' XLA path), for checks."""
  return jnp.einsum("...k,...kd->...d", v, w.at[idx].get(mode="promise_in_bounds"))


def reference_matvec(x, w, idx):
  """The plain-JAX product (``row_kernels``' XLA path), for checks."""
  return jnp.einsum("...d,...cd->...c", x, w.at[idx].get(mode="promise_in_bounds"))

