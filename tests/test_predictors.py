"""Predicted-neuron decoding: predictors, the MLP's candidate path, and their fit, save and restore."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from topk_transformers import layers
from topk_transformers import predictors
from topk_transformers.errors import ConfigError
from topk_transformers.t5 import decoding as t5_decoding
from topk_transformers.t5 import network

from conftest import tiny_t5_config

V10 = ("relu",)
V11 = ("gelu", "linear")
D, FF, K = 16, 64, 8


def mlp(acts, candidates=None, use_row_kernels=True):
  return layers.MlpBlock(intermediate_dim=FF, activations=acts, top_k=K, top_k_method="exact",
                         intermediate_dropout_rate=0.0, sparse_decode=True, decode_candidates=candidates,
                         use_row_kernels=use_row_kernels)


def mlp_params(acts, seed=0):
  return mlp(acts).init(jax.random.PRNGKey(seed), jnp.ones((1, 1, D)))["params"]


def block_predictors(params, a, b):
  """The prepared collection of a lone MlpBlock (``predictors.prepare`` works on whole T5 trees)."""
  keys = ["wi"] if "wi" in params else ["wi_0", "wi_1"]
  rows = jnp.stack([params[k]["kernel"].T for k in keys])
  return {"a": a, "b": b, "wi_rows": rows}


def run_block(acts, params, x, candidates=None, preds=None, use_row_kernels=True):
  variables = {"params": params}
  if preds is not None:
    variables["predictors"] = preds
  return jax.jit(lambda v, x: mlp(acts, candidates, use_row_kernels).apply(
      v, x, decode=True, deterministic=True, mutable=["intermediates"]))(variables, x)


@pytest.mark.parametrize("acts", [V10, V11], ids=["v1.0", "v1.1"])
def test_mlp_block_candidates_of_all_units_or_perfect_predictor_equal_exact_sparse(acts):
  params = nn.meta.unbox(mlp_params(acts))
  x = jnp.asarray(np.random.RandomState(1).randn(3, 1, D), jnp.float32)
  exact, exact_stats = run_block(acts, params, x)
  n = len(acts)
  rng = np.random.RandomState(2)
  bad = block_predictors(params, jnp.asarray(rng.randn(D, 4), jnp.float32),
                         jnp.asarray(rng.randn(n, 4, FF), jnp.float32))
  # c = d_ff: every unit is a candidate, whatever the predictor says.
  out, stats = run_block(acts, params, x, FF, bad)
  np.testing.assert_allclose(out, exact, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, stats, exact_stats)
  # A perfect predictor (a = I, b = wi) with only c = k candidates.
  wi = jnp.stack([params["wi"]["kernel"]] if n == 1 else [params["wi_0"]["kernel"], params["wi_1"]["kernel"]])
  perfect = block_predictors(params, jnp.eye(D), wi)
  out, stats = run_block(acts, params, x, K, perfect)
  np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, stats, exact_stats)
  # A bad predictor with few candidates gives another result, still from exactly k units per token; the same
  # with XLA's gather in place of the row kernels.
  out, stats = run_block(acts, params, x, K, bad)
  assert not np.allclose(out, exact, atol=1e-3)
  xla_out, xla_stats = run_block(acts, params, x, K, bad, use_row_kernels=False)
  np.testing.assert_allclose(xla_out, out, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, xla_stats, stats)
  assert float(stats["intermediates"]["nonzero_count"][0]) <= 3 * K


@pytest.mark.parametrize("use_row_kernels", [True, False], ids=["row_kernels", "xla_gather"])
def test_predicted_step_reads_candidate_rows_not_whole_kernels(use_row_kernels):
  params = nn.meta.unbox(mlp_params(V10))
  x = jnp.ones((1, 1, D))
  preds = block_predictors(params, jnp.ones((D, 4)), jnp.ones((1, 4, FF)))
  fn = lambda v, x: mlp(V10, 16, use_row_kernels).apply(v, x, decode=True, deterministic=True)  # noqa: E731
  jaxpr = jax.make_jaxpr(fn)({"params": params, "predictors": preds}, x).jaxpr
  shapes = [tuple(v.aval.shape) for e in jaxpr.eqns if e.primitive.name == "dot_general" for v in e.invars]
  kernels = {str(e.params["target_name"]): [tuple(v.aval.shape) for v in e.invars]
             for e in jaxpr.eqns if e.primitive.name == "ffi_call"}
  selections = [tuple(e.invars[0].aval.shape) for e in jaxpr.eqns if e.primitive.name == "top_k"]
  assert selections == [(1, 1, FF), (1, 1, 16)]  # the 16 candidates from the scores, the k among them
  # Never a product with wi [16, 64] or wo [64, 16]: x @ a, (x a) @ b, then the 16 candidate rows of wi and the
  # 8 selected rows of wo, gathered by XLA or read by the row kernels (which get the whole matrix and the row
  # indices; test_row_kernels.py shows that they read no other row).
  assert (D, FF) not in shapes and (FF, D) not in shapes
  if use_row_kernels:
    assert kernels == {"topk_gather_matvec": [(1, 1, D), (FF, D), (1, 1, 16)],
                       "topk_gather_vecmat": [(1, 1, K), (FF, D), (1, 1, K)]}
  else:
    assert not kernels and (1, 1, 16, D) in shapes and (1, 1, K, D) in shapes
  # Without predictors (or without candidates) the block is the exact sparse path, unchanged.
  no_preds = jax.make_jaxpr(lambda p, x: mlp(V10, 16, use_row_kernels).apply({"params": p}, x, decode=True,
                                                                            deterministic=True))
  exact = jax.make_jaxpr(lambda p, x: mlp(V10, None, use_row_kernels).apply({"params": p}, x, decode=True,
                                                                           deterministic=True))
  assert str(no_preds(params, x)) == str(exact(params, x))
  with pytest.raises(ValueError, match="wi_rows"):
    fn({"params": params, "predictors": {"a": preds["a"], "b": preds["b"]}}, x)


def t5(acts=V10, candidates=None, layers_=2):
  return network.Transformer(tiny_t5_config(
      vocab_size=40, emb_dim=D, mlp_dim=FF, num_decoder_layers=layers_, mlp_activations=acts, top_k=K,
      top_k_method="exact", sparse_decode=True, decode_candidates=candidates))


def t5_params(module, seed=2):
  enc = jnp.ones((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), enc, enc, enc,
                                                            enable_dropout=False)))["params"]
  r = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(r.randn(*s.shape) / (np.sqrt(s.shape[0]) if path[-1].key == "kernel" else 1.0),
                                  jnp.float32), shapes)


ENC = jnp.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 0, 0, 0]], jnp.int32)


@pytest.mark.parametrize("acts", [V10, pytest.param(V11, marks=pytest.mark.slow)], ids=["v1.0", "v1.1"])
def test_t5_predicted_decoding_with_all_candidates_or_perfect_predictors_equals_exact(acts):
  exact = t5(acts)
  params = t5_params(exact)
  batch = {"encoder_input_tokens": ENC}
  ref, ref_scores = t5_decoding.predict_batch(exact, params, batch, max_decode_length=6, eos_id=None,
                                              return_scores=True)
  assert len(np.unique(ref)) > 2, "degenerate decodes would make this test weak"
  rand = predictors.random_predictors(params, 3, seed=1)
  for candidates, preds in ((FF, rand), (K, predictors.perfect_predictors(params))):
    tokens, scores = t5_decoding.predict_batch(t5(acts, candidates), params, batch, max_decode_length=6, eos_id=None,
                                               return_scores=True, predictors=preds)
    np.testing.assert_array_equal(tokens, ref)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
  # Random rank-3 predictors with c = k change the decodes: the predicted path is really taken.
  tokens, scores = t5_decoding.predict_batch(t5(acts, K), params, batch, max_decode_length=6, eos_id=None,
                                             return_scores=True, predictors=rand)
  assert not np.allclose(scores, ref_scores, atol=1e-3)
  with pytest.raises(ConfigError, match="decode_candidates"):
    t5_decoding.predict_batch(exact, params, batch, max_decode_length=6, predictors=rand)


@pytest.mark.parametrize("acts", [V10, V11], ids=["v1.0", "v1.1"])
def test_prepare_holds_wi_once_as_rows(acts):
  """The decoder MLPs' wi kernels move into the predictors as wi_rows; every other leaf is passed on, not copied."""
  params = t5_params(t5(acts))
  names = ["wi"] if len(acts) == 1 else ["wi_0", "wi_1"]
  step_params, prepared = predictors.prepare(params, predictors.random_predictors(params, 3))
  for layer in ("layers_0", "layers_1"):
    mlp, rows = step_params["decoder"][layer]["mlp"], predictors.layers_of(prepared)[layer]["wi_rows"]
    assert all("kernel" not in mlp[name] for name in names) and mlp["wo"]["kernel"] is params["decoder"][layer][
        "mlp"]["wo"]["kernel"]
    np.testing.assert_array_equal(rows, np.stack([params["decoder"][layer]["mlp"][n]["kernel"].T for n in names]))
    assert ("b_cols" in predictors.layers_of(prepared)[layer]) == (len(acts) > 1)
  assert all(a is b for a, b in zip(jax.tree.leaves(step_params["encoder"]), jax.tree.leaves(params["encoder"])))
  assert "kernel" in params["decoder"]["layers_0"]["mlp"][names[0]]  # the caller's tree is left as it was
  with pytest.raises(ConfigError, match="active Top-k"):
    t5_decoding.predict_batch(network.Transformer(dataclasses.replace(t5(acts, K).config, top_k=None)), params,
                              {"encoder_input_tokens": ENC}, max_decode_length=3,
                              predictors=predictors.random_predictors(params, 3))


