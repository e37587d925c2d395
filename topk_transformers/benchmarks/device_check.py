"""The device check: one prepared run on a GPU or TPU that records what this project needs to know about it.

  benchmarks/device_check.sh OUT_DIR            # the device run, at most ~8 minutes on one H100
  benchmarks/device_check.sh OUT_DIR --smoke    # the same stages at tiny shapes, on any machine (~90 s CPU time)
  python -m topk_transformers.benchmarks.device_check OUT_DIR [--smoke]   # the same, from an install

Stages, each a subprocess with its own time limit (so one that hangs or runs out of memory costs only itself), each
writing its JSON under ``OUT_DIR`` as it finishes:

1. ``kernels.json``: the Pallas row kernels (``pallas_rows``) compiled for the device against the plain-JAX
   products, at T5 v1.0 and v1.1 Large shapes, float32 and bfloat16, one row and four beams: the largest error and
   both timings. Then the choices autotune makes there: the decoding path (dense / sparse) for one token and for four
   beams, and the row implementations. (On the CPU, smoke: the kernels in interpret mode, tiny shapes.)
2. ``train.json``: ``topk-bench-train`` at T5 v1.0 Base and Large (2 layers a stack), bfloat16, dense against
   every selection method (``auto`` included, as measured).
3. ``decode.json``: ``topk-bench-decode`` at T5 v1.0 Large with its 24 decoder layers, dense, sparse and predicted,
   float32 and bfloat16.
4. ``device_check.json``: the summary: the machine and its peak figures (:data:`PEAKS`), each stage's status, the
   kernel checks, the training steps' model FLOPs utilisation (MFU: the dense model's FLOPs, :func:`t5_train_flops`,
   over the step time, over the peak), the decoding weight bytes/s over the peak memory bandwidth, and the autotune
   cache that the run produced (``autotune_cache.json``, measured with ``TOPK_AUTOTUNE=1``).

Needs jax and flax (and optax) only: no TensorFlow, seqio or gin, which a bare GPU image lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

# Peak dense bfloat16 FLOP/s and memory bandwidth (bytes/s), by a substring of jax's device_kind, from the vendors'
# data sheets (NVIDIA H100 and H200 SXM: 989.4 TFLOP/s bf16 dense, without the 2:4-sparsity doubling; Google Cloud
# TPU system architecture pages). The first match wins, so the longer names come first.
PEAKS = [
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989.4e12, 3.35e12),  # "NVIDIA H100 80GB HBM3" (SXM5)
    ("H200", 989.4e12, 4.8e12),  # "NVIDIA H200" (SXM, 141 GB HBM3e)
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100", 312e12, 1.555e12),
    ("L4", 121e12, 0.3e12),
    ("TPU v4", 275e12, 1.2e12),
    ("TPU v5 lite", 197e12, 0.819e12),  # v5e
    ("TPU v5p", 459e12, 2.765e12),
    ("TPU v5", 459e12, 2.765e12),
    ("TPU v6 lite", 918e12, 1.64e12),  # v6e (Trillium)
]

MODULE = "topk_transformers.benchmarks.device_check"
STAGES = ("kernels", "train", "decode")
# Seconds each stage may take on the device (the whole check stays under 8 minutes), and in smoke mode.
LIMITS = {"kernels": 90, "train": 160, "decode": 210}
# Smoke mode takes about a minute in all on an idle 2-core CPU; its limits leave room for a machine shared by others.
SMOKE_LIMITS = {"kernels": 300, "train": 400, "decode": 400}
BUDGET_S = 470
SMOKE_BUDGET_S = 1100


def peaks(device_kind: str) -> Dict[str, Any]:
  """``{'bf16_flops', 'memory_bytes_per_s', 'matched'}`` for a device kind (None where the table has none)."""
  for name, flops, bandwidth in PEAKS:
    if name.lower() in device_kind.lower():
      return {"matched": name, "bf16_flops": flops, "memory_bytes_per_s": bandwidth}
  return {"matched": None, "bf16_flops": None, "memory_bytes_per_s": None}


def t5_train_flops(d_model: int, d_ff: int, inner: int, layers: int, vocab: int, batch: int, input_length: int,
                   target_length: int, wi_branches: int = 1) -> float:
  """Model FLOPs of one T5 training step (forward and backward: 3 x 2 x the multiply-adds), dense MLPs.

  Per encoder token and layer: the q, k, v, o projections (``4 d inner``), the scores and the weighted sum over
  ``input_length`` keys (``2 Le inner``), the MLP (``(branches + 1) d d_ff``). Per decoder token and layer: the
  self-attention's projections and scores over ``target_length``, the cross-attention's q and o projections and its
  scores over ``input_length`` (its k and v projections are counted per encoder token), the MLP. The logits: ``d
  vocab`` per decoder token. Masks are not subtracted; a Top-k MLP is counted as dense (it computes as much).
  """
  mlp = (wi_branches + 1) * d_model * d_ff
  enc = layers * (4 * d_model * inner + 2 * input_length * inner + mlp + 2 * d_model * inner)  # + cross k, v
  dec = layers * (4 * d_model * inner + 2 * target_length * inner + 2 * d_model * inner + 2 * input_length * inner
                  + mlp) + d_model * vocab
  return 6.0 * batch * (input_length * enc + target_length * dec)


# ---------------------------------------------------------------------------
# Stage 1: the kernels and the choices.
# ---------------------------------------------------------------------------


def _median_s(fn, reps: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def kernel_checks(smoke: bool) -> Dict[str, Any]:
  """The Pallas kernels against the plain-JAX products (compiled for the device, or interpreted on the CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from topk_transformers import pallas_rows  # pylint: disable=g-import-not-at-top

  backend = jax.default_backend()
  platform = pallas_rows.platform_for(backend)
  interpret = platform is None
  # (name, d_model, d_ff, k, c, branches): T5 v1.0 Large, v1.1 Large (gated: 2c rows of wi), or tiny ones.
  # The interpreter is slow: there, one tiny gated shape with beams (the tests cover the rest).
  shapes = ([("v1.1 tiny", 64, 256, 8, 16, 2)] if smoke or interpret else
            [("v1.0 large", 1024, 4096, 128, 256, 1), ("v1.1 large", 1024, 2816, 128, 256, 2)])
  rows = []
  rng = np.random.default_rng(0)
  for flavour in ([platform] if platform else list(pallas_rows.PLATFORMS)):
    for name, d, ff, k, c, branches in shapes:
      for dtype in ("float32", "bfloat16"):
        for beams in ((4,) if interpret else (1, 4)):
          wi = jnp.asarray(rng.standard_normal((branches * ff, d)) / np.sqrt(d), dtype)
          wo = jnp.asarray(rng.standard_normal((ff, d)) / np.sqrt(ff), dtype)
          x = jnp.asarray(rng.standard_normal((beams, d)), dtype)
          v = jnp.asarray(rng.standard_normal((beams, k)), dtype)
          cand = np.stack([rng.permutation(ff)[:c] for _ in range(beams)])
          cand = jnp.asarray(np.concatenate([cand + i * ff for i in range(branches)], axis=-1), jnp.int32)
          idx = jnp.asarray(np.stack([rng.permutation(ff)[:k] for _ in range(beams)]), jnp.int32)
          for op, args, kernel, reference in (
              ("gather_matvec", (x, wi, cand), pallas_rows.gather_matvec, pallas_rows.reference_matvec),
              ("gather_vecmat", (v, wo, idx), pallas_rows.gather_vecmat, pallas_rows.reference_vecmat)):
            row = dict(op=op, shape=name, dtype=dtype, beams=beams, platform=flavour, interpret=interpret,
                       n=int(args[1].shape[0]), d=d, count=int(args[2].shape[-1]))
            try:
              fn = jax.jit(lambda a, w, i, kernel=kernel: kernel(a, w, i, platform=flavour, interpret=interpret))
              ref = jax.jit(reference)
              got, want = np.asarray(fn(*args), np.float32), np.asarray(ref(*args), np.float32)
              err = float(np.max(np.abs(got - want)))
              scale = float(np.max(np.abs(want))) or 1.0
              tol = 1e-4 if dtype == "float32" else 2e-2
              row.update(max_abs_error=err, max_abs_reference=scale, ok=bool(err <= tol * scale))
              if not interpret:
                reps = 20
                row.update(kernel_s=_median_s(lambda: fn(*args), reps), reference_s=_median_s(lambda: ref(*args), reps))
                row["kernel_over_reference"] = row["kernel_s"] / row["reference_s"]
            except Exception as e:  # pylint: disable=broad-except  # recorded, the check goes on
              row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
            rows.append(row)
            print(f"   {op} {name} {dtype} beams={beams} {flavour}: "
                  + (f"error {row.get('max_abs_error'):.3g}" if "max_abs_error" in row else row.get("error", ""))
                  + (f", kernel {row['kernel_s'] * 1e6:.1f} us vs XLA {row['reference_s'] * 1e6:.1f} us"
                     if "kernel_s" in row else ""), flush=True)
  return {"backend": backend, "platform": platform, "interpret": interpret, "rows": rows,
          "all_ok": all(r.get("ok") for r in rows)}


def autotune_choices(smoke: bool) -> List[Dict[str, Any]]:
  """The decoding path and row implementations autotune picks for T5 v1.0 Large steps (tiny in smoke mode)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from topk_transformers import autotune  # pylint: disable=g-import-not-at-top
  from topk_transformers import mlp_steps  # pylint: disable=g-import-not-at-top
  from topk_transformers import row_kernels  # pylint: disable=g-import-not-at-top

  d, ff, k = (64, 256, 8) if smoke else (1024, 4096, 128)
  out = []
  for dtype in (("float32",) if smoke else ("float32", "bfloat16")):
    for tokens in ((1,) if smoke else (1, 4)):
      settings = mlp_steps.Settings(top_k=k, dtype=jnp.dtype(dtype))
      rule = "sparse" if 4 * tokens * k <= ff else "dense"
      choice = autotune.decode_path((tokens, 1, d), ff, settings, default=rule)
      out.append(dict(choice="decode_path", dtype=dtype, tokens=tokens, d_model=d, d_ff=ff, k=k, rule=rule,
                      chosen=choice))
      w = jnp.zeros((ff, d), dtype)
      for op, a, count in (("gather_vecmat", jnp.zeros((tokens, k), dtype), k),
                           ("gather_matvec", jnp.zeros((tokens, d), dtype), 2 * k)):
        idx = jnp.asarray(np.zeros((tokens, count)), jnp.int32)
        out.append(dict(choice=f"rows/{op}", dtype=dtype, tokens=tokens, n=ff, d=d, count=count,
                        chosen=row_kernels.implementation(op, a, w, idx)))
      print(f"   {dtype} tokens={tokens}: " + ", ".join(f"{r['choice']} {r['chosen']}" for r in out[-3:]), flush=True)
  return out


def stage_kernels(out_dir: str, smoke: bool) -> None:
  result = {"kernels": kernel_checks(smoke), "choices": autotune_choices(smoke)}
  _write(os.path.join(out_dir, "kernels.json"), result)


# ---------------------------------------------------------------------------
# Stages 2 and 3: the benchmarks' own commands.
# ---------------------------------------------------------------------------


def train_args(out_dir: str, smoke: bool) -> List[str]:
  json_path = os.path.join(out_dir, "train.json")
  if smoke:
    return ["--models=t5_1.0", "--sizes=tiny", "--k=8", "--methods=exact,approx,threshold,auto", "--num_layers=1",
            "--batch_size=2", "--input_length=16", "--target_length=8", "--vocab_size=128", "--dtype=bfloat16",
            "--reps=1", "--no_selection", f"--json={json_path}"]
  return ["--models=t5_1.0", "--sizes=base,large", "--k=128", "--methods=exact,approx,threshold,auto",
          "--num_layers=2", "--batch_size=32", "--input_length=512", "--target_length=128", "--dtype=bfloat16",
          "--reps=5", "--no_selection", f"--json={json_path}"]


def decode_args(out_dir: str, smoke: bool) -> List[str]:
  json_path = os.path.join(out_dir, "decode.json")
  if smoke:
    return ["--sizes=tiny", "--version=1.0", "--k=8", "--method=exact", "--dtype=float32,bfloat16", "--num_layers=1",
            "--steps=2", "--reps=1", "--input_length=8", "--predicted", "--predictor_rank=4", "--candidates=32",
            "--vecmat_gib=0.004", f"--json={json_path}"]
  # The published 24 decoder layers; a 2-layer encoder (it runs once per input, outside the timed loop).
  return ["--sizes=large", "--version=1.0", "--k=128", "--method=exact", "--dtype=float32,bfloat16",
          "--encoder_layers=2", "--steps=32", "--reps=5", "--input_length=32", "--predicted", "--predictor_rank=32",
          "--candidates=256", f"--json={json_path}"]


def _command(module: str, args: Sequence[str]) -> List[str]:
  return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))", *args]


# ---------------------------------------------------------------------------
# The summary.
# ---------------------------------------------------------------------------


def summarise(out_dir: str, machine_info: Dict[str, Any], statuses: Dict[str, Any]) -> Dict[str, Any]:
  """``device_check.json``'s content from the stages' JSON files."""
  from topk_transformers import autotune  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import sizes  # pylint: disable=g-import-not-at-top

  peak = peaks(machine_info.get("device_kind", ""))
  summary: Dict[str, Any] = {"machine": machine_info, "peaks": peak, "stages": statuses}
  kernels = _read(os.path.join(out_dir, "kernels.json"))
  summary["kernels"] = kernels.get("kernels")
  summary["autotune_choices"] = kernels.get("choices")

  train = _read(os.path.join(out_dir, "train.json"))
  train_rows = []
  settings = train.get("settings", {})
  for r in train.get("results", []):
    published = sizes.published_config("1.0", r["size"])
    flops = t5_train_flops(r["d_model"], r["d_ff"], published.num_heads * published.head_dim, r["layers"],
                           r["vocab"], settings["batch_size"], settings["input_length"], settings["target_length"],
                           len(r["mlp_activations"]))
    achieved = flops / r["median_s"]
    train_rows.append(dict(size=r["size"], layers=r["layers"], variant=r["variant"], resolves_to=r["resolves_to"],
                           median_s=r["median_s"], ratio_to_dense=r["ratio"], same_loss_as_exact=r["same_loss_as_exact"],
                           model_flops_per_step=flops, achieved_flops_per_s=achieved,
                           mfu=achieved / peak["bf16_flops"] if peak["bf16_flops"] else None))
  summary["train"] = train_rows

  decode = _read(os.path.join(out_dir, "decode.json"))
  summary["decode"] = [dict(name=r.get("name", r["variant"]), dtype=r["dtype"], layers=r["num_decoder_layers"],
                            ms_per_token=r["s_per_token"] * 1e3, speedup=r.get("speedup"),
                            weight_bytes_per_token=r["weight_bytes_per_token"],
                            weight_bytes_per_s=r["weight_gb_per_s"] * 1e9,
                            share_of_memory_bandwidth=(r["weight_gb_per_s"] * 1e9 / peak["memory_bytes_per_s"]
                                                       if peak["memory_bytes_per_s"] else None),
                            row_kernels=r.get("row_kernels"), vecmat_gb_per_s=r.get("vecmat_gb_per_s"),
                            share_of_vecmat_rate=r.get("share_of_vecmat_rate"))
                       for r in decode.get("results", [])]
  summary["autotune_cache"] = autotune.cached_entries(os.path.join(out_dir, "autotune_cache.json"))
  return summary


def _read(path: str) -> Dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _write(path: str, data: Dict[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, default=str)


def run(out_dir: str, smoke: bool = False, budget_s: Optional[float] = None) -> Dict[str, Any]:
  """Every stage in a subprocess under its time limit, then the summary; returns it."""
  budget_s = budget_s or (SMOKE_BUDGET_S if smoke else BUDGET_S)
  os.makedirs(out_dir, exist_ok=True)
  env = dict(os.environ, TOPK_AUTOTUNE="1", TOPK_AUTOTUNE_CACHE=os.path.join(out_dir, "autotune_cache.json"))
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  os.environ.update(env)  # the summary reads the same cache
  start = time.perf_counter()
  limits = SMOKE_LIMITS if smoke else LIMITS
  commands = {
      "kernels": [sys.executable, "-m", MODULE, "--stage=kernels", out_dir] + (["--smoke"] if smoke else []),
      "train": _command("topk_transformers.commands.bench_train", train_args(out_dir, smoke)),
      "decode": _command("topk_transformers.commands.bench_decode", decode_args(out_dir, smoke)),
  }
  statuses = {}
  for stage in STAGES:
    left = budget_s - (time.perf_counter() - start)
    limit = min(limits[stage], left)
    if limit < 10:
      statuses[stage] = {"status": "skipped", "reason": f"{left:.0f}s of the budget left"}
      continue
    print(f"== {stage} (limit {limit:.0f}s)", flush=True)
    t0 = time.perf_counter()
    log_path = os.path.join(out_dir, f"{stage}.log")
    with open(log_path, "w", encoding="utf-8") as log:
      try:
        done = subprocess.run(commands[stage], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit,
                              check=False)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
      except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f}s"
    with open(log_path, encoding="utf-8", errors="replace") as log:
      tail = log.read()[-3000:]
    statuses[stage] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "log": os.path.basename(log_path)}
    if status != "ok":
      statuses[stage]["log_tail"] = tail
    print(f"   {status} in {statuses[stage]['seconds']}s" + ("" if status == "ok" else f"\n{tail}"), flush=True)

  from topk_transformers.benchmarks import machine  # pylint: disable=g-import-not-at-top
  info = dict(machine.machine_info(), smoke=smoke, total_s=round(time.perf_counter() - start, 1))
  summary = summarise(out_dir, info, statuses)
  _write(os.path.join(out_dir, "device_check.json"), summary)
  _print(summary)
  return summary


def _print(summary: Dict[str, Any]) -> None:
  m, p = summary["machine"], summary["peaks"]
  print(f"\n{m['platform']} ({m['device_kind']}); peaks: {p}")
  for stage, s in summary["stages"].items():
    print(f"   {stage}: {s['status']}")
  if summary.get("kernels"):
    print(f"   Pallas kernels match the reference: {summary['kernels']['all_ok']}")
  for r in summary["train"]:
    mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
    print(f"   train {r['size']} {r['variant']:14s} {r['median_s'] * 1e3:8.1f} ms  ratio {r['ratio_to_dense']:.3f}  "
          f"MFU {mfu}")
  for r in summary["decode"]:
    share = f"{r['share_of_memory_bandwidth']:.3f}" if r["share_of_memory_bandwidth"] is not None else "-"
    print(f"   decode {r['dtype']} {r['name']:30s} {r['ms_per_token']:8.2f} ms/token  "
          f"{r['weight_bytes_per_s'] / 1e9:7.1f} GB/s  share of peak {share}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="device_check", description=__doc__.splitlines()[0])
  p.add_argument("out_dir", help="where the JSON files go")
  p.add_argument("--smoke", action="store_true", help="tiny shapes (about 90 s of CPU time)")
  p.add_argument("--budget_s", type=float, default=None,
                 help=f"seconds for all stages together (default {BUDGET_S}, smoke {SMOKE_BUDGET_S})")
  p.add_argument("--stage", choices=["kernels"], default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.stage == "kernels":
    stage_kernels(args.out_dir, args.smoke)
    return 0
  summary = run(args.out_dir, args.smoke, args.budget_s)
  return 0 if all(s["status"] == "ok" for s in summary["stages"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
