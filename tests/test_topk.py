"""Top-k against a NumPy reference, for every method: ties, signed zeros, infinities, gradients, recall.

The reference ranks by the total order ``lax.top_k`` documents for floats
(``-NaN < -inf < ... < -0.0 < +0.0 < ... < inf < NaN``), written here from
comparisons and the sign bit rather than from the bit trick ``topk.order_key``
uses, and breaks ties by position (the lower index first).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import layers
from topk_transformers import topk

from jaxpr_tools import equations, recall_targets

DTYPES = [jnp.float32, jnp.bfloat16]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_kept(x: np.ndarray, k: int, by_magnitude: bool = False) -> np.ndarray:
  """Boolean ``[rows, d]``: the first ``k`` of each row in (score descending, position ascending) order."""
  score = np.abs(x.astype(np.float64)) if by_magnitude else x.astype(np.float64)
  nan, negative = np.isnan(score), np.signbit(score)
  group = np.where(nan, np.where(negative, -1, 1), 0)  # -NaN below everything, NaN above
  value = np.where(nan, 0.0, score)
  positive_zero = ((score == 0) & ~negative).astype(np.int8)  # -0.0 just below +0.0
  kept = np.zeros(x.shape, bool)
  for r in range(x.shape[0]):
    idx = np.arange(x.shape[1])
    order = np.lexsort((idx, -positive_zero[r], -value[r], -group[r]))
    kept[r, order[:k]] = True
  return kept


def reference_topk(x: np.ndarray, k: int, by_magnitude: bool = False) -> np.ndarray:
  return np.where(reference_kept(x, k, by_magnitude), x, np.zeros((), x.dtype))


def bits(a) -> np.ndarray:
  """The bytes of ``a``: equal bits, so ``-0.0 != +0.0`` and NaN == NaN."""
  return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def planted(d: int, k: int, dtype) -> np.ndarray:
  """Rows that break careless selections: ties at the k-th value, all-equal rows, fewer than k
  positive entries (ReLU zeros), signed zeros, infinities and NaNs of both signs."""
  rng = np.random.default_rng(d * 1000 + k)
  rows = [
      rng.standard_normal(d),
      rng.integers(-2, 3, d).astype(float),  # many ties everywhere
      np.full(d, 1.5),  # one value: the first k by position
      np.full(d, -0.0),
      np.where(rng.random(d) < 0.5, 0.0, -0.0),
      np.maximum(rng.standard_normal(d) - 2.0, 0.0),  # mostly zeros: fewer than k positive
      np.concatenate([[np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0], rng.standard_normal(d)])[:d],
  ]
  x = np.stack(rows)
  x[0, ::3] = x[0, 0]  # ties at an arbitrary value in a random row
  return np.asarray(jnp.asarray(x, dtype))


EXACT_METHODS = ("exact", "threshold", "auto")
PLANTED_SHAPES = ((7, 1), (7, 6), (40, 13), (100, 99))  # k = 1 and k = d - 1 included


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("by_magnitude", [False, True], ids=["value", "magnitude"])
def test_every_exact_method_keeps_the_reference_set_on_planted_rows(method, dtype, by_magnitude):
  for d, k in PLANTED_SHAPES:
    x = planted(d, k, dtype)
    got = jax.jit(lambda x: topk.topk(x, k, method, by_magnitude=by_magnitude))(x)
    want = reference_topk(x, k, by_magnitude)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"{method} d={d} k={k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("by_magnitude", [False, True], ids=["value", "magnitude"])
def test_approx_keeps_k_entries_with_the_reference_values_on_planted_rows(dtype, by_magnitude):
  """``approx_max_k`` ranks with a plain ``>``: on CPU it finds the k largest values, but ties
  (signed zeros included) go to any position, and NaN has no place, so NaN-free rows compare by value."""
  for d, k in PLANTED_SHAPES:
    x = planted(d, k, dtype)
    x = np.where(np.isnan(x.astype(np.float32)), np.asarray(2.5, x.dtype), x)
    got = np.asarray(jax.jit(lambda x: topk.topk(x, k, "approx", by_magnitude=by_magnitude))(x))
    kept = np.asarray(jax.jit(lambda x: topk.select(x, k, "approx", by_magnitude=by_magnitude))(x)[1])
    assert all(len(set(row)) == k for row in kept.tolist())  # k distinct positions per row
    score = np.abs(x.astype(np.float64)) if by_magnitude else x.astype(np.float64)
    want = np.sort(np.where(reference_kept(x, k, by_magnitude), score, -np.inf), axis=-1)[:, -k:]
    np.testing.assert_array_equal(np.sort(np.take_along_axis(score, kept, -1), axis=-1), want)
    np.testing.assert_array_equal(np.take_along_axis(got, kept, -1), np.take_along_axis(x, kept, -1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_threshold_equals_top_k_then_scatter_bit_for_bit(dtype):
  rng = np.random.default_rng(0)

  @jax.jit
  def both(x):
    k = x.shape[-1] // 16 + 1
    exact = topk.scatter(*topk.select(x, k, "exact"), x.shape[-1])
    return exact, topk.topk(x, k, "threshold"), jnp.sum(topk.keep_mask(x, k), axis=-1), k

  for shape in ((3, 5, 64), (16, 2048), (9, 333)):
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    if dtype == jnp.bfloat16:  # a 7-bit mantissa already gives ties; coarser values give many more
      x = jnp.round(x * 8) / 8
    exact, threshold, kept, k = both(x)
    np.testing.assert_array_equal(bits(threshold), bits(exact), err_msg=f"{shape}")
    np.testing.assert_array_equal(kept, k)


def test_keep_mask_keeps_the_first_ties_by_position():
  x = jnp.asarray([[3.0, 1.0, 3.0, 2.0, 3.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [0.0] * 6])
  mask = jax.jit(lambda x: topk.keep_mask(x, 2))(x)
  np.testing.assert_array_equal(mask, [[1, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
  with pytest.raises(ValueError, match="1 <= k <= 6"):
    topk.keep_mask(x, 7)
  with pytest.raises(ValueError, match="int32"):
    topk.keep_mask(jnp.ones((2, 8), jnp.int32), 2)


@pytest.mark.parametrize("dtype, utype", [(jnp.float32, np.uint32), (jnp.bfloat16, np.uint16)], ids=["f32", "bf16"])
def test_threshold_orders_values_that_differ_only_in_their_last_bits(dtype, utype):
  """Neighbouring floats (1 to 3 units in the last place apart, of both signs) among others, in shuffled
  positions, with d not a multiple of the key width: every k keeps the reference set, so the radix rounds
  read every bit of the key, the lowest two included."""
  one = int(np.asarray(jnp.asarray(1.5, dtype)).view(utype))
  sign = 1 << (8 * np.dtype(utype).itemsize - 1)
  family = [one + j for j in range(4)] + [(one | sign) + j for j in range(4)]
  values = np.asarray(np.array(family, utype).view(np.dtype(jnp.dtype(dtype))), np.float64)
  assert len(set(values.tolist())) == 8  # eight distinct values: 1.5 and -1.5 and their next 3 neighbours
  rng = np.random.default_rng(3)
  d = 37
  rows = []
  for _ in range(4):
    row = np.concatenate([values, rng.uniform(-1.0, 1.0, d - len(values))])
    rows.append(row[rng.permutation(d)])
  x = jnp.asarray(np.stack(rows), dtype)
  for k in range(1, 9):
    np.testing.assert_array_equal(np.asarray(topk.keep_mask(x, k)), reference_kept(np.asarray(x), k), err_msg=f"k={k}")
  for k in (d - 8, d - 1, d):  # the neighbours of -1.5 at the bottom; k = d keeps the whole row
    np.testing.assert_array_equal(np.asarray(topk.keep_mask(x, k)), reference_kept(np.asarray(x), k), err_msg=f"k={k}")
  assert np.asarray(topk.keep_mask(x, d)).all()
  assert topk.keep_mask(x, 3).dtype == jnp.bool_  # the documented dtype


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("by_magnitude", [False, True], ids=["value", "magnitude"])
def test_gradient_is_the_indicator_of_the_kept_set(method, by_magnitude):
  x = jnp.asarray(planted(48, 12, jnp.float32))
  x = jnp.where(jnp.isfinite(x), x, 7.0)  # finite, so that the cotangent stays finite
  g = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(topk.topk(x, 12, method, by_magnitude=by_magnitude) * g)))(x)
  np.testing.assert_array_equal(grad, np.where(reference_kept(np.asarray(x), 12, by_magnitude), g, 0.0))


def test_by_magnitude_keeps_the_largest_absolute_values_with_their_sign():
  x = jnp.asarray([[-5.0, 1.0, 4.0, -0.5, 3.0, -2.0]])  # signed ranking would keep 4, 3
  for method in topk.METHODS:
    both = jax.jit(lambda x: (topk.topk(x, 2, method, by_magnitude=True), topk.topk(x, 2, method)))(x)
    np.testing.assert_array_equal(both[0], [[-5.0, 0, 4.0, 0, 0, 0]], err_msg=method)
    np.testing.assert_array_equal(both[1], [[0, 0, 4.0, 0, 3.0, 0]], err_msg=method)


def test_approx_recall():
  """``approx_max_k`` is exact on CPU and GPU, where XLA ignores the recall target.

  The recall it reaches on TPU cannot be measured here; what holds everywhere
  is asserted: a row never keeps more than k, and (here, on CPU) what it keeps
  is the reference set, so the recall is 1 >= the target.
  """
  rng = np.random.default_rng(2)
  x = jnp.asarray(np.maximum(rng.standard_normal((64, 1024)), 0), jnp.float32)
  want = reference_kept(np.asarray(x), 64)
  for target in (0.5, 0.9, 0.95):
    got = np.asarray(jax.jit(lambda x, t=target: topk.topk(x, 64, "approx", recall_target=t))(x)) != 0
    assert got.sum(axis=-1).max() <= 64
    recall = (got & want).sum() / want.sum()
    assert recall >= target
    if jax.default_backend() in ("cpu", "gpu"):
      assert recall == 1.0


def test_resolve_method_rule(tiny_t5_config):
  big, small = (1024, 2048), (1, 2048)
  assert topk.resolve_method("auto", big, 128, jnp.float32, "cpu") == "threshold"
  assert topk.resolve_method("auto", small, 128, jnp.float32, "cpu") == "exact"
  assert topk.resolve_method("auto", big, 16, jnp.bfloat16, "gpu") == "exact"
  assert topk.resolve_method("auto", big, 17, jnp.bfloat16, "gpu") == "threshold"
  assert topk.resolve_method("auto", small, 1, jnp.float32, "tpu") == "threshold"
  assert topk.resolve_method("auto", big, 128, jnp.int32, "cpu") == "exact"
  for method in ("exact", "approx", "threshold"):
    assert topk.resolve_method(method, big, 128, jnp.float32, "cpu") == method
  assert topk.DEFAULT_METHOD == "auto" and layers.MlpBlock().top_k_method == "auto"
  from topk_transformers.vit import network as vit_network  # pylint: disable=g-import-not-at-top
  assert vit_network.ViT().top_k_method == "auto"  # the module default, as in the gin configs
  assert tiny_t5_config().top_k_method == "auto"  # T5Config's default: the tiny T5 does not set it
  with pytest.raises(ValueError, match="top_k_method"):
    topk.topk(jnp.ones((2, 8)), 2, "sort")


def test_auto_takes_the_threshold_path_on_large_inputs():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((16, 2048)), jnp.float32)
  assert topk.resolve_method("auto", x.shape, 128, x.dtype) == "threshold"  # on CPU, GPU and TPU alike
  jaxpr = str(jax.make_jaxpr(lambda x: topk.topk(x, 128))(x))
  assert "top_k" not in jaxpr and "population_count" in jaxpr
  np.testing.assert_array_equal(bits(topk.topk(x, 128)), bits(reference_topk(np.asarray(x), 128)))


@pytest.mark.parametrize("acts", [("relu",), ("gelu", "linear")], ids=["v1.0", "v1.1"])
def test_mlp_block_output_and_sown_statistics_are_the_same_for_every_method(acts):
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 16)), jnp.float32)
  mask = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])
  outs = {}
  for method in topk.METHODS:
    block = layers.MlpBlock(intermediate_dim=64, activations=acts, top_k=6, top_k_method=method,
                            intermediate_dropout_rate=0.0)
    params = block.init(jax.random.PRNGKey(0), x)["params"]
    y, state = jax.jit(lambda p, x, m, b=block: b.apply({"params": p}, x, deterministic=True, mask=m,
                                                        mutable=["intermediates"]))(params, x, mask)
    outs[method] = (y, state["intermediates"])
  for method, (y, stats) in outs.items():
    np.testing.assert_array_equal(y, outs["exact"][0], err_msg=method)
    for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(outs["exact"][1])):
      np.testing.assert_array_equal(a, b, err_msg=method)
  assert float(outs["threshold"][1]["nonzero_count"][0]) <= 6 * 13


_MESH_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
    sys.path.insert(0, sys.argv[1])  # tests/
    from conftest import tiny_t5_config
    from topk_transformers import partitioning
    from topk_transformers.t5 import network

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.integers(2, 64, (8, 12)), jnp.int32)
    tgt = jnp.asarray(rng.integers(2, 64, (8, 6)), jnp.int32)
    dec = jnp.pad(tgt[:, :-1], ((0, 0), (1, 0)))

    def run(method, partitioner):
      cfg = tiny_t5_config(mlp_dim=64, top_k=8, top_k_method=method)
      model = network.Transformer(cfg)
      boxed = jax.jit(lambda: model.init(jax.random.PRNGKey(0), enc, dec, tgt, enable_dropout=False))()["params"]
      shardings = partitioner.logical_shardings(boxed)
      params = jax.device_put(nn.meta.unbox(boxed), shardings)
      tx = optax.sgd(0.1)

      def step(params, opt_state, batch):
        def loss_fn(p):
          logits = model.apply({"params": p}, batch["enc"], batch["dec"], batch["tgt"], enable_dropout=False)
          return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["tgt"]))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

      batch = {n: jax.device_put(v, partitioner.data_sharding(2)) for n, v in
               dict(enc=enc, dec=dec, tgt=tgt).items()}
      new, _, loss, grads = jax.jit(step, in_shardings=(shardings, None, None))(params, tx.init(params), batch)
      wi = new["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
      return float(loss), jax.tree_util.tree_map(np.asarray, grads), len(wi.sharding.device_set)

    single = partitioning.Partitioner(devices=jax.devices()[:1])
    mesh = partitioning.Partitioner(num_partitions=2)
    ref_loss, ref_grads, _ = run("exact", single)
    out = {}
    for method in ("threshold",):
      loss, grads, n = run(method, mesh)
      diff = max(float(np.max(np.abs(a - b))) for a, b in
                 zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)))
      out[method] = dict(loss=loss, max_grad_diff=diff, devices=n)
    out["reference_loss"] = ref_loss
    print("RESULT " + json.dumps(out))
""")


