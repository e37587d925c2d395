"""``mlp_steps``: the sparse and predicted decoding steps as pure functions, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import layers
from topk_transformers import mlp_steps
from topk_transformers.errors import ConfigError

from test_mlp_oracle import np_mlp
from test_predicted_mlp_oracle import C, K, reference, setup

D, FF = 8, 32


def params_of(gated, bias, seed=0):
  rng = np.random.RandomState(seed)
  names = mlp_steps.branch_names(2 if gated else 1)
  p = {name: {"kernel": rng.randn(D, FF).astype(np.float32) / np.sqrt(D)} for name in names}
  p["wo"] = {"kernel": rng.randn(FF, D).astype(np.float32) / np.sqrt(FF)}
  if bias:
    for name in p:
      p[name]["bias"] = rng.randn(p[name]["kernel"].shape[1]).astype(np.float32) * 0.5
  return jax.tree.map(jnp.asarray, p)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("gated", [False, True], ids=["v1.0", "v1.1"])
@pytest.mark.parametrize("row_kernels", [True, False], ids=["row_kernels", "xla_gather"])
def test_sparse_step_equals_numpy(gated, bias, row_kernels):
  params = params_of(gated, bias)
  x = jnp.asarray(np.random.RandomState(1).randn(3, 1, D) * 2.0, jnp.float32)
  settings = mlp_steps.Settings(top_k=K, activations=("gelu", "linear") if gated else ("relu",), method="exact",
                                row_kernels=row_kernels)
  y, stats = jax.jit(lambda p, x: mlp_steps.sparse_step(p, x, settings, mask=jnp.array([[1], [0], [1]])))(params, x)
  want = np_mlp(np.asarray(x), params, K, gated=gated, bias=bias)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
  # The two counted tokens' k units, the padded one left out.
  h = mlp_steps.hidden(params, x, settings.activations, jnp.float32)
  kept = np.asarray(jax.vmap(lambda r: jnp.abs(r) if gated else r)(h.reshape(3, FF)))
  fires = np.zeros(FF)
  for t in (0, 2):
    fires[np.argsort(-kept[t])[:K]] += 1
  np.testing.assert_array_equal(np.asarray(stats.neuron_fire_count), fires)
  assert float(stats.nonzero_count) == 2 * K and float(stats.token_count) == 2


@pytest.mark.parametrize("acts, b_cols", [(("relu",), False), (("gelu", "linear"), True)], ids=["v1.0", "v1.1"])
def test_predicted_step_equals_numpy_with_an_imperfect_predictor(acts, b_cols):
  params, preds, names, a, b, x, mask = setup(acts, True, b_cols)
  want, fires, tokens, _ = reference(acts, params, names, a, b, x, mask, True)
  # wi is read from wi_rows alone: the kernels need not be there.
  without_wi = {name: {"bias": params[name]["bias"]} for name in names} | {"wo": params["wo"]}
  settings = mlp_steps.Settings(top_k=K, activations=acts, method="exact", candidates=C)
  y, stats = jax.jit(lambda p, q, x, m: mlp_steps.predicted_step(p, q, x, settings, m))(
      without_wi, preds, jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(stats.neuron_fire_count), fires)
  assert float(stats.nonzero_count) == fires.sum() and float(stats.token_count) == tokens


def test_statistics_of_the_dense_and_the_selected_forms_agree():
  rng = np.random.RandomState(2)
  h = rng.randn(2, 3, FF).astype(np.float32)
  h[0, 1] = 0.0  # a token with no unit fired: its selected zeros must not count
  vals, idx = jax.lax.top_k(jnp.asarray(h), 4)
  dense_h = np.zeros_like(h)
  np.put_along_axis(dense_h, np.asarray(idx), np.asarray(vals), -1)
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  dense = mlp_steps.statistics(jnp.asarray(dense_h), jnp.asarray(mask))
  selected = mlp_steps.statistics(vals, jnp.asarray(mask), idx, FF)
  jax.tree.map(np.testing.assert_array_equal, dense, selected)
  want = ((dense_h != 0) * mask[..., None]).reshape(-1, FF).sum(0)
  np.testing.assert_array_equal(np.asarray(dense.neuron_fire_count), want)
  assert float(dense.token_count) == 5 and float(dense.nonzero_count) == 4 * 4  # 5 counted, one of them empty
  unmasked = mlp_steps.statistics(jnp.asarray(dense_h))
  assert float(unmasked.token_count) == 6 and float(unmasked.nonzero_count) == 5 * 4


def test_bias_rule():
  y = jnp.ones((2, 3), jnp.float32)
  bias = jnp.arange(5, dtype=jnp.float32)
  assert mlp_steps.add_bias(y, {"kernel": None}, jnp.float32) is y  # no bias, nothing added
  np.testing.assert_array_equal(mlp_steps.add_bias(jnp.ones((2, 5)), {"bias": bias}, jnp.float32),
                                1.0 + np.arange(5)[None].repeat(2, 0))
  units = jnp.array([[4, 0, 2], [1, 1, 3]])
  np.testing.assert_array_equal(mlp_steps.add_bias(y, {"bias": bias}, jnp.float32, units=units),
                                1.0 + np.asarray(units))
  # In the computation dtype, from the float32 parameter.
  assert mlp_steps.add_bias(jnp.ones((2, 5), jnp.bfloat16), {"bias": bias}, jnp.bfloat16).dtype == jnp.bfloat16


def test_linear_equals_dense_general():
  x = jnp.asarray(np.random.RandomState(3).randn(2, 4, D), jnp.float32)
  dense = layers.DenseGeneral(FF, kernel_axes=("embed", "mlp"), use_bias=True,
                              bias_init=jax.nn.initializers.normal(1.0))
  variables = dense.init(jax.random.PRNGKey(0), x)
  layer = jax.tree.map(lambda v: v.unbox() if hasattr(v, "unbox") else v, variables["params"],
                       is_leaf=lambda v: hasattr(v, "unbox"))
  np.testing.assert_array_equal(mlp_steps.linear(x, layer, jnp.float32), dense.apply(variables, x))


def test_bad_settings_and_parameters_are_one_line_errors():
  def one_line(fn, match):
    with pytest.raises(ConfigError, match=match) as e:
      fn()
    assert "\n" not in str(e.value)

  one_line(lambda: mlp_steps.Settings(top_k=None), r"^the sparse and predicted MLP steps need a top_k$")
  one_line(lambda: mlp_steps.Settings(top_k=0), r"^top_k must be a positive integer or None, got 0$")
  one_line(lambda: mlp_steps.Settings(top_k=4, method="fast"), r"^top_k_method must be one of")
  one_line(lambda: mlp_steps.Settings(top_k=4, activations=()), r"^an MLP step needs at least one activation$")
  one_line(lambda: mlp_steps.Settings(top_k=4, activations=("swish2",)), r"^unknown MLP activation 'swish2'$")
  one_line(lambda: mlp_steps.Settings(top_k=4, candidates=3),
           r"^candidates must be an integer of at least top_k \(4\) or None, got 3$")
  assert mlp_steps.Settings(top_k=4, activations="relu").activations == ("relu",)
  params, x = params_of(False, False), jnp.ones((1, 1, D))
  settings = mlp_steps.Settings(top_k=4)
  one_line(lambda: mlp_steps.sparse_step({"wi": params["wi"]}, x, settings),
           r"^an MLP step needs the MLP's 'wo' parameters$")
  one_line(lambda: mlp_steps.sparse_step({"wi": params["wi"], "wo": {"kernel": jnp.ones((FF, D - 1))}}, x, settings),
           rf"^'wo' kernel has shape \({FF}, {D - 1}\), expected \({FF}, {D}\)$")
  one_line(lambda: mlp_steps.predicted_step(params, {}, x, settings), r"^the predicted MLP step needs settings\.")
