"""Unbatched greedy decoding of T5: dense MLPs vs Top-k sparse MLPs on the same weights (``topk-bench-decode``).

  topk-bench-decode --sizes=large,3B --version=1.0 --k=128 --method=exact \
      --dtype=float32 --steps=16 --reps=7 --json=benchmarks/decode.json --plot=benchmarks/decode.png

For each size (the published shapes, ``t5/sizes.py``, the same as the gin files
``configs/t5/t5_1_{0,1}/*.gin``; v1.1's 3B and 11B are its XL and XXL), each dtype, each selection method and
each k, the script builds T5 with random weights (created directly in the
dtype), encodes one random input, and times jitted greedy decoding of
``--steps`` tokens with the KV cache (``decoding.greedy_decode``, no EOS stop),
batch 1:

* ``dense``: the vanilla model (``top_k=None``), the baseline;
* ``sparse``: Top-k MLPs on the sparse path (``sparse_decode=True``: each
  decoder MLP reads the k selected rows of ``wo``);
* ``dense_topk`` (with ``--dense_topk``): Top-k MLPs computed densely.

All variants share one parameter tree. Timings are interleaved (one run of each
variant per repetition) so load from other processes hits them alike; the
figures are medians after compilation, ``block_until_ready`` included (the
speedup is the ratio of the medians; the median of per-repetition ratios,
``paired``, and the ratio of the best runs, ``best``, are printed as checks on
the noise). The sparse tokens are checked against the dense Top-k model's (same function).

* ``predicted/<method>/<k>/r<r>/c<c>`` (with ``--predicted``): Top-k MLPs on the
  predicted-neuron path (``T5Config.decode_candidates = c``, random rank-``r``
  predictors from ``predictors.random_predictors``: the cost does not depend on
  their values): each decoder MLP scores its units with ``x @ a @ b``, computes
  the ``c`` best from their rows of ``wi`` (``[mlp, embed]`` layout, prepared
  once before timing), and reads the k rows of ``wo`` of the Top-k among them.
  Its tokens are not expected to match (the predictors are random).

The memory-traffic bound is the ratio of the weight bytes one decoder step
reads, dense over the variant. Per decoder layer: self-attention ``q, k, v, o``;
cross-attention ``q, o`` (the keys and values of the encoder output are
computed once per input by ``t5.decoding.encode_for_decoding``, before the
decoding loop, and passed to every step, which never touches the ``key`` and
``value`` kernels: ``Transformer.decode(..., cross_kv=...)``); the MLP (dense
and sparse: ``wi`` branches in full, then ``wo`` in full or ``k`` of its rows;
predicted: the predictor's ``a`` and ``b``, ``c`` rows of each ``wi`` branch and
``k`` rows of ``wo``); three layer-norm scales. Once per step: the token's
embedding row, the final norm and the logits matrix (``vocab x d``, tied or
not). Activations, the KV cache and the cached encoder keys and values are not
counted (``2 * (steps + input_length) * heads * head_dim`` values per layer,
under 1% of the bytes here). The encoder and the cross-attention keys and
values are computed once per input, outside the timed loop.

bfloat16 on a CPU: XLA:CPU computes bfloat16 dots in float32 and hoists the
conversion of the weights out of the loop, so each call first converts the
weights and the loop then reads float32 copies; the bytes the bound counts at 2
per value are not what runs there (the figures still compare the two paths).

``--num_layers N`` builds N encoder and N decoder layers instead of the
published depth (for shapes that do not fit in memory); every figure is then for
that truncated model, and per-layer latencies (per-token / N) are reported too.
``--encoder_layers M`` shrinks only the encoder, which runs once before the
timed loop and does not change the per-token decoder cost: a 3B model in
float32 then fits with its full 24-layer decoder.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers import decoding
from topk_transformers import predictors
from topk_transformers import row_kernels
from topk_transformers import topk
from topk_transformers.benchmarks import machine
from topk_transformers.errors import ConfigError
from topk_transformers.t5 import decoding as t5_decoding
from topk_transformers.t5 import network
from topk_transformers.t5 import sizes

METHODS = topk.METHODS
DTYPES = ("float32", "bfloat16")
COUNTED = ("weights read per decoder step: self-attention q,k,v,o; cross-attention q,o (its keys and values are "
           "computed once per input, explicitly, by t5.decoding.encode_for_decoding and passed to every step); MLP: wi "
           "in full and wo in full (dense) or k rows (sparse), or (predicted) the rank-r predictor a, b, c rows of "
           "each wi branch and k rows of wo; layer norms; embedding row; logits matrix")
DEFAULT_RANK = 32
"""``--predictor_rank``'s default (the README's headline setting)."""
DEFAULT_CANDIDATES = 256
"""``--candidates``' default (the README's headline setting)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to benchmark; ``topk-bench-decode``'s flags."""

  sizes: Tuple[str, ...] = ("large",)
  version: str = "1.0"
  ks: Tuple[int, ...] = (128,)
  methods: Tuple[str, ...] = ("exact",)
  dtypes: Tuple[str, ...] = ("float32",)
  num_layers: Optional[int] = None
  """Encoder and decoder layers (default: the published depth)."""
  encoder_layers: Optional[int] = None
  """Encoder layers only (default: as the decoder); the encoder runs once, untimed."""
  steps: int = 16
  """Tokens decoded per timed run."""
  reps: int = 5
  """Timed runs per variant (the median is reported)."""
  input_length: int = 32
  dense_topk: bool = False
  """Also time the Top-k model on the dense path."""
  predicted: bool = False
  """Also time the predicted-neuron path for every rank and candidate count."""
  predictor_ranks: Tuple[int, ...] = (DEFAULT_RANK,)
  candidates: Tuple[int, ...] = (DEFAULT_CANDIDATES,)
  xla_gather: bool = False
  """Also time the sparse and predicted paths with XLA's gather in place of the row kernels (``row_kernels.py``)."""
  in_out: bool = True
  """Also time dense decoding with the kernels as T5X lays them out (``dense@in_out``), beside the transposed
  layout that every other variant reads (``t5.decoding.transpose_for_decoding``)."""
  vecmat_gib: float = 1.0
  """Size of the float32 matrix whose vector products measure the machine's streaming rate, interleaved with the
  variants (0: not measured)."""
  seed: int = 0

  def __post_init__(self):
    for size in self.sizes:
      try:
        sizes.published_config(self.version, size)
      except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, values, allowed in (("method", self.methods, METHODS), ("dtype", self.dtypes, DTYPES)):
      bad = [v for v in values if v not in allowed]
      if bad or not values:
        raise ConfigError(f"--{name} must list {' and/or '.join(allowed)}, got {','.join(values) or 'nothing'}")
    if not self.ks or min(self.ks) <= 0:
      raise ConfigError(f"--k must list positive integers, got {self.ks}")
    for name in ("steps", "reps", "input_length"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
    if not self.predictor_ranks or min(self.predictor_ranks) <= 0:
      raise ConfigError(f"--predictor_rank must list positive integers, got {self.predictor_ranks}")
    if not self.candidates or min(self.candidates) <= 0:
      raise ConfigError(f"--candidates must list positive integers, got {self.candidates}")
    if self.predicted and min(self.candidates) < max(self.ks):
      raise ConfigError(f"--candidates must be at least k ({max(self.ks)}), got {self.candidates}")
    if self.vecmat_gib < 0:
      raise ConfigError(f"--vecmat_gib must be at least 0, got {self.vecmat_gib}")
    for name in ("num_layers", "encoder_layers"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")


# ---------------------------------------------------------------------------
# Bytes of weights read per decoded token.
# ---------------------------------------------------------------------------


def weight_bytes_per_token(cfg: network.T5Config, k: Optional[int], itemsize: int, rank: Optional[int] = None,
                           candidates: Optional[int] = None) -> Dict[str, int]:
  """Weight bytes one decoder step reads, by part (see module docstring).

  ``k=None``: the dense MLP; ``k``: the sparse MLP (``wi`` in full, k rows of ``wo``); ``k``, ``rank`` and
  ``candidates``: the predicted MLP (``predictors.weight_values_per_step``).
  """
  d, hd, ff, n_wi = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, len(cfg.mlp_activations)
  layers_ = cfg.num_decoder_layers
  wo_rows = ff if k is None or k >= ff else k
  if candidates is not None:
    mlp = sum(predictors.weight_values_per_step(d, ff, n_wi, k, rank, candidates).values())
  else:
    mlp = n_wi * d * ff + wo_rows * d
  per_layer = {
      "self_attention": 4 * d * hd,
      "cross_attention": 2 * d * hd,  # q and o; the keys and values are cached once per input
      "mlp": mlp,
      "layer_norms": 3 * d,
  }
  parts = {name: layers_ * n * itemsize for name, n in per_layer.items()}
  parts["embedding_row_and_final_norm"] = 2 * d * itemsize
  parts["logits"] = cfg.vocab_size * d * itemsize
  parts["per_layer"] = sum(per_layer.values()) * itemsize
  parts["total"] = sum(v for name, v in parts.items() if name != "per_layer")
  return parts


# ---------------------------------------------------------------------------
# Model set-up and timing.
# ---------------------------------------------------------------------------


def random_params(module: nn.Module, dtype, seed: int = 0) -> Any:
  """Random parameters of ``module``'s shapes, created directly in ``dtype`` (one leaf at a time).

  Drawn with NumPy and converted on the host, so nothing is compiled and the
  peak memory is the model plus one float32 leaf.
  """
  tokens = jnp.ones((1, 1), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))["params"])
  rng = np.random.default_rng(seed)
  np_dtype = jnp.dtype(dtype)  # ml_dtypes' bfloat16 for 'bfloat16'

  def init(path, s):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      return jnp.ones(s.shape, dtype)
    # Kernels N(0, 1/fan_in) keep activations O(1), like T5's initialisation; the rest N(0, 1).
    x = rng.standard_normal(s.shape, dtype=np.float32)
    if name == "kernel":
      x *= np.float32(1.0 / np.sqrt(s.shape[0]))
    return jax.device_put(x.astype(np_dtype))

  return jax.tree_util.tree_map_with_path(init, shapes)