def test_threshold_trains_on_an_8_device_host_mesh(tmp_path):
  """A jitted T5 training step with the threshold Top-k on a 4 x 2 ('data', 'model') mesh gives the
  single-device exact step's loss and gradients.

  XLA_FLAGS must be set before jax is imported, hence the subprocess. The MLP's
  hidden axis is model-parallel, so the selection runs over a sharded axis.
  """
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, os.path.join(ROOT, "tests")], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  r = json.loads(lines[-1][len("RESULT "):])
  assert r["threshold"]["devices"] == 8
  assert abs(r["threshold"]["loss"] - r["reference_loss"]) <= 1e-5 * abs(r["reference_loss"]), r
  assert r["threshold"]["max_grad_diff"] < 1e-5, r


# ---------------------------------------------------------------------------
# top_k_method is honoured: the primitive that does the selection, counted in the jaxpr.
# On CPU "approx" finds the same set as "exact", so only the program tells them apart.
# ---------------------------------------------------------------------------

SELECTION_PRIMITIVES = ("top_k", "approx_top_k", "population_count")


def primitive_counts(fn, *args) -> dict:
  """How often each selection primitive occurs in ``fn``'s jaxpr, sub-jaxprs (jit, cond, loops) included."""
  counts = dict.fromkeys(SELECTION_PRIMITIVES, 0)
  for eqn in equations(fn, *args):
    if eqn.primitive.name in counts:
      counts[eqn.primitive.name] += 1
  return counts


