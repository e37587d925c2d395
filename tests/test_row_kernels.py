"""The CPU row kernels of sparse decoding (``row_kernels.py``, ``native/row_kernels.cc``) against NumPy."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import row_kernels


needs_kernels = pytest.mark.skipif(row_kernels._compiler() is None, reason="no C++ compiler")


def ffi_targets(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [str(e.params.get("target_name")) for e in jaxpr.eqns if e.primitive.name == "ffi_call"]


def test_the_kernels_build_on_this_machine():
  # The project's machines and CI have a C++ compiler; without one the JAX path runs (tested below).
  if row_kernels._compiler() is None or not row_kernels._enabled_by_env():
    pytest.skip("no C++ compiler or TOPK_NATIVE=0: the JAX path runs (test_without_the_kernels_...)")
  assert row_kernels.available(), row_kernels.unavailable_reason()
  assert row_kernels.describe().startswith("native")


# d not a multiple of the 16 lanes, c and k not multiples of the 4-row groups, more rows than one 32-row task.
@pytest.mark.parametrize("lead,d,c", [((), 70, 37), ((1,), 64, 8), ((3,), 33, 100), ((2, 3), 16, 5), ((1, 1), 1024, 256)])
@needs_kernels
@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
def test_gather_products_equal_numpy(lead, d, c, native):
  rng = np.random.RandomState(sum(lead) + d + c)
  n = 3 * c + 7
  w = rng.randn(n, d).astype(np.float32)
  x = rng.randn(*lead, d).astype(np.float32)
  v = rng.randn(*lead, c).astype(np.float32)
  idx = rng.randint(0, n, lead + (c,)).astype(np.int32)  # repeats allowed
  matvec = jax.jit(lambda x, w, i: row_kernels.gather_matvec(x, w, i, native=native))(x, w, idx)
  vecmat = jax.jit(lambda v, w, i: row_kernels.gather_vecmat(v, w, i, native=native))(v, w, idx)
  np.testing.assert_allclose(matvec, np.einsum("...d,...cd->...c", x, w[idx]), rtol=2e-5, atol=2e-5 * np.sqrt(d))
  np.testing.assert_allclose(vecmat, np.einsum("...c,...cd->...d", v, w[idx]), rtol=2e-5, atol=2e-5 * np.sqrt(c))
  assert (row_kernels._TARGETS[0] in ffi_targets(lambda x, w, i: row_kernels.gather_matvec(x, w, i, native=native),
                                                 x, w, idx)) == native


@needs_kernels
@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
def test_rows_that_are_not_selected_are_never_read(native):
  rng = np.random.RandomState(0)
  w = np.full((512, 48), np.nan, np.float32)
  idx = np.sort(rng.choice(512, 40, replace=False)).astype(np.int32)[None]
  w[idx[0]] = rng.randn(40, 48)
  x, v = rng.randn(1, 48).astype(np.float32), rng.randn(1, 40).astype(np.float32)
  assert np.isfinite(row_kernels.gather_matvec(jnp.asarray(x), jnp.asarray(w), jnp.asarray(idx), native=native)).all()
  assert np.isfinite(row_kernels.gather_vecmat(jnp.asarray(v), jnp.asarray(w), jnp.asarray(idx), native=native)).all()


@needs_kernels
def test_a_row_index_outside_the_matrix_is_an_error_not_a_wild_read():
  w, x = jnp.ones((10, 16)), jnp.ones((1, 16))
  with pytest.raises(Exception, match="row index is outside w"):
    jax.block_until_ready(row_kernels.gather_matvec(x, w, jnp.array([[3, 10]], jnp.int32), native=True))
  with pytest.raises(Exception, match="row index is outside w"):
    jax.block_until_ready(row_kernels.gather_vecmat(jnp.ones((1, 2)), w, jnp.array([[-1, 2]], jnp.int32), native=True))


def test_bad_shapes_and_dtypes_are_one_line_errors():
  w = jnp.ones((10, 16))
  with pytest.raises(ValueError, match="width 8"):
    row_kernels.gather_matvec(jnp.ones((1, 8)), w, jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="same shape"):
    row_kernels.gather_vecmat(jnp.ones((1, 4)), w, jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="2-D"):
    row_kernels.gather_vecmat(jnp.ones((1, 3)), w[None], jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="float32"):
    row_kernels.gather_matvec(jnp.ones((1, 16), jnp.bfloat16), w.astype(jnp.bfloat16), jnp.zeros((1, 3), jnp.int32),
                              native=True)
  # bfloat16 takes the JAX path by itself, in bfloat16.
  out = row_kernels.gather_matvec(jnp.ones((1, 16), jnp.bfloat16), w.astype(jnp.bfloat16), jnp.zeros((1, 3), jnp.int32))
  assert out.dtype == jnp.bfloat16 and np.allclose(np.asarray(out, np.float32), 16.0)


@pytest.mark.parametrize("env,expect", [({"TOPK_NATIVE": "0"}, "TOPK_NATIVE=0"),
                                        ({"CXX": "", "PATH": "/nonexistent"}, "no C++ compiler")])
def test_without_the_kernels_the_jax_path_runs_and_says_why(tmp_path, env, expect):
  code = ("import jax.numpy as jnp, numpy as np; from topk_transformers import row_kernels as rk;"
          "y = rk.gather_vecmat(jnp.ones((1, 2)), jnp.arange(12.0).reshape(6, 2), jnp.array([[1, 4]], jnp.int32));"
          "print(rk.available(), np.asarray(y).tolist(), rk.unavailable_reason())")
  import os
  full_env = dict(os.environ, TOPK_NATIVE_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", **env)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("False [[10.0, 12.0]]") and expect in out.stdout, out.stdout
  if "PATH" in env:
    assert "row kernels unavailable" in out.stderr and len([l for l in out.stderr.splitlines() if "unavailable" in l]) == 1
