"""Predictors for decoding: which units of a Top-k MLP will be active, before computing them.

A predictor is per decoder MLP, a low-rank map of the MLP's input ``x [embed]`` to a score per unit,
``x @ a @ b`` with ``a [embed, r]`` and ``b [branches, r, mlp]`` (one branch for T5 v1.0's ``wi``, two for
v1.1's gated ``wi_0``, ``wi_1``, which share ``a``). In a decoding step (``MlpBlock.decode_candidates = c``) the
block takes the ``c`` best-scored units as candidates, computes their hidden activations exactly from their rows of
``wi``, keeps the Top-k among them and reads those k rows of ``wo``. So a step reads ``r * (embed + branches * mlp)``
predictor values and ``(branches * c + k) * embed`` MLP weights instead of ``(branches + 1) * mlp * embed``.

Why this design. The predictor predicts the pre-activations ``x @ wi`` (for v1.0 the Top-k of ``relu(x @ wi)`` is the
Top-k of the pre-activations; for v1.1 the score is ``|gelu(x @ a @ b_0) * (x @ a @ b_1)|``), and :func:`fit` computes
it in closed form: the rank-r ``a @ b`` that minimises the squared error of the pre-activations over the checkpoint's
own MLP inputs, ``min ||X wi - X a b||``, is the truncated SVD of ``L^T wi`` with ``L L^T = X^T X / N`` (an
activation-weighted SVD of ``wi``), mapped back by ``L^{-T}``. It needs one pass over the data to accumulate ``X^T X``
and one SVD per layer, no learning rate, gives every rank at once, and at ``r = embed`` it is ``wi`` itself (a perfect
predictor). The candidates absorb its errors: a unit it ranks slightly too low is still computed exactly when it is
among the c best, so recall is set by ``c`` as much as by ``r``.

The tree mirrors the parameters, ``{'decoder': {'layers_i': {'mlp': {'a', 'b'}}}}``, and is passed to the network as
the ``predictors`` variable collection after :func:`prepare`, which moves each block's ``wi`` kernels into it as
``wi_rows [branches, mlp, embed]`` (row layout, so that the ``c`` rows a step reads are contiguous; ``wi`` is then
held once), computed once, not per step.
Saved with :func:`save` as ``.npz`` (plus its metadata); :func:`restore` checks the shapes against the parameters.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from topk_transformers.errors import ConfigError, one_line

FORMAT = "topk_transformers.predictors/1"


def mlp_kernels(params: Mapping[str, Any], stack: str = "decoder") -> Dict[str, np.ndarray]:
  """``{'layers_i': wi [branches, embed, mlp]}`` of every MLP of ``stack``, in layer order."""
  params = nn.meta.unbox(params)
  layers = params[stack]
  out = {}
  for name in sorted((n for n in layers if n.startswith("layers_")), key=lambda n: int(n.split("_")[1])):
    mlp = layers[name]["mlp"]
    keys = ["wi"] if "wi" in mlp else sorted(k for k in mlp if k.startswith("wi_"))
    out[name] = np.stack([np.asarray(mlp[k]["kernel"], np.float32) for k in keys])
  return out


def _tree(per_layer: Mapping[str, Mapping[str, Any]], stack: str = "decoder") -> Dict[str, Any]:
  return {stack: {name: {"mlp": dict(v)} for name, v in per_layer.items()}}


def layers_of(predictors: Mapping[str, Any], stack: str = "decoder") -> Dict[str, Dict[str, Any]]:
  """``{'layers_i': {'a', 'b', ...}}`` of a predictor tree."""
  return {name: v["mlp"] for name, v in predictors[stack].items()}


def rank(predictors: Mapping[str, Any]) -> int:
  first = next(iter(layers_of(predictors).values()))
  return int(np.shape(first["a"])[1])


def random_predictors(params: Mapping[str, Any], r: int, seed: int = 0, dtype=jnp.float32) -> Dict[str, Any]:
  """Random rank-``r`` predictors of ``params``' decoder MLPs (benchmarks: the cost does not depend on the values)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, wi in mlp_kernels_shapes(params).items():
    n, d, ff = wi
    out[name] = {"a": jnp.asarray(rng.standard_normal((d, r), np.float32) / np.sqrt(d), dtype),
                 "b": jnp.asarray(rng.standard_normal((n, r, ff), np.float32) / np.sqrt(r), dtype)}
  return _tree(out)


def mlp_kernels_shapes(params: Mapping[str, Any], stack: str = "decoder") -> Dict[str, Tuple[int, int, int]]:
  """``{'layers_i': (branches, embed, mlp)}`` without reading the kernels."""
  layers = nn.meta.unbox(params)[stack]
  out = {}
  for name in sorted((n for n in layers if n.startswith("layers_")), key=lambda n: int(n.split("_")[1])):
    mlp = layers[name]["mlp"]
    keys = ["wi"] if "wi" in mlp else sorted(k for k in mlp if k.startswith("wi_"))
    d, ff = np.shape(mlp[keys[0]]["kernel"])
    out[name] = (len(keys), int(d), int(ff))
  return out


