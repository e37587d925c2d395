#!/usr/bin/env python
"""Unbatched greedy decoding of T5: dense MLPs vs Top-k sparse MLPs on the same weights.

  python scripts/decode_benchmark.py --sizes=large,3B --version=1.0 --k=128 --method=exact \
      --dtype=float32 --steps=16 --reps=7 --json=benchmarks/decode.json --plot=benchmarks/decode.png

For each size (the published shapes, read from ``configs/t5/t5_1_{0,1}/*.gin``;
v1.1's 3B and 11B are its XL and XXL), each dtype, each selection method and
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

The memory-traffic bound is the ratio of the weight bytes one decoder step
reads, dense over sparse. Per decoder layer: self-attention ``q, k, v, o``;
cross-attention ``q, o`` (the network, like T5X, projects the encoder output to
keys and values inside every step, but that projection depends only on loop
invariants and XLA hoists it out of the decoding ``while`` loop, as the
compiled HLO shows, so a step does not read those two kernels); the MLP (``wi``
branches in full, then ``wo`` in full or ``k`` of its rows); three layer-norm
scales. Once per step: the token's embedding row, the final norm and the logits
matrix (``vocab x d``, tied or not). Activations, the KV cache and the projected
encoder keys and values are not counted (``2 * (steps + input_length) * heads *
head_dim`` values per layer, under 1% of the bytes here).

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

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from topk_transformers import decoding  # noqa: E402
from topk_transformers import gin_utils  # noqa: E402
from topk_transformers.t5 import network  # noqa: E402

GIN_FILES = {
    "1.0": {s: f"configs/t5/t5_1_0/{s}.gin" for s in ("tiny", "small", "base", "large", "3B", "11B")},
    "1.1": {"tiny": "configs/t5/t5_1_1/tiny.gin", "small": "configs/t5/t5_1_1/small.gin",
            "base": "configs/t5/t5_1_1/base.gin", "large": "configs/t5/t5_1_1/large.gin",
            "3B": "configs/t5/t5_1_1/xl.gin", "11B": "configs/t5/t5_1_1/xxl.gin"},
}


def load_config(version: str, size: str) -> network.T5Config:
  """The published ``T5Config`` of a size, from its gin file."""
  if version not in GIN_FILES:
    raise ValueError(f"--version must be one of {sorted(GIN_FILES)}, got {version!r}")
  if size not in GIN_FILES[version]:
    raise ValueError(f"unknown size {size!r}; choose from {', '.join(GIN_FILES[version])}")
  gin_utils.configure([GIN_FILES[version][size]])
  return gin_utils.get_macro("MODEL").module.config


# ---------------------------------------------------------------------------
# Bytes of weights read per decoded token.
# ---------------------------------------------------------------------------


def weight_bytes_per_token(cfg: network.T5Config, k: Optional[int], itemsize: int) -> Dict[str, int]:
  """Weight bytes one decoder step reads, by part; ``k=None`` for the dense MLP (see module docstring)."""
  d, hd, ff, n_wi = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, len(cfg.mlp_activations)
  layers_ = cfg.num_decoder_layers
  wo_rows = ff if k is None or k >= ff else k
  per_layer = {
      "self_attention": 4 * d * hd,
      "cross_attention": 2 * d * hd,  # q and o; k, v of the encoder output are hoisted out of the loop
      "mlp": n_wi * d * ff + wo_rows * d,
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
  """Jitted ``(params, cache, encoded, enc_tokens) -> tokens [1, steps]``: greedy, no EOS stop."""

  @jax.jit
  def run(params, cache, encoded, enc_tokens):
    step = decoding.make_tokens_to_logits(module, params, encoded, enc_tokens, steps)
    tokens, _ = decoding.greedy_decode(step, cache, enc_tokens.shape[0], steps, eos_id=None)
    return tokens

  return run


def machine_info() -> Dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
          "cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
          "date": datetime.datetime.now().isoformat(timespec="seconds")}
  if hasattr(os, "getloadavg"):
    info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
  return info


def bench_size(version: str, size: str, dtype_name: str, ks: List[int], methods: List[str], args) -> List[Dict]:
  """All rows of one (size, dtype): dense, and sparse (and dense Top-k) for each method and k."""
  published = load_config(version, size)
  layers_ = args.num_layers or published.num_decoder_layers
  enc_layers = args.encoder_layers or min(layers_, published.num_encoder_layers)
  base = dataclasses.replace(published, dtype=jnp.dtype(dtype_name), dropout_rate=0.0, top_k=None,
                             num_encoder_layers=enc_layers, num_decoder_layers=layers_)
  truncated = layers_ != published.num_decoder_layers
  itemsize = jnp.dtype(dtype_name).itemsize
  print(f"\n== T5 v{version} {size} {dtype_name}: d={base.emb_dim} heads={base.num_heads}x{base.head_dim} "
        f"d_ff={base.mlp_dim} vocab={base.vocab_size} encoder layers {enc_layers}, decoder layers {layers_}"
        + (f" of {published.num_decoder_layers} (--num_layers: figures are for this truncated model)"
           if truncated else ""), flush=True)
  t0 = time.perf_counter()
  params = random_params(network.Transformer(base), dtype_name, seed=args.seed)
  jax.block_until_ready(params)
  print(f"   random weights in {time.perf_counter() - t0:.1f}s", flush=True)
  enc_tokens = jax.random.randint(jax.random.PRNGKey(args.seed + 1), (1, args.input_length), 2, base.vocab_size)

  variants = {"dense": base}
  for method in methods:
    for k in ks:
      if k >= base.mlp_dim:
        print(f"   k={k} >= d_ff={base.mlp_dim}: Top-k keeps every unit, skipped")
        continue
      topk_cfg = dataclasses.replace(base, top_k=k, top_k_method=method)
      variants[f"sparse/{method}/{k}"] = dataclasses.replace(topk_cfg, sparse_decode=True)
      variants[f"dense_topk/{method}/{k}"] = dataclasses.replace(topk_cfg, sparse_decode=False)

  runs, tokens = {}, {}
  for name, cfg in variants.items():
    module = network.Transformer(cfg)
    encoded = jax.jit(lambda p, e, m=module: m.apply({"params": p}, e, enable_dropout=False, method=m.encode))(
        params, enc_tokens)
    cache = decoding.init_cache(module, params, encoded, enc_tokens, args.steps)
    run = make_decoder(module, args.steps)
    call = functools.partial(run, params, cache, encoded, enc_tokens)
    t0 = time.perf_counter()
    tokens[name] = np.asarray(jax.block_until_ready(call()))  # compiles, warms up
    print(f"   compiled {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    if name.startswith("dense_topk") and not args.dense_topk:
      continue  # run once to check the sparse tokens, not timed
    runs[name] = call

  times = {name: [] for name in runs}
  for _ in range(args.reps):
    for name, call in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append((time.perf_counter() - t0) / args.steps)

  common = dict(size=size, version=version, dtype=dtype_name, num_decoder_layers=layers_,
                published_decoder_layers=published.num_decoder_layers, num_encoder_layers=enc_layers,
                truncated=truncated)

  def timing(name, nbytes):
    s = statistics.median(times[name])
    return dict(s_per_token=s, min_s_per_token=min(times[name]), tokens_per_s=1.0 / s, s_per_layer=s / layers_,
                weight_bytes_per_token=nbytes["total"], weight_gb_per_s=nbytes["total"] / s / 1e9,
                weight_bytes=nbytes, all_s_per_token=times[name])

  dense_bytes = weight_bytes_per_token(base, None, itemsize)
  dense = dict(common, variant="dense", method=None, k=None, **timing("dense", dense_bytes))
  rows = [dense]
  print(f"   {'variant':22s} {'ms/token':>9s} {'(best)':>8s} {'tok/s':>6s} {'GB/s':>5s} {'speedup':>7s} "
        f"{'(paired)':>8s} {'(best)':>7s} {'bound':>6s} {'sp/bound':>8s} {'saving/possible':>15s}  "
        f"tokens==dense_topk")
  print(f"   {'dense':22s} {dense['s_per_token'] * 1e3:9.2f} {dense['min_s_per_token'] * 1e3:8.2f} "
        f"{dense['tokens_per_s']:6.2f} {dense['weight_gb_per_s']:5.2f}")
  for name in runs:
    if name == "dense":
      continue
    kind, method, k = name.split("/")
    k = int(k)
    row = dict(common, variant=kind, method=method, k=k,
               **timing(name, weight_bytes_per_token(variants[name], k if kind == "sparse" else None, itemsize)))
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
    print(f"   {name:22s} {row['s_per_token'] * 1e3:9.2f} {row['min_s_per_token'] * 1e3:8.2f} "
          f"{row['tokens_per_s']:6.2f} {row['weight_gb_per_s']:5.2f} {speedup:7.3f} {row['paired_speedup']:8.3f} "
          f"{row['best_speedup']:7.3f} {bound:6.3f} {speedup / bound:8.3f} {realised:15.3f}  "
          f"{row['tokens_match_dense_topk']}", flush=True)
  if truncated:
    print(f"   per layer (ms/token / {layers_} layers): "
          + ", ".join(f"{r['variant']}{'/' + str(r['k']) if r['k'] else ''} {r['s_per_layer'] * 1e3:.2f}"
                      for r in rows))
  del params, runs
  return rows


def plot(rows: List[Dict], path: str) -> None:
  """Latency and speedup against k, one column per size (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  sizes = list(dict.fromkeys(r["size"] for r in rows))
  fig, axes = plt.subplots(2, len(sizes), figsize=(4.5 * len(sizes), 7), squeeze=False)
  for col, size in enumerate(sizes):
    lat, spd = axes[0][col], axes[1][col]
    for dtype in dict.fromkeys(r["dtype"] for r in rows if r["size"] == size):
      sel = [r for r in rows if r["size"] == size and r["dtype"] == dtype]
      dense = next(r for r in sel if r["variant"] == "dense")
      lat.axhline(dense["s_per_token"] * 1e3, ls="--", color="gray", lw=1)
      lat.annotate(f"dense {dtype}", (0.02, dense["s_per_token"] * 1e3), xycoords=("axes fraction", "data"),
                   fontsize=7, va="bottom")
      for kind in ("sparse", "dense_topk"):
        for method in dict.fromkeys(r["method"] for r in sel if r["variant"] == kind):
          line = sorted((r for r in sel if r["variant"] == kind and r["method"] == method), key=lambda r: r["k"])
          ks = [r["k"] for r in line]
          label = f"{kind} {method} {dtype}"
          lat.plot(ks, [r["s_per_token"] * 1e3 for r in line], "o-", label=label)
          spd.plot(ks, [r["speedup"] for r in line], "o-", label=f"measured {label}")
          if kind == "sparse" and not spd.get_legend_handles_labels()[1].count("bytes bound"):
            # The bound is a ratio of byte counts: the same for every dtype and method.
            spd.plot(ks, [r["bound"] for r in line], "k:", marker="x", label="bytes bound")
    title = f"T5 v{rows[0]['version']} {size}"
    first = next(r for r in rows if r["size"] == size)
    if first["truncated"]:
      title += f" ({first['num_decoder_layers']}/{first['published_decoder_layers']} layers)"
    lat.set_title(title)
    lat.set_ylabel("ms per token")
    spd.set_ylabel("speedup over dense")
    spd.set_xlabel("k")
    for ax in (lat, spd):
      ax.set_xscale("log", base=2)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="large", help="comma list of small,base,large,3B,11B (and tiny)")
  p.add_argument("--version", default="1.0", choices=sorted(GIN_FILES))
  p.add_argument("--k", default="128", help="comma list of k")
  p.add_argument("--method", default="exact", help="comma list of exact,approx")
  p.add_argument("--dtype", default="float32", help="comma list of float32,bfloat16")
  p.add_argument("--num_layers", type=int, default=None, help="encoder and decoder layers (default: published)")
  p.add_argument("--encoder_layers", type=int, default=None,
                 help="encoder layers only (default: as the decoder); the encoder runs once, untimed")
  p.add_argument("--steps", type=int, default=16, help="tokens decoded per timed run")
  p.add_argument("--reps", type=int, default=5, help="timed runs per variant (median reported)")
  p.add_argument("--input_length", type=int, default=32, help="encoder input tokens")
  p.add_argument("--dense_topk", action="store_true", help="also time the Top-k model on the dense path")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write results here")
  p.add_argument("--plot", default=None, help="write a PNG of latency and speedup against k here")
  args = p.parse_args(argv)

  def int_list(flag, text):
    try:
      values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
      raise SystemExit(f"error: {flag} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) <= 0:
      raise SystemExit(f"error: {flag} must list positive integers, got {text!r}")
    return values

  args.k_list = int_list("--k", args.k)
  args.size_list = [s.strip() for s in args.sizes.split(",") if s.strip()]
  args.method_list = [m.strip() for m in args.method.split(",") if m.strip()]
  args.dtype_list = [d.strip() for d in args.dtype.split(",") if d.strip()]
  for s in args.size_list:
    if s not in GIN_FILES[args.version]:
      raise SystemExit(f"error: unknown size {s!r}; choose from {', '.join(GIN_FILES[args.version])}")
  for m in args.method_list:
    if m not in ("exact", "approx"):
      raise SystemExit(f"error: --method must list exact and/or approx, got {m!r}")
  for d in args.dtype_list:
    if d not in ("float32", "bfloat16"):
      raise SystemExit(f"error: --dtype must list float32 and/or bfloat16, got {d!r}")
  for flag in ("steps", "reps", "input_length"):
    if getattr(args, flag) <= 0:
      raise SystemExit(f"error: --{flag} must be positive, got {getattr(args, flag)}")
  for flag in ("num_layers", "encoder_layers"):
    if getattr(args, flag) is not None and getattr(args, flag) <= 0:
      raise SystemExit(f"error: --{flag} must be positive, got {getattr(args, flag)}")
  return args


def main(argv=None) -> Dict[str, Any]:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  machine = machine_info()
  print(f"backend {machine['platform']} ({machine['device_kind']}), cpu {machine['cpu']}, {machine['cores']} cores, "
        f"jax {machine['jax']}")
  rows = []
  for size in args.size_list:
    for dtype in args.dtype_list:
      rows.extend(bench_size(args.version, size, dtype, args.k_list, args.method_list, args))
  result = {"command": " ".join(["python scripts/decode_benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
            "machine": machine,
            "settings": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
            "counted": "weights read per decoder step: self-attention q,k,v,o; cross-attention q,o (the "
                       "key/value projection of the encoder output is loop-invariant and XLA hoists it out of "
                       "the decoding loop); MLP wi in full and wo in full (dense) or k rows (sparse); layer "
                       "norms; embedding row; logits matrix",
            "results": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
  if args.plot:
    plot(rows, args.plot)
    print(f"wrote {args.plot}")
  return result


if __name__ == "__main__":
  main()
