"""Tests for topk_transformers/vit/network.py and the configs/vit gin files."""

import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import gin_utils
from topk_transformers import layers
from topk_transformers.vit import network

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published counts at 224x224, 1000 classes, token pooling, no representation layer
# (google-research/vision_transformer, vit_jax/models_test.py).
PUBLISHED_PARAM_COUNTS = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "B/16": 86_567_656,
    "L/16": 304_326_632,
    "H/14": 632_045_800,
}


def _abstract_params(module, image_size=224):
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), images, train=False))
  return nn.unbox(variables["params"])


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def _tiny(**kw):
  kw.setdefault("variant", "Test/4")
  kw.setdefault("num_classes", 5)
  return network.ViT(**kw)


IMAGES = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3), jnp.float32)  # 2x2 patches of 4x4


@pytest.fixture(scope="module")
def tiny_variables():
  """One real initialisation, shared: JAX compiles each initialiser on first use, which is slow on CPU."""
  return _tiny().init(jax.random.PRNGKey(0), IMAGES, train=False)


@pytest.fixture(scope="module")
def tiny_params(tiny_variables):
  """Initial params with a random head: ViT's zero head would make every logit 0.

  Top-k, the activation, dropout and the dtype change no parameter, so every
  tiny token-pooling model below runs on these.
  """
  params = nn.unbox(tiny_variables["params"])
  head = params["head"]
  rng = np.random.default_rng(1)
  params["head"] = {
      "kernel": jnp.asarray(rng.normal(size=head["kernel"].shape), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=head["bias"].shape), jnp.float32),
  }
  return params


@pytest.mark.parametrize("variant", sorted(PUBLISHED_PARAM_COUNTS))
def test_param_count_matches_published(variant):
  params = _abstract_params(network.ViT(variant=variant, num_classes=1000))
  assert _count(params) == PUBLISHED_PARAM_COUNTS[variant]


def test_gap_pooling_param_count_matches_published():
  # ViT-B_16-gap-norep: no class token, one position embedding fewer.
  params = _abstract_params(network.ViT(variant="B/16", num_classes=1000, pool_type="gap"))
  assert _count(params) == 86_566_120
  assert "cls" not in params


def test_representation_layer_adds_a_dense():
  params = _abstract_params(network.ViT(variant="B/16", num_classes=1000, representation_size=768))
  assert _count(params) == PUBLISHED_PARAM_COUNTS["B/16"] + 768 * 768 + 768


def test_mlp_dim_overrides_only_the_hidden_width():
  # Test/2 on 8x8x1 digits with gap pooling is 18,154 parameters; each of its 2 MLPs grows by
  # (256 - 64) * (2 * 32 + 1) parameters (wi, its bias, wo) when d_ff goes from 64 to 256.
  narrow = _abstract_params(network.ViT(variant="Test/2", num_classes=10, pool_type="gap"), image_size=8)
  wide_vit = network.ViT(variant="Test/2", num_classes=10, pool_type="gap", mlp_dim=256)
  wide = _abstract_params(wide_vit, image_size=8)
  assert _count(wide) - _count(narrow) == 2 * (256 - 64) * (2 * 32 + 1)
  assert wide["Transformer"]["encoderblock_0"]["mlp"]["wi"]["kernel"].shape == (32, 256)
  assert wide_vit.shape == dict(width=32, depth=2, mlp_dim=256, num_heads=2, patch_size=2)
  with pytest.raises(Exception, match="mlp_dim must be a positive integer"):
    network.ViT(variant="Test/2", mlp_dim=0)


def test_topk_changes_no_parameter():
  dense = _abstract_params(network.ViT(variant="B/16", num_classes=1000))
  sparse = _abstract_params(network.ViT(variant="B/16", num_classes=1000, top_k=256, mlp_activation="relu"))
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: x.shape, tree)
  assert shapes(dense) == shapes(sparse)