def test_fit_is_least_squares_and_exact_at_full_rank():
  module = t5(V11, layers_=1)
  params = t5_params(module)
  wi = predictors.mlp_kernels(params)["layers_0"]  # [2, D, FF]
  # Correlated inputs: the activation-weighted fit must beat the plain SVD of wi on them.
  rng = np.random.RandomState(0)
  x = rng.randn(500, D) @ (rng.randn(D, D) * np.logspace(0, -2, D)[:, None])
  moments = predictors.Moments()
  moments.add("layers_0", x[:300].reshape(10, 30, D))
  moments.add("layers_0", np.concatenate([x[300:], np.full((50, D), 1e3)]), weights=np.r_[np.ones(200), np.zeros(50)])
  assert moments.count["layers_0"] == 500  # the 50 padded rows were skipped
  fits = predictors.fit(params, moments, [4, D])
  w = np.concatenate(list(wi), 1)

  def err(pred):
    p = predictors.layers_of(pred)["layers_0"]
    ab = np.concatenate(list(np.einsum("dr,nrf->ndf", p["a"], p["b"])), 1)
    return np.sum((x @ (w - ab)) ** 2)

  assert err(fits[D]) < 1e-6 * np.sum((x @ w) ** 2)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  plain = {"decoder": {"layers_0": {"mlp": {"a": u[:, :4], "b": (s[:4, None] * vt[:4]).reshape(4, 2, FF)
                                                .transpose(1, 0, 2)}}}}
  assert err(fits[4]) < 0.9 * err(plain)
  with pytest.raises(ConfigError, match="ranks"):
    predictors.fit(params, moments, [D + 1])