def perfect_predictors(params: Mapping[str, Any]) -> Dict[str, Any]:
  """Rank-``embed`` predictors ``a = I``, ``b = wi``: they score every unit by its true pre-activation."""
  out = {}
  for name, wi in mlp_kernels(params).items():
    out[name] = {"a": jnp.eye(wi.shape[1], dtype=jnp.float32), "b": jnp.asarray(wi)}
  return _tree(out)


def prepare(params: Mapping[str, Any], predictors: Mapping[str, Any],
            dtype=None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """``(params, predictors)``: the variables a predicted decoding step reads, ``wi`` held once.

  Each predicted block's ``wi`` kernels move from ``params`` into its predictor as ``wi_rows [branches, mlp,
  embed]``, their transpose, so that the rows of the candidates are contiguous; the step reads ``wi`` from there
  alone (``mlp_steps.predicted_step``), and the ``wi`` biases stay in ``params``. Gated blocks also get ``b_cols
  [r, branches * mlp]``, ``b`` with its branches side by side, so that a step scores both in one product. Every
  other parameter is passed on as it is (not copied). ``dtype`` casts ``a``, ``b``, ``b_cols`` and ``wi_rows``
  (default: as stored).

  The returned ``params`` decode only with these predictors; encode and create the cache with the full ones. Call
  it once per set of parameters (or once per decoding call, outside the loop), not per step.
  """
  params = nn.meta.unbox(params)
  decoder = dict(params["decoder"])
  out = {}
  for name, p in layers_of(predictors).items():
    mlp = dict(decoder[name]["mlp"])
    keys = ["wi"] if "wi" in mlp else sorted(k for k in mlp if k.startswith("wi_"))
    rows = jnp.stack([jnp.transpose(jnp.asarray(mlp[k]["kernel"])) for k in keys])
    for k in keys:
      mlp[k] = {leaf: v for leaf, v in mlp[k].items() if leaf != "kernel"}
    decoder[name] = {**decoder[name], "mlp": mlp}
    b = jnp.asarray(p["b"])
    entry = {"a": jnp.asarray(p["a"]), "b": b, "wi_rows": rows}
    if b.shape[0] > 1:  # gated: both branches' b side by side, [r, branches * mlp], for one product per step
      entry["b_cols"] = jnp.transpose(b, (1, 0, 2)).reshape(b.shape[1], -1)
    if dtype is not None:
      entry = {k: v.astype(dtype) for k, v in entry.items()}
    out[name] = entry
  return {**params, "decoder": decoder}, _tree(out)


def check(params: Mapping[str, Any], predictors: Mapping[str, Any]) -> None:
  """Raises ``ConfigError`` unless ``predictors`` has one predictor of the right shapes per decoder MLP."""
  shapes = mlp_kernels_shapes(params)
  layers = layers_of(predictors)
  if sorted(layers) != sorted(shapes):
    raise ConfigError(f"the predictors cover decoder layers {sorted(layers)}, the model has {sorted(shapes)}")
  for name, (n, d, ff) in shapes.items():
    a, b = np.shape(layers[name]["a"]), np.shape(layers[name]["b"])
    if len(a) != 2 or a[0] != d or len(b) != 3 or b[0] != n or b[1] != a[1] or b[2] != ff:
      raise ConfigError(f"predictor of decoder {name} has a {a}, b {b}; the MLP needs a [{d}, r], b [{n}, r, {ff}]")


# ---------------------------------------------------------------------------
# Fitting from the MLP inputs.
# ---------------------------------------------------------------------------


class Moments:
  """Accumulates ``X^T X`` and the count of the MLP inputs ``X`` of each decoder layer (float64)."""

  def __init__(self):
    self.xtx: Dict[str, np.ndarray] = {}
    self.count: Dict[str, int] = {}

  def add(self, name: str, x: np.ndarray, weights: Optional[np.ndarray] = None) -> None:
    """``x [..., embed]``; ``weights [...]`` (nonzero: count this token) skips padding."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    if weights is not None:
      x = x[np.asarray(weights).reshape(-1) != 0]
    self.xtx[name] = self.xtx.get(name, 0.0) + x.T @ x
    self.count[name] = self.count.get(name, 0) + x.shape[0]


def fit(params: Mapping[str, Any], moments: Moments, ranks, ridge: float = 1e-6) -> Dict[int, Dict[str, Any]]:
  """The least-squares rank-r predictors of the decoder pre-activations, for every ``r`` in ``ranks``.

  For each layer, with ``C = X^T X / N + ridge * mean(diag) * I = L L^T`` and the truncated SVD
  ``L^T W = U S V^T`` of the stacked ``W = [wi_0 | wi_1 | ...]`` (``[embed, branches * mlp]``),
  ``a = L^{-T} U_r`` and ``b = S_r V_r^T`` minimise ``sum_tokens ||x W - x a b||^2`` over rank-r products.
  Returns ``{r: predictors}``.
  """
  ranks = sorted({int(r) for r in ranks})
  kernels = mlp_kernels(params)
  out: Dict[int, Dict[str, Any]] = {r: {} for r in ranks}
  for name, wi in kernels.items():
    if name not in moments.xtx:
      raise ConfigError(f"no MLP inputs were collected for decoder {name}")
    n, d, ff = wi.shape
    if ranks[0] <= 0 or ranks[-1] > d:
      raise ConfigError(f"predictor ranks must lie in [1, {d}] (the MLP input width), got {ranks}")
    c = moments.xtx[name] / max(moments.count[name], 1)
    c = c + ridge * max(float(np.mean(np.diag(c))), 1e-12) * np.eye(d)
    chol = np.linalg.cholesky(c)  # C = L L^T
    w = np.concatenate(list(wi.astype(np.float64)), axis=1)  # [d, n * ff]
    u, s, vt = np.linalg.svd(chol.T @ w, full_matrices=False)
    for r in ranks:
      a = np.linalg.solve(chol.T, u[:, :r])  # L^{-T} U_r
      b = (s[:r, None] * vt[:r]).reshape(r, n, ff).transpose(1, 0, 2)
      out[r][name] = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  return {r: _tree(v) for r, v in out.items()}


# ---------------------------------------------------------------------------
# Save and restore.
# ---------------------------------------------------------------------------


def save(path: str, predictors: Mapping[str, Any], metadata: Optional[Mapping[str, Any]] = None) -> str:
  """Writes ``predictors`` (``a`` and ``b`` of each layer) and ``metadata`` (JSON) to ``path`` (``.npz``)."""
  arrays = {}
  for name, p in layers_of(predictors).items():
    for key in ("a", "b"):
      arrays[f"decoder/{name}/mlp/{key}"] = np.asarray(p[key], np.float32)
  meta = {"format": FORMAT, "rank": rank(predictors), **(metadata or {})}
  arrays["__metadata__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


def restore(path: str, params: Optional[Mapping[str, Any]] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """``(predictors, metadata)`` from :func:`save`'s file; with ``params``, checked against the model (``check``).

  A missing, truncated or corrupt file, or one that is not a predictors file, is a one-line ``ConfigError``
  naming it, as other unreadable input files are.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"no predictors file at {path}")
  try:
    with np.load(path) as f:
      meta = json.loads(bytes(f["__metadata__"]).decode())
      arrays = {k: f[k] for k in f.files if k != "__metadata__"}
  except KeyError:
    raise ConfigError(f"{path} is not a predictors file (no metadata)") from None
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    # np.load of a cut or damaged .npz raises any of these (BadZipFile, "Read less bytes", a bad pickle header...).
    raise ConfigError(f"cannot read predictors file {path}: not a predictors file, or truncated or corrupt "
                      f"({type(e).__name__}: {one_line(e)})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else meta
    raise ConfigError(f"{path} is not a predictors file (format {found!r})")
  per_layer: Dict[str, Dict[str, Any]] = {}
  stack = "decoder"
  for key, value in arrays.items():
    parts = key.split("/")
    if len(parts) != 4 or not parts[1].startswith("layers_") or not parts[1][len("layers_"):].isdigit():
      raise ConfigError(f"{path} is not a predictors file (unexpected array {key!r})")
    stack, name, _, leaf = parts
    per_layer.setdefault(name, {})[leaf] = jnp.asarray(value)
  if not per_layer:
    raise ConfigError(f"predictors file {path} holds no predictors")
  predictors = _tree(dict(sorted(per_layer.items(), key=lambda kv: int(kv[0].split("_")[1]))), stack)
  if params is not None:
    check(params, predictors)
  return predictors, meta


def weight_values_per_step(embed: int, mlp: int, branches: int, k: int, r: int, c: int) -> Dict[str, int]:
  """Values one predicted MLP step reads: the predictor, ``c`` rows of each ``wi``, ``k`` rows of ``wo``."""
  c = min(c, mlp)
  predictor = r * (embed + branches * mlp) if c < mlp else 0
  return {"predictor": predictor, "wi_rows": branches * c * embed, "wo_rows": min(k, mlp) * embed}


def default_path(checkpoint_dir: str, r: int) -> str:
  """Where the train command saves rank-``r`` predictors: beside the checkpoint, ``<run>/predictors/r<r>.npz``."""
  return os.path.join(checkpoint_dir, "predictors", f"r{r}.npz")