def test_parameter_names_and_logical_axes(tiny_variables):
  params = tiny_variables["params"]
  assert set(tiny_variables) == {"params"}
  assert set(params) == {"embedding", "cls", "pos_embedding", "Transformer", "head"}
  assert set(params["Transformer"]) == {"encoderblock_0", "encoderblock_1", "encoder_norm"}
  block = params["Transformer"]["encoderblock_1"]
  assert set(block) == {"LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "mlp"}
  assert set(block["mlp"]) == {"wi", "wo"}
  assert block["mlp"]["wi"]["kernel"].names == ("embed", "mlp")
  assert block["mlp"]["wo"]["kernel"].names == ("mlp", "embed")
  attention = block["MultiHeadDotProductAttention_0"]
  assert attention["query"]["kernel"].names == ("embed", "heads", "kv")
  assert attention["out"]["kernel"].names == ("heads", "kv", "embed")
  unboxed = nn.unbox(params)
  assert unboxed["pos_embedding"].shape == (1, 4 + 1, 32)  # 2x2 patches, plus the class token
  assert unboxed["Transformer"]["encoderblock_0"]["mlp"]["wi"]["kernel"].shape == (32, 64)
  # ViT's init: zero head, zero class token, near-zero MLP biases, xavier-uniform kernels.
  assert not np.any(unboxed["head"]["kernel"]) and not np.any(unboxed["cls"])
  mlp = unboxed["Transformer"]["encoderblock_0"]["mlp"]
  assert np.any(mlp["wi"]["bias"]) and np.max(np.abs(mlp["wi"]["bias"])) < 1e-4
  limit = np.sqrt(6 / (32 + 64))
  assert np.max(np.abs(mlp["wi"]["kernel"])) <= limit and np.max(np.abs(mlp["wi"]["kernel"])) > 0.9 * limit


@pytest.mark.parametrize("pool_type, tokens", [("token", 5), ("gap", 4)])
def test_pooling_shapes(pool_type, tokens):
  module = _tiny(pool_type=pool_type, representation_size=16)
  params = _abstract_params(module, image_size=8)
  assert params["pos_embedding"].shape == (1, tokens, 32)
  assert ("cls" in params) == (pool_type == "token")
  assert params["pre_logits"]["kernel"].shape == (32, 16) and params["head"]["kernel"].shape == (16, 5)
  logits, state = jax.eval_shape(
      lambda p: module.apply({"params": p}, IMAGES, train=False, mutable=["intermediates"]), params)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert set(state["intermediates"]["Transformer"]["encoderblock_1"]["mlp"]) == {
      "nonzero_count", "token_count", "neuron_fire_count"}


def _mlp_hidden(module, params, images=IMAGES):
  """Logits, the inputs of every MLP's ``wo`` (hidden activations after Top-k) and the sown intermediates."""
  hidden = []

  def record(next_fun, args, kwargs, context):
    # The MLP's dropout (inactive here) takes the hidden units after the Top-k, the input of wo.
    if isinstance(context.module, nn.Dropout) and isinstance(context.module.parent, layers.MlpBlock):
      hidden.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    logits, state = module.apply({"params": params}, images, train=False, mutable=["intermediates"])
  return logits, hidden, state["intermediates"]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_topk_keeps_at_most_k_per_token(tiny_params, activation):
  k = 5
  _, dense_hidden, _ = _mlp_hidden(_tiny(mlp_activation=activation), tiny_params)
  # Without Top-k far more than k units fire, so the test below is not vacuous.
  assert min(int(jnp.max(jnp.sum(h != 0, axis=-1))) for h in dense_hidden) > k

  _, hidden, stats = _mlp_hidden(_tiny(mlp_activation=activation, top_k=k), tiny_params)
  assert len(hidden) == 2  # one per block
  tokens = 2 * (4 + 1)
  for i, h in enumerate(hidden):
    per_token = np.asarray(jnp.sum(h != 0, axis=-1))
    assert per_token.shape == (2, 5) and per_token.max() <= k
    # At init about half the ReLU inputs are positive and GELU is nonzero almost
    # everywhere, so every token keeps exactly k units.
    assert np.all(per_token == k)
    sown = stats["Transformer"][f"encoderblock_{i}"]["mlp"]
    assert float(sown["nonzero_count"][0]) == per_token.sum() == k * tokens
    assert float(sown["token_count"][0]) == tokens
    np.testing.assert_array_equal(np.asarray(sown["neuron_fire_count"][0]), np.sum(np.asarray(h) != 0, axis=(0, 1)))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_k_at_least_mlp_dim_is_bit_identical_to_vanilla(tiny_params, activation):
  expected = _tiny(mlp_activation=activation).apply({"params": tiny_params}, IMAGES, train=False)
  for k in (64, 1000):  # mlp_dim of Test is 64
    got = _tiny(mlp_activation=activation, top_k=k).apply({"params": tiny_params}, IMAGES, train=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  # A binding k does change the output.
  sparse = _tiny(mlp_activation=activation, top_k=4).apply({"params": tiny_params}, IMAGES, train=False)
  assert not np.allclose(np.asarray(sparse), np.asarray(expected))


def test_bfloat16_forward(tiny_params):
  # Top-k may legitimately pick other units in bfloat16 than in float32, so check the invariants.
  logits, hidden, _ = _mlp_hidden(_tiny(dtype=jnp.bfloat16, top_k=4, mlp_activation="relu"), tiny_params)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits))) and np.any(np.asarray(logits))
  assert all(h.dtype == jnp.bfloat16 and int(jnp.max(jnp.sum(h != 0, axis=-1))) == 4 for h in hidden)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(top_k=0), "0"),
    (dict(top_k=-3), "-3"),
    (dict(top_k=2.5), "2.5"),
    (dict(top_k=True), "True"),
    (dict(top_k_method="fast"), "'fast'"),
    (dict(variant="Q/16"), "'Q/16'"),
    (dict(variant="B16"), "'B16'"),
    (dict(pool_type="cls"), "'cls'"),
    (dict(mlp_activation="swish"), "'swish'"),
    (dict(num_classes=0), "0"),
    (dict(representation_size=-1), "-1"),
])
def test_bad_configuration_is_a_one_line_error_at_construction(kwargs, fragment):
  with pytest.raises(ValueError) as info:
    _tiny(**kwargs)
  message = str(info.value)
  assert "\n" not in message and fragment in message