def test_predictors_survive_save_and_restore(tmp_path):
  module = t5(V10, K)
  params = t5_params(module)
  preds = predictors.random_predictors(params, 4, seed=3)
  path = predictors.save(str(tmp_path / "run" / "predictors" / "r4.npz"), preds, {"step": 7})
  restored, meta = predictors.restore(path, params)
  assert meta["step"] == 7 and meta["rank"] == 4 and predictors.rank(restored) == 4
  jax.tree.map(np.testing.assert_array_equal, restored, preds)
  batch = {"encoder_input_tokens": ENC}
  kwargs = dict(max_decode_length=5, eos_id=None, return_scores=True)
  before = t5_decoding.predict_batch(module, params, batch, predictors=preds, **kwargs)
  after = t5_decoding.predict_batch(module, params, batch, predictors=restored, **kwargs)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  # Predictors of another model, or no predictors file, are one clear error.
  other = t5_params(t5(V10, K, layers_=1))
  with pytest.raises(ConfigError, match="decoder layers"):
    predictors.restore(path, other)
  with pytest.raises(ConfigError, match="no predictors file"):
    predictors.restore(str(tmp_path / "missing.npz"))
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(ConfigError, match="not a predictors file"):
    predictors.restore(str(tmp_path / "bad.npz"))


