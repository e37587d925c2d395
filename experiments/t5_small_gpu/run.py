#!/usr/bin/env python
"""A T5-Small-shaped dense ReLU model trained on the embedded corpus for a fixed time, then its sparsity measured.

Issue #25's accelerator run: the closest this project comes to the paper's T5-Base figure (2.7-3.0% nonzero,
93.5% of units firing on fewer than 10% of inputs). T5 v1.0 Small's shape (6+6 layers, d_model 512, d_ff 2048,
8 heads of 64, ReLU), no Top-k, no dropout, bfloat16 activations and float32 parameters, Adafactor at T5's rsqrt
rate (0.01 up to step 10,000), inputs 512 / targets 114, batch 128; trained for ``--seconds`` of steps on the
examples ``prepare.py`` wrote, with the whole held-out split measured at steps 0, 100, 200, 400, ... and at the end::

    python experiments/t5_small_gpu/prepare.py --out=runs/t5_small_gpu/examples.npz           # here (TensorFlow)
    python experiments/t5_small_gpu/run.py --examples=runs/t5_small_gpu/examples.npz \\
        --out=OUT --seconds=300                                                                # on the device
    python experiments/t5_small_gpu/run.py ... --smoke                                         # tiny, any machine

Needs jax, flax, optax and numpy only (the device image has no TensorFlow, seqio or gin). Writes
``OUT/t5_small_gpu.json``: the device, the configuration, steps and tokens, the training loss, and per measurement
(``curve``, and ``final`` at the end) the held-out loss and per layer the % nonzero, ``fraction_firing_below_10pct``
and ``fraction_never_firing`` (``sparsity.fraction_firing_below``). Prints the final table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # runs from a clone without an install (the device image)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from topk_transformers import sparsity  # noqa: E402
from topk_transformers.errors import ConfigError  # noqa: E402
from topk_transformers.t5 import network  # noqa: E402

EXPERIMENT = "t5_small_gpu"
Z_LOSS = 1e-4
WARMUP = 10_000  # T5's rsqrt schedule: 1 / sqrt(max(step, 10,000))
SMOKE = dict(layers=1, d_model=32, d_ff=64, heads=2, head_dim=16, batch=4)


def measurement_steps(limit: int = 1 << 30) -> List[int]:
  """0, 100, 200, 400, 800, ...: the steps at which the held-out split is measured (and the end)."""
  steps, s = [0], 100
  while s < limit:
    steps.append(s)
    s *= 2
  return steps


def load_examples(path: str) -> Dict[str, Any]:
  if not os.path.isfile(path):
    raise ConfigError(f"--examples: no file {path} (write it with experiments/t5_small_gpu/prepare.py)")
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in ("train_inputs", "train_targets", "eval_inputs", "eval_targets")}
      data["meta"] = json.loads(str(f["meta"]))
  except (OSError, ValueError, KeyError) as e:
    raise ConfigError(f"--examples: {path} is not an archive that prepare.py wrote ({type(e).__name__}: {e})") from e
  for split in ("train", "eval"):
    if len(data[f"{split}_inputs"]) == 0 or len(data[f"{split}_inputs"]) != len(data[f"{split}_targets"]):
      raise ConfigError(f"--examples: {path} has no {split} examples, or inputs and targets of other counts")
  return data


def make_config(vocab_size: int, smoke: bool, dtype: str) -> network.T5Config:
  """T5 v1.0 Small's shape (``network.T5Config``'s defaults), dense ReLU; tiny with ``smoke``."""
  config = network.T5Config(vocab_size=-(-vocab_size // 128) * 128, dtype=jnp.dtype(dtype), dropout_rate=0.0,
                            mlp_activations=("relu",), top_k=None)
  if smoke:
    config = dataclasses.replace(config, num_encoder_layers=SMOKE["layers"], num_decoder_layers=SMOKE["layers"],
                                 emb_dim=SMOKE["d_model"], mlp_dim=SMOKE["d_ff"], num_heads=SMOKE["heads"],
                                 head_dim=SMOKE["head_dim"])
  return config


def as_batch(inputs: np.ndarray, targets: np.ndarray) -> Dict[str, jax.Array]:
  targets = targets.astype(np.int32)
  return {"inputs": jnp.asarray(inputs.astype(np.int32)), "targets": jnp.asarray(targets),
          "decoder_inputs": jnp.asarray(np.pad(targets[:, :-1], ((0, 0), (1, 0))))}


def token_losses(module, params, batch, mutable=()):
  """Per target token: cross-entropy plus T5's z-loss, and the weights (1 on real tokens)."""
  out = module.apply({"params": params}, batch["inputs"], batch["decoder_inputs"], batch["targets"],
                     enable_dropout=False, mutable=list(mutable) if mutable else False)
  logits, state = out if mutable else (out, {})
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  nll = log_z - jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  return nll + Z_LOSS * jnp.square(log_z), nll, (batch["targets"] > 0).astype(jnp.float32), state


