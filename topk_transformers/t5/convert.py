"""Pretrained T5 in and out: Hugging Face, T5X and this project's checkpoints.

One param tree, three formats::

  from topk_transformers.t5 import convert
  config, params = convert.from_hf('/models/t5-base')            # config.json + safetensors / .bin
  config, params = convert.from_t5x('gs://.../checkpoint_1000000', config)   # msgpack + zarr, or orbax
  convert.to_hf(config, params, '/tmp/t5-base-hf')                 # T5ForConditionalGeneration loads it
  convert.save_project(config, params, '/tmp/t5-base')             # topk-eval / -sparsity / -train read it
  config, params = convert.load('/tmp/anything', 'auto')           # any of them

The params are this project's (and T5X's) tree: ``token_embedder/embedding``,
``encoder/layers_{i}/attention/query/kernel`` ``[embed, heads*head_dim]`` and so on
(``network.py``), float32 NumPy arrays. Hugging Face stores ``nn.Linear``
weights ``[out, in]``, so every kernel is transposed, and keeps the relative
position table ``[buckets, heads]`` in layer 0 of each stack only. Neither side
scales attention logits by ``1/sqrt(head_dim)`` (T5 folds it into the query
weights), and both rescale tied logits by ``emb_dim ** -0.5``, so the weights
map with no other change (``tests/test_convert.py`` checks the logits against
``transformers``' PyTorch T5).

A project checkpoint is a directory ``DIR/checkpoints/<step>/state`` holding
orbax ``{'params': ...}`` only (the trainer's layout without the optimizer
state), plus ``DIR/t5_config.json``. Any mismatch is one line
(:class:`~topk_transformers.errors.ConfigError`): a missing or wrong-shaped
tensor names the parameter and both shapes, a config that disagrees names the
field, an unknown architecture says what it found.

This module needs numpy, jax/flax, safetensors, msgpack, tensorstore and orbax;
torch only to read a ``pytorch_model.bin``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from topk_transformers.errors import ConfigError
from topk_transformers.t5 import network

Params = Dict[str, Any]
FORMATS = ("hf", "t5x", "project")
PROJECT_CONFIG = "t5_config.json"
VOCABULARY_FILE = "spiece.model"

# The fields that fix what a checkpoint computes; the rest (dtype, dropout, Top-k, ...) a run may choose.
ARCHITECTURE_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
                       "num_decoder_layers", "mlp_activations", "logits_via_embedding", "relpos_num_buckets",
                       "relpos_max_distance")
# Hugging Face's dense_act_fn <-> the activation names of layers.resolve_activation.
_HF_TO_ACT = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact",
              "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu"}
_HF_ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
_HF_MODEL_TYPES = ("t5", "mt5")


# ---------------------------------------------------------------------------------------------------------------
# Param trees, shapes and checks
# ---------------------------------------------------------------------------------------------------------------

def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """``{'a': {'b': x}}`` -> ``{'a/b': x}``."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> Params:
  """``{'a/b': x}`` -> ``{'a': {'b': x}}``."""
  tree: Params = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def expected_shapes(config: network.T5Config) -> Dict[str, Tuple[int, ...]]:
  """``{'encoder/layers_0/mlp/wi/kernel': (emb, mlp), ...}`` of the network ``config`` builds (nothing computed)."""
  # Only the architecture decides the shapes: one trace per architecture.
  return dict(_shapes(dataclasses.replace(config, top_k=None, dropout_rate=0.0, dtype="float32",
                                          sparse_decode=None)))