def test_decode_candidates_is_validated():
  with pytest.raises(ConfigError, match="at least top_k"):
    t5(V10, K - 1)
  with pytest.raises(ConfigError, match="positive integer"):
    t5(V10, 0)


def test_quality_report_scores_through_the_decoding_step():
  from topk_transformers import predictor_training  # pylint: disable=g-import-not-at-top

  module = t5(V10)
  params = t5_params(module)
  dec_in = jnp.array([[0, 3, 4, 5, 6], [0, 7, 8, 9, 2]], jnp.int32)
  stepped = predictor_training.forced_step_logits(module, params, None, ENC, dec_in)
  forced = module.apply({"params": params}, ENC, dec_in, jnp.ones_like(dec_in), enable_dropout=False)
  np.testing.assert_allclose(stepped, forced, rtol=1e-4, atol=1e-4)
  # The recall of a perfect predictor is 1; of c = k random candidates, about k / d_ff.
  x = jnp.asarray(np.random.RandomState(0).randn(200, D), jnp.float32)
  wi = jnp.asarray(predictors.mlp_kernels(params)["layers_0"])
  assert float(jnp.mean(predictor_training._recall(x, wi, jnp.eye(D), wi, acts=V10, k=K, c=K))) == 1.0
  rand = predictors.layers_of(predictors.random_predictors(params, 3, seed=0))["layers_0"]
  low = float(jnp.mean(predictor_training._recall(x, wi, rand["a"], rand["b"], acts=V10, k=K, c=K)))
  assert low < 0.5


def test_measured_speedups_join_the_quality_rows_at_the_same_rank_and_candidates_per_kept_unit(tmp_path):
  from topk_transformers import plotting, predictor_training
  rows = [{"variant": "exact", "predictor_rank": None, "candidates": None, "loss_vs_exact": 0.0, "recall": 1.0},
          {"variant": "predicted", "predictor_rank": 16, "candidates": 128, "loss_vs_exact": 1e-4, "recall": 0.99,
           "bound": 1.91},
          {"variant": "predicted", "predictor_rank": 32, "candidates": 64, "loss_vs_exact": 1e-3, "recall": 0.9,
           "bound": 1.98}]
  timed = dict(variant="predicted", version="1.0", size="large", num_decoder_layers=24, dtype="float32", k=128)
  bench = {"results": [dict(timed, predictor_rank=16, candidates=256, speedup=1.9, row_kernels=True),
                       dict(timed, predictor_rank=16, candidates=256, speedup=1.6, row_kernels=False),  # XLA gather
                       dict(timed, predictor_rank=32, candidates=256, speedup=1.8, row_kernels=True),  # c/k = 2, not 1
                       dict(timed, variant="sparse", predictor_rank=None, candidates=None, speedup=1.3)]}
  assert predictor_training.attach_measured_speedups(rows, bench, k=64) == 1
  assert rows[1]["measured_speedup"] == 1.9 and rows[1]["measured_candidates"] == 256
  assert "measured_speedup" not in rows[0] and "measured_speedup" not in rows[2]
  assert rows[1]["measured_on"] == "T5 v1.0 large, 24 decoder layers, float32, k=128"
  plotting.plot_predictor_quality(rows, str(tmp_path / "q.png"))
  assert (tmp_path / "q.png").stat().st_size > 0


@pytest.mark.parametrize("content,problem", [(None, "No such file"), ("{oops", "Expecting"),
                                             ('{"a": 1}', "not a topk-bench-decode JSON")])
def test_train_predictors_checks_speedups_before_anything_else(tmp_path, capsys, content, problem):
  from topk_transformers.commands import train_predictors
  path = tmp_path / "bench.json"
  if content is not None:
    path.write_text(content)
  status = train_predictors.main(["--gin_file=t5/runs/cpu_smoke.gin", f"--checkpoint={tmp_path / 'no_run'}",
                                  f"--speedups={path}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1 and "--speedups" in err[0] and problem in err[0], err
