"""T5 network: T5 semantics (attention, norm, relative positions), KV-cache decoding, packing, Top-k."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import layers
from topk_transformers.t5 import network

from conftest import tiny_t5_config

VOCAB = 50


def tiny_config(version="1.0", **overrides):
  """The shared tiny T5 at this file's shapes (two layers each side, width 32; the tests check the shapes)."""
  kw = dict(vocab_size=VOCAB, emb_dim=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=2, head_dim=8,
            mlp_dim=32)
  if version == "1.0":
    kw.update(mlp_activations=("relu",), logits_via_embedding=True)
  else:
    kw.update(mlp_activations=("gelu", "linear"), logits_via_embedding=False)
  kw.update(overrides)
  return tiny_t5_config(**kw)


def batch(seed=0, b=2, enc_len=8, dec_len=8, pad_from=5):
  rng = np.random.RandomState(seed)
  enc = rng.randint(1, VOCAB, (b, enc_len)).astype(np.int32)
  enc[1, pad_from:] = 0  # padding in the second example
  targets = rng.randint(1, VOCAB, (b, dec_len)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
  return jnp.asarray(enc), jnp.asarray(dec_in), jnp.asarray(targets)


# Tests run Flax eagerly: JAX caches each compiled op by shape, so configs that
# differ only in top_k or dtype share the work, where jit would recompile all.

def apply(cfg, params, *args, cache=None, method=None, **kw):
  """``Transformer(cfg).apply`` with ``enable_dropout=False`` unless given."""
  variables = {"params": params} if cache is None else {"params": params, "cache": cache}
  kw.setdefault("enable_dropout", False)
  fn = getattr(network.Transformer, method) if method else None
  return network.Transformer(cfg).apply(variables, *args, method=fn, **kw)


@functools.lru_cache(maxsize=None)
def _random_params(cfg, shapes, seed):
  """Random parameters of the right shapes, drawn in NumPy (tracing T5X's initialisers is slow)."""
  model = network.Transformer(cfg)
  args = [jnp.ones(s, jnp.int32) for s in shapes]
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, enable_dropout=False)["params"]))
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":  # layer norms: around 1
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "embedding":
      value = rng.standard_normal(leaf.shape)
    elif name == "rel_embedding":
      value = rng.uniform(-0.5, 0.5, leaf.shape)
    else:  # kernels [fan_in, fan_out]
      value = rng.standard_normal(leaf.shape) / math.sqrt(leaf.shape[0])
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def init(cfg, enc, dec_in, targets, seed=0):
  """``(module, params)``; Top-k does not change the parameters, so the dense config's are reused."""
  dense = dataclasses.replace(cfg, top_k=None)
  return network.Transformer(cfg), _random_params(dense, (enc.shape, dec_in.shape, targets.shape), seed)


def jit_apply(module, method=None, **kw):
  """``module.apply(variables, *args, **kw)`` as a function (eager, see above)."""
  return lambda variables, *args: module.apply(variables, *args, method=method, **kw)


# ----------------------------------------------------------------------------- relative positions

def t5_bucket_reference(relative_position, bidirectional, num_buckets=32, max_distance=128):
  """Mesh TensorFlow's _relative_position_bucket, element by element in NumPy/math."""
  out = np.zeros(np.shape(relative_position), np.int64)
  for idx, rp in np.ndenumerate(np.asarray(relative_position)):
    n = -int(rp)
    nb = num_buckets
    ret = 0
    if bidirectional:
      nb //= 2
      if n < 0:
        ret += nb
      n = abs(n)
    else:
      n = max(n, 0)
    max_exact = nb // 2
    if n < max_exact:
      ret += n
    else:
      large = max_exact + int(np.float32(np.log(np.float32(n) / max_exact + np.finfo(np.float32).eps))
                              / np.float32(math.log(max_distance / max_exact)) * (nb - max_exact))
      ret += min(large, nb - 1)
    out[idx] = ret
  return out


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_t5_formula(bidirectional):
  rel = np.arange(-400, 401)
  got = layers.relative_position_bucket(rel, bidirectional, 32, 128)
  np.testing.assert_array_equal(got, t5_bucket_reference(rel, bidirectional))
  # Known T5 facts: exact buckets near 0, saturation far away, direction split.
  if bidirectional:
    assert got[rel == -1][0] == 1 and got[rel == 1][0] == 17 and got[rel == -400][0] == 15 and got[rel == 400][0] == 31
  else:
    assert (got[rel > 0] == 0).all() and got[rel == -1][0] == 1 and got[rel == -400][0] == 31
  assert got.min() >= 0 and got.max() <= 31


