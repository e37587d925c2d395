#!/usr/bin/env python
"""Parameter count, per-module shapes and MLP FLOPs per token of a gin-configured model.

  python scripts/model_info.py --gin_file=configs/t5/t5_1_0/11B.gin [--gin.TOP_K=128] [--json info.json]

Shapes come from ``jax.eval_shape`` of the model's ``init``: nothing is
allocated, so the 11B model answers as fast as the tiny one.

MLP FLOPs count the multiply-adds (2 FLOPs each) of the MLP matmuls for one
token in one layer: dense ``2*d*ff`` per ``wi`` branch plus ``2*ff*d`` for
``wo``. With Top-k the ``wi`` matmuls stay dense (every hidden unit must be
computed to pick the k largest) and ``wo`` reads only the k selected rows:
``2*k*d``. Activations, the gate product and the selection itself (comparisons,
no multiply-adds) are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from topk_transformers import gin_utils  # noqa: E402
from topk_transformers.t5 import network as t5_network  # noqa: E402
from topk_transformers.vit import network as vit_network  # noqa: E402

DEFAULT_REPORT_K = 128  # configs/t5/topk.gin's k, used when the config has no top_k


def abstract_params(module: nn.Module) -> Any:
  """The boxed parameter tree of ``module`` as ``ShapeDtypeStruct``s (no memory used)."""
  if isinstance(module, t5_network.Transformer):
    tokens = jnp.ones((1, 1), jnp.int32)
    args, kwargs = (tokens, tokens, tokens), {"enable_dropout": False}
  elif isinstance(module, vit_network.ViT):
    size = module.image_size or 224
    args, kwargs = (jnp.ones((1, size, size, 3), jnp.float32),), {"train": False}
  else:
    raise gin_utils.ConfigError(f"model_info does not know how to initialise {type(module).__name__}")

  def init():
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    return module.init(rngs, *args, **kwargs)

  return jax.eval_shape(init)["params"]


def param_rows(params: Any) -> List[Dict[str, Any]]:
  """One row per parameter: ``name`` (``a/b/kernel``), ``shape``, logical ``axes``, ``count``."""
  rows = []
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in leaves:
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    axes = list(leaf.names) if isinstance(leaf, nn.Partitioned) else None
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    count = 1
    for n in value.shape:
      count *= int(n)
    rows.append({"name": name, "shape": [int(n) for n in value.shape], "axes": axes, "count": count})
  return rows


def mlp_shape(module: nn.Module) -> Dict[str, Any]:
  """``d_model``, ``d_ff``, wi branches, configured k and layers per stack, for T5 or ViT."""
  if isinstance(module, vit_network.ViT):
    v = module.shape
    return dict(d=v["width"], ff=v["mlp_dim"], n_wi=1, top_k=module.top_k, stacks={"encoder": v["depth"]})
  c = module.config
  return dict(d=c.emb_dim, ff=c.mlp_dim, n_wi=len(c.mlp_activations), top_k=c.top_k,
              stacks={"encoder": c.num_encoder_layers, "decoder": c.num_decoder_layers})


def mlp_flops(module: nn.Module, k: Optional[int] = None) -> Dict[str, Any]:
  """MLP FLOPs per token, dense vs Top-k (see the module docstring for what is counted)."""
  shape = mlp_shape(module)
  d, ff, n_wi = shape["d"], shape["ff"], shape["n_wi"]
  k_source = "config"
  if k is None:
    k, k_source = shape["top_k"], "config"
  if k is None:
    k, k_source = DEFAULT_REPORT_K, "default (config has no top_k)"
  k_eff = min(int(k), ff)
  dense = 2 * d * ff * n_wi + 2 * ff * d
  sparse = 2 * d * ff * n_wi + 2 * k_eff * d
  per_stack = {}
  for stack, n_layers in shape["stacks"].items():
    per_stack[stack] = {"layers": n_layers, "dense": dense * n_layers, "topk": sparse * n_layers}
  return {
      "k": int(k), "k_source": k_source, "k_effective": k_eff, "d_model": d, "d_ff": ff, "wi_branches": n_wi,
      "per_layer": {"dense": dense, "topk": sparse, "wo_dense": 2 * ff * d, "wo_topk": 2 * k_eff * d},
      "per_token": per_stack,
      "topk_over_dense": sparse / dense,
      "counted": "2*d*ff per wi branch + wo (2*ff*d dense, 2*k*d Top-k: only k rows of wo); "
                 "activations, gate product and selection not counted",
  }


def model_info(model: Any, k: Optional[int] = None) -> Dict[str, Any]:
  """Everything ``main`` prints, as a JSON-able dict."""
  module = getattr(model, "module", model)
  rows = param_rows(abstract_params(module))
  if isinstance(module, vit_network.ViT):
    cfg = {name: getattr(module, name) for name in ("variant", "num_classes", "top_k", "top_k_method",
                                                     "mlp_activation", "pool_type", "representation_size")}
    cfg.update(module.shape)
  else:
    config = module.config
    cfg = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    cfg["dtype"] = str(cfg["dtype"])
    cfg["mlp_activations"] = list(cfg["mlp_activations"])
  return {
      "model": type(module).__name__,
      "config": cfg,
      "param_count": sum(r["count"] for r in rows),
      "params": rows,
      "mlp_flops_per_token": mlp_flops(module, k),
  }


def format_report(info: Dict[str, Any]) -> str:
  lines = [f"{info['model']}: {info['param_count']:,} parameters"]
  width = max(len(r["name"]) for r in info["params"])
  for r in info["params"]:
    axes = "(" + ", ".join(str(a) for a in r["axes"]) + ")" if r["axes"] is not None else "-"
    lines.append(f"  {r['name']:<{width}}  {str(tuple(r['shape'])):<16} {axes:<28} {r['count']:>14,}")
  f = info["mlp_flops_per_token"]
  lines.append(f"MLP FLOPs per token (d={f['d_model']}, d_ff={f['d_ff']}, {f['wi_branches']} wi branch(es), "
               f"k={f['k']} [{f['k_source']}]):")
  lines.append(f"  per layer: dense {f['per_layer']['dense']:,}  Top-k {f['per_layer']['topk']:,}  "
               f"(wo: {f['per_layer']['wo_dense']:,} -> {f['per_layer']['wo_topk']:,})")
  for stack, v in f["per_token"].items():
    lines.append(f"  {stack} token ({v['layers']} layers): dense {v['dense']:,}  Top-k {v['topk']:,}")
  lines.append(f"  Top-k / dense: {f['topk_over_dense']:.3f}")
  lines.append(f"  counted: {f['counted']}")
  return "\n".join(lines)


@gin_utils.exit_on_config_error
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  gin_files, bindings, rest = gin_utils.parse_gin_flags(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
  parser.add_argument("--top_k", type=int, default=None,
                      help=f"k for the FLOPs comparison (default: the config's, else {DEFAULT_REPORT_K})")
  args = parser.parse_args(rest)
  if not gin_files:
    parser.error("give at least one --gin_file (e.g. --gin_file=configs/t5/t5_1_0/base.gin)")
  gin_utils.configure(gin_files, bindings)
  model = gin_utils.get_macro("MODEL")
  info = model_info(model, args.top_k)
  info["gin_files"] = list(gin_files)
  info["gin_bindings"] = list(bindings)
  print(format_report(info))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as fh:
      json.dump(info, fh, indent=2)
    print(f"wrote {args.json}")
  return info


if __name__ == "__main__":
  main()