def train_loss(module, params, batch):
  loss, _, weights, _ = token_losses(module, params, batch)
  return jnp.sum(loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def train_step(module, optimizer, params, opt_state, batch):
  loss, grads = jax.value_and_grad(functools.partial(train_loss, module))(params, batch)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def eval_counts(module, params, batch):
  """One held-out batch: summed cross-entropy, target tokens, and each MLP's sown counts."""
  _, nll, weights, state = token_losses(module, params, batch, mutable=["intermediates"])
  return jnp.sum(nll * weights), jnp.sum(weights), sparsity.layer_stats(state["intermediates"])


def measure(eval_fn, params, data: Dict[str, Any], batch_size: int) -> Dict[str, Any]:
  """The whole held-out split: loss, and per layer % nonzero and the firing statistics."""
  nll = tokens = 0.0
  totals = None
  n = len(data["eval_inputs"])
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n  # the last batch wraps round; its repeats are dropped below
    batch = as_batch(data["eval_inputs"][idx], data["eval_targets"][idx])
    if start + batch_size > n:  # zero out the repeated rows: padding counts nowhere
      keep = (np.arange(batch_size) < n - start)[:, None]
      batch = {k: v * keep for k, v in batch.items()}
    s_nll, s_tok, stats = jax.device_get(eval_fn(params, batch))
    nll, tokens = nll + float(s_nll), tokens + float(s_tok)
    stats = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), stats)
    totals = stats if totals is None else jax.tree_util.tree_map(np.add, totals, stats)
  layers = {}
  for layer, f in sorted(sparsity.summed_figures(totals).items(), key=lambda kv: sparsity.layer_sort_key(kv[0])):
    layers[layer] = {"percent_nonzero": f["percent_nonzero"], "tokens": int(f["tokens"]),
                     "fraction_firing_below_10pct": sparsity.fraction_firing_below(f["firing_frequency"]),
                     "fraction_never_firing": sparsity.fraction_never_firing(f["firing_frequency"])}
  return {"heldout_loss": nll / max(tokens, 1.0), "layers": layers,
          "mean_percent_nonzero": float(np.mean([r["percent_nonzero"] for r in layers.values()]))}