def selection_primitives(fn, *args) -> set:
  return {name for name, n in primitive_counts(fn, *args).items() if n}


@pytest.mark.parametrize("by_magnitude", [False, True], ids=["value", "magnitude"])
def test_top_k_method_chooses_the_selection_primitive(by_magnitude):
  small, large = jnp.ones((2, 64)), jnp.ones((16, 2048))
  want = {"exact": {"top_k"}, "approx": {"approx_top_k"}, "threshold": {"population_count"}}
  for method, prims in want.items():
    for x in (small, large):
      assert selection_primitives(lambda x: topk.topk(x, 4, method, by_magnitude=by_magnitude), x) == prims, method
  assert selection_primitives(lambda x: topk.topk(x, 4, "auto"), small) == {"top_k"}  # the CPU rule's small side
  for fn in (topk.select, topk.select_f32):  # the decoding path: every exact method is lax.top_k
    for method in ("exact", "threshold", "auto"):
      assert selection_primitives(lambda x: fn(x, 4, method, by_magnitude=by_magnitude), small) == {"top_k"}
    assert selection_primitives(lambda x: fn(x, 4, "approx", by_magnitude=by_magnitude), small) == {"approx_top_k"}


@pytest.mark.parametrize("acts", [("relu",), ("gelu", "linear")], ids=["v1.0", "v1.1"])
def test_mlp_block_t5_and_vit_pass_top_k_method_down(acts, tiny_t5_config):
  from topk_transformers.t5 import network
  from topk_transformers.vit import network as vit_network

  x = jnp.ones((1, 4, 8))
  tokens = jnp.ones((1, 4), jnp.int32)
  image = jnp.ones((1, 8, 8, 3))
  for method in ("exact", "approx", "threshold"):
    one = primitive_counts(lambda x: topk.topk(x, 4, method), jnp.ones((4, 32)))  # one selection's primitives
    block = layers.MlpBlock(intermediate_dim=32, activations=acts, top_k=4, top_k_method=method,
                            intermediate_dropout_rate=0.0)
    params = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x, deterministic=True))
    assert primitive_counts(lambda p: block.apply(p, x, deterministic=True), params) == one, method
    for sparse in (True, False):  # a decoding step, sparse or dense: approx stays approx
      dec = block.clone(sparse_decode=sparse)
      counts = primitive_counts(lambda p: dec.apply(p, x[:, :1], decode=True, deterministic=True), params)
      assert counts["approx_top_k"] == (method == "approx"), (method, sparse)

    cfg = tiny_t5_config(vocab_size=16, emb_dim=8, head_dim=4, num_encoder_layers=2, num_decoder_layers=1, mlp_dim=32,
                         mlp_activations=acts, top_k=4, top_k_method=method)
    t5 = network.Transformer(cfg)
    t5_params = jax.eval_shape(lambda: t5.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
    counts = primitive_counts(lambda p: t5.apply(p, tokens, tokens, tokens, enable_dropout=False), t5_params)
    assert counts == {n: 3 * c for n, c in one.items()}, (method, counts)  # 2 encoder + 1 decoder MLPs

    if len(acts) == 1:  # ViT's MLP is not gated
      vit = vit_network.ViT(variant="Test/4", num_classes=3, top_k=4, top_k_method=method, mlp_activation="relu")
      vit_params = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), image, train=False))
      counts = primitive_counts(lambda p: vit.apply(p, image, train=False), vit_params)
      assert counts == {n: 2 * c for n, c in one.items()}, (method, counts)  # "Test": 2 blocks


