"""Pretrained T5 in and out (t5/convert.py): logits against transformers' PyTorch T5, round trips, T5X layouts, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from topk_transformers.commands import convert as convert_cmd  # noqa: E402
from topk_transformers.errors import ConfigError  # noqa: E402
from topk_transformers.t5 import convert, network  # noqa: E402
from transformers.models.t5 import modeling_t5  # noqa: E402

VOCAB, D, DKV, HEADS, FF, LAYERS = 150, 32, 8, 4, 64, 2
K = 16
VERSIONS = {"1.0": ("relu", True), "1.1": ("gated-gelu", False)}


def hf_model(version: str, seed: int = 0, own_lm_head: bool = True):
  """A tiny transformers T5 with random weights of unit-ish scale (so Top-k and ties matter)."""
  proj, tied = VERSIONS[version]
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=VOCAB, d_model=D, d_kv=DKV, d_ff=FF, num_layers=LAYERS, num_heads=HEADS,
                              feed_forward_proj=proj, tie_word_embeddings=tied, dropout_rate=0.0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.5)
  if not tied and own_lm_head:  # transformers 5 ties lm_head at construction; v1.1 has its own
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, D))
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  out = {}
  for version in VERSIONS:
    model = hf_model(version)
    path = str(tmp_path_factory.mktemp(f"hf_{version}"))
    model.save_pretrained(path)
    out[version] = (model, path)
  return out


def tokens(seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, VOCAB, (2, 40))  # 40 > 8 exact buckets: the logarithmic buckets are exercised
  dec = rng.integers(1, VOCAB, (2, 30))
  dec[:, 0] = 0
  return enc, dec


def ours(config, params, enc, dec):
  return np.asarray(network.Transformer(config).apply(
      {"params": params}, jnp.asarray(enc), jnp.asarray(dec), jnp.ones(dec.shape, jnp.int32), enable_dropout=False))


def theirs(model, enc, dec):
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()


def assert_logits_close(a, b):
  # 1e-5 relative to the logits' scale (elementwise relative error is meaningless for logits near 0).
  scale = float(np.max(np.abs(b)))
  assert float(np.max(np.abs(a - b))) <= 1e-5 * scale, (float(np.max(np.abs(a - b))), scale)


def _topk_mask(h, k, by_magnitude):
  idx = torch.topk(h.abs() if by_magnitude else h, k, dim=-1).indices
  return torch.zeros_like(h).scatter(-1, idx, 1.0) * h


def _act_dense_topk(self, x):
  return self.wo(_topk_mask(self.act(self.wi(x)), K, by_magnitude=False))


def _gated_topk(self, x):
  return self.wo(_topk_mask(self.act(self.wi_0(x)) * self.wi_1(x), K, by_magnitude=True))


# ----------------------------------------------------------------------------- Hugging Face import


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("top_k", [None, K])
def test_hf_import_logits_equal_transformers(hf_dirs, version, top_k, monkeypatch):
  model, path = hf_dirs[version]
  config, params = convert.from_hf(path)
  assert config.logits_via_embedding == (version == "1.0")
  assert config.mlp_activations == (("relu",) if version == "1.0" else ("gelu", "linear"))
  enc, dec = tokens()
  dense = theirs(model, enc, dec)
  if top_k:
    # Both sides apply Top-k: the k largest units per token (v1.1: the k largest |gelu(wi_0 x) * wi_1 x|).
    monkeypatch.setattr(modeling_t5.T5DenseActDense, "forward", _act_dense_topk)
    monkeypatch.setattr(modeling_t5.T5DenseGatedActDense, "forward", _gated_topk)
    config = dataclasses.replace(config, top_k=top_k, top_k_method="exact")
  ref = theirs(model, enc, dec)
  if top_k:
    assert float(np.max(np.abs(ref - dense))) > 1e-2 * float(np.max(np.abs(dense)))  # Top-k changes the logits
  assert_logits_close(ours(config, params, enc, dec), ref)


def test_v11_saved_by_transformers_5_with_lm_head_tied_imports_its_logits(tmp_path):
  # transformers 5 ties a new v1.1's lm_head to shared.weight and saves shared.weight only (unscaled logits).
  model = hf_model("1.1", seed=2, own_lm_head=False)
  model.save_pretrained(tmp_path)
  config, params = convert.from_hf(str(tmp_path))
  assert not config.logits_via_embedding
  enc, dec = tokens(3)
  assert_logits_close(ours(config, params, enc, dec), theirs(model, enc, dec))


def test_sharded_safetensors_and_pytorch_bin_import_the_same(hf_dirs, tmp_path):
  model, path = hf_dirs["1.1"]
  _, params = convert.from_hf(path)
  sharded = tmp_path / "sharded"
  model.save_pretrained(sharded, max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 3
  binary = tmp_path / "bin"
  binary.mkdir()
  (binary / "config.json").write_text((sharded / "config.json").read_text())
  torch.save(model.state_dict(), binary / "pytorch_model.bin")
  for other in (sharded, binary):
    config, got = convert.from_hf(str(other))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)


def test_bfloat16_safetensors_import(tmp_path):
  model = hf_model("1.0", seed=1)
  model.to(torch.bfloat16).save_pretrained(tmp_path)
  config, params = convert.from_hf(str(tmp_path))
  want = model.shared.weight.detach().float().numpy()
  np.testing.assert_array_equal(params["token_embedder"]["embedding"], want)


# ----------------------------------------------------------------------------- export and round trips


def project_params(config, seed=0):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  ones = jnp.ones((1, 4), jnp.int32)
  variables = network.Transformer(config).init(jax.random.PRNGKey(seed), ones, ones, ones, enable_dropout=False)
  return jax.tree_util.tree_map(np.asarray, nn.meta.unbox(variables["params"]))


@pytest.fixture
def tiny_config(tiny_t5_config):
  """``tiny_config(version)``: the shared tiny T5 at the shapes of :func:`hf_model`, v1.0 or v1.1."""

  def make(version):
    return tiny_t5_config(vocab_size=VOCAB, emb_dim=D, num_heads=HEADS, head_dim=DKV, mlp_dim=FF,
                          num_encoder_layers=LAYERS, num_decoder_layers=LAYERS,
                          mlp_activations=("relu",) if version == "1.0" else ("gelu", "linear"),
                          logits_via_embedding=version == "1.0")

  return make


@pytest.mark.parametrize("version", list(VERSIONS))
def test_export_then_from_pretrained_gives_the_same_logits(version, tmp_path, tiny_config):
  config = tiny_config(version)
  params = project_params(config)
  convert.to_hf(config, params, str(tmp_path))
  model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  if version == "1.1":
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
  enc, dec = tokens(1)
  assert_logits_close(ours(config, params, enc, dec), theirs(model, enc, dec))


@pytest.mark.parametrize("version", list(VERSIONS))
def test_project_to_hf_to_project_is_bit_exact(version, tmp_path, tiny_config):
  config = tiny_config(version)
  params = project_params(config, seed=3)
  convert.to_hf(config, params, str(tmp_path / "hf"))
  back_config, back = convert.from_hf(str(tmp_path / "hf"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  assert all(getattr(back_config, f) == getattr(config, f) for f in convert.ARCHITECTURE_FIELDS)
  convert.save_project(back_config, back, str(tmp_path / "project"))
  again_config, again = convert.load_project(str(tmp_path / "project"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
  assert again_config == back_config


# ----------------------------------------------------------------------------- T5X


def write_t5x_msgpack(params, ckpt_dir, inline=("scale",)):
  """T5X's layout: ``checkpoint`` (msgpack) with TensorStore specs in place of arrays, one zarr array each.

  Arrays whose name ends in ``inline`` are stored in the msgpack itself, as T5X does for unpartitioned ones.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top

  os.makedirs(ckpt_dir, exist_ok=True)

  def write(name, x):
    if name.endswith(inline):
      return np.asarray(x)
    rel = "target." + name.replace("/", ".")
    spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": rel},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(x.shape), "chunks": list(x.shape)}}
    absolute = dict(spec, kvstore={"driver": "file", "path": os.path.join(ckpt_dir, rel)})
    ts.open(absolute, create=True, delete_existing=True).result().write(np.asarray(x)).result()
    return spec

  target = convert.unflatten({k: write(k, v) for k, v in convert.flatten(params).items()})
  state = {"step": np.int32(1000), "param_states": convert.unflatten(
      {k: {"v": np.zeros((1,), np.float32)} for k in convert.flatten(params)})}
  with open(os.path.join(ckpt_dir, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize({"version": 3, "optimizer": {"target": target, "state": state}}))


@pytest.mark.parametrize("version", list(VERSIONS))
def test_t5x_msgpack_zarr_checkpoint_imports_the_same_params(version, tmp_path, tiny_config):
  config = tiny_config(version)
  params = project_params(config, seed=5)
  ckpt = str(tmp_path / "checkpoint_1000")
  write_t5x_msgpack(params, ckpt)
  assert os.path.isdir(os.path.join(ckpt, "target.encoder.layers_0.attention.query.kernel"))
  got_config, got = convert.from_t5x(ckpt, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
  inferred, _ = convert.from_t5x(ckpt)  # no config given: inferred from the shapes
  assert all(getattr(inferred, f) == getattr(config, f) for f in convert.ARCHITECTURE_FIELDS)
  assert convert.detect_format(ckpt) == "t5x"


def test_t5x_export_round_trips_bit_exact_in_t5x_layout(tmp_path, tiny_config):
  """project -> t5x -> project: the msgpack file names every array, one zarr array per parameter."""
  from flax import serialization  # pylint: disable=g-import-not-at-top

  config = tiny_config("1.1")
  params = project_params(config, seed=7)
  ckpt = str(tmp_path / "checkpoint_0")
  assert convert.save(config, params, ckpt, "t5x") == ckpt
  with open(os.path.join(ckpt, "checkpoint"), "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  assert contents["version"] == 3 and int(contents["optimizer"]["state"]["step"]) == 0
  spec = contents["optimizer"]["target"]["decoder"]["layers_1"]["mlp"]["wi_0"]["kernel"]
  assert spec["driver"] == "zarr" and spec["kvstore"]["path"] == "target.decoder.layers_1.mlp.wi_0.kernel"
  assert os.path.isdir(os.path.join(ckpt, "target.decoder.layers_1.mlp.wi_0.kernel"))
  got_config, got = convert.from_t5x(ckpt)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
  assert all(getattr(got_config, f) == getattr(config, f) for f in convert.ARCHITECTURE_FIELDS)
  again = str(tmp_path / "again")
  assert convert_cmd.main(["--from=t5x", "--to=t5x", f"--input={ckpt}", f"--output={again}"]) == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, convert.from_t5x(again)[1], params)
  wrong = dict(convert.flatten(params))
  wrong["decoder/layers_0/mlp/wo/kernel"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ConfigError, match="decoder/layers_0/mlp/wo/kernel"):
    convert.to_t5x(config, convert.unflatten(wrong), str(tmp_path / "bad"))


def test_t5x_orbax_checkpoint_imports_the_same_params(tmp_path, tiny_config):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  config = tiny_config("1.1")
  params = project_params(config, seed=6)
  ckpt = tmp_path / "checkpoint_20"
  with ocp.PyTreeCheckpointer() as ckptr:  # T5X's orbax format: checkpoint_<step>/state = train_state.state_dict()
    ckptr.save(str(ckpt / "state"), {"target": params, "state": {"step": np.int32(20)}})
  got_config, got = convert.from_t5x(str(ckpt), config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
  assert convert.load(str(ckpt))[0].mlp_dim == FF


# ----------------------------------------------------------------------------- the command and the run loader


def test_convert_command_between_formats(hf_dirs, tmp_path, capsys, monkeypatch):
  model, path = hf_dirs["1.0"]
  (tmp_path / "spiece.model").write_bytes(b"not really a model")
  project = str(tmp_path / "project")
  assert convert_cmd.main(["--from=hf", "--to=project", f"--input={path}", f"--output={project}",
                           f"--vocabulary={tmp_path / 'spiece.model'}"]) == 0
  assert "wrote project checkpoint" in capsys.readouterr().out
  assert os.path.exists(os.path.join(project, "spiece.model"))
  back = str(tmp_path / "hf")
  monkeypatch.chdir(tmp_path)  # relative paths too
  assert convert_cmd.main(["--to=hf", "--input=project", "--output=hf"]) == 0  # --from=auto
  assert os.path.exists(os.path.join(back, "spiece.model"))
  again = transformers.T5ForConditionalGeneration.from_pretrained(back).eval()
  enc, dec = tokens(2)
  np.testing.assert_array_equal(theirs(again, enc, dec), theirs(model, enc, dec))


def test_run_loader_reads_a_project_checkpoint(hf_dirs, tmp_path):
  from topk_transformers import runs  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import model as t5_model  # pylint: disable=g-import-not-at-top

  config, params = convert.from_hf(hf_dirs["1.1"][1])
  convert.save_project(config, params, str(tmp_path))
  shapes = {"encoder_input_tokens": (2, 8), "decoder_input_tokens": (2, 4)}
  model = t5_model.EncoderDecoderModel(network.Transformer(dataclasses.replace(config, top_k=8)))
  run = runs.load_run(str(tmp_path), model=model, input_shapes=shapes)
  assert run.step == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(run.params), params)
  other = t5_model.EncoderDecoderModel(network.Transformer(dataclasses.replace(config, relpos_max_distance=64)))
  with pytest.raises(ConfigError, match="relpos_max_distance"):
    runs.load_run(str(tmp_path), model=other, input_shapes=shapes)


# ----------------------------------------------------------------------------- bad inputs, one line each


def one_line(excinfo):
  text = str(excinfo.value)
  assert "\n" not in text, text
  return text


def copy_hf(src, dst, drop=None, replace=None):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(dst, exist_ok=True)
  state = load_file(os.path.join(src, "model.safetensors"))
  for k in drop or ():
    del state[k]
  state.update(replace or {})
  save_file(state, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return cfg


def test_missing_and_wrong_shaped_tensors_name_the_parameter_and_shapes(hf_dirs, tmp_path, tiny_config):
  _, path = hf_dirs["1.0"]
  name = "encoder.block.1.layer.1.DenseReluDense.wi.weight"
  copy_hf(path, tmp_path / "missing", drop=[name])
  with pytest.raises(ConfigError) as e:
    convert.from_hf(str(tmp_path / "missing"))
  assert name in one_line(e) and "missing" in str(e.value) and str((FF, D)) in str(e.value)
  copy_hf(path, tmp_path / "shape", replace={name: np.zeros((FF + 1, D), np.float32)})
  with pytest.raises(ConfigError) as e:
    convert.from_hf(str(tmp_path / "shape"))
  assert name in one_line(e) and str((FF + 1, D)) in str(e.value) and str((FF, D)) in str(e.value)
  config = tiny_config("1.0")
  params = convert.flatten(project_params(config))
  params["decoder/layers_0/mlp/wo/kernel"] = np.zeros((FF, D + 2), np.float32)
  write_t5x_msgpack(convert.unflatten(params), str(tmp_path / "t5x"))
  with pytest.raises(ConfigError) as e:
    convert.from_t5x(str(tmp_path / "t5x"), config)
  assert "decoder/layers_0/mlp/wo/kernel" in one_line(e) and str((FF, D + 2)) in str(e.value)
  assert str((FF, D)) in str(e.value)


def test_a_config_that_disagrees_names_the_field(hf_dirs):
  _, path = hf_dirs["1.1"]
  config, _ = convert.from_hf(path)
  for field, value in (("relpos_max_distance", 64), ("mlp_activations", ("gelu_exact", "linear")),
                       ("num_heads", 2)):
    with pytest.raises(ConfigError) as e:
      convert.load(path, "hf", dataclasses.replace(config, **{field: value}))
    assert f"T5Config.{field}" in one_line(e)
  assert convert.load(path, "auto", dataclasses.replace(config, top_k=4, dropout_rate=0.1))[0].top_k == 4


def test_unknown_architecture_says_what_it_found(hf_dirs, tmp_path):
  _, path = hf_dirs["1.0"]
  for key, value, found in (("model_type", "bart", "bart"), ("architectures", ["T5EncoderModel"], "T5EncoderModel"),
                            ("feed_forward_proj", "gated-tanh-x", "gated-tanh-x")):
    cfg = copy_hf(path, tmp_path / key)
    cfg[key] = value
    (tmp_path / key / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
      convert.from_hf(str(tmp_path / key))
    assert found in one_line(e)


def test_missing_empty_and_corrupt_files(hf_dirs, tmp_path, tiny_config):
  _, path = hf_dirs["1.0"]
  cases = {}
  cases["no such directory"] = str(tmp_path / "nowhere")
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  cases["pytorch_model.bin"] = str(tmp_path / "noweights")
  for name, data in (("empty", b""), ("corrupt", b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all")):
    copy_hf(path, tmp_path / name)
    (tmp_path / name / "model.safetensors").write_bytes(data)
    cases["not a readable safetensors"] = str(tmp_path / name)
  copy_hf(path, tmp_path / "badjson")
  (tmp_path / "badjson" / "config.json").write_text("{oops")
  cases["not readable JSON"] = str(tmp_path / "badjson")
  for expected, where in cases.items():
    with pytest.raises(ConfigError) as e:
      convert.from_hf(where)
    assert expected in one_line(e) or "does not exist" in str(e.value), (expected, str(e.value))
  (tmp_path / "t5x_empty").mkdir()
  (tmp_path / "t5x_empty" / "checkpoint").write_bytes(b"")
  with pytest.raises(ConfigError, match="empty"):
    convert.from_t5x(str(tmp_path / "t5x_empty"))
  (tmp_path / "t5x_bad").mkdir()
  (tmp_path / "t5x_bad" / "checkpoint").write_bytes(b"\xc1\xc1\xc1")
  with pytest.raises(ConfigError) as e:
    convert.from_t5x(str(tmp_path / "t5x_bad"))
  assert "not msgpack" in one_line(e)
  config = tiny_config("1.0")
  write_t5x_msgpack(project_params(config), str(tmp_path / "t5x_gone"))
  os.system(f"rm -r {tmp_path / 't5x_gone' / 'target.decoder.logits_dense.kernel'} 2>/dev/null; "
            f"rm -r {tmp_path / 't5x_gone' / 'target.token_embedder.embedding'}")
  with pytest.raises(ConfigError) as e:
    convert.from_t5x(str(tmp_path / "t5x_gone"))
  assert "token_embedder/embedding" in one_line(e) and "does not exist" in str(e.value)


def test_convert_imports_neither_tensorflow_nor_seqio_nor_gin_nor_torch(hf_dirs):
  code = ("import sys\n"
          "from topk_transformers.t5 import convert\n"
          f"convert.from_hf({hf_dirs['1.1'][1]!r})\n"
          "print(' '.join(m for m in ('tensorflow', 'seqio', 'gin', 'torch') if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == ""


def test_convert_command_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  assert convert_cmd.main(["--to=hf", f"--input={tmp_path / 'nowhere'}", f"--output={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "does not exist" in err and "\n" not in err


# ----------------------------------------------------------------------------- the output directory


def _tree_files(directory):
  """{relative path: bytes} of every file under ``directory``."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


def test_convert_refuses_an_output_that_holds_anything_and_changes_nothing(save_tiny_hf_t5, tmp_path, capsys):
  hf = save_tiny_hf_t5(tmp_path / "hf")
  run = tmp_path / "run"  # a training run's directory, as the trainer leaves it
  (run / "checkpoints" / "30" / "state").mkdir(parents=True)
  (run / "checkpoints" / "30" / "state" / "_METADATA").write_text("{}")
  (run / "config.gin").write_text("TOP_K = 8\n")
  before = _tree_files(run)
  capsys.readouterr()  # transformers' progress bar
  for dst in ("project", "hf", "t5x"):
    assert convert_cmd.main([f"--to={dst}", f"--input={hf}", f"--output={run}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: output directory {run} is not empty (it holds checkpoints, config.gin); give a new or "
                   "empty directory, or --overwrite to replace what a conversion writes there\n")
    assert _tree_files(run) == before
  afile = tmp_path / "afile"
  afile.write_text("x")
  assert convert_cmd.main(["--to=hf", f"--input={hf}", f"--output={afile}", "--overwrite"]) == 2
  assert capsys.readouterr().err == f"error: output {afile} is a file, not a directory\n"
  assert afile.read_text() == "x"
  empty = tmp_path / "empty"
  empty.mkdir()
  assert convert_cmd.main(["--to=project", f"--input={hf}", f"--output={empty}"]) == 0  # an empty one is fine


def test_convert_twice_to_one_output_with_overwrite_replaces_only_what_a_conversion_writes(
    save_tiny_hf_t5, tmp_path, capsys):
  first = save_tiny_hf_t5(tmp_path / "first")
  second = save_tiny_hf_t5(tmp_path / "second", feed_forward_proj="gated-gelu")
  out = tmp_path / "out"
  assert convert_cmd.main(["--to=project", f"--input={first}", f"--output={out}"]) == 0
  (out / "notes.txt").write_text("mine")
  before = _tree_files(out)
  assert convert_cmd.main(["--to=project", f"--input={second}", f"--output={out}"]) == 2
  assert _tree_files(out) == before, "a refused conversion changes nothing"
  capsys.readouterr()
  # Was a StepAlreadyExistsError traceback: step 0 is replaced.
  assert convert_cmd.main(["--to=project", f"--input={second}", f"--output={out}", "--overwrite"]) == 0
  assert "Traceback" not in capsys.readouterr().err
  config, params = convert.load(str(out))
  assert config.mlp_activations == ("gelu", "linear")
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, convert.from_hf(second)[1])
  assert (out / "notes.txt").read_text() == "mine"
  assert sorted(os.listdir(out / "checkpoints")) == ["0"]
  # A conversion to another format replaces the previous one's files, so that it is what the directory holds.
  assert convert_cmd.main(["--to=hf", f"--input={first}", f"--output={out}", "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt"]
  assert convert.detect_format(str(out)) == "hf"
  jax.tree_util.tree_map(np.testing.assert_array_equal, convert.load(str(out))[1], convert.from_hf(first)[1])