def make_decoder(module: nn.Module, steps: int):
  """Jitted ``(params, cache, cross_kv, enc_tokens, predictors) -> tokens [1, steps]``: greedy, no EOS stop.

  ``cross_kv`` and ``cache`` come from ``t5.decoding.encode_for_decoding`` (once per input, not timed); ``params``
  and ``predictors`` are as ``predictors.prepare`` returns them, or the parameters and ``None``.
  """

  @jax.jit
  def run(params, cache, cross_kv, enc_tokens, preds, transposed=None):
    step = t5_decoding.make_tokens_to_logits(module, params, None, enc_tokens, steps, cross_kv=cross_kv,
                                             predictors=preds, transposed=transposed)
    tokens, _ = decoding.greedy_decode(step, cache, enc_tokens.shape[0], steps, eos_id=None)
    return tokens

  return run


def vecmat_runs(gib: float, steps: int) -> Dict[str, Tuple[Any, int]]:
  """The machine's streaming rate: ``name -> (call, bytes per step)`` for ``x @ W`` and ``W @ y`` over one float32
  matrix of ``gib`` GiB, ``steps`` products per call (each feeds the next, so none is skipped)."""
  n = int(round((gib * 2**30 / 4) ** 0.5))
  w = jax.device_put(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) / np.float32(np.sqrt(n)))
  v = jnp.full((n,), 1.0 / n, jnp.float32)
  x_w = jax.jit(lambda w, v: jax.lax.fori_loop(0, steps, lambda i, u: jnp.tanh(u @ w), v))
  w_y = jax.jit(lambda w, v: jax.lax.fori_loop(0, steps, lambda i, u: jnp.tanh(w @ u), v))
  return {"vecmat/x@W": (functools.partial(x_w, w, v), n * n * 4),
          "vecmat/W@y": (functools.partial(w_y, w, v), n * n * 4)}