def test_relative_position_biases_traced_positions_and_decode_rows_match_static():
  mod = layers.RelativePositionBiases(num_heads=3)
  length = 150  # beyond max_distance, so the clipped lookup table is exercised
  params = mod.init(jax.random.PRNGKey(0), length, length, False)
  static = mod.apply(params, length, length, False)
  assert static.shape == (1, 3, length, length)
  pos = jnp.arange(length)[None]
  traced = mod.apply(params, length, length, False, query_positions=pos, key_positions=pos)
  np.testing.assert_array_equal(traced, static)
  # Decoding: the first call creates the index, each later call is the next row.
  _, v = mod.apply(params, length, length, False, decode=True, mutable=["cache"])
  step = lambda variables: mod.apply(variables, 1, length, False, decode=True, mutable=["cache"])
  cache = v["cache"]
  for i in range(3):
    row, v = step({**params, "cache": cache})
    cache = v["cache"]
    np.testing.assert_array_equal(row, static[:, :, i:i + 1, :])


# ----------------------------------------------------------------------------- norm and attention

def test_layer_norm_is_rms_scale_only_in_float32():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16)) + 5.0  # a large mean must not be removed
  mod = layers.LayerNorm()
  params = mod.init(jax.random.PRNGKey(1), x)
  assert list(params["params"].keys()) == ["scale"]  # no bias
  scale = jax.random.uniform(jax.random.PRNGKey(2), (16,)) + 0.5
  params = {"params": {"scale": nn.LogicallyPartitioned(scale, ("embed",))}}
  y = jit_apply(mod)(params, x)
  xn = np.asarray(x, np.float64)
  expect = xn / np.sqrt(np.mean(xn ** 2, axis=-1, keepdims=True) + 1e-6) * np.asarray(scale)
  np.testing.assert_allclose(y, expect, rtol=1e-5)
  # bfloat16 activations: the statistics are still float32 (no overflow of x**2).
  big = jnp.full((1, 16), 300.0, jnp.bfloat16)
  out = jit_apply(layers.LayerNorm(dtype=jnp.bfloat16))(params, big)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(scale)[None], rtol=1e-2)


def test_attention_logits_are_plain_dot_products():
  heads, head_dim, d = 2, 8, 32  # the shapes of the tiny network below, so compiled ops are shared
  mod = layers.MultiHeadDotProductAttention(num_heads=heads, head_dim=head_dim)
  xq = jax.random.normal(jax.random.PRNGKey(0), (2, 8, d))
  xkv = jax.random.normal(jax.random.PRNGKey(1), (2, 8, d))
  bias = jax.random.normal(jax.random.PRNGKey(2), (1, heads, 8, 8))  # not symmetric: a q/k mix-up shows
  params = nn.unbox(mod.init(jax.random.PRNGKey(3), xq, xkv, None, bias, deterministic=True)["params"])
  assert {k: params[k]["kernel"].shape for k in params} == {
      "query": (d, heads * head_dim), "key": (d, heads * head_dim), "value": (d, heads * head_dim),
      "out": (heads * head_dim, d)}
  out = jit_apply(mod, deterministic=True)({"params": params}, xq, xkv, None, bias)

  def split(x, w):
    return (np.asarray(x, np.float64) @ np.asarray(w, np.float64)).reshape(x.shape[0], x.shape[1], heads, head_dim)

  q, k, v = split(xq, params["query"]["kernel"]), split(xkv, params["key"]["kernel"]), split(xkv, params["value"]["kernel"])
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) + np.asarray(bias)  # no 1/sqrt(head_dim)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ctx = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 8, heads * head_dim)
  np.testing.assert_allclose(out, ctx @ np.asarray(params["out"]["kernel"], np.float64), rtol=1e-4, atol=1e-5)
  # The 1/sqrt(head_dim) lives in the query initialisation instead.
  ratio = np.std(params["query"]["kernel"]) / np.std(params["key"]["kernel"])
  assert abs(ratio * math.sqrt(head_dim) - 1.0) < 0.15


def test_attention_mask_blocks_keys():
  mod = layers.MultiHeadDotProductAttention(num_heads=2, head_dim=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 32))
  mask = layers.make_attention_mask(jnp.ones((2, 3)), jnp.array([[1, 1, 0], [1, 1, 0]]))
  params = mod.init(jax.random.PRNGKey(1), x, x, mask, deterministic=True)
  run = jit_apply(mod, deterministic=True)
  out = run(params, x, x, mask)
  x2 = x.at[:, 2].set(100.0)  # a masked key/value must not matter
  np.testing.assert_array_equal(out[:, :2], run(params, x2, x2, mask)[:, :2])