def train(data: Dict[str, Any], config: network.T5Config, batch_size: int, seconds: float, seed: int,
          max_steps: int = 0) -> Dict[str, Any]:
  """Trains for ``seconds`` of wall time (the first, compiling step and the measurements not counted; or
  ``max_steps``); returns the JSON's body."""
  module = network.Transformer(config)
  lengths = (data["train_inputs"].shape[1], data["train_targets"].shape[1])
  one = jnp.ones((1, 1), jnp.int32)
  params = module.init(jax.random.PRNGKey(seed), one, one, one, enable_dropout=False)["params"]
  optimizer = optax.adafactor(learning_rate=lambda step: 1.0 / jnp.sqrt(jnp.maximum(step, WARMUP)))
  opt_state = optimizer.init(params)
  step_fn = jax.jit(functools.partial(train_step, module, optimizer), donate_argnums=(0, 1))
  eval_fn = jax.jit(functools.partial(eval_counts, module))
  rng = np.random.default_rng(seed)
  n = len(data["train_inputs"])
  order, cursor = rng.permutation(n), 0
  schedule = measurement_steps()
  curve, losses, step_times = [], [], []
  step, trained, compile_seconds = 0, 0.0, None
  while True:
    if step in schedule:
      curve.append({"step": step, "train_seconds": round(trained, 2), **measure(eval_fn, params, data, batch_size)})
      print(f"step {step}: held-out loss {curve[-1]['heldout_loss']:.3f}, % nonzero (mean of layers) "
            f"{curve[-1]['mean_percent_nonzero']:.2f}", flush=True)
    if (max_steps and step >= max_steps) or (not max_steps and trained >= seconds):
      break
    if cursor + batch_size > n:
      order, cursor = rng.permutation(n), 0
    idx = order[cursor:cursor + batch_size]
    cursor += batch_size
    batch = as_batch(data["train_inputs"][idx], data["train_targets"][idx])
    start = time.perf_counter()
    params, opt_state, loss = step_fn(params, opt_state, batch)
    loss = float(loss)  # waits for the step
    elapsed = time.perf_counter() - start
    if compile_seconds is None:
      compile_seconds = elapsed  # the first step compiles: not counted against --seconds
    else:
      step_times.append(elapsed)
      trained += elapsed
    step += 1
    if step % 50 == 0 or step == 1:
      losses.append({"step": step, "loss": loss})
  final = measure(eval_fn, params, data, batch_size)
  tokens_per_step = batch_size * sum(lengths)
  median = statistics.median(step_times) if step_times else None
  return {
      "steps": step, "train_seconds": round(trained, 2), "compile_seconds": compile_seconds,
      "median_step_seconds": median, "tokens_per_second": tokens_per_step / median if median else None,
      "tokens_per_step": tokens_per_step, "tokens_seen": step * tokens_per_step,
      "passes_over_the_train_examples": step * batch_size / n,
      "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
      "train_loss": losses, "curve": curve, "final": {"step": step, **final},
  }


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--examples", required=True, help="the .npz that prepare.py wrote")
  parser.add_argument("--out", required=True, help="directory for t5_small_gpu.json")
  parser.add_argument("--seconds", type=float, default=300.0,
                      help="wall time of training steps (not compiling, not measuring)")
  parser.add_argument("--max_steps", type=int, default=0, help="stop after this many steps instead (0: by time)")
  parser.add_argument("--batch", type=int, default=None, help="default 128 (with --smoke: 4)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="activations")
  parser.add_argument("--smoke", action="store_true", help="a tiny model (any machine, for tests)")
  args = parser.parse_args(argv)
  try:
    if (args.batch is not None and args.batch <= 0) or args.seconds <= 0 or args.max_steps < 0:
      raise ConfigError("--batch and --seconds must be positive, --max_steps not negative")
    data = load_examples(args.examples)
    config = make_config(data["meta"]["vocab_size"], args.smoke, args.dtype)
    batch_size = args.batch or (SMOKE["batch"] if args.smoke else 128)
    if batch_size > len(data["train_inputs"]):
      raise ConfigError(f"--batch {batch_size} is more than the {len(data['train_inputs'])} train examples")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  device = jax.devices()[0]
  print(f"{EXPERIMENT}: {device.platform} {device.device_kind}, {len(data['train_inputs'])} train examples, "
        f"batch {batch_size}, {'max ' + str(args.max_steps) + ' steps' if args.max_steps else f'{args.seconds:g} s'}",
        flush=True)
  body = train(data, config, batch_size, args.seconds, args.seed, args.max_steps)
  payload = {
      "experiment": EXPERIMENT, "command": " ".join(["experiments/t5_small_gpu/run.py"] + list(argv)),
      "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
      "device": {"platform": device.platform, "device_kind": device.device_kind, "jax": jax.__version__},
      "smoke": args.smoke, "examples": data["meta"],
      "config": {"layers_per_stack": config.num_encoder_layers, "d_model": config.emb_dim, "d_ff": config.mlp_dim,
                 "num_heads": config.num_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
                 "activations": str(jnp.dtype(config.dtype)), "mlp_activations": list(config.mlp_activations),
                 "dropout_rate": config.dropout_rate, "optimizer": "adafactor", "learning_rate": "1/sqrt(max(step, "
                 f"{WARMUP}))", "z_loss": Z_LOSS, "batch": batch_size, "seed": args.seed},
      **body,
  }
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"{EXPERIMENT}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  print(f"{'layer':<20} {'% nonzero':>10} {'< 10% of tokens':>16} {'never':>7}")
  for layer, row in payload["final"]["layers"].items():
    print(f"{layer:<20} {row['percent_nonzero']:>10.2f} {100 * row['fraction_firing_below_10pct']:>15.1f}% "
          f"{100 * row['fraction_never_firing']:>6.1f}%")
  print(f"{payload['steps']} steps in {payload['train_seconds']:.0f} s; held-out loss "
        f"{payload['final']['heldout_loss']:.3f}; wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
