"""The predicted-neuron MLP step against NumPy, with a predictor that is wrong on purpose.

``test_predictors.py`` checks the cases where the predictor cannot matter (every unit a
candidate, or a perfect predictor). Here a random low-rank predictor with ``k < c < d_ff``
picks candidates that differ from the true top units, so the output depends on every stage
of the path: the scores (``x a b``, per branch; ReLU's pre-activation for v1.0, the
|product| for gated v1.1), the ``c`` candidates, their hidden activations with their biases,
the Top-k among them (by magnitude for v1.1), the ``k`` rows of ``wo`` and its bias, and the
sown statistics. Each is written here from the definitions of ``mlp_steps.predicted_step``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from topk_transformers import layers

from jaxpr_tools import recall_targets
from test_predictors import block_predictors

D, FF, K, C, R = 12, 48, 5, 14, 3
TOKENS = 4


def block(acts, candidates, use_bias, use_row_kernels=True, dtype=jnp.float32, top_k=K, dropout=0.0):
  return layers.MlpBlock(intermediate_dim=FF, activations=acts, top_k=top_k, top_k_method="exact",
                         intermediate_dropout_rate=dropout, sparse_decode=True, decode_candidates=candidates,
                         use_bias=use_bias, bias_init=nn.initializers.normal(0.5), use_row_kernels=use_row_kernels,
                         dtype=dtype)


def setup(acts, use_bias, b_cols, seed=0):
  rng = np.random.RandomState(seed)
  params = nn.meta.unbox(block(acts, None, use_bias).init(jax.random.PRNGKey(seed), jnp.ones((1, 1, D)))["params"])
  n = len(acts)
  names = ["wi"] if n == 1 else [f"wi_{i}" for i in range(n)]
  a = rng.randn(D, R).astype(np.float32)
  b = rng.randn(n, R, FF).astype(np.float32)
  preds = block_predictors(params, jnp.asarray(a), jnp.asarray(b))
  if b_cols:
    preds["b_cols"] = jnp.asarray(np.concatenate(list(b), axis=1))  # predictors.prepare's [r, n * mlp]
  x = rng.randn(2, TOKENS // 2, D).astype(np.float32)
  mask = np.array([[1, 1], [1, 0]], np.float32)  # one padding token, left out of the statistics
  return params, preds, names, a, b, x, mask


def reference(acts, params, names, a, b, x, mask, use_bias):
  """NumPy: candidates by the predicted score, hidden units of the candidates, Top-k among them, k rows of wo."""
  f = [np.vectorize(lambda v, fn=layers.resolve_activation(act): float(fn(jnp.float32(v)))) for act in acts]
  tokens = x.reshape(-1, D)
  out = np.zeros_like(tokens)
  fires = np.zeros(FF)
  cands = []
  for t, xt in enumerate(tokens):
    pred = [xt @ a @ b[i] for i in range(len(acts))]
    score = pred[0] if len(acts) == 1 else np.abs(np.prod([fn(p) for fn, p in zip(f, pred)], axis=0))
    cand = np.argsort(-score, kind="stable")[:C]
    cands.append(set(cand))
    h = np.ones(C)
    for fn, name in zip(f, names):
      pre = xt @ np.asarray(params[name]["kernel"])[:, cand]
      if use_bias:
        pre = pre + np.asarray(params[name]["bias"])[cand]
      h = h * fn(pre)
    rank = np.abs(h) if len(acts) > 1 else h
    keep = np.argsort(-rank, kind="stable")[:K]
    units = cand[keep]
    out[t] = h[keep] @ np.asarray(params["wo"]["kernel"])[units]
    if use_bias:
      out[t] += np.asarray(params["wo"]["bias"])
    if mask.reshape(-1)[t]:
      fires[units[h[keep] != 0]] += 1
  return out.reshape(x.shape), fires, float(mask.sum()), cands


def true_top_units(acts, params, names, x):
  tokens = x.reshape(-1, D)
  h = np.ones((len(tokens), FF))
  for act, name in zip(acts, names):
    h = h * np.asarray(layers.resolve_activation(act)(jnp.asarray(tokens @ np.asarray(params[name]["kernel"]))))
  return [set(np.argsort(-np.abs(row))[:K]) for row in h]


@pytest.mark.parametrize("acts, b_cols", [(("relu",), False), (("gelu", "linear"), True),
                                          (("gelu", "linear"), False)],
                         ids=["v1.0", "v1.1-b_cols", "v1.1-per_branch_b"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["no_bias", "bias"])
def test_predicted_step_equals_numpy_with_an_imperfect_predictor(acts, b_cols, use_bias):
  params, preds, names, a, b, x, mask = setup(acts, use_bias, b_cols)
  want, fires, tokens, cands = reference(acts, params, names, a, b, x, mask, use_bias)
  got = {}
  for row_kernels in (True, False):
    out, state = jax.jit(lambda v, x, m, rk=row_kernels: block(acts, C, use_bias, rk).apply(
        v, x, decode=True, deterministic=True, mask=m, mutable=["intermediates"]))(
            {"params": params, "predictors": preds}, jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5, err_msg=f"row kernels {row_kernels}")
    stats = state["intermediates"]
    np.testing.assert_array_equal(np.asarray(stats["neuron_fire_count"][0]), fires)
    assert float(stats["nonzero_count"][0]) == fires.sum() and float(stats["token_count"][0]) == tokens
    got[row_kernels] = np.asarray(out)
  # The predictor is wrong on purpose: for some token the candidates miss one of the true top-k units, so an
  # output equal to the exact path's would mean the candidates were not used.
  assert any(not u <= c for u, c in zip(true_top_units(acts, params, names, x), cands)), "an accidentally good predictor"
  exact, _ = block(acts, None, use_bias).apply({"params": params}, jnp.asarray(x), decode=True, deterministic=True,
                                               mask=jnp.asarray(mask), mutable=["intermediates"])
  assert not np.allclose(got[True], np.asarray(exact), atol=1e-3)


def test_predicted_step_of_a_bfloat16_block_stays_in_bfloat16():
  acts = ("gelu", "linear")
  params, preds, names, a, b, x, mask = setup(acts, True, True)  # float32 parameters and predictors, as trained
  out = jax.eval_shape(lambda v, x: block(acts, C, True, dtype=jnp.bfloat16).apply(v, x, decode=True,
                                                                                  deterministic=True),
                       {"params": params, "predictors": preds}, jnp.asarray(x))
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape


def test_predicted_step_checks_the_predictor_it_reads():
  """Predictors of another MLP's shape (branches, units or width) are a one-line ConfigError, each on its own.

  (``(?m)``: JAX appends a note on its filtered traceback after the message's line.)
  """
  from topk_transformers.errors import ConfigError
  acts = ("gelu", "linear")
  params, preds, _, _, _, x, _ = setup(acts, False, False)

  def step(p):
    return jax.eval_shape(lambda v, x: block(acts, C, False).apply(v, x, decode=True, deterministic=True),
                          {"params": params, "predictors": p}, jnp.asarray(x))

  with pytest.raises(ConfigError, match=r"(?m)^predicted decoding needs the 'wi_rows' layout of the predictors "
                                        r"\(predictors\.prepare\)$"):
    step({"a": preds["a"], "b": preds["b"]})
  wrong = {"branches": dict(preds, b=preds["b"][:1]), "units": dict(preds, b=preds["b"][..., :FF - 1]),
           "width": dict(preds, wi_rows=preds["wi_rows"][..., :D - 1])}
  for what, p in wrong.items():
    with pytest.raises(ConfigError, match=(
        rf"(?m)^predictor shapes b \({', '.join(map(str, p['b'].shape))}\), wi_rows "
        rf"\({', '.join(map(str, p['wi_rows'].shape))}\) do not fit an MLP of 2 branch\(es\), {FF} units, "
        rf"width {D}$")):
      step(p)


def test_predicted_path_is_taken_only_with_an_active_top_k_and_without_active_dropout():
  acts = ("relu",)
  params, preds, names, a, b, x, mask = setup(acts, False, False)
  want = reference(acts, params, names, a, b, x, mask, False)[0]
  variables = {"params": params, "predictors": preds}

  def step(deterministic=True, **kw):
    return np.asarray(block(acts, C, False, **kw).apply(variables, jnp.asarray(x), decode=True,
                                                        deterministic=deterministic))

  # Dropout is inactive when deterministic, or at rate 0: the predicted path either way.
  np.testing.assert_allclose(step(dropout=0.1), want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(step(deterministic=False), want, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match=r"(?m)^predicted decoding needs deterministic=True \(intermediate dropout 0\.1 "
                                       r"is active\)$"):
    step(deterministic=False, dropout=0.1)
  # Without an active Top-k (None, or k >= d_ff) the predictor is ignored: the dense MLP.
  dense = np.asarray(block(acts, None, False, top_k=None).apply({"params": params}, jnp.asarray(x), decode=True,
                                                                 deterministic=True))
  for inactive in (None, FF):
    np.testing.assert_allclose(step(top_k=inactive), dense, rtol=1e-6, atol=1e-6)
  assert not np.allclose(dense, want, atol=1e-3)


def test_v10_candidates_rank_by_the_predicted_pre_activation_below_zero_too():
  """ReLU's pre-activation, not its output, ranks v1.0's candidates: with fewer than c units predicted positive, the
  rest of the c are the least negative (ranking by the ReLU would tie them all at 0)."""
  acts = ("relu",)
  params, preds, names, _, _, x, mask = setup(acts, False, False)
  rng = np.random.RandomState(5)
  tokens = x.reshape(-1, D)
  a = np.zeros((D, R), np.float32)
  a[:, 0] = np.linalg.lstsq(tokens, np.ones(len(tokens)), rcond=None)[0]  # x @ a[:, 0] = 1 for every token
  b = np.zeros((1, R, FF), np.float32)
  b[0, 0] = -rng.uniform(0.1, 2.0, FF)
  b[0, 0, rng.choice(FF, 4, replace=False)] = 1.0  # 4 < C units predicted positive
  preds = dict(preds, a=jnp.asarray(a), b=jnp.asarray(b))
  assert np.sum(tokens @ a @ b[0] > 0, axis=1).max() == 4
  want = reference(acts, params, names, a, b, x, mask, False)[0]
  out = block(acts, C, False).apply({"params": params, "predictors": preds}, jnp.asarray(x), decode=True,
                                    deterministic=True)
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)


def test_gated_scores_come_from_b_cols_in_one_product_when_prepared():
  """predictors.prepare's ``b_cols`` [r, n * mlp] is one product for both branches; without it, one per branch."""
  acts = ("gelu", "linear")
  for b_cols, want in ((True, [(R, 2 * FF)]), (False, [(R, FF), (R, FF)])):
    params, preds, _, _, _, x, _ = setup(acts, False, b_cols)
    jaxpr = jax.make_jaxpr(lambda v, x: block(acts, C, False).apply(v, x, decode=True, deterministic=True))(
        {"params": params, "predictors": preds}, jnp.asarray(x)).jaxpr
    shapes = [tuple(e.invars[1].aval.shape) for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [s for s in shapes if s[0] == R] == want, shapes


@pytest.mark.parametrize("acts", [("relu",), ("gelu", "linear")], ids=["v1.0", "v1.1"])
def test_candidates_of_every_unit_give_the_exact_sparse_step(acts):
  """``c >= d_ff``: every unit is a candidate, whatever the predictor says (no scores are computed)."""
  params, preds, _, _, _, x, mask = setup(acts, True, False)
  exact, exact_stats = block(acts, None, True).apply({"params": params}, jnp.asarray(x), decode=True,
                                                     deterministic=True, mask=jnp.asarray(mask),
                                                     mutable=["intermediates"])
  for c in (FF, 2 * FF):
    out, stats = block(acts, c, True).apply({"params": params, "predictors": preds}, jnp.asarray(x), decode=True,
                                            deterministic=True, mask=jnp.asarray(mask), mutable=["intermediates"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(exact), rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, stats, exact_stats)


def test_predicted_step_passes_its_top_k_method_and_recall_target_on():
  """The Top-k among the candidates uses the block's method and recall target (read from the jaxpr: on CPU
  ``approx_max_k`` is exact, so no output could show a dropped recall target)."""
  acts = ("relu",)
  params, preds, _, _, _, x, _ = setup(acts, False, False)
  mlp = layers.MlpBlock(intermediate_dim=FF, activations=acts, top_k=K, top_k_method="approx", top_k_recall_target=0.7,
                        intermediate_dropout_rate=0.0, sparse_decode=True, decode_candidates=C)
  assert recall_targets(lambda v, x: mlp.apply(v, x, decode=True, deterministic=True),
                        {"params": params, "predictors": preds}, jnp.asarray(x)) == [0.7]