# ----------------------------------------------------------------------------- network

def test_parameter_names_and_axes_follow_t5x():
  enc, dec_in, targets = batch()
  for version in ("1.0", "1.1"):
    cfg = tiny_config(version)
    boxed = jax.eval_shape(lambda: network.Transformer(cfg).init(
        jax.random.PRNGKey(0), enc, dec_in, targets, enable_dropout=False)["params"])
    flat = {"/".join(str(p.key) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
    mlp = ["mlp/wi/kernel", "mlp/wo/kernel"] if version == "1.0" else ["mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"]
    att = ["query/kernel", "key/kernel", "value/kernel", "out/kernel"]
    expect = {"token_embedder/embedding", "encoder/relpos_bias/rel_embedding", "encoder/encoder_norm/scale",
              "decoder/relpos_bias/rel_embedding", "decoder/decoder_norm/scale"}
    for i in range(2):
      e, d = f"encoder/layers_{i}/", f"decoder/layers_{i}/"
      expect |= {e + "pre_attention_layer_norm/scale", e + "pre_mlp_layer_norm/scale"}
      expect |= {e + "attention/" + a for a in att} | {e + m for m in mlp}
      expect |= {d + n + "/scale" for n in ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm",
                                            "pre_mlp_layer_norm")}
      expect |= {d + s + "/" + a for s in ("self_attention", "encoder_decoder_attention") for a in att}
      expect |= {d + m for m in mlp}
    if version == "1.1":
      expect.add("decoder/logits_dense/kernel")
    assert set(flat) == expect
    assert flat["token_embedder/embedding"].names == ("vocab", "embed")
    assert flat["encoder/layers_0/attention/query/kernel"].names == ("embed", "joined_kv")
    assert flat["encoder/layers_0/attention/out/kernel"].names == ("joined_kv", "embed")
    assert flat["decoder/relpos_bias/rel_embedding"].names == ("heads", "relpos_buckets")
    assert flat["decoder/layers_1/mlp/wo/kernel"].names == ("mlp", "embed")
    if version == "1.1":
      assert flat["decoder/logits_dense/kernel"].names == ("embed", "vocab")


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_logits_tied_scaled_or_dense(version):
  cfg = tiny_config(version)
  enc, dec_in, targets = batch()
  _, params = init(cfg, enc, dec_in, targets)
  logits, state = apply(cfg, params, enc, dec_in, targets, capture_intermediates=True, mutable=("intermediates",))
  y = np.asarray(state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0], np.float64)
  if cfg.logits_via_embedding:
    expect = y @ np.asarray(params["token_embedder"]["embedding"], np.float64).T / math.sqrt(cfg.emb_dim)
  else:
    expect = y @ np.asarray(params["decoder"]["logits_dense"]["kernel"], np.float64)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, expect, rtol=1e-4, atol=1e-5)


def start_decoding(cfg, params, enc, length):
  """The cache for ``length`` positions and the encoder output, as the decoding loop makes them."""
  ones = jnp.ones((enc.shape[0], length), jnp.int32)
  _, v = apply(cfg, params, enc, ones, ones, decode=True, mutable=("cache",))
  encoded = apply(cfg, params, enc, method="encode")
  return v["cache"], encoded


def decode_incrementally(cfg, params, enc, dec_in):
  length = dec_in.shape[1]
  cache, encoded = start_decoding(cfg, params, enc, length)
  # One compiled step, as a decoding loop would use it.
  step = jax.jit(lambda cache, tok: apply(cfg, params, encoded, enc, tok, tok, cache=cache, method="decode",
                                          decode=True, max_decode_length=length, mutable=("cache",)))
  outs = []
  for i in range(length):
    logits, v = step(cache, dec_in[:, i:i + 1])
    cache = v["cache"]
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_kv_cache_decoding_equals_teacher_forcing(version, top_k):
  cfg = tiny_config(version, top_k=top_k)
  enc, dec_in, targets = batch(seed=1)
  _, params = init(cfg, enc, dec_in, targets)
  full = apply(cfg, params, enc, dec_in, targets)
  inc, cache = decode_incrementally(cfg, params, enc, dec_in)
  assert int(cache["decoder"]["layers_0"]["self_attention"]["cache_index"]) == dec_in.shape[1]
  # [batch, heads, head_dim, length]
  assert cache["decoder"]["layers_1"]["self_attention"]["cached_key"].shape == (2, 2, 8, dec_in.shape[1])
  np.testing.assert_allclose(inc, full, rtol=1e-5, atol=1e-5)


