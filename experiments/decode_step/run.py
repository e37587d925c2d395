"""The microbenchmarks behind docs/results/decode_step_microbench.md: per-op figures for a T5-Large decoding step (CPU, batch 1).

Each case runs 24 "layers" of one operation inside a jitted ``fori_loop`` (8 iterations), with distinct arrays per
layer so that nothing is loop-invariant, and reports the median microseconds per layer over interleaved repetitions:

* ``attention/bkhd`` against ``attention/bhdk``: one decoding step's attention (one query, 32 keys, 16 heads x 64)
  over caches in the projected ``[batch, length, heads, head_dim]`` layout and in the caches' ``[batch, heads,
  head_dim, length]`` layout (``layers.dot_product_attention(kv_layout=...)``);
* ``sort/256``: ``jnp.sort`` of 256 int32 candidate indices (what the predicted step no longer does);
* ``top_k/4096->256`` and ``top_k/256->128``: ``lax.top_k`` at the predicted step's two selections;
* ``rows/xla`` against ``rows/kernel``: 256 gathered rows of a ``[4096, 1024]`` matrix times a vector, XLA's gather
  then einsum against ``row_kernels.gather_matvec``.

    python experiments/decode_step/run.py [--reps=11] [--json=out.json]
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers import layers
from topk_transformers import row_kernels
from topk_transformers.benchmarks import machine

L, LOOPS = 24, 8


def _time(cases, reps):
  runs = {}
  for name, (fn, args) in cases.items():
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    runs[name] = (jitted, args)
  times = {name: [] for name in runs}
  for _ in range(reps):
    for name, (jitted, args) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(jitted(*args))
      times[name].append((time.perf_counter() - t0) / LOOPS / L * 1e6)
  return {name: statistics.median(v) for name, v in times.items()}


def _loop(step):
  """``x -> x + 1e-6 * step(x, layer arrays)`` over L layers, LOOPS times."""
  def run(x, per_layer):
    def body(_, x):
      for arrays in per_layer:
        x = x + 1e-6 * step(x, *arrays)
      return x
    return jax.lax.fori_loop(0, LOOPS, body, x)
  return run


def cases(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))  # noqa: E731
  q = f32(1, 1, 16, 64)
  bkhd = [(f32(1, 32, 16, 64), f32(1, 32, 16, 64)) for _ in range(L)]
  bhdk = [tuple(layers.to_cache_layout(t) for t in kv) for kv in bkhd]
  att = lambda layout: _loop(lambda x, k, v: layers.dot_product_attention(  # noqa: E731
      x, k, v, deterministic=True, kv_layout=layout))
  scores = [(f32(1, 4096),) for _ in range(L)]
  small = [(f32(1, 256),) for _ in range(L)]
  ints = [(jnp.asarray(rng.permutation(4096)[:256][None].astype(np.int32)),) for _ in range(L)]
  rows = [(f32(4096, 1024), jnp.asarray(np.sort(rng.choice(4096, 256, replace=False))[None].astype(np.int32)))
          for _ in range(L)]
  x = f32(1, 1024)
  return {
      "attention/bkhd": (att("bkhd"), (q, bkhd)),
      "attention/bhdk": (att("bhdk"), (q, bhdk)),
      "sort/256": (_loop(lambda x, i: jnp.sort(i + (x[:, :1] > 1e9).astype(jnp.int32), axis=-1)[:, :1]),
                   (jnp.zeros((1, 1)), ints)),
      "top_k/4096->256": (_loop(lambda x, s: jax.lax.top_k(s + x, 256)[0][:, :1]), (jnp.zeros((1, 1)), scores)),
      "top_k/256->128": (_loop(lambda x, s: jax.lax.top_k(s + x, 128)[0][:, :1]), (jnp.zeros((1, 1)), small)),
      "rows/xla": (_loop(lambda x, w, i: row_kernels.gather_matvec(x, w, i, native=False).sum(-1, keepdims=True)), (x, rows)),
      "rows/kernel": (_loop(lambda x, w, i: row_kernels.gather_matvec(x, w, i).sum(-1, keepdims=True)), (x, rows)),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=11)
  p.add_argument("--json", default=None)
  args = p.parse_args()
  load = machine.load_average()
  result = _time(cases(), args.reps)
  for name, us in result.items():
    print(f"{name:18s} {us:8.1f} us per layer")
  out = {"us_per_layer": result, "row_kernels": row_kernels.describe(), "load_average_at_start": load,
         "load_average_at_end": machine.load_average(), "reps": args.reps}
  print(f"load average {load} -> {out['load_average_at_end']}; rows: {out['row_kernels']}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
