"""The Pallas row kernels (``pallas_rows.py``) against the plain-JAX products, in Pallas's interpret mode on CPU,
and lowered (not run) for CUDA and TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import pallas_rows
from topk_transformers import row_kernels

# (d_model, d_ff, k, c, branches): a v1.0 MLP (wi rows [d_ff, d]) and a gated v1.1 one (both branches' rows side by
# side, [2 * d_ff, d], as mlp_steps.predicted_step reads them); widths that are not powers of two included.
SHAPES = {"v1.0": (32, 128, 8, 24, 1), "v1.1_gated": (48, 96, 12, 20, 2)}
TOLERANCE = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _operands(shape, lead, dtype, seed=0):
  d, ff, k, c, branches = SHAPES[shape]
  rng = np.random.default_rng(seed)
  wi_rows = jnp.asarray(rng.standard_normal((branches * ff, d)), dtype)
  wo = jnp.asarray(rng.standard_normal((ff, d)), dtype)
  x = jnp.asarray(rng.standard_normal(lead + (d,)), dtype)
  cand = np.stack([rng.permutation(ff)[:c] for _ in range(int(np.prod(lead)))]).reshape(lead + (c,))
  cand = np.concatenate([cand + i * ff for i in range(branches)], axis=-1)  # the gated step's 2c rows
  v = jnp.asarray(rng.standard_normal(lead + (k,)), dtype)
  idx = np.stack([rng.permutation(ff)[:k] for _ in range(int(np.prod(lead)))]).reshape(lead + (k,))
  return x, wi_rows, jnp.asarray(cand, jnp.int32), v, wo, jnp.asarray(idx, jnp.int32)


def _close(actual, expected, dtype):
  assert actual.shape == expected.shape and actual.dtype == expected.dtype
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), **TOLERANCE[dtype])


@pytest.mark.parametrize("platform", pallas_rows.PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_kernels_match_the_plain_jax_products_for_one_row_and_for_beams(platform, dtype, shape):
  for lead in [(1,), (4,), (2, 3)]:  # batch 1, four beams, a batch of beams
    x, wi_rows, cand, v, wo, idx = _operands(shape, lead, dtype, seed=len(lead) + lead[0])
    got = pallas_rows.gather_matvec(x, wi_rows, cand, platform=platform, interpret=True)
    _close(got, row_kernels.gather_matvec(x, wi_rows, cand, native=False), dtype)
    got = pallas_rows.gather_vecmat(v, wo, idx, platform=platform, interpret=True)
    _close(got, row_kernels.gather_vecmat(v, wo, idx, native=False), dtype)


@pytest.mark.parametrize("platform", pallas_rows.PLATFORMS)
def test_several_blocks_of_indices_are_summed_and_padding_reads_nothing(platform, monkeypatch):
  # Small blocks: many grid steps (TPU), many gathered loads per program (GPU), an index count that no block size
  # divides (padded with row 0, value 0), and repeated indices (beams that keep the same units).
  monkeypatch.setattr(pallas_rows, "TPU_BLOCK_ROWS", 8)
  monkeypatch.setattr(pallas_rows, "TRITON_CHUNK", 4)
  monkeypatch.setattr(pallas_rows, "TRITON_BLOCK_C", 8)
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
  idx = jnp.asarray(rng.integers(1, 40, (3, 21)), jnp.int32)
  v = jnp.asarray(rng.standard_normal((3, 21)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)
  _close(pallas_rows.gather_vecmat(v, w, idx, platform=platform, interpret=True),
         pallas_rows.reference_vecmat(v, w, idx), jnp.float32)
  _close(pallas_rows.gather_matvec(x, w, idx, platform=platform, interpret=True),
         pallas_rows.reference_matvec(x, w, idx), jnp.float32)
  # A row of x broadcast over beams' candidates.
  _close(pallas_rows.gather_matvec(x[:1], w, idx, platform=platform, interpret=True),
         pallas_rows.reference_matvec(x[:1], w, idx), jnp.float32)


@pytest.mark.parametrize("platform,lowering_platform", [("triton", "cuda"), ("mosaic", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_kernels_lower_for_the_device_at_t5_large_shapes(platform, lowering_platform, dtype):
  # T5 v1.0 Large: d 1024, d_ff 4096, k 128, c 256, two beams. Lowering builds the Triton / Mosaic IR here, on the
  # CPU, so a kernel that breaks a block-shape rule fails now and not on the device.
  spec = jax.ShapeDtypeStruct
  cases = [(pallas_rows.gather_vecmat, (spec((2, 128), dtype), spec((4096, 1024), dtype), spec((2, 128), jnp.int32))),
           (pallas_rows.gather_matvec, (spec((2, 1024), dtype), spec((4096, 1024), dtype), spec((2, 256), jnp.int32)))]
  for fn, args in cases:
    lowered = jax.jit(functools.partial(fn, platform=platform)).trace(*args).lower(
        lowering_platforms=(lowering_platform,))
    assert "topk_gather_" in lowered.as_text()


def test_the_platform_follows_the_backend_and_cpu_has_none():
  assert pallas_rows.platform_for("gpu") == pallas_rows.platform_for("cuda") == "triton"
  assert pallas_rows.platform_for("tpu") == "mosaic"
  assert pallas_rows.platform_for("cpu") is None
  w = jnp.zeros((4, 8), jnp.float32)
  with pytest.raises(ValueError, match="GPU .* or TPU"):
    pallas_rows.gather_vecmat(jnp.ones((1, 2)), w, jnp.zeros((1, 2), jnp.int32))
  assert pallas_rows.supported(w, jnp.zeros((1, 2), jnp.int32))
  assert not pallas_rows.supported(w.astype(jnp.float16), jnp.zeros((1, 2), jnp.int32))
  assert not pallas_rows.supported(w, jnp.zeros((1, 2), jnp.float32))