@pytest.mark.parametrize("image_size, shape, fragment", [
    (8, (1, 16, 16, 3), "configured for 8x8"),
    (None, (1, 10, 10, 3), "not a multiple of the patch size 4"),
])
def test_bad_image_shape_is_a_clear_error(image_size, shape, fragment):
  with pytest.raises(ValueError, match=fragment):
    jax.eval_shape(lambda: _tiny(image_size=image_size).init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


# --- gin -------------------------------------------------------------------------

MODEL_FILES = {"ti16": "Ti/16", "s16": "S/16", "b16": "B/16", "l16": "L/16", "h14": "H/14"}


def _build_from_gin(files, bindings=()):
  """Builds MODEL the way the scripts do (gin_utils), from files under vit/."""
  try:
    gin_utils.configure([os.path.join(REPO_ROOT, "configs", "vit", f) for f in files], list(bindings))
    return gin_utils.get_macro("MODEL")
  finally:
    gin.clear_config()


def test_every_vit_gin_file_is_covered():
  names = {f for f in os.listdir(os.path.join(REPO_ROOT, "configs", "vit")) if f.endswith(".gin")}
  assert names == {f"{n}.gin" for n in MODEL_FILES} | {"topk.gin", "relu.gin"}


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
@pytest.mark.parametrize("layer", [None, "topk.gin", "relu.gin"])
def test_gin_model_files_build(name, layer):
  files = [f"{name}.gin"] + ([layer] if layer else [])
  model = _build_from_gin(files)
  vit = model.module
  assert vit.variant == MODEL_FILES[name]
  assert (vit.num_classes, vit.image_size, vit.pool_type, vit.top_k_method) == (1000, 224, "token", "auto")
  assert vit.top_k == (256 if layer == "topk.gin" else None)
  assert vit.mlp_activation == ("gelu" if layer is None else "relu")
  if name == "b16" and layer is None:  # one full shape check; the counts of every variant are pinned above
    assert _count(_abstract_params(vit)) == PUBLISHED_PARAM_COUNTS["B/16"]


def test_gin_macros_override():
  model = _build_from_gin(["s16.gin", "topk.gin"], ["NUM_CLASSES = 10", "POOL = 'gap'", "TOP_K = 32",
                                                   "IMAGE_SIZE = 32", "LABEL_SMOOTHING = 0.1"])
  assert (model.module.num_classes, model.module.pool_type, model.module.top_k) == (10, "gap", 32)
  assert model.label_smoothing == 0.1
  params = _abstract_params(model.module, image_size=32)
  assert params["head"]["kernel"].shape == (384, 10)


@pytest.mark.parametrize("binding, fragment", [
    ("TOP_K = 0", "top_k must be a positive integer or None, got 0"),
    ("POOL = 'cls'", "pool_type must be one of ('token', 'gap'), got 'cls'"),
    ("MLP_ACTIVATION = 'tanh'", "mlp_activation must be one of ('gelu', 'relu'), got 'tanh'"),
])
def test_gin_bad_binding_is_a_one_line_error(binding, fragment):
  with pytest.raises(ValueError) as info:
    _build_from_gin(["ti16.gin", "topk.gin"], [binding])
  message = str(info.value)
  assert "\n" not in message and fragment in message
