"""The sparse decoding path gives the dense Top-k results while reading only k rows of ``wo``."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from topk_transformers import decoding
from topk_transformers import layers
from topk_transformers import topk
from topk_transformers.t5 import decoding as t5_decoding
from topk_transformers.t5 import network

V10 = ("relu",)
V11 = ("gelu", "linear")


def all_eqns(jaxpr):
  """Every equation of a jaxpr, including those of nested (jit, while, ...) sub-jaxprs."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):  # Jaxpr
          yield from all_eqns(sub)
        elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # ClosedJaxpr
          yield from all_eqns(sub.jaxpr)


def dots_with_operand(fn, shape, *args):
  """How many ``dot_general`` in ``fn(*args)`` take an operand of ``shape`` (e.g. the ``wo`` kernel)."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return sum(1 for e in all_eqns(jaxpr) if e.primitive.name == "dot_general"
             and any(tuple(v.aval.shape) == tuple(shape) for v in e.invars))


def test_sparse_matmul_equals_scatter_then_matmul():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
  vals, idx = topk.select(x, 8)
  sparse, dense = jax.jit(lambda v, i, w: (topk.sparse_matmul(v, i, w), topk.scatter(v, i, 64) @ w))(vals, idx, kernel)
  np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)
  # The computation dtype: bfloat16 rows, gathered from a float32 kernel.
  assert jax.eval_shape(lambda: topk.sparse_matmul(vals, idx, kernel, dtype=jnp.bfloat16)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="2-D"):
    topk.sparse_matmul(vals, idx, kernel[None])
  with pytest.raises(ValueError, match="same shape"):
    topk.sparse_matmul(vals, idx[..., :4], kernel)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("by_magnitude", [False, True])
def test_select_f32_selects_like_select(dtype, by_magnitude):
  # Small integers: many ties, which both must break by position the same way.
  x = jnp.asarray(np.random.RandomState(0).randint(-4, 5, size=(6, 200)), dtype)
  v1, i1 = topk.select(x, 20, by_magnitude=by_magnitude)
  v2, i2 = topk.select_f32(x, 20, by_magnitude=by_magnitude)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_array_equal(v1, v2)
  assert v2.dtype == dtype


def mlp(acts, method, sparse, dropout=0.0):
  return layers.MlpBlock(intermediate_dim=64, activations=acts, top_k=8, top_k_method=method,
                         intermediate_dropout_rate=dropout, sparse_decode=sparse)


@pytest.mark.parametrize("acts", [V10, V11], ids=["v1.0", "v1.1"])
@pytest.mark.parametrize("method", ["exact", "approx"])
@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_block_sparse_equals_dense(acts, method, batch):
  x = np.random.RandomState(batch).randn(batch, 1, 16)
  x[2:] = 0.0  # a counted row of zeros: fewer than k nonzero units, so the selected zeros must not count as fired
  x = jnp.asarray(x, jnp.float32)
  params = mlp(acts, method, False).init(jax.random.PRNGKey(0), x)["params"]
  mask = jnp.array([[1], [0], [1]][:batch])  # a padded row must not count in the statistics
  outs = {}
  for sparse in (False, True):
    block = mlp(acts, method, sparse)
    outs[sparse] = jax.jit(lambda p, x, m: block.apply({"params": p}, x, decode=True, deterministic=True, mask=m,
                                                       mutable=["intermediates"]))(params, x, mask)
    n_dots = dots_with_operand(lambda p, x: block.apply({"params": p}, x, decode=True, deterministic=True),
                               (64, 16), params, x)
    assert n_dots == (0 if sparse else 1)
  (y_dense, s_dense), (y_sparse, s_sparse) = outs[False], outs[True]
  np.testing.assert_allclose(y_sparse, y_dense, rtol=1e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, s_sparse, s_dense)
  assert float(s_dense["intermediates"]["nonzero_count"][0]) > 0


def test_sparse_statistics_without_a_mask_count_every_token():
  x = np.random.RandomState(4).randn(3, 1, 16)
  x[1] = 0.0  # fewer than k nonzero units in this row
  x = jnp.asarray(x, jnp.float32)
  params = jax.jit(mlp(V10, "exact", False).init)(jax.random.PRNGKey(0), x)["params"]
  stats = [jax.jit(lambda p, x, b=mlp(V10, "exact", s): b.apply({"params": p}, x, decode=True, deterministic=True,
                                                                mutable=["intermediates"])[1])(params, x)
           for s in (False, True)]
  jax.tree.map(np.testing.assert_array_equal, stats[1], stats[0])
  assert float(stats[1]["intermediates"]["token_count"][0]) == 3


def test_sparse_decode_rule_and_errors():
  d_ff, k = 64, 8  # automatic: sparse while 4 * tokens * k <= d_ff, i.e. up to 2 tokens
  block = mlp(V10, "exact", None)
  params = block.init(jax.random.PRNGKey(0), jnp.ones((1, 1, 16)))["params"]

  def dense_dots(x, decode=True):
    return dots_with_operand(lambda p, x: block.apply({"params": p}, x, decode=decode, deterministic=True),
                             (d_ff, 16), params, x)
  assert dense_dots(jnp.ones((2, 1, 16))) == 0
  assert dense_dots(jnp.ones((3, 1, 16))) == 1
  assert dense_dots(jnp.ones((1, 3, 16))) == 1  # tokens: every position of the call, not the batch alone
  assert dense_dots(jnp.ones((1, 1, 16)), decode=False) == 1  # training / scoring stay dense
  # Active dropout keeps the automatic choice dense, and makes a forced sparse path an error.
  dropping = mlp(V10, "exact", None, dropout=0.5)
  def fn(p, x):
    return dropping.apply({"params": p}, x, decode=True, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})

  assert dots_with_operand(fn, (d_ff, 16), params, jnp.ones((1, 1, 16))) == 1
  # Dropout is active only when both non-deterministic and rate > 0: otherwise the automatic choice stays sparse.
  for block, deterministic in ((dropping, True), (mlp(V10, "exact", None), False)):
    assert dots_with_operand(lambda p, x, b=block, d=deterministic: b.apply(
        {"params": p}, x, decode=True, deterministic=d, rngs={"dropout": jax.random.PRNGKey(0)}),
        (d_ff, 16), params, jnp.ones((1, 1, 16))) == 0
  with pytest.raises(ValueError, match="deterministic"):
    mlp(V10, "exact", True, dropout=0.5).apply({"params": params}, jnp.ones((1, 1, 16)), decode=True,
                                               deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  # Same parameters whichever path init would take.
  sparse_params = mlp(V11, "exact", True).init(jax.random.PRNGKey(0), jnp.ones((1, 1, 16)), decode=True)
  dense_params = mlp(V11, "exact", False).init(jax.random.PRNGKey(0), jnp.ones((1, 1, 16)), decode=True)
  jax.tree.map(np.testing.assert_array_equal, sparse_params, dense_params)


def test_bfloat16_sparse_step_stays_in_bfloat16():
  """A bfloat16 block's sparse step gathers its rows of ``wo`` and adds its bias in bfloat16, as its dense step
  computes (the float32 row kernel is for float32 blocks); traced only, the dtypes are static."""
  def out_dtype(sparse):
    block = layers.MlpBlock(intermediate_dim=64, top_k=8, intermediate_dropout_rate=0.0, dtype=jnp.bfloat16,
                            use_bias=True, sparse_decode=sparse)
    x = jax.ShapeDtypeStruct((2, 1, 16), jnp.float32)
    params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)["params"]  # float32, as stored
    return jax.eval_shape(lambda p, x: block.apply({"params": p}, x, decode=True, deterministic=True), params, x).dtype
  assert out_dtype(False) == out_dtype(True) == jnp.bfloat16


def test_sparse_step_reads_wo_through_flax():
  """The block declares ``wo`` itself, so a missing or misshapen one is Flax's error before any step runs (the pure
  step's own checks are in ``test_mlp_steps.py``)."""
  block = mlp(V10, "exact", True)
  wi = {"kernel": jnp.ones((16, 64))}
  step = lambda p: jax.eval_shape(lambda: block.apply({"params": p}, jnp.ones((1, 1, 16)), decode=True,
                                                      deterministic=True))  # traced only: the checks are static
  assert step({"wi": wi, "wo": {"kernel": jnp.ones((64, 16))}}).shape == (1, 1, 16)
  with pytest.raises(flax.errors.ScopeParamNotFoundError, match='"kernel" in scope "/wo"'):
    step({"wi": wi})
  with pytest.raises(flax.errors.ScopeParamShapeError, match=r"\"/wo\".* shape \(64, 16\), .* shape \(64, 8\)"):
    step({"wi": wi, "wo": {"kernel": jnp.ones((64, 8))}})