def reference_order(x: np.ndarray, k: int, by_magnitude: bool = False) -> np.ndarray:
  """``[..., k]`` positions in ``lax.top_k``'s order: score descending, ties by position (NaN-free rows)."""
  score = np.abs(x.astype(np.float64)) if by_magnitude else x.astype(np.float64)
  positive_zero = ((score == 0) & ~np.signbit(score)).astype(np.int8)
  flat, pz = score.reshape(-1, x.shape[-1]), positive_zero.reshape(-1, x.shape[-1])
  idx = np.arange(x.shape[-1])
  order = np.stack([np.lexsort((idx, -pz[r], -flat[r]))[:k] for r in range(flat.shape[0])])
  return order.reshape(*x.shape[:-1], k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("by_magnitude", [False, True], ids=["value", "magnitude"])
def test_select_and_select_f32_return_the_reference_indices_in_order_and_signed_values(dtype, by_magnitude):
  """On a 3-D input (the axis must be the last, not 1), NaN-free planted rows; approx: the same values."""
  rows = planted(40, 13, dtype).astype(np.float32)
  rows = np.where(np.isnan(rows), 2.5, rows)
  x = jnp.asarray(np.stack([rows, rows[::-1] * -1.0]), dtype)  # [2, 7, 40]
  want = reference_order(np.asarray(x), 13, by_magnitude)
  for fn in (topk.select, topk.select_f32):
    for method in ("exact", "threshold", "auto", "approx"):
      values, idx = jax.jit(lambda x, f=fn, m=method: f(x, 13, m, by_magnitude=by_magnitude))(x)
      assert values.dtype == x.dtype and idx.shape == (2, 7, 13)
      np.testing.assert_array_equal(bits(values), bits(np.take_along_axis(np.asarray(x), np.asarray(idx), -1)))
      if method == "approx":  # the same scores, ties in any order
        score = np.abs(np.asarray(x, np.float64)) if by_magnitude else np.asarray(x, np.float64)
        np.testing.assert_array_equal(np.sort(np.take_along_axis(score, np.asarray(idx), -1), -1),
                                      np.sort(np.take_along_axis(score, want, -1), -1))
      else:
        np.testing.assert_array_equal(np.asarray(idx), want, err_msg=f"{fn.__name__} {method}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_sparse_matmul_equals_the_dense_product_of_the_scattered_values(dtype):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 3, 32)), dtype)
  kernel = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
  values, idx = topk.select_f32(x, 5, "exact", by_magnitude=True)
  dense = np.asarray(reference_topk(np.asarray(x).reshape(6, 32), 5, by_magnitude=True), np.float64)
  want = (dense @ np.asarray(kernel, np.float64)).reshape(2, 3, 8)
  got = jax.jit(lambda v, i, w: topk.sparse_matmul(v, i, w, dtype=jnp.float32))(values, idx, kernel)
  assert got.dtype == jnp.float32 and got.shape == (2, 3, 8)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  default = jax.jit(topk.sparse_matmul)(values, idx, kernel)
  assert default.dtype == x.dtype  # computed in the values' dtype unless told
  np.testing.assert_allclose(np.asarray(default, np.float64), want, rtol=2e-2, atol=2e-2)
  with pytest.raises(ValueError, match="2-D"):
    topk.sparse_matmul(values, idx, kernel[None])
  with pytest.raises(ValueError, match="same shape"):
    topk.sparse_matmul(values, idx[..., :4], kernel)


def test_bad_settings_are_one_line_config_errors():
  for bad, match in ((0, "positive integer"), (-3, "positive integer"), (2.0, "float"), (True, "bool")):
    with pytest.raises(topk.ConfigError, match=match):
      topk.validate_top_k(bad)
  for target in (0.0, -0.5, 1.5):
    with pytest.raises(topk.ConfigError, match="top_k_recall_target must be in"):
      topk.validate_top_k(4, "approx", target)
  topk.validate_top_k(None)
  topk.validate_top_k(1, "approx", 1.0)
  with pytest.raises(topk.ConfigError, match="top_k_method must be one of"):
    topk.validate_top_k(4, "sorted")


def test_resolve_method_boundaries():
  f32 = jnp.float32
  assert topk.resolve_method("auto", (8, 2048), 64, f32, "cpu") == "threshold"  # 8 rows, 16384 scores
  assert topk.resolve_method("auto", (7, 4096), 64, f32, "cpu") == "exact"  # too few rows
  assert topk.resolve_method("auto", (8, 2047), 64, f32, "cpu") == "exact"  # too few scores
  assert topk.resolve_method("auto", (2, 4, 2048), 64, f32, "cpu") == "threshold"  # rows: every leading axis
  for gpu in ("gpu", "cuda", "rocm"):
    assert topk.resolve_method("auto", (1, 64), 16, f32, gpu) == "exact"
    assert topk.resolve_method("auto", (1, 64), 17, f32, gpu) == "threshold"
  assert topk.resolve_method("auto", (1, 64), 4, jnp.float16, "tpu") == "threshold"
  assert topk.resolve_method("auto", (1024, 2048), 64, jnp.bfloat16, "cpu") == "threshold"
  assert topk.resolve_method("auto", (1024, 2048), 64, jnp.float64, "tpu") == "exact"


def test_defaults_rank_by_value_with_the_default_method():
  x = jnp.asarray([[-5.0, 1.0, 4.0, -0.5, 3.0, -2.0]])  # by magnitude, -5 would be kept
  np.testing.assert_array_equal(topk.topk(x, 2), [[0, 0, 4.0, 0, 3.0, 0]])
  for fn in (topk.select, topk.select_f32):
    values, idx = fn(x, 2)
    np.testing.assert_array_equal(idx, [[2, 4]])
    np.testing.assert_array_equal(values, [[4.0, 3.0]])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_scatter_writes_each_value_at_its_index_on_a_3d_input(dtype):
  rng = np.random.default_rng(6)
  values = jnp.asarray(rng.standard_normal((2, 3, 4)), dtype)  # k = 4, unlike every other axis
  idx = jnp.asarray(np.stack([rng.permutation(7)[:4] for _ in range(6)]).reshape(2, 3, 4), jnp.int32)
  got = jax.jit(lambda v, i: topk.scatter(v, i, 7))(values, idx)
  want = np.zeros((2, 3, 7), np.float32)
  np.put_along_axis(want, np.asarray(idx), np.asarray(values, np.float32), -1)
  assert got.dtype == dtype and got.shape == (2, 3, 7)
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("method", topk.METHODS)
def test_topk_of_a_3d_input_keeps_the_k_largest_of_each_last_axis_row_in_its_dtype(method, dtype):
  """An MLP's activations are ``[batch, length, d_ff]``: each ``d_ff`` row keeps its own k, whatever the other axes
  (2 and 3 here, unlike d = 7), and the result keeps the input's dtype (bfloat16 too)."""
  rng = np.random.default_rng(8)
  x = np.stack([rng.permutation(7) - 3.5 for _ in range(6)]) / 4  # distinct per row, nonzero, exact in bfloat16
  x = jnp.asarray(x.reshape(2, 3, 7), dtype)
  got = jax.jit(lambda x: topk.topk(x, 3, method))(x)
  assert got.dtype == dtype and got.shape == (2, 3, 7)
  want = reference_topk(np.asarray(x).reshape(6, 7), 3).reshape(2, 3, 7)
  np.testing.assert_array_equal(bits(got), bits(want), err_msg=method)


def test_topk_and_select_check_their_settings_and_pass_the_recall_target_on():
  x = jnp.ones((2, 8))
  with pytest.raises(topk.ConfigError, match="top_k must be a positive integer"):
    topk.topk(x, 0)
  with pytest.raises(topk.ConfigError, match="top_k_recall_target must be in"):
    topk.topk(x, 2, "approx", recall_target=1.5)
  with pytest.raises(ValueError, match="top_k_method must be one of"):
    topk.select(x, 2, "sorted")

  assert recall_targets(lambda x: topk.topk(x, 2, "approx", recall_target=0.7), x) == [0.7]
  assert recall_targets(lambda x: topk.select(x, 2, "approx", recall_target=0.6)[0], x) == [0.6]
  assert recall_targets(lambda x: topk.select_f32(x, 2, "approx", recall_target=0.5)[0], x) == [0.5]