def step_kernels_run(transposed: Any, steps: int) -> Tuple[Any, int]:
  """``(call, bytes per step)``: the vector products of a dense decoder step alone, over its own ``[out, in]``
  kernels in the step's order (each layer's attention, then its MLP, then the logits), nothing else in between.

  The rate of what the step cannot do without; dense decoding's share of it is what the rest of the step costs.
  """
  def order(path_leaf):
    path = [getattr(p, "key", "") for p in path_leaf[0]]
    layer = next((int(p.split("_")[1]) for p in path if p.startswith("layers_")), 10**6)
    return layer, path

  kernels = [leaf for _, leaf in sorted(jax.tree_util.tree_flatten_with_path(transposed)[0], key=order)]

  def chain(ks, v):
    for w in ks:
      u = jnp.tanh(jnp.dot(w, v[: w.shape[1]]))
      v = jnp.concatenate([u, v[u.shape[0]:]]) if u.shape[0] < v.shape[0] else u[: v.shape[0]]
    return v

  width = max(w.shape[1] for w in kernels)
  run = jax.jit(lambda ks, v: jax.lax.fori_loop(0, steps, lambda i, u: chain(ks, u), v))
  v0 = jnp.full((width,), 1.0 / width, kernels[0].dtype)
  return functools.partial(run, kernels, v0), sum(w.size * w.dtype.itemsize for w in kernels)