def greedy_with_steps(module, params, enc, length):
  """Greedy decoding one jitted step at a time: tokens ``[batch, length]`` and logits ``[batch, length, vocab]``."""
  encode = jax.jit(lambda p, e: module.apply({"params": p}, e, enable_dropout=False, method=module.encode))
  encoded = encode(params, enc)
  cache = t5_decoding.init_cache(module, params, encoded, enc, length)

  @jax.jit
  def step(params, cache, token, i):
    fn = t5_decoding.make_tokens_to_logits(module, params, encoded, enc, length)
    return fn(decoding.DecodingState(i, token, None, cache))

  token = jnp.zeros((enc.shape[0], 1), jnp.int32)
  tokens, logits = [], []
  for i in range(length):
    step_logits, cache = step(params, cache, token, jnp.int32(i))
    token = jnp.argmax(step_logits, -1)[:, None].astype(jnp.int32)
    tokens.append(token)
    logits.append(step_logits)
  return np.concatenate(tokens, 1), np.stack(logits, 1), step, (params, cache, token, jnp.int32(length - 1))


@pytest.mark.parametrize("acts,method,batch", [(V10, "exact", 1), (V11, "approx", 2)], ids=["v1.0", "v1.1"])
def test_t5_greedy_sparse_equals_dense(acts, method, batch, tiny_t5_config):
  # wo is (mlp_dim, emb_dim) = (64, 32) in each of the 2 decoder layers, as the dot counts below expect.
  cfg = dict(vocab_size=40, emb_dim=32, head_dim=16, mlp_dim=64, num_decoder_layers=2, mlp_activations=acts,
             top_k=8, top_k_method=method)
  enc = jnp.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 0, 0, 0]][:batch], jnp.int32)
  dense = network.Transformer(tiny_t5_config(**cfg, sparse_decode=False))
  sparse = network.Transformer(tiny_t5_config(**cfg, sparse_decode=True))
  shapes = nn.meta.unbox(jax.eval_shape(lambda: dense.init(jax.random.PRNGKey(0), enc, enc, enc,
                                                           enable_dropout=False)))["params"]
  r = np.random.RandomState(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(r.randn(*s.shape) / (np.sqrt(s.shape[0]) if path[-1].key == "kernel" else 1.0),
                                  jnp.float32), shapes)
  length = 6
  t_dense, l_dense, step_dense, args = greedy_with_steps(dense, params, enc, length)
  t_sparse, l_sparse, step_sparse, _ = greedy_with_steps(sparse, params, enc, length)
  np.testing.assert_array_equal(t_sparse, t_dense)
  np.testing.assert_allclose(l_sparse, l_dense, rtol=1e-5, atol=1e-5)
  assert len(np.unique(t_dense)) > 1, "degenerate decodes would make this test weak"
  # The dense step multiplies by every layer's wo; the sparse step by none.
  assert dots_with_operand(step_dense, (64, 32), *args) == 2
  assert dots_with_operand(step_sparse, (64, 32), *args) == 0


