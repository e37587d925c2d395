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
import numpy as np

_KEYS = ("nonzero_count", "token_count", "neuron_fire_count")
RARE_FIRING = 0.1
"""The paper's statistic (Li et al., 2022, Section 3): the share of units that fire on fewer than 10% of tokens."""


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


def summed_figures(stats: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
  """Per layer, from counts summed over a split (``layer_stats``'s shape, host arrays): ``percent_nonzero``
  (100 * nonzero / (tokens * d_ff)), ``tokens`` and ``firing_frequency`` (``[d_ff]``: the fraction of counted tokens
  on which each unit was nonzero)."""
  out = {}
  for name, s in stats.items():
    tokens = float(np.sum(s["token_count"]))
    fire = np.asarray(s["neuron_fire_count"], np.float64)
    out[name] = {"percent_nonzero": float(100.0 * np.sum(s["nonzero_count"]) / max(tokens * fire.shape[-1], 1.0)),
                 "tokens": tokens, "firing_frequency": fire / max(tokens, 1.0)}
  return out


def format_table(percent: Mapping[str, float]) -> str:
  """A compact per-layer table: ``layer  % nonzero``."""
  if not percent:
    return "(no MLP activations recorded)"
  width = max(len(n) for n in percent)
  lines = [f"{'layer':<{width}}  % nonzero"]
  lines += [f"{name:<{width}}  {float(p):8.3f}" for name, p in percent.items()]
  return "\n".join(lines)


# Firing frequencies: per unit, the fraction of counted tokens on which it was nonzero
# (``neuron_fire_count / token_count``).

def firing_histogram(frequency: np.ndarray, bins: int = 20) -> Tuple[np.ndarray, np.ndarray]:
  """``(counts, edges)``: how many hidden units fire on a fraction of tokens in each of ``bins`` bins of [0, 1]."""
  if bins <= 0:
    raise ValueError(f"bins must be positive, got {bins}")
  frequency = np.asarray(frequency, np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  counts, _ = np.histogram(np.clip(frequency, 0.0, 1.0), bins=edges)
  return counts, edges


def _unit_frequencies(frequency: np.ndarray) -> np.ndarray:
  frequency = np.asarray(frequency)
  if frequency.ndim != 1 or frequency.size == 0:
    raise ValueError(f"firing frequencies must be a non-empty [d_ff] vector, got shape {frequency.shape}")
  return frequency if np.issubdtype(frequency.dtype, np.floating) else frequency.astype(np.float64)


def fraction_firing_below(frequency: np.ndarray, threshold: float = RARE_FIRING) -> float:
  """The share of units that fire on fewer than ``threshold`` of the tokens (never-firing units included).

  Strictly below: a unit that fires on exactly 10% of the tokens is not counted. The comparison is made in the
  frequencies' own dtype, so a float32 frequency of exactly 1/10 is not taken for less than the float64 0.1.
  """
  frequency = _unit_frequencies(frequency)
  return float(np.mean(frequency < frequency.dtype.type(threshold)))


def fraction_never_firing(frequency: np.ndarray) -> float:
  """The share of units that were zero on every counted token."""
  return float(np.mean(_unit_frequencies(frequency) == 0.0))


def firing_summary(frequency: np.ndarray, bins: int = 20) -> dict:
  """Per-layer firing statistics: histogram, the paper's rarely-firing share, never- and mostly-firing units."""
  frequency = _unit_frequencies(frequency)
  counts, edges = firing_histogram(frequency, bins)
  return {
      "num_neurons": int(frequency.size),
      "histogram": counts.tolist(),
      "bin_edges": edges.tolist(),
      "mean": float(np.mean(frequency, dtype=np.float64)),
      "median": float(np.median(frequency)),
      "fraction_firing_below_10pct": fraction_firing_below(frequency),
      "fraction_never_firing": fraction_never_firing(frequency),
      "fire_over_half": float(np.mean(frequency > 0.5)),
  }