def _with_wo(params: Any, prepared: Any, transposed: Any) -> Tuple[Any, Any]:
  """``transpose_for_decoding(params, keep_wo=True)`` from its ``keep_wo=False`` result, sharing its arrays."""
  decoder, kept = dict(prepared["decoder"]), dict(transposed["decoder"])
  for name, layer in transposed["decoder"].items():
    if "mlp" in layer and "wo" in layer["mlp"]:
      decoder[name] = {**decoder[name], "mlp": {**decoder[name]["mlp"], "wo": params["decoder"][name]["mlp"]["wo"]}}
      kept[name] = {**layer, "mlp": {k: v for k, v in layer["mlp"].items() if k != "wo"}}
  return {**prepared, "decoder": decoder}, {"decoder": kept}


def bench_size(version: str, size: str, dtype_name: str, ks: List[int], methods: List[str],
               settings: "Settings") -> List[Dict]:
  """All rows of one (size, dtype): dense, and sparse (and dense Top-k) for each method and k."""
  published = sizes.published_config(version, size)
  layers_ = settings.num_layers or published.num_decoder_layers
  enc_layers = settings.encoder_layers or min(layers_, published.num_encoder_layers)
  base = dataclasses.replace(published, dtype=jnp.dtype(dtype_name), dropout_rate=0.0, top_k=None,
                             num_encoder_layers=enc_layers, num_decoder_layers=layers_)
  truncated = layers_ != published.num_decoder_layers
  itemsize = jnp.dtype(dtype_name).itemsize
  print(f"\n== T5 v{version} {size} {dtype_name}: d={base.emb_dim} heads={base.num_heads}x{base.head_dim} "
        f"d_ff={base.mlp_dim} vocab={base.vocab_size} encoder layers {enc_layers}, decoder layers {layers_}"
        + (f" of {published.num_decoder_layers} (--num_layers: figures are for this truncated model)"
           if truncated else ""), flush=True)
  t0 = time.perf_counter()
  params = random_params(network.Transformer(base), dtype_name, seed=settings.seed)
  jax.block_until_ready(params)
  print(f"   random weights in {time.perf_counter() - t0:.1f}s", flush=True)
  enc_tokens = jax.random.randint(jax.random.PRNGKey(settings.seed + 1), (1, settings.input_length), 2, base.vocab_size)

  variants = {"dense": base}
  if settings.in_out:
    variants["dense@in_out"] = base
  for method in methods:
    for k in ks:
      if k >= base.mlp_dim:
        print(f"   k={k} >= d_ff={base.mlp_dim}: Top-k keeps every unit, skipped")
        continue
      topk_cfg = dataclasses.replace(base, top_k=k, top_k_method=method)
      variants[f"sparse/{method}/{k}"] = dataclasses.replace(topk_cfg, sparse_decode=True)
      variants[f"dense_topk/{method}/{k}"] = dataclasses.replace(topk_cfg, sparse_decode=False)
      if settings.predicted:
        for r in settings.predictor_ranks:
          for c in settings.candidates:
            variants[f"predicted/{method}/{k}/r{r}/c{c}"] = dataclasses.replace(
                topk_cfg, sparse_decode=True, decode_candidates=c)
  if settings.xla_gather:  # the same steps, rows gathered by XLA (kind@xla)
    for name in [n for n in variants if n.startswith(("sparse/", "predicted/"))]:
      kind, rest = name.split("/", 1)
      variants[f"{kind}@xla/{rest}"] = dataclasses.replace(variants[name], decode_row_kernels=False)

  # The step's kernels laid out [out, in] once, shared by the variants (Top-k ones keep wo's rows).
  dense_layout = jax.block_until_ready(t5_decoding.transpose_for_decoding(params, keep_wo=False))
  topk_layout = _with_wo(params, *dense_layout)
  prepared = {}  # r -> (params with wi as rows in the predictors, predictors): the other leaves are params' own
  if settings.predicted:
    for r in settings.predictor_ranks:
      # The predicted step reads wi from the predictors' rows, and the rest as the other Top-k variants do.
      _, preds = predictors.prepare(
          params, predictors.random_predictors(params, r, seed=settings.seed, dtype=jnp.dtype(dtype_name)))
      prepared[r] = jax.block_until_ready((topk_layout[0], preds, topk_layout[1]))

  runs, tokens = {}, {}
  encode = jax.jit(lambda p, e, m: t5_decoding.encode_for_decoding(m, p, e, settings.steps), static_argnums=2)
  for name, cfg in variants.items():
    module = network.Transformer(cfg)
    cross_kv, cache = encode(params, enc_tokens, module)
    decoder = make_decoder(module, settings.steps)
    if name.startswith("predicted"):
      step_params, preds, transposed = prepared[int(name.split("/")[3][1:])]
    elif name == "dense@in_out":
      step_params, preds, transposed = params, None, None
    else:
      step_params, transposed = dense_layout if name == "dense" else topk_layout
      preds = None
    call = functools.partial(decoder, step_params, cache, cross_kv, enc_tokens, preds, transposed)
    t0 = time.perf_counter()
    tokens[name] = np.asarray(jax.block_until_ready(call()))  # compiles, warms up
    print(f"   compiled {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    if name.startswith("dense_topk") and not settings.dense_topk:
      continue  # run once to check the sparse tokens, not timed
    runs[name] = call

  vecmat = vecmat_runs(settings.vecmat_gib, settings.steps) if settings.vecmat_gib > 0 else {}
  if settings.vecmat_gib > 0:
    vecmat["vecmat/step_kernels"] = step_kernels_run(dense_layout[1], settings.steps)
  for name, (call, _) in vecmat.items():
    jax.block_until_ready(call())
    runs[name] = call
  times = {name: [] for name in runs}
  for _ in range(settings.reps):
    for name, call in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append((time.perf_counter() - t0) / settings.steps)
  rates = {name: nbytes / statistics.median(times.pop(name)) / 1e9 for name, (_, nbytes) in vecmat.items()}
  for name in vecmat:
    del runs[name]

  shared = dict(size=size, version=version, dtype=dtype_name, num_decoder_layers=layers_,
                published_decoder_layers=published.num_decoder_layers, num_encoder_layers=enc_layers,
                truncated=truncated, load_average_after_timing=machine.load_average())

  def timing(name, nbytes):
    s = statistics.median(times[name])
    return dict(s_per_token=s, min_s_per_token=min(times[name]), tokens_per_s=1.0 / s, s_per_layer=s / layers_,
                weight_bytes_per_token=nbytes["total"], weight_gb_per_s=nbytes["total"] / s / 1e9,
                weight_bytes=nbytes, all_s_per_token=times[name])

  dense_bytes = weight_bytes_per_token(base, None, itemsize)
  dense = dict(shared, variant="dense", method=None, k=None, **timing("dense", dense_bytes))
  if rates:
    # The machine's rate, measured between the variants: the share of it that dense decoding streams.
    dense.update(vecmat_gb_per_s=rates, vecmat_gib=settings.vecmat_gib,
                 share_of_vecmat_rate={name: dense["weight_gb_per_s"] / rate for name, rate in rates.items()})
  rows = [dense]
  if rates:
    print("   machine rate (float32 vector-matrix, interleaved): "
          + ", ".join(f"{name.split('/')[1]} {rate:.1f} GB/s (dense at {dense['weight_gb_per_s'] / rate:.0%})"
                      for name, rate in rates.items())
          + " (step_kernels: the dense step's own [out, in] kernels, by vector products alone)")
  print(f"   {'variant':30s} {'ms/token':>9s} {'(best)':>8s} {'tok/s':>6s} {'GB/s':>5s} {'speedup':>7s} "
        f"{'(paired)':>8s} {'(best)':>7s} {'bound':>6s} {'sp/bound':>8s} {'saving/possible':>15s}  "
        f"tokens==dense_topk")
  print(f"   {'dense':30s} {dense['s_per_token'] * 1e3:9.2f} {dense['min_s_per_token'] * 1e3:8.2f} "
        f"{dense['tokens_per_s']:6.2f} {dense['weight_gb_per_s']:5.2f}")
  for name in runs:
    if name == "dense":
      continue
    if name == "dense@in_out":
      row = dict(shared, name=name, variant="dense_in_out", method=None, k=None,
                 **timing(name, dense_bytes))
      row.update(speedup=dense["s_per_token"] / row["s_per_token"],
                 paired_speedup=statistics.median(d / x for d, x in zip(times["dense"], times[name])),
                 tokens_match_dense=bool(np.array_equal(tokens[name], tokens["dense"])))
      rows.append(row)
      print(f"   {name:30s} {row['s_per_token'] * 1e3:9.2f} {row['min_s_per_token'] * 1e3:8.2f} "
            f"{row['tokens_per_s']:6.2f} {row['weight_gb_per_s']:5.2f} {row['speedup']:7.3f} "
            f"{row['paired_speedup']:8.3f}   (T5X's [in, out] kernels; tokens == dense: {row['tokens_match_dense']})",
            flush=True)
      continue
    kind, method, k, *rc = name.split("/")
    kind, _, gather = kind.partition("@")
    k = int(k)
    r, c = (int(rc[0][1:]), int(rc[1][1:])) if rc else (None, None)
    nbytes = weight_bytes_per_token(variants[name], k if kind != "dense_topk" else None, itemsize, r, c)
    row = dict(shared, name=name, variant=kind, method=method, k=k, **timing(name, nbytes))
    if kind != "dense_topk":
      row.update(row_kernels=gather != "xla" and row_kernels.available() and dtype_name == "float32")
    if kind == "predicted":
      row.update(predictor_rank=r, candidates=c)
    bound = dense_bytes["total"] / row["weight_bytes_per_token"]
    speedup = dense["s_per_token"] / row["s_per_token"]
    # The share of the time saving that reading fewer bytes allows which was realised (1: all of it).
    possible = 1.0 - 1.0 / bound
    realised = (1.0 - 1.0 / speedup) / possible if possible > 0 else float("nan")
    row.update(speedup=speedup, bound=bound, speedup_over_bound=speedup / bound, saving_realised=realised,
               paired_speedup=statistics.median(d / x for d, x in zip(times["dense"], times[name])),
               best_speedup=dense["min_s_per_token"] / row["min_s_per_token"],
               tokens_match_dense_topk=bool(np.array_equal(tokens[name], tokens[f"dense_topk/{method}/{k}"])))
    rows.append(row)
    print(f"   {name:30s} {row['s_per_token'] * 1e3:9.2f} {row['min_s_per_token'] * 1e3:8.2f} "
          f"{row['tokens_per_s']:6.2f} {row['weight_gb_per_s']:5.2f} {speedup:7.3f} {row['paired_speedup']:8.3f} "
          f"{row['best_speedup']:7.3f} {bound:6.3f} {speedup / bound:8.3f} {realised:15.3f}  "
          f"{row['tokens_match_dense_topk']}", flush=True)
  if truncated:
    print(f"   per layer (ms/token / {layers_} layers): "
          + ", ".join(f"{r.get('name', r['variant'])} {r['s_per_layer'] * 1e3:.2f}" for r in rows))
  del params, prepared, runs
  return rows


def run(settings: Settings, command: str = "") -> Dict[str, Any]:
  """Every size and dtype of ``settings``; returns the JSON-ready result."""
  info = dict(machine.machine_info(), row_kernels=row_kernels.describe())
  print(f"rows of wi / wo read by: {info['row_kernels']}")
  print(f"backend {info['platform']} ({info['device_kind']}), cpu {info['cpu']}, {info['cores']} cores, "
        f"jax {info['jax']}, load average {info['load_average_at_start']}")
  rows = []
  for size in settings.sizes:
    for dtype in settings.dtypes:
      rows.extend(bench_size(settings.version, size, dtype, list(settings.ks), list(settings.methods), settings))
  return {"command": command, "machine": info, "settings": dataclasses.asdict(settings), "counted": COUNTED,
          "results": rows}