def test_decode_benchmark_writes_json_and_plot(tmp_path):
  import json  # pylint: disable=g-import-not-at-top

  from topk_transformers.commands import bench_decode  # pylint: disable=g-import-not-at-top

  out, png = tmp_path / "bench.json", tmp_path / "bench.png"
  assert bench_decode.main(["--sizes=tiny", "--k=16", "--steps=2", "--reps=2", "--num_layers=1", f"--json={out}",
                            f"--plot={png}", "--predicted", "--predictor_rank=4", "--candidates=32",
                            "--vecmat_gib=0.004"]) == 0
  result = json.loads(out.read_text())
  assert result["machine"]["platform"] == jax.devices()[0].platform and result["machine"]["cores"] >= 1
  dense, in_out, sparse, predicted = result["results"]
  # T5X's [in, out] kernels decode the same tokens as the [out, in] layout every other variant reads.
  assert in_out["variant"] == "dense_in_out" and in_out["tokens_match_dense"]
  assert in_out["weight_bytes_per_token"] == dense["weight_bytes_per_token"]
  # The machine's rate, interleaved: both vector-matrix orientations and the step's own kernels.
  assert sorted(dense["vecmat_gb_per_s"]) == ["vecmat/W@y", "vecmat/step_kernels", "vecmat/x@W"]
  for name, rate in dense["vecmat_gb_per_s"].items():
    assert rate > 0 and dense["share_of_vecmat_rate"][name] == pytest.approx(dense["weight_gb_per_s"] / rate)
  assert (predicted["variant"], predicted["predictor_rank"], predicted["candidates"]) == ("predicted", 4, 32)
  # Predicted: the rank-4 predictor (a [64, 4], b [4, 256]), 32 rows of wi, 16 rows of wo.
  per_layer_predicted = 6 * 64 * 64 + 4 * (64 + 256) + 32 * 64 + 16 * 64 + 3 * 64
  assert predicted["weight_bytes_per_token"] == 4 * (per_layer_predicted + 2 * 64 + 32128 * 64)
  assert predicted["bound"] == pytest.approx(dense["weight_bytes_per_token"] / predicted["weight_bytes_per_token"])
  assert predicted["speedup"] == pytest.approx(dense["s_per_token"] / predicted["s_per_token"])
  assert "once per input" in result["counted"] and len(dense["load_average_after_timing"]) == 3
  assert (dense["variant"], sparse["variant"], sparse["k"]) == ("dense", "sparse", 16)
  assert sparse["tokens_match_dense_topk"] and dense["truncated"] and dense["num_decoder_layers"] == 1
  # tiny: d=64, 2 heads x 32, d_ff=256, vocab 32128, one decoder layer, float32. Per layer: 4 self-attention and
  # 2 cross-attention (q, o) kernels [64, 64], wi and wo [64, 256] (sparse: 16 rows of wo), 3 norms; then the
  # embedding row, the final norm, the logits.
  per_layer_dense = 6 * 64 * 64 + 2 * 64 * 256 + 3 * 64
  per_layer_sparse = 6 * 64 * 64 + 64 * 256 + 16 * 64 + 3 * 64
  once = 2 * 64 + 32128 * 64
  assert dense["weight_bytes_per_token"] == 4 * (per_layer_dense + once)
  assert sparse["weight_bytes_per_token"] == 4 * (per_layer_sparse + once)
  assert sparse["bound"] == pytest.approx((per_layer_dense + once) / (per_layer_sparse + once))
  assert sparse["speedup"] == pytest.approx(dense["s_per_token"] / sparse["s_per_token"])
  assert len(sparse["all_s_per_token"]) == 2 and all(t > 0 for t in sparse["all_s_per_token"])
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A bad flag is one line and exit 2, before anything is built.
  assert bench_decode.main(["--sizes=huge"]) == 2
  assert bench_decode.main(["--sizes=tiny", "--k=0"]) == 2
  assert bench_decode.main(["--sizes=tiny", "--k=16", "--predicted", "--candidates=8"]) == 2  # c < k
  assert bench_decode.main(["--sizes=tiny", "--vecmat_gib=-1"]) == 2
