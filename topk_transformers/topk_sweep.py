"""Training-free Top-k: what a dense (pretrained) model loses when its MLPs keep only the k largest units.

The first question about a pretrained T5: apply Top-k without retraining, how much
worse does it get? :func:`sweep` evaluates the same params with the dense MLPs and
with Top-k at each k (only the network's ``top_k`` changes), on the same batches::

  run = runs.load_run('/tmp/t5_base', gin_files=['t5/t5_1_0/base.gin', ...])
  result = topk_sweep.sweep(run, ks=(32, 64, 128, 256, 512), eval_steps=20)
  print(result['text'])
  topk_sweep.write(result, '/tmp/t5_base_sweep')   # sweep.json, sweep.png

Each row holds the loss, token accuracy and % nonzero MLP activations (mean over
layers) with their differences from the dense row; ``topk-topk-sweep`` is the
command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from topk_transformers import evaluators
from topk_transformers import plotting
from topk_transformers.errors import ConfigError


def _mean(values) -> Optional[float]:
  values = list(values)
  return sum(values) / len(values) if values else None


def sweep(run: Any, ks: Sequence[int], split: Optional[str] = None, eval_steps: Optional[int] = 20) -> Dict[str, Any]:
  """Evaluates ``run.params`` dense and with Top-k at each of ``ks`` on the first ``eval_steps`` batches of ``split``.

  Returns ``{'rows': [...], 'split', 'eval_steps', 'checkpoint', 'text'}``; the first row is the dense model
  (``k=None``), the others follow in increasing ``k``.
  """
  ks = sorted({int(k) for k in ks})
  if not ks or ks[0] <= 0:
    raise ConfigError(f"the k to sweep must be positive integers, got {list(ks)}")
  split = split or run.dataset.eval_split
  rows: List[Dict[str, Any]] = []
  for k in [None] + ks:
    # The dense row is dense whatever Top-k the run's own config sets.
    variant = dataclasses.replace(run, model=run.model.with_top_k(k), _eval_steps=[])
    start = time.time()
    metrics, percent = evaluators.split_results(
        evaluators.run_all(evaluators.for_run(variant, evaluators.DEFAULT, split, eval_steps), variant.params))
    row = {"k": k, **metrics,
           "percent_nonzero": _mean(percent.values()), "percent_nonzero_per_layer": percent,
           "seconds": round(time.time() - start, 2)}
    if rows:
      dense = rows[0]
      for name in ("loss", "accuracy"):
        if name in row and name in dense:
          row[f"delta_{name}"] = row[name] - dense[name]
    rows.append(row)
  out = {"checkpoint": run.checkpoint, "step": run.step, "split": split, "eval_steps": eval_steps,
         "mlp_dim": run.model.describe().mlp.ff, "rows": rows}
  out["text"] = format_table(out)
  return out


def format_table(result: Dict[str, Any]) -> str:
  """The sweep as a plain-text table."""
  lines = [f"Training-free Top-k on {result['checkpoint']} (step {result['step']}), split {result['split']!r}, "
           f"{result['eval_steps'] or 'all'} batches, d_ff {result['mlp_dim']}",
           f"{'k':>8} {'loss':>9} {'d loss':>9} {'accuracy':>9} {'d acc':>8} {'% nonzero':>10}"]
  for row in result["rows"]:
    k = "dense" if row["k"] is None else str(row["k"])
    dl = f"{row['delta_loss']:+9.4f}" if "delta_loss" in row else f"{'':>9}"
    da = f"{row['delta_accuracy']:+8.4f}" if "delta_accuracy" in row else f"{'':>8}"
    nz = f"{row['percent_nonzero']:10.2f}" if row["percent_nonzero"] is not None else f"{'-':>10}"
    lines.append(f"{k:>8} {row.get('loss', float('nan')):9.4f} {dl} {row.get('accuracy', float('nan')):9.4f} {da} {nz}")
  return "\n".join(lines)


def plot(result: Dict[str, Any], path: str, title: str = "") -> str:
  """Loss and accuracy against k (log axis), with the dense model as a dashed line."""
  plt = plotting.pyplot()
  dense, rows = result["rows"][0], result["rows"][1:]
  ks = [r["k"] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, name in zip(axes, ("loss", "accuracy")):
    ax.plot(ks, [r.get(name, float("nan")) for r in rows], "o-", label="Top-k, no retraining")
    ax.axhline(dense.get(name, float("nan")), color="gray", linestyle="--", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (MLP units kept per token)")
    ax.set_ylabel(f"held-out {name}")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(title or f"Training-free Top-k, d_ff {result['mlp_dim']}")
  fig.tight_layout()
  return plotting.save(fig, path)


def write(result: Dict[str, Any], out_dir: str, title: str = "") -> Dict[str, str]:
  """``out_dir/sweep.json`` and ``out_dir/sweep.png``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "sweep.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, default=float)
  return {"json": json_path, "plot": plot(result, os.path.join(out_dir, "sweep.png"), title)}