@functools.lru_cache(maxsize=16)
def _shapes(config: network.T5Config) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  module = network.Transformer(config)
  ones = jnp.ones((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda r: module.init(r, ones, ones, ones, enable_dropout=False), jax.random.PRNGKey(0))
  return tuple((k, tuple(v.shape)) for k, v in flatten(nn.meta.unbox(boxed["params"])).items())


def check_params(flat: Mapping[str, Any], config: network.T5Config, source: str) -> None:
  """Every parameter of ``config``'s network is in ``flat`` with its shape, and nothing else."""
  want = expected_shapes(config)
  for name, shape in want.items():
    if name not in flat:
      raise ConfigError(f"{source}: parameter {name!r} (shape {shape}) is missing")
    have = tuple(np.shape(flat[name]))
    if have != shape:
      raise ConfigError(f"{source}: parameter {name!r} has shape {have} but the model needs {shape}")
  extra = sorted(set(flat) - set(want))
  if extra:
    raise ConfigError(f"{source}: unexpected parameter {extra[0]!r} ({len(extra)} not in the model)")


def check_config(model_config: network.T5Config, checkpoint_config: network.T5Config, source: str) -> None:
  """The model's architecture fields equal the checkpoint's; the first that differs is named."""
  for field in ARCHITECTURE_FIELDS:
    mine, theirs = getattr(model_config, field), getattr(checkpoint_config, field)
    if mine != theirs:
      raise ConfigError(f"the model's T5Config.{field}={mine!r} disagrees with {source}, "
                        f"which has {field}={theirs!r}")


def infer_config(shapes: Mapping[str, Tuple[int, ...]], source: str, **fields) -> network.T5Config:
  """A ``T5Config`` from parameter shapes (T5X checkpoints carry none).

  The shapes fix every size; what they cannot tell takes T5's values unless
  given in ``fields``: a gated MLP is gated GELU, ``relpos_max_distance`` 128.
  """
  def shape(name):
    if name not in shapes:
      raise ConfigError(f"{source}: no parameter {name!r}, so this is not a T5 checkpoint "
                        f"(found {', '.join(sorted(shapes)[:4])}{', ...' if len(shapes) > 4 else ''})")
    return shapes[name]

  vocab, emb = shape("token_embedder/embedding")
  heads, buckets = shape("encoder/relpos_bias/rel_embedding")
  joined = shape("encoder/layers_0/attention/query/kernel")[1]
  count = lambda stack: len({n.split("/")[1] for n in shapes if n.startswith(f"{stack}/layers_")})
  gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
  mlp_dim = shape(f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel")[1]
  values = dict(vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=joined // heads, mlp_dim=mlp_dim,
                num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"),
                mlp_activations=("gelu", "linear") if gated else ("relu",),
                logits_via_embedding="decoder/logits_dense/kernel" not in shapes, relpos_num_buckets=buckets,
                dropout_rate=0.0 if gated else 0.1)
  values.update(fields)
  return network.T5Config(**values)


def _float32(x) -> np.ndarray:
  return np.asarray(x).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------------------------

def _read_json(path: str, what: str) -> dict:
  if not os.path.exists(path):
    raise ConfigError(f"{what} {path} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{what} {path} is not readable JSON ({type(e).__name__}: {e})") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{what} {path} holds a {type(data).__name__}, not a JSON object")
  return data


def hf_config_to_t5(hf: Mapping[str, Any], source: str = "config.json") -> network.T5Config:
  """This project's ``T5Config`` for a Hugging Face T5 ``config.json``."""
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or []
  if model_type not in _HF_MODEL_TYPES:
    raise ConfigError(f"{source}: unknown architecture: model_type {model_type!r} "
                      f"(architectures {architectures}); this reads T5 and mT5 encoder-decoders")
  unknown = [a for a in architectures if a not in _HF_ARCHITECTURES]
  if unknown:
    raise ConfigError(f"{source}: unknown architecture {unknown[0]!r}; this reads "
                      f"{' and '.join(_HF_ARCHITECTURES)} checkpoints")
  proj = str(hf.get("feed_forward_proj", "relu"))
  parts = proj.split("-")
  gated = parts[0] == "gated"
  act = parts[-1]
  if gated and act == "gelu":
    act = "gelu_new"  # Hugging Face's spelling of v1.1's tanh GELU
  if len(parts) > 2 or (len(parts) == 2 and not gated) or act not in _HF_TO_ACT:
    raise ConfigError(f"{source}: unknown feed_forward_proj {proj!r} (known: relu, gated-gelu, gelu, "
                      f"gated-silu, ...)")
  eps = float(hf.get("layer_norm_epsilon", 1e-6))
  if abs(eps - 1e-6) > 1e-12:
    raise ConfigError(f"{source}: layer_norm_epsilon={eps} but this T5 uses 1e-6")
  # transformers >= 5 writes scale_decoder_outputs; older configs say tie_word_embeddings (default True).
  tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
  try:
    layers = int(hf.get("num_layers", 6))
    return network.T5Config(
        vocab_size=int(hf["vocab_size"]), emb_dim=int(hf["d_model"]), num_heads=int(hf["num_heads"]),
        head_dim=int(hf["d_kv"]), mlp_dim=int(hf["d_ff"]), num_encoder_layers=layers,
        num_decoder_layers=int(hf.get("num_decoder_layers") or layers),
        mlp_activations=(_HF_TO_ACT[act], "linear") if gated else (_HF_TO_ACT[act],),
        dropout_rate=float(hf.get("dropout_rate", 0.1)), logits_via_embedding=bool(tied),
        relpos_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relpos_max_distance=int(hf.get("relative_attention_max_distance", 128)))
  except KeyError as e:
    raise ConfigError(f"{source}: no {e.args[0]!r}, which a T5 config needs") from None
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{source}: {e}") from None


def t5_to_hf_config(config: network.T5Config) -> Dict[str, Any]:
  """A Hugging Face ``config.json`` for ``config``."""
  acts = tuple(config.mlp_activations)
  gated = len(acts) == 2 and acts[1] == "linear"
  if len(acts) not in (1, 2) or (len(acts) == 2 and not gated) or acts[0] not in _ACT_TO_HF:
    raise ConfigError(f"T5Config.mlp_activations={acts!r} has no Hugging Face T5 equivalent")
  hf_act = _ACT_TO_HF[acts[0]]
  proj = ("gated-gelu" if hf_act == "gelu_new" else f"gated-{hf_act}") if gated else hf_act
  tied = bool(config.logits_via_embedding)
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": config.vocab_size,
      "d_model": config.emb_dim, "d_kv": config.head_dim, "d_ff": config.mlp_dim,
      "num_layers": config.num_encoder_layers, "num_decoder_layers": config.num_decoder_layers,
      "num_heads": config.num_heads, "relative_attention_num_buckets": config.relpos_num_buckets,
      "relative_attention_max_distance": config.relpos_max_distance, "dropout_rate": float(config.dropout_rate),
      "layer_norm_epsilon": 1e-6, "feed_forward_proj": proj, "tie_word_embeddings": tied,
      "scale_decoder_outputs": tied, "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
      "decoder_start_token_id": 0, "dtype": "float32",
  }


def _hf_names(config: network.T5Config) -> Dict[str, Tuple[str, bool]]:
  """``{project name: (Hugging Face name, transposed)}`` for every parameter of ``config``'s network."""
  gated = len(config.mlp_activations) > 1
  names = {"token_embedder/embedding": ("shared.weight", False)}
  attn = {"query": "q", "key": "k", "value": "v", "out": "o"}
  mlp = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  for stack, n, blocks in (("encoder", config.num_encoder_layers, ("attention", "mlp")),
                           ("decoder", config.num_decoder_layers,
                            ("self_attention", "encoder_decoder_attention", "mlp"))):
    if n:
      names[f"{stack}/relpos_bias/rel_embedding"] = (
          f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
    for i in range(n):
      for j, block in enumerate(blocks):
        hf = f"{stack}.block.{i}.layer.{j}"
        norm = {"attention": "pre_attention_layer_norm", "self_attention": "pre_self_attention_layer_norm",
                "encoder_decoder_attention": "pre_cross_attention_layer_norm", "mlp": "pre_mlp_layer_norm"}[block]
        names[f"{stack}/layers_{i}/{norm}/scale"] = (f"{hf}.layer_norm.weight", False)
        if block == "mlp":
          for w in mlp:
            names[f"{stack}/layers_{i}/mlp/{w}/kernel"] = (f"{hf}.DenseReluDense.{w}.weight", True)
        else:
          sub = "EncDecAttention" if block == "encoder_decoder_attention" else "SelfAttention"
          for ours, theirs in attn.items():
            names[f"{stack}/layers_{i}/{block}/{ours}/kernel"] = (f"{hf}.{sub}.{theirs}.weight", True)
    names[f"{stack}/{stack}_norm/scale"] = (f"{stack}.final_layer_norm.weight", False)
  if not config.logits_via_embedding:
    names["decoder/logits_dense/kernel"] = ("lm_head.weight", True)
  return names


def hf_state_to_params(state: Mapping[str, Any], config: network.T5Config, source: str = "checkpoint") -> Params:
  """This project's params from a Hugging Face T5 state dict (``name -> array``, any float dtype)."""
  want = expected_shapes(config)
  flat = {}
  for ours, (theirs, transposed) in _hf_names(config).items():
    if theirs not in state:
      shape = want[ours][::-1] if transposed else want[ours]
      raise ConfigError(f"{source}: tensor {theirs!r} (for {ours!r}, shape {shape}) is missing")
    x = _float32(state[theirs])
    shape = x.T.shape if transposed else x.shape
    if shape != want[ours]:
      need = want[ours][::-1] if transposed else want[ours]
      raise ConfigError(f"{source}: tensor {theirs!r} has shape {tuple(x.shape)} but the config needs {need}")
    flat[ours] = np.ascontiguousarray(x.T) if transposed else x
  return unflatten(flat)


def params_to_hf_state(config: network.T5Config, params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """The Hugging Face T5 state dict (float32 NumPy) of ``params``."""
  flat = flatten(params)
  check_params(flat, config, "params")
  state = {}
  for ours, (theirs, transposed) in _hf_names(config).items():
    x = _float32(jax.device_get(flat[ours]))
    state[theirs] = np.ascontiguousarray(x.T if transposed else x)
  return state


def _read_safetensors_file(path: str) -> Dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as NumPy.

  The NumPy reader (not ``framework="flax"``, which would place every tensor on the default device) gives
  bfloat16 tensors as ml_dtypes' bfloat16 from safetensors 0.8 on.
  """
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top

  try:
    with safe_open(path, framework="numpy") as f:
      return {name: f.get_tensor(name) for name in f.keys()}
  except (SafetensorError, OSError, ValueError) as e:
    raise ConfigError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
  except TypeError as e:  # an older safetensors: "data type 'bfloat16' not understood"
    raise ConfigError(f"{path}: this safetensors cannot read its tensors as NumPy ({e}); "
                      "pip install 'safetensors>=0.8'") from None


def _read_torch_bin(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError(f"{path} is a PyTorch pickle, which needs torch (pip install torch); "
                      "safetensors directories do not") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many types for a bad file
    raise ConfigError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if not isinstance(state, Mapping):
    raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def read_hf_state(path: str) -> Dict[str, np.ndarray]:
  """The tensors of a Hugging Face directory: ``model.safetensors``, its sharded index, or ``pytorch_model.bin``."""
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  binary = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(single):
    return _read_safetensors_file(single)
  if os.path.exists(index):
    weight_map = _read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
      raise ConfigError(f"{index} has no weight_map")
    state = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(path, shard)
      if not os.path.exists(shard_path):
        raise ConfigError(f"{index} names shard {shard}, which does not exist")
      state.update(_read_safetensors_file(shard_path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise ConfigError(f"{index}: tensor {missing[0]!r} is not in shard {weight_map[missing[0]]}")
    return state
  if os.path.exists(binary):
    return _read_torch_bin(binary)
  raise ConfigError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def from_hf(path: str) -> Tuple[network.T5Config, Params]:
  """``(config, params)`` of a Hugging Face T5 directory (``config.json`` and its weights)."""
  if not os.path.isdir(path):
    raise ConfigError(f"Hugging Face checkpoint {path} "
                      f"{'is not a directory' if os.path.exists(path) else 'does not exist'}")
  config_path = os.path.join(path, "config.json")
  hf = _read_json(config_path, "Hugging Face config")
  config = hf_config_to_t5(hf, config_path)
  state = read_hf_state(path)
  if (not config.logits_via_embedding and "lm_head.weight" not in state and "shared.weight" in state
      and hf.get("tie_word_embeddings", True)):
    # transformers >= 5 ties lm_head to the embedding unless the weights say otherwise, and then saves
    # only shared.weight (with scale_decoder_outputs false): the unscaled output layer is the embedding.
    state = dict(state, **{"lm_head.weight": state["shared.weight"]})
  return config, hf_state_to_params(state, config, path)


def to_hf(config: network.T5Config, params: Mapping[str, Any], path: str, vocabulary: Optional[str] = None) -> str:
  """Writes ``config.json`` and ``model.safetensors`` (and ``spiece.model`` if given) in ``path``."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  state = params_to_hf_state(config, params)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(t5_to_hf_config(config), f, indent=2)
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  _copy_vocabulary(vocabulary, path)
  return path


def _copy_vocabulary(vocabulary: Optional[str], path: str) -> None:
  if vocabulary and os.path.abspath(vocabulary) != os.path.abspath(os.path.join(path, VOCABULARY_FILE)):
    shutil.copyfile(vocabulary, os.path.join(path, VOCABULARY_FILE))


# ---------------------------------------------------------------------------------------------------------------
# T5X: msgpack + one zarr array per parameter (TensorStore), or orbax
# ---------------------------------------------------------------------------------------------------------------

def _is_ts_spec(x) -> bool:
  return isinstance(x, Mapping) and "driver" in x and ("kvstore" in x or "path" in x)


def _read_ts(spec: Mapping[str, Any], ckpt_dir: str, name: str) -> np.ndarray:
  """One array from a T5X TensorStore spec whose path is relative to the checkpoint directory."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  spec = json.loads(json.dumps(spec, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
  kv = spec.get("kvstore")
  rel = kv.get("path") if isinstance(kv, dict) else spec.pop("path", None)
  if rel is None:
    raise ConfigError(f"T5X checkpoint {ckpt_dir}: the spec of {name!r} has no path")
  full = os.path.join(ckpt_dir, rel)
  if full.startswith("gs://"):
    bucket, _, key = full[len("gs://"):].partition("/")
    spec["kvstore"] = {"driver": "gcs", "bucket": bucket, "path": key}
  else:
    if not os.path.exists(full):
      raise ConfigError(f"T5X checkpoint {ckpt_dir}: array {rel} of parameter {name!r} does not exist")
    spec["kvstore"] = {"driver": "file", "path": full}
  try:
    return ts.open(spec, open=True, read=True).result().read().result()
  except Exception as e:  # pylint: disable=broad-except  # tensorstore's errors are ValueErrors of many kinds
    raise ConfigError(f"T5X checkpoint {ckpt_dir}: cannot read parameter {name!r} from {rel} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _t5x_msgpack_params(ckpt_dir: str) -> Dict[str, np.ndarray]:
  from flax import serialization  # pylint: disable=g-import-not-at-top

  path = os.path.join(ckpt_dir, "checkpoint")
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise ConfigError(f"T5X checkpoint file {path} is empty")
  try:
    contents = serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except  # msgpack raises several types for bad bytes
    raise ConfigError(f"T5X checkpoint file {path} is not msgpack ({type(e).__name__})") from None
  if not isinstance(contents, Mapping):
    raise ConfigError(f"T5X checkpoint file {path} holds a {type(contents).__name__}, not a state dict")
  # Version >= 2: {'version', 'optimizer': {'target', 'state'}}; version 0: a flax optimizer dict.
  optimizer = contents.get("optimizer", contents)
  target = optimizer.get("target") if isinstance(optimizer, Mapping) else None
  if not isinstance(target, Mapping):
    raise ConfigError(f"T5X checkpoint file {path} has no optimizer target (keys: {sorted(contents)})")
  flat = {}
  for name, leaf in _flatten_specs(target).items():
    flat[name] = _read_ts(leaf, ckpt_dir, name) if _is_ts_spec(leaf) else np.asarray(leaf)
  return flat


def _flatten_specs(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and not _is_ts_spec(value):
      out.update(_flatten_specs(value, name + "/"))
    else:
      out[name] = value
  return out


def _restore_orbax_numpy(path: str, what: str) -> Mapping[str, Any]:
  """A whole orbax PyTree checkpoint as NumPy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = path if "://" in path else os.path.abspath(path)  # orbax takes absolute paths only

  import logging  # pylint: disable=g-import-not-at-top

  absl_logger = logging.getLogger("absl")  # orbax warns that a bare PyTree has no step metadata
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(path)
      tree = getattr(meta, "item_metadata", meta)
      tree = getattr(tree, "tree", tree)
      restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many types
    raise ConfigError(f"{what} {path} cannot be read ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
  finally:
    absl_logger.setLevel(level)


def from_t5x(path: str, config: Optional[network.T5Config] = None) -> Tuple[network.T5Config, Params]:
  """``(config, params)`` of a T5X checkpoint directory ``.../checkpoint_<step>``.

  Reads the msgpack ``checkpoint`` file with its TensorStore arrays, or T5X's
  orbax format (``checkpoint_<step>/state``). T5X checkpoints carry no config:
  with ``config`` the parameters are checked against it; without, it is
  inferred from their shapes (:func:`infer_config`).
  """
  if not os.path.isdir(path) and "://" not in path:
    raise ConfigError(f"T5X checkpoint {path} is not a directory")
  if os.path.exists(os.path.join(path, "checkpoint")):
    flat = _t5x_msgpack_params(path)
  else:
    state_dir = os.path.join(path, "state") if os.path.isdir(os.path.join(path, "state")) else path
    if not _is_orbax_dir(state_dir):
      raise ConfigError(f"{path} is not a T5X checkpoint: no msgpack 'checkpoint' file and no orbax 'state'")
    tree = _restore_orbax_numpy(state_dir, "T5X orbax checkpoint")
    tree = tree.get("optimizer", tree)
    if "target" not in tree:
      raise ConfigError(f"T5X orbax checkpoint {state_dir} has no 'target' (keys: {sorted(tree)})")
    flat = flatten(tree["target"])
  flat = {k: _float32(v) for k, v in flat.items()}
  if config is None:
    config = infer_config({k: v.shape for k, v in flat.items()}, path)
  check_params(flat, config, f"T5X checkpoint {path}")
  return config, unflatten(flat)


def to_t5x(config: network.T5Config, params: Mapping[str, Any], path: str, step: int = 0) -> str:
  """Writes ``params`` as a T5X msgpack checkpoint directory (``.../checkpoint_<step>``) at ``path``.

  The layout :func:`from_t5x` reads and T5X writes: a msgpack ``checkpoint`` file
  ``{'version': 3, 'optimizer': {'target': ..., 'state': {'step': ...}}}`` whose
  ``target`` leaves are TensorStore specs, with one gzip zarr array per parameter
  named ``target.<dotted name>``. Only the parameters are written, no optimizer
  slots: load it in T5X as an initial checkpoint with a fresh optimizer state
  (that T5X accepts it was not checked here; T5X does not install from PyPI).
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from flax import serialization  # pylint: disable=g-import-not-at-top

  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  check_params(flat, config, "the parameters to export")
  os.makedirs(path, exist_ok=True)
  specs = {}
  for name, x in flat.items():
    rel = "target." + name.replace("/", ".")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": rel},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(x.shape), "chunks": list(x.shape),
                         "dtype": {"float32": "<f4", "bfloat16": "bfloat16"}.get(x.dtype.name, x.dtype.str)}}
    full = dict(spec, kvstore={"driver": "file", "path": os.path.join(os.path.abspath(path), rel)})
    ts.open(full, create=True, delete_existing=True).result().write(x).result()
    specs[name] = spec
  contents = {"version": 3, "optimizer": {"target": unflatten(specs), "state": {"step": np.int32(step)}}}
  with open(os.path.join(path, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  return path


def _is_orbax_dir(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.exists(os.path.join(path, f)) for f in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt",
                                                      "checkpoint"))


# ---------------------------------------------------------------------------------------------------------------
# This project's checkpoints: orbax {'params'} under DIR/checkpoints/<step>/state, t5_config.json beside
# ---------------------------------------------------------------------------------------------------------------

def config_to_json(config: network.T5Config) -> Dict[str, Any]:
  values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  values.update(dtype=str(config.dtype), mlp_activations=list(values["mlp_activations"]))
  return values


def config_from_json(values: Mapping[str, Any], source: str) -> network.T5Config:
  known = {f.name for f in dataclasses.fields(network.T5Config)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"{source}: unknown T5Config field {unknown[0]!r}")
  try:
    return network.T5Config(**values)
  except TypeError as e:
    raise ConfigError(f"{source}: {e}") from None


def save_project(config: network.T5Config, params: Mapping[str, Any], path: str, step: int = 0,
                 vocabulary: Optional[str] = None) -> str:
  """Writes a params-only project checkpoint: ``path/checkpoints/<step>/state`` and ``path/t5_config.json``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from topk_transformers import checksums  # pylint: disable=g-import-not-at-top

  flat = {k: _float32(jax.device_get(v)) for k, v in flatten(params).items()}
  check_params(flat, config, "params")
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  state = {"params": unflatten(flat)}
  # The trainer's checksums item beside the arrays, so every restore of this checkpoint verifies it.
  with ocp.CheckpointManager(os.path.join(path, "checkpoints"),
                             options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
                             item_handlers={"state": ocp.StandardCheckpointHandler(),
                                            checksums.CHECKSUMS: ocp.JsonCheckpointHandler()}) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            **{checksums.CHECKSUMS: ocp.args.JsonSave(checksums.record(state, step))}),
              force=True)
    mngr.wait_until_finished()
  with open(os.path.join(path, PROJECT_CONFIG), "w", encoding="utf-8") as f:
    json.dump(config_to_json(config), f, indent=2)
  _copy_vocabulary(vocabulary, path)
  return path


def _project_step_dir(path: str) -> Tuple[str, str]:
  """``(run directory, .../checkpoints/<step>/state)`` for a run directory (newest step) or a step directory."""
  path = path.rstrip("/")
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(os.path.dirname(path)), os.path.join(path, "state")
  ckpt_dir = os.path.join(path, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise ConfigError(f"{path} is not a project checkpoint (no checkpoints/<step>/state)")
  return path, os.path.join(ckpt_dir, str(steps[-1]), "state")


def check_recorded_config(checkpoints_dir: str, model_config: Any) -> None:
  """If the run directory of ``checkpoints_dir`` records a ``t5_config.json``, ``model_config`` must agree with it.

  ``checkpoints_dir`` is ``RUN/checkpoints`` (``checkpoints.locate``'s first value). Training runs record none.
  """
  run_dir = os.path.dirname(checkpoints_dir.rstrip("/"))
  config_path = os.path.join(run_dir, PROJECT_CONFIG)
  if not os.path.exists(config_path) or not isinstance(model_config, network.T5Config):
    return
  recorded = config_from_json(_read_json(config_path, "project config"), config_path)
  check_config(model_config, recorded, config_path)


def project_config(path: str) -> Optional[network.T5Config]:
  """The ``T5Config`` that a project checkpoint records (``None`` for a training run's directory)."""
  run_dir, _ = _project_step_dir(path)
  config_path = os.path.join(run_dir, PROJECT_CONFIG)
  if not os.path.exists(config_path):
    return None
  return config_from_json(_read_json(config_path, "project config"), config_path)


def load_project(path: str, config: Optional[network.T5Config] = None) -> Tuple[network.T5Config, Params]:
  """``(config, params)`` of a project checkpoint or a training run's directory (its params only)."""
  _, state_dir = _project_step_dir(path)
  recorded = project_config(path)
  tree = _restore_orbax_numpy(state_dir, "project checkpoint")
  if "params" not in tree:
    raise ConfigError(f"project checkpoint {state_dir} has no 'params' (keys: {sorted(tree)})")
  flat = {k: _float32(v) for k, v in flatten(tree["params"]).items()}
  if config is not None and recorded is not None:
    check_config(config, recorded, f"the checkpoint's {PROJECT_CONFIG}")
  config = config or recorded or infer_config({k: v.shape for k, v in flat.items()}, path)
  check_params(flat, config, f"project checkpoint {path}")
  return config, unflatten(flat)


# ---------------------------------------------------------------------------------------------------------------
# Any format
# ---------------------------------------------------------------------------------------------------------------

def detect_format(path: str) -> str:
  """``'hf'``, ``'t5x'`` or ``'project'``, from the files in ``path``."""
  if not os.path.exists(path):
    raise ConfigError(f"checkpoint {path} does not exist")
  if not os.path.isdir(path):
    raise ConfigError(f"checkpoint {path} is a file; give its directory")
  if os.path.exists(os.path.join(path, "config.json")):
    return "hf"
  if os.path.exists(os.path.join(path, "checkpoint")) or (
      os.path.basename(path.rstrip("/")).startswith("checkpoint_") and os.path.isdir(os.path.join(path, "state"))):
    return "t5x"
  if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.basename(path.rstrip("/")).isdigit():
    return "project"
  raise ConfigError(f"cannot tell the format of checkpoint {path} (found {sorted(os.listdir(path))[:6]}); "
                    f"give it as one of {', '.join(FORMATS)}")


def load(path: str, fmt: str = "auto", config: Optional[network.T5Config] = None
         ) -> Tuple[network.T5Config, Params]:
  """``(config, params)`` of a checkpoint in ``fmt`` (``'auto'``: :func:`detect_format`).

  Given ``config`` (the model a run builds), the checkpoint's architecture must
  agree with it (:func:`check_config`); the returned config is then ``config``.
  """
  fmt = detect_format(path) if fmt == "auto" else fmt
  if fmt == "hf":
    found, params = from_hf(path)
  elif fmt == "t5x":
    found, params = from_t5x(path, config)
  elif fmt == "project":
    found, params = load_project(path, config)
  else:
    raise ConfigError(f"unknown checkpoint format {fmt!r}; choose from auto, {', '.join(FORMATS)}")
  if config is None:
    return found, params
  check_config(config, found, f"checkpoint {path}")
  return config, params


# What a conversion writes in its output directory, in any format (patterns relative to it). ``--overwrite``
# replaces these and nothing else; the whole set goes, so that a previous conversion to another format cannot
# shadow the new one (``detect_format`` reads ``config.json`` first, for one).
CONVERSION_OUTPUTS = ("config.json", "model.safetensors", "checkpoint", "target.*", PROJECT_CONFIG,
                      "checkpoints/0", "checkpoints/0.orbax-checkpoint-tmp-*", VOCABULARY_FILE)


def check_output(path: str, overwrite: bool = False) -> None:
  """An output directory must be new or empty, unless ``overwrite``; a file there is refused either way.

  Raises ``ConfigError`` (one line) without changing anything in ``path``.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"output {path} is a file, not a directory")
  held = sorted(os.listdir(path)) if os.path.isdir(path) else []
  if held and not overwrite:
    raise ConfigError(f"output directory {path} is not empty (it holds {', '.join(held[:4])}"
                      f"{', ...' if len(held) > 4 else ''}); give a new or empty directory, or --overwrite to "
                      f"replace what a conversion writes there")


def clear_output(path: str, keep: Optional[str] = None) -> None:
  """Removes from ``path`` what a conversion writes (:data:`CONVERSION_OUTPUTS`) and nothing else; not ``keep``."""
  import glob  # pylint: disable=g-import-not-at-top

  keep = os.path.abspath(keep) if keep else None
  for pattern in CONVERSION_OUTPUTS:
    for found in glob.glob(os.path.join(glob.escape(path), pattern)):
      if os.path.abspath(found) == keep:
        continue
      if os.path.isdir(found) and not os.path.islink(found):
        shutil.rmtree(found)
      else:
        os.remove(found)
  checkpoints_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(checkpoints_dir) and not os.listdir(checkpoints_dir):
    os.rmdir(checkpoints_dir)  # the project conversion's own, now empty


def save(config: network.T5Config, params: Mapping[str, Any], path: str, fmt: str,
         vocabulary: Optional[str] = None, overwrite: bool = False) -> str:
  """Writes ``params`` in ``fmt`` (``'hf'``, ``'t5x'`` or ``'project'``) at ``path``.

  ``path`` must be new or empty (:func:`check_output`); with ``overwrite``, what a conversion writes there is
  replaced (:func:`clear_output`) and anything else is left as it is.
  """
  if fmt not in ("hf", "project", "t5x"):
    raise ConfigError(f"cannot write format {fmt!r}; choose hf, t5x or project")
  check_output(path, overwrite)
  if overwrite and os.path.isdir(path):
    clear_output(path, keep=vocabulary)
  if fmt == "hf":
    return to_hf(config, params, path, vocabulary)
  if fmt == "project":
    return save_project(config, params, path, vocabulary=vocabulary)
  return to_t5x(config, params, path)


def find_vocabulary(path: str) -> Optional[str]:
  """The ``spiece.model`` in a checkpoint directory, if there is one."""
  candidate = os.path.join(path, VOCABULARY_FILE)
  return candidate if os.path.exists(candidate) else None
