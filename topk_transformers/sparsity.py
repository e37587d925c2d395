"""Activation sparsity: the percentage of nonzero MLP activations per layer.

Every ``layers.MlpBlock`` sows, per call, ``nonzero_count`` (nonzero hidden
activations summed over the counted tokens), ``token_count`` and
``neuron_fire_count`` (``[d_ff]``) into the ``intermediates`` collection. This
module turns such a tree into per-layer figures, inside ``jit`` (the train
step's metrics); ``evaluators.SparsityEvaluator`` does it for the counts summed
over a split.

Layer names are the module paths without the trailing ``/mlp``, e.g.
``encoder/layers_3`` or ``decoder/layers_0`` (T5) and ``Transformer/encoderblock_5`` (ViT).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

_KEYS = ("nonzero_count", "token_count", "neuron_fire_count")


def _layer_name(path: Tuple[str, ...]) -> str:
  parts = list(path)
  if parts and parts[-1] == "mlp":
    parts = parts[:-1]
  return "/".join(parts) or "mlp"


def _walk(tree: Any, path: Tuple[str, ...], out: Dict[str, Dict[str, Any]]) -> None:
  if not isinstance(tree, Mapping):
    return
  if "nonzero_count" in tree:
    entry = {}
    for key in _KEYS:
      vals = tree[key]
      vals = vals if isinstance(vals, (tuple, list)) else (vals,)
      entry[key] = sum(vals[1:], vals[0])  # several calls of one block (e.g. decode steps) add up
    out[_layer_name(path)] = entry
    return
  for name, sub in tree.items():
    _walk(sub, path + (str(name),), out)


def layer_stats(intermediates: Any) -> Dict[str, Dict[str, Any]]:
  """``{layer: {'nonzero_count', 'token_count', 'neuron_fire_count'}}`` from sown intermediates."""
  out: Dict[str, Dict[str, Any]] = {}
  _walk(intermediates, (), out)
  return dict(sorted(out.items(), key=lambda kv: layer_sort_key(kv[0])))


_STACK_ORDER = {"encoder": 0, "decoder": 1}


def layer_sort_key(name: str):
  # encoder before decoder, then numeric layer order (layers_10 after layers_9).
  parts = [(_STACK_ORDER.get(name.split("/")[0], 2), 0)]
  for p in name.split("/"):
    head, _, tail = p.rpartition("_")
    parts.append((head, int(tail)) if tail.isdigit() else (p, -1))
  return parts


def percent_nonzero(intermediates: Any) -> Dict[str, jax.Array]:
  """Per layer, 100 * nonzero activations / (tokens * d_ff). Works under ``jit``."""
  result = {}
  for name, s in layer_stats(intermediates).items():
    width = s["neuron_fire_count"].shape[-1]
    result[name] = 100.0 * s["nonzero_count"] / jnp.maximum(s["token_count"] * width, 1.0)
  return result


def format_table(percent: Mapping[str, float]) -> str:
  """A compact per-layer table: ``layer  % nonzero``."""
  if not percent:
    return "(no MLP activations recorded)"
  width = max(len(n) for n in percent)
  lines = [f"{'layer':<{width}}  % nonzero"]
  lines += [f"{name:<{width}}  {float(p):8.3f}" for name, p in percent.items()]
  return "\n".join(lines)
