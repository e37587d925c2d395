"""T5 gin configs: published shapes and parameter counts, one-line errors for bad model values, model_info.

Gin flags, search paths and configuration mistakes in general are in test_gin_utils.py.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers import gin_utils
from topk_transformers import layers
from topk_transformers.commands import model_info as model_info_command
from topk_transformers.t5 import network
from topk_transformers.t5 import sizes

# Published T5 shapes (Raffel et al. 2020; T5 v1.1 release notes) and their parameter counts with the
# 32128-row embedding: v1.0 ties the output layer to the embedding, v1.1 has a separate logits_dense.
# (emb_dim, num_heads, encoder layers, decoder layers, head_dim, mlp_dim) -> parameters.
PUBLISHED = {
    "t5_1_0/small": ((512, 8, 6, 6, 64, 2048), 60_506_624),
    "t5_1_0/base": ((768, 12, 12, 12, 64, 3072), 222_903_552),
    "t5_1_0/large": ((1024, 16, 24, 24, 64, 4096), 737_668_096),
    "t5_1_0/3B": ((1024, 32, 24, 24, 128, 16384), 2_851_598_336),
    "t5_1_0/11B": ((1024, 128, 24, 24, 128, 65536), 11_307_321_344),
    "t5_1_1/small": ((512, 6, 8, 8, 64, 1024), 76_961_152),
    "t5_1_1/base": ((768, 12, 12, 12, 64, 2048), 247_577_856),
    "t5_1_1/large": ((1024, 16, 24, 24, 64, 2816), 783_150_080),
    "t5_1_1/xl": ((2048, 32, 24, 24, 64, 5120), 2_849_757_184),
    "t5_1_1/xxl": ((4096, 64, 24, 24, 64, 10240), 11_135_332_352),
}
TINY = {"t5_1_0/tiny": (64, 2, 2, 2, 32, 256), "t5_1_1/tiny": (64, 2, 2, 2, 32, 256)}
ALL_FILES = sorted(PUBLISHED) + sorted(TINY)


def gin_path(name):
  return f"t5/{name}.gin"


def build(files, bindings=()):
  gin_utils.configure([gin_path(f) if not f.endswith(".gin") else f for f in files], list(bindings))
  return gin_utils.get_macro("MODEL")


def count_formula(cfg: network.T5Config) -> int:
  """T5's parameter count from its shapes (T5X layout, one relative-position table per stack)."""
  d, joined, ff, wi = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, len(cfg.mlp_activations)
  attention = 4 * d * joined
  mlp = wi * d * ff + ff * d
  relpos = cfg.num_heads * 32
  encoder = cfg.num_encoder_layers * (attention + mlp + 2 * d) + d + relpos
  decoder = cfg.num_decoder_layers * (2 * attention + mlp + 3 * d) + d + relpos
  logits = 0 if cfg.logits_via_embedding else d * cfg.vocab_size
  return cfg.vocab_size * d + encoder + decoder + logits


def eval_shape_count(module) -> int:
  tokens = jnp.ones((1, 1), jnp.int32)
  params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(params["params"])))


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_config_parses_builds_and_has_the_published_shape(name):
  model = build([name])
  cfg = model.module.config
  assert isinstance(model.module, network.Transformer)
  shape = (cfg.emb_dim, cfg.num_heads, cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.head_dim, cfg.mlp_dim)
  v11 = name.startswith("t5_1_1")
  assert cfg.vocab_size == 32128
  assert cfg.mlp_activations == (("gelu", "linear") if v11 else ("relu",))
  assert cfg.logits_via_embedding is (not v11)
  assert cfg.top_k is None and cfg.top_k_method == "auto"
  assert model.z_loss == 1e-4
  for vocab in (model.input_vocabulary, model.output_vocabulary):  # lazily loaded: nothing read from GCS here
    assert vocab.sentencepiece_model_file == "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
    assert vocab.extra_ids == 0  # the "100extra" model already holds the sentinels
  if name in TINY:
    assert shape == TINY[name] and cfg.dtype == jnp.float32
  else:
    assert shape == PUBLISHED[name][0]
    assert count_formula(cfg) == PUBLISHED[name][1]


@pytest.mark.parametrize("name", ["t5_1_0/tiny", "t5_1_1/tiny", "t5_1_0/small", "t5_1_1/small", "t5_1_0/base"])
def test_network_parameter_count_by_eval_shape(name):
  module = build([name]).module
  got = eval_shape_count(module)
  assert got == count_formula(module.config)  # the formula used for every size matches the network
  if name in PUBLISHED:
    assert got == PUBLISHED[name][1]


@pytest.mark.slow
def test_every_published_size_by_eval_shape():
  for name, (_, published) in PUBLISHED.items():
    assert eval_shape_count(build([name]).module) == published, name


def test_topk_layer_sets_k_and_method():
  cfg = build(["t5_1_0/base", "topk"]).module.config
  assert cfg.top_k == 128 and cfg.top_k_method == "auto"
  cfg = build(["t5_1_1/xl", "topk"], ["TOP_K_METHOD = 'approx'", "TOP_K = 64"]).module.config
  assert (cfg.top_k, cfg.top_k_method, cfg.mlp_dim) == (64, "approx", 5120)
  # Macros let a run shrink the tiny model's vocabulary.
  assert build(["t5_1_0/tiny"], ["NUM_EMBEDDINGS = 512"]).module.config.vocab_size == 512


