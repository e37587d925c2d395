#!/usr/bin/env python
"""Formulation study: how to compute the sparse decoder MLP so XLA compiles it well.

At batch 1 an MLP step is bound by reading its weights. The dense MLP reads
``wi`` and ``wo`` in full; the Top-k sparse MLP reads ``wi`` in full and only the
``k`` selected rows of ``wo``. This study times, on whatever backend JAX picks,
the dense MLP and several ways of writing the sparse product, with jit, warm-up,
``block_until_ready`` and the median over many interleaved repetitions.

  python experiments/mlp_formulations/run.py --shapes=large,3B,11B --dtype=float32,bfloat16 \
      --k=128 --reps=30 --json=experiments/mlp_formulations/mlp_formulations.json

The results are in ``docs/results/mlp_formulations.md``, the choice they led to in ``docs/design/decoding_paths.md``.

Every variant gets the same ``x``, ``wi`` and ``wo`` (``wo`` is ``[d_ff, d]`` as in
T5X, so a selected row is contiguous; the ``wo_t`` variants use a ``[d, d_ff]``
copy to measure the other layout). The JSON records the machine with its load average at the
start, and the command's arguments.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers.benchmarks import machine
from topk_transformers.commands import common
from topk_transformers.gin_utils import ConfigError

SHAPES = {"large": (1024, 4096), "3B": (1024, 16384), "11B": (1024, 65536)}


def _select(h, k):
  vals, idx = jax.lax.top_k(h, k)
  return vals, idx


def variants(k, d_ff):
  """name -> f(x, wi, wo, wo_t) for x [1, d], wi [d, d_ff], wo [d_ff, d], wo_t [d, d_ff]."""
  relu = jax.nn.relu

  def dense(x, wi, wo, wo_t):
    return relu(x @ wi) @ wo

  def dense_wo_t(x, wi, wo, wo_t):
    # The dense MLP with wo stored [d, d_ff]: the wo matmul contracts the contiguous axis.
    return jnp.einsum("bf,df->bd", relu(x @ wi), wo_t)

  def dense_topk(x, wi, wo, wo_t):
    # The dense Top-k path of MlpBlock: scatter the k values back into [d_ff], full matmul.
    h = relu(x @ wi)
    vals, idx = _select(h, k)
    z = jnp.zeros_like(h).at[jnp.arange(h.shape[0])[:, None], idx].set(vals)
    return z @ wo

  def wi_only(x, wi, wo, wo_t):
    # Lower bound of any sparse variant: the wi matmul plus the selection.
    h = relu(x @ wi)
    vals, idx = _select(h, k)
    return vals, idx

  def take(mode=None, sort=False, sorted_flag=False):
    def f(x, wi, wo, wo_t):
      h = relu(x @ wi)
      vals, idx = _select(h, k)
      if sort:
        idx, vals = jax.lax.sort_key_val(idx, vals, dimension=-1)
      # jnp.take has no 'promise_in_bounds'; the indexing API (.at[].get) does.
      rows = wo.at[idx].get(mode=mode, indices_are_sorted=sorted_flag)  # [b, k, d]
      return jnp.einsum("bk,bkd->bd", vals, rows)
    return f

  def take_flat(x, wi, wo, wo_t):
    # batch 1 only: one [k] index vector, a [k, d] gather and a [1, k] @ [k, d] matmul.
    h = relu(x @ wi)
    vals, idx = _select(h, k)
    rows = wo.at[idx[0]].get(mode="promise_in_bounds")
    return vals @ rows

  def take_wo_t(x, wi, wo, wo_t):
    h = relu(x @ wi)
    vals, idx = _select(h, k)
    cols = wo_t.at[:, idx].get(mode="promise_in_bounds")  # [d, b, k]
    return jnp.einsum("bk,dbk->bd", vals, cols)

  def onehot(x, wi, wo, wo_t):
    h = relu(x @ wi)
    vals, idx = _select(h, k)
    oh = jax.nn.one_hot(idx, d_ff, dtype=vals.dtype)  # [b, k, d_ff]
    return jnp.einsum("bk,bkf->bf", vals, oh) @ wo

  def fori_dynamic_slice(x, wi, wo, wo_t):
    h = relu(x @ wi)
    vals, idx = _select(h, k)
    b = x.shape[0]

    def body(j, acc):
      rows = jax.vmap(lambda i: jax.lax.dynamic_slice_in_dim(wo, i, 1, axis=0)[0])(idx[:, j])  # [b, d]
      return acc + jax.lax.dynamic_slice_in_dim(vals, j, 1, axis=1).astype(jnp.float32) * rows.astype(jnp.float32)

    acc = jax.lax.fori_loop(0, k, body, jnp.zeros((b, wo.shape[1]), jnp.float32))
    return acc.astype(x.dtype)

  def vmap_dynamic_slice(x, wi, wo, wo_t):
    h = relu(x @ wi)
    vals, idx = _select(h, k)
    rows = jax.vmap(jax.vmap(lambda i: jax.lax.dynamic_slice_in_dim(wo, i, 1, axis=0)[0]))(idx)
    return jnp.einsum("bk,bkd->bd", vals, rows)

  def scatter_add_free(x, wi, wo, wo_t):
    # Weighted sum without a matmul: multiply the gathered rows and reduce.
    h = relu(x @ wi)
    vals, idx = _select(h, k)
    rows = wo.at[idx].get(mode="promise_in_bounds")
    return jnp.sum(vals[..., None] * rows, axis=-2)

  return {
      "dense": dense,
      "dense_wo_transposed": dense_wo_t,
      "dense_topk_scatter": dense_topk,
      "wi_and_select_only": wi_only,
      "take_default": take(),
      "take_clip": take("clip"),
      "take_fill": take("fill"),
      "take_promise": take("promise_in_bounds"),
      "take_sorted_idx": take("promise_in_bounds", sort=True, sorted_flag=True),
      "take_flat_b1": take_flat,
      "take_wo_transposed": take_wo_t,
      "onehot_matmul": onehot,
      "fori_dynamic_slice": fori_dynamic_slice,
      "vmap_dynamic_slice": vmap_dynamic_slice,
      "mul_reduce": scatter_add_free,
  }


def _names(flag: str, value: str, choices: Sequence[str]) -> List[str]:
  names = [n.strip() for n in value.split(",") if n.strip()]
  if not names:
    raise ConfigError(f"--{flag} names nothing; choose from {', '.join(choices)}")
  unknown = [n for n in names if n not in choices]
  if unknown:
    raise ConfigError(f"--{flag}: unknown {unknown[0]!r}; choose from {', '.join(choices)}")
  return names


def parse_args(argv: Sequence[str]):
  p = common.ArgumentParser(prog="run.py", description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="large,3B", help=f"comma list of {', '.join(SHAPES)}")
  p.add_argument("--dtype", default="float32,bfloat16", help="comma list of float32, bfloat16")
  p.add_argument("--k", type=int, default=128)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--reps", type=int, default=50)
  p.add_argument("--variants", default="", help="comma list; default all")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  args.shapes = _names("shapes", args.shapes, list(SHAPES))
  args.dtype = _names("dtype", args.dtype, ["float32", "bfloat16"])
  for flag in ("k", "batch", "reps"):
    if getattr(args, flag) <= 0:
      raise ConfigError(f"--{flag} must be positive, got {getattr(args, flag)}")
  smallest = min(SHAPES[s][1] for s in args.shapes)
  if args.k > smallest:
    raise ConfigError(f"--k={args.k} exceeds d_ff={smallest} of the smallest shape")
  names = list(variants(args.k, smallest))
  args.variants = _names("variants", args.variants, names) if args.variants else names
  if "dense" not in args.variants:
    args.variants = ["dense"] + args.variants  # the baseline of every speedup
  return args


@common.command(tensorflow=False)
def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  host = machine.machine_info()  # the load average before the timings
  results = []
  for shape in args.shapes:
    d, d_ff = SHAPES[shape]
    for dtype_name in args.dtype:
      dtype = jnp.dtype(dtype_name)
      key = jax.random.PRNGKey(0)
      k1, k2, k3 = jax.random.split(key, 3)
      x = jax.random.normal(k1, (args.batch, d), dtype)
      wi = (jax.random.normal(k2, (d, d_ff), dtype) * d ** -0.5).astype(dtype)
      wo = (jax.random.normal(k3, (d_ff, d), dtype) * d_ff ** -0.5).astype(dtype)
      wo_t = jnp.asarray(wo.T)
      fns = variants(args.k, d_ff)
      fns = {n: fns[n] for n in args.variants}
      jitted = {n: jax.jit(f) for n, f in fns.items()}
      ref = np.asarray(jitted["dense_topk_scatter"](x, wi, wo, wo_t), np.float32) if "dense_topk_scatter" in jitted else None
      for n, f in jitted.items():  # compile + warm-up; check each sparse variant against the dense Top-k
        out = jax.block_until_ready(f(x, wi, wo, wo_t))
        if ref is not None and n not in ("dense", "dense_wo_transposed", "wi_and_select_only"):
          err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
          tol = 1e-3 if dtype == jnp.float32 else 5e-2
          if err > tol * max(1.0, float(np.max(np.abs(ref)))):
            print(f"WARNING {n} differs from dense Top-k by {err}")
      times = {n: [] for n in jitted}
      for _ in range(args.reps):  # interleave variants so load from other processes hits all alike
        for n, f in jitted.items():
          t0 = time.perf_counter()
          jax.block_until_ready(f(x, wi, wo, wo_t))
          times[n].append(time.perf_counter() - t0)
      med = {n: statistics.median(t) for n, t in times.items()}
      nbytes = dtype.itemsize
      dense_bytes = 2 * d * d_ff * nbytes
      sparse_bytes = (d * d_ff + args.k * d) * nbytes
      print(f"\n{shape} d={d} d_ff={d_ff} {dtype_name} batch={args.batch} k={args.k} "
            f"bound dense/sparse bytes = {dense_bytes / sparse_bytes:.3f}x")
      for n in jitted:
        print(f"  {n:22s} {med[n] * 1e6:10.1f} us   dense/this = {med['dense'] / med[n]:6.3f}x")
        results.append(dict(shape=shape, d=d, d_ff=d_ff, dtype=dtype_name, batch=args.batch, k=args.k,
                            variant=n, median_s=med[n], speedup_vs_dense=med["dense"] / med[n],
                            bound=dense_bytes / sparse_bytes))
  if args.json:
    common.write_json(args.json, dict(platform=host["platform"], machine=host, command=" ".join(argv),
                                      results=results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
