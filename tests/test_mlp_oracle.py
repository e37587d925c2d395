"""``layers.MlpBlock`` with Top-k against a NumPy MLP written from the paper's definition.

v1.0 / ViT: ``wo(TopK(relu(wi x)))``, keeping the k largest activations.
v1.1: ``wo(TopK(gelu(wi_0 x) * (wi_1 x)))``, keeping the k largest |products|
with their sign (a product can be negative). The inputs are chosen so that
ranking the gated product by signed value keeps other units than ranking by
magnitude, and the outputs of the two differ by far more than the tolerance,
so a block that ranks by the wrong key fails. The dense path and both decoding
paths (dense and the sparse ``wo`` gather) are checked.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import layers

D, FF, K = 8, 32, 5


def np_gelu(x):
  """flax's default ``nn.gelu`` (the tanh approximation)."""
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_keep_top(h, k, by_magnitude):
  """Zeroes all but the k largest (by value or |value|) entries of each row; no ties in these inputs."""
  score = np.abs(h) if by_magnitude else h
  order = np.argsort(-score, axis=-1, kind="stable")
  kept = np.zeros_like(h, dtype=bool)
  np.put_along_axis(kept, order[..., :k], True, -1)
  sorted_score = np.take_along_axis(score, order, -1)
  gap = sorted_score[..., k - 1] - sorted_score[..., k]
  assert np.all(gap > 1e-3), "the oracle's k-th and (k+1)-th scores are too close for float32"
  return np.where(kept, h, 0.0)


def np_mlp(x, params, k, gated, by_magnitude=None, bias=False):
  x = x.astype(np.float64)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  if gated:
    h = np_gelu(x @ p["wi_0"]["kernel"] + (p["wi_0"]["bias"] if bias else 0.0)) * (
        x @ p["wi_1"]["kernel"] + (p["wi_1"]["bias"] if bias else 0.0))
  else:
    pre = x @ p["wi"]["kernel"] + (p["wi"]["bias"] if bias else 0.0)
    h = np.maximum(pre, 0.0)
  h = np_keep_top(h, k, gated if by_magnitude is None else by_magnitude)
  return h @ p["wo"]["kernel"] + (p["wo"]["bias"] if bias else 0.0)


def make(gated, bias=False, **kw):
  block = layers.MlpBlock(intermediate_dim=FF, activations=("gelu", "linear") if gated else ("relu",), top_k=K,
                          intermediate_dropout_rate=0.0, use_bias=bias,
                          bias_init=jax.nn.initializers.normal(0.5), **kw)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, D)) * 2.0, jnp.float32)
  params = nn.meta.unbox(block.init(jax.random.PRNGKey(1), x, deterministic=True)["params"])
  return block, params, x


@pytest.mark.parametrize("method", ["exact", "threshold", "approx"])
def test_gated_v1_1_keeps_the_k_largest_magnitudes(method):
  block, params, x = make(gated=True, top_k_method=method)
  want = np_mlp(np.asarray(x), params, K, gated=True)
  signed = np_mlp(np.asarray(x), params, K, gated=True, by_magnitude=False)
  h = np_gelu(np.asarray(x, np.float64) @ np.asarray(params["wi_0"]["kernel"])) * (
      np.asarray(x, np.float64) @ np.asarray(params["wi_1"]["kernel"]))
  assert np.all(np.sort(np.abs(h), -1)[..., -K:].min(-1) > 0)  # every row keeps k nonzero products
  assert (np.abs(want - signed).max()) > 0.1  # signed ranking would give another output
  assert np.any(np.where(np_keep_top(h, K, True) != 0, h, 0.0) < 0)  # some kept products are negative
  got = jax.jit(lambda p, x: block.apply({"params": p}, x, deterministic=True))(params, x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["t5_v1_0", "vit_bias"])
def test_relu_v1_0_keeps_the_k_largest_activations(bias):
  block, params, x = make(gated=False, bias=bias, top_k_method="auto")
  want = np_mlp(np.asarray(x), params, K, gated=False, bias=bias)
  got = jax.jit(lambda p, x: block.apply({"params": p}, x, deterministic=True))(params, x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  dense = jax.jit(lambda p, x: block.clone(top_k=None).apply({"params": p}, x, deterministic=True))(params, x)
  assert np.abs(np.asarray(dense) - want).max() > 0.1  # the Top-k changes the output here


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("gated", [False, True], ids=["v1.0", "v1.1"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense_step", "sparse_step"])
def test_decoding_step_equals_the_oracle(gated, sparse, bias):
  block, params, x = make(gated=gated, bias=bias, sparse_decode=sparse)
  step = x[:, :1]
  want = np_mlp(np.asarray(step), params, K, gated=gated, bias=bias)
  got = jax.jit(lambda p, x: block.apply({"params": p}, x, decode=True, deterministic=True))(params, step)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
