"""Parameter count, per-module shapes and MLP FLOPs per token of a model (``topk-model-info``).

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

from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax

from topk_transformers import models

DEFAULT_REPORT_K = 128  # configs/t5/topk.gin's k, used when the config has no top_k


def abstract_params(model: Any) -> Any:
  """The boxed parameter tree of ``model`` as ``ShapeDtypeStruct``s (no memory used)."""
  shapes = model.default_input_shapes()
  return jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0))["params"]


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


def mlp_flops(shape: models.MlpDescription, k: Optional[int] = None) -> Dict[str, Any]:
  """MLP FLOPs per token, dense vs Top-k, for a model's ``describe().mlp`` (the module docstring says what counts)."""
  d, ff, n_wi = shape.d, shape.ff, shape.n_wi
  k_source = "config"
  if k is None:
    k, k_source = shape.top_k, "config"
  if k is None:
    k, k_source = DEFAULT_REPORT_K, "default (config has no top_k)"
  k_eff = min(int(k), ff)
  dense = 2 * d * ff * n_wi + 2 * ff * d
  sparse = 2 * d * ff * n_wi + 2 * k_eff * d
  per_stack = {}
  for stack, n_layers in shape.stacks.items():
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
  """Everything ``topk-model-info`` prints, as a JSON-able dict."""
  rows = param_rows(abstract_params(model))
  facts = model.describe()
  return {
      "model": type(model.module).__name__,
      "config": dict(facts.config),
      "param_count": sum(r["count"] for r in rows),
      "params": rows,
      "mlp_flops_per_token": mlp_flops(facts.mlp, k),
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