def test_decode_step_infers_cache_length_without_max_decode_length():
  cfg = tiny_config("1.0")
  enc, dec_in, targets = batch()
  _, params = init(cfg, enc, dec_in, targets)
  cache, encoded = start_decoding(cfg, params, enc, dec_in.shape[1])
  tok = dec_in[:, :1]
  logits, _ = apply(cfg, params, encoded, enc, tok, tok, cache=cache, method="decode", decode=True,
                    mutable=("cache",))
  full = apply(cfg, params, enc, dec_in, targets)
  np.testing.assert_allclose(logits[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)


def packed_batch():
  """Row 0 packs two examples (segments 1 and 2) plus padding; row 1 holds example 2 alone."""
  enc = np.array([[5, 6, 7, 8, 11, 12, 13, 0], [11, 12, 13, 0, 0, 0, 0, 0]], np.int32)
  enc_seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
  enc_pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0, 0, 0]], np.int32)
  tgt = np.array([[21, 22, 23, 31, 32, 33, 34, 0], [31, 32, 33, 34, 0, 0, 0, 0]], np.int32)
  dec_in = np.array([[0, 21, 22, 0, 31, 32, 33, 0], [0, 31, 32, 33, 0, 0, 0, 0]], np.int32)
  dec_seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
  dec_pos = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 0, 0, 0]], np.int32)
  return enc, enc_seg, enc_pos, dec_in, tgt, dec_seg, dec_pos


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_packed_examples_do_not_attend_across_segments(version):
  cfg = tiny_config(version)
  enc, enc_seg, enc_pos, dec_in, tgt, dec_seg, dec_pos = packed_batch()
  _, params = init(cfg, *batch())

  def run(enc, dec_in, tgt):
    encoded = apply(cfg, params, enc, enc_seg, enc_pos, method="encode")
    logits = apply(cfg, params, enc, dec_in, tgt, enc_seg, dec_seg, enc_pos, dec_pos)
    return np.asarray(encoded), np.asarray(logits)

  base_enc, base_logits = run(enc, dec_in, tgt)
  enc2, dec_in2, tgt2 = enc.copy(), dec_in.copy(), tgt.copy()
  enc2[0, enc_seg[0] == 2] = [40, 41, 42]
  tgt2[0, dec_seg[0] == 2] = [44, 45, 46, 47]
  dec_in2[0, dec_seg[0] == 2] = [0, 44, 45, 46]
  new_enc, new_logits = run(enc2, dec_in2, tgt2)
  seg1_enc, seg1_dec = enc_seg[0] == 1, dec_seg[0] == 1
  np.testing.assert_array_equal(new_enc[0, seg1_enc], base_enc[0, seg1_enc])
  np.testing.assert_array_equal(new_logits[0, seg1_dec], base_logits[0, seg1_dec])
  assert not np.allclose(new_logits[0, dec_seg[0] == 2], base_logits[0, dec_seg[0] == 2])  # the change arrived

  # Example 2 packed after example 1 gives what it gives alone at the start of a row.
  np.testing.assert_allclose(base_enc[0, enc_seg[0] == 2], base_enc[1, :3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(base_logits[0, dec_seg[0] == 2], base_logits[1, :4], rtol=1e-5, atol=1e-5)


def test_cross_attention_kv_projects_with_the_decoders_own_kernels():
  """The keys and values come from each layer's encoder_decoder_attention/{key,value} kernels, read through Flax
  (CrossAttentionKV shares the decoder's scope and adds no parameter of its own)."""
  cfg = tiny_config("1.1")
  enc, dec_in, targets = batch()
  module, params = init(cfg, enc, dec_in, targets)
  created = module.init(jax.random.PRNGKey(0), enc, dec_in, targets, enable_dropout=False)["params"]
  assert sorted(created) == ["decoder", "encoder", "token_embedder"]
  encoded = jnp.asarray(np.random.RandomState(1).randn(2, 8, 32), jnp.float32)
  kv = module.apply({"params": params}, encoded, method=module.cross_attention_kv)
  for i in range(cfg.num_decoder_layers):
    attention = params["decoder"][f"layers_{i}"]["encoder_decoder_attention"]
    for name in ("key", "value"):
      want = (np.asarray(encoded) @ np.asarray(attention[name]["kernel"])).reshape(2, 8, 2, 8).transpose(0, 2, 3, 1)
      np.testing.assert_allclose(kv[f"layers_{i}"][name], want, rtol=1e-5, atol=1e-5)
  changed = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 2.0 if "value" in str(path) and "layers_1" in str(path) else x, params)
  again = module.apply({"params": changed}, encoded, method=module.cross_attention_kv)
  np.testing.assert_allclose(again["layers_1"]["value"], 2.0 * np.asarray(kv["layers_1"]["value"]), rtol=1e-6)
  np.testing.assert_array_equal(again["layers_1"]["key"], kv["layers_1"]["key"])


def test_top_k_at_least_mlp_dim_is_bitwise_vanilla():
  enc, dec_in, targets = batch()
  for version in ("1.0", "1.1"):
    cfg = tiny_config(version)
    _, params = init(cfg, enc, dec_in, targets)
    dense = apply(cfg, params, enc, dec_in, targets)
    for k in (32, 100):  # mlp_dim is 32: Top-k is a no-op
      same = apply(tiny_config(version, top_k=k), params, enc, dec_in, targets)
      np.testing.assert_array_equal(same, dense)
    sparse = apply(tiny_config(version, top_k=5), params, enc, dec_in, targets)
    assert not np.allclose(sparse, dense)


def test_top_k_reaches_every_mlp_and_stats_skip_padding():
  cfg = tiny_config("1.1", top_k=5)
  enc, dec_in, targets = batch()
  targets = targets.at[0, 4:].set(0)  # target padding in the first example
  _, params = init(cfg, enc, dec_in, targets)
  _, state = apply(cfg, params, enc, dec_in, targets, mutable=("intermediates",))
  inter = state["intermediates"]
  real_enc, real_dec = int((enc > 0).sum()), int((targets > 0).sum())
  for stack, real in (("encoder", real_enc), ("decoder", real_dec)):
    for i in range(2):
      mlp = inter[stack][f"layers_{i}"]["mlp"]
      assert float(mlp["token_count"][0]) == real
      assert float(mlp["nonzero_count"][0]) == 5 * real  # exactly k nonzeros per counted token


def test_dropout_only_when_enabled():
  cfg = tiny_config("1.0", dropout_rate=0.3, num_encoder_layers=1, num_decoder_layers=1)
  enc, dec_in, targets = batch()
  _, params = init(cfg, enc, dec_in, targets)
  model = network.Transformer(cfg)
  run = lambda p, rng: model.apply({"params": p}, enc, dec_in, targets, enable_dropout=True, rngs={"dropout": rng})
  a = apply(cfg, params, enc, dec_in, targets)
  np.testing.assert_array_equal(a, apply(cfg, params, enc, dec_in, targets))
  b, c = run(params, jax.random.PRNGKey(1)), run(params, jax.random.PRNGKey(2))
  assert not np.allclose(a, b) and not np.allclose(b, c)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_top_k_is_a_one_line_error_naming_the_value(bad):
  with pytest.raises(ValueError) as info:
    tiny_config("1.0", top_k=bad)
  msg = str(info.value)
  assert "\n" not in msg and "top_k" in msg and repr(bad) in msg


def test_config_rejects_unknown_activation_and_canonicalises():
  with pytest.raises(ValueError, match="'swishy'"):
    tiny_config("1.0", mlp_activations=("swishy",))
  cfg = tiny_config("1.1", mlp_activations=["gelu", "linear"], dtype="bfloat16")
  assert cfg.mlp_activations == ("gelu", "linear") and cfg.dtype == jnp.bfloat16
  hash(cfg)  # usable as a Flax module attribute


def test_bfloat16_activations_trace_with_float32_params_and_logits():
  # Abstract evaluation only: checks the dtypes through the whole network without compiling it.
  enc, dec_in, targets = batch()
  cfg = tiny_config("1.1", dtype="bfloat16", float32_attention_logits=True)
  model = network.Transformer(cfg)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), enc, dec_in, targets, enable_dropout=False))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(nn.unbox(variables)))
  logits, state = jax.eval_shape(lambda v: model.apply(v, enc, dec_in, targets, enable_dropout=False,
                                                       capture_intermediates=True), variables)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 8, VOCAB)
  inter = state["intermediates"]
  assert inter["encoder"]["layers_0"]["mlp"]["__call__"][0].dtype == jnp.bfloat16
  assert inter["decoder"]["layers_1"]["self_attention"]["__call__"][0].dtype == jnp.bfloat16