@pytest.mark.parametrize("bad, shown", [("0", "0"), ("-1", "-1"), ("2.5", "2.5")])
def test_bad_top_k_is_a_one_line_error(bad, shown, model_config_error):
  msg = model_config_error(["t5/t5_1_0/tiny.gin"], [f"TOP_K = {bad}"], "top_k", shown)
  assert "positive integer" in msg


@pytest.mark.parametrize("bindings, shown", [
    (["network.T5Config.relpos_max_distance = 16"], "above relpos_num_buckets // 2 (16), got 16"),
    (["network.T5Config.relpos_num_buckets = 8", "network.T5Config.relpos_max_distance = 3"], "(4), got 3"),
    (["network.T5Config.relpos_num_buckets = 2"], "relpos_num_buckets must be an integer >= 4, got 2"),
])
def test_relative_position_settings_whose_buckets_break_are_one_line_errors(bindings, shown, model_config_error):
  # max_distance <= buckets // 2 divides by log(max_distance / max_exact) <= 0 in the decoder's buckets (NaN logits).
  model_config_error(["t5/t5_1_0/tiny.gin"], bindings, shown)


def test_the_smallest_valid_relative_position_settings_give_buckets_in_range(tiny_t5_config):
  cfg = tiny_t5_config(relpos_num_buckets=8, relpos_max_distance=5)  # the config accepts them
  for bidirectional in (True, False):
    buckets = layers.relative_position_bucket(np.arange(-40, 41), bidirectional, cfg.relpos_num_buckets,
                                              cfg.relpos_max_distance)
    assert buckets.min() >= 0 and buckets.max() < cfg.relpos_num_buckets


def test_model_info_reports_counts_shapes_and_flops(tmp_path, capsys):
  out = tmp_path / "info.json"
  assert model_info_command.main(["--gin_file=t5/t5_1_1/tiny.gin", "--gin_file=t5/topk.gin",
                                  "--gin.TOP_K=16", f"--json={out}"]) == 0
  printed = capsys.readouterr().out
  saved = json.loads(out.read_text())
  cfg = build(["t5_1_1/tiny"]).module.config
  assert saved["param_count"] == count_formula(cfg)
  assert sum(p["count"] for p in saved["params"]) == saved["param_count"]
  rows = {p["name"]: p for p in saved["params"]}
  assert rows["encoder/layers_1/mlp/wi_0/kernel"]["shape"] == [64, 256]
  assert rows["encoder/layers_1/mlp/wi_0/kernel"]["axes"] == ["embed", "mlp"]
  assert rows["decoder/logits_dense/kernel"]["axes"] == ["embed", "vocab"]
  d, ff, k = 64, 256, 16
  flops = saved["mlp_flops_per_token"]
  assert flops["k"] == k and flops["k_source"] == "config"
  assert flops["per_layer"] == {"dense": 2 * d * ff * 2 + 2 * ff * d, "topk": 2 * d * ff * 2 + 2 * k * d,
                                "wo_dense": 2 * ff * d, "wo_topk": 2 * k * d}
  assert flops["per_token"]["decoder"]["topk"] == 2 * flops["per_layer"]["topk"]
  assert f"{saved['param_count']:,} parameters" in printed
  assert "decoder/layers_0/self_attention/query/kernel" in printed and "(embed, joined_kv)" in printed


def test_model_info_bad_k_exits_2_with_one_error_line(capsys):
  assert model_info_command.main(["--gin_file=t5/t5_1_0/11B.gin", "--gin.TOP_K=0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "got 0" in err[0]


def test_model_info_knows_vit_too(tmp_path):
  out = tmp_path / "vit.json"
  assert model_info_command.main(["--gin_file=vit/b16.gin", "--gin_file=vit/topk.gin", "--json", str(out)]) == 0
  info = json.loads(out.read_text())
  assert info["param_count"] == 86_567_656  # ViT-B/16, published
  flops = info["mlp_flops_per_token"]
  assert flops["k"] == 256 and flops["per_token"] == {
      "encoder": {"layers": 12, "dense": 12 * 4 * 768 * 3072, "topk": 12 * (2 * 768 * 3072 + 2 * 256 * 768)}}


SHAPE_FIELDS = ("vocab_size", "dtype", "emb_dim", "num_heads", "num_encoder_layers", "num_decoder_layers", "head_dim",
                "mlp_dim", "mlp_activations", "dropout_rate", "logits_via_embedding", "float32_attention_logits")


@pytest.mark.parametrize("version", sizes.VERSIONS)
def test_the_python_size_table_equals_every_gin_size_file(version):
  for size in sizes.sizes(version):
    from_gin = build([sizes.GIN_NAMES[version][size]]).module.config
    from_table = sizes.published_config(version, size)
    for field in SHAPE_FIELDS:
      ours, theirs = getattr(from_table, field), getattr(from_gin, field)
      if field == "dtype":
        ours, theirs = jnp.dtype(ours), jnp.dtype(theirs)
      elif field == "mlp_activations":
        ours, theirs = tuple(ours), tuple(theirs)
      assert ours == theirs, (version, size, field)
  assert dataclasses.replace(sizes.published_config(version, "base"), top_k=8).top_k == 8
  with pytest.raises(ValueError, match="unknown T5"):
    sizes.published_config(version, "huge")
