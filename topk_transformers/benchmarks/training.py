"""Training step time: dense MLPs against Top-k MLPs, on random data (``topk-bench-train``).

  topk-bench-train --models=t5_1.0 --sizes=base --k=128 --methods=exact,threshold --num_layers=2 --reps=5 \
      --json=benchmarks/train_t5_1.0.json --markdown=benchmarks/train_t5_1.0.md

For each model (T5 v1.0, T5 v1.1, ViT) and size (small, base, large: the
published shapes, ``t5/sizes.py`` and ``vit/network.py``'s variant table, with
``--num_layers`` layers in each stack instead of the published depth), the
benchmark builds the network with random float32 weights and times one jitted
training step (forward, backward and the optimizer update: Adafactor for T5,
AdamW for ViT) on random tokens or images:

* ``dense``: the vanilla network (``top_k=None``), the baseline; ViT has ReLU
  MLPs (the paper's Top-k ViT) in every variant, and with ``--num_layers`` is
  :class:`TruncatedViT`, ViT's own stem, blocks and head at that depth;
* one variant per selection method and k (``k < d_ff``): the same parameters and
  batch with Top-k MLPs.

Variants are timed interleaved, one step of each per repetition, so load from
other processes hits them alike. A figure is the median over repetitions after
compilation, ``block_until_ready`` included; ``ratio`` is the Top-k median over
the dense median of the same run, ``paired`` the median of the per-repetition
ratios and ``best`` the ratio of the fastest steps (checks on the noise). Every step starts from the same parameters, so
the exact methods must give the same loss: ``same_loss_as_exact`` says whether
they did, bit for bit.

Dropout is off (``dropout_rate=0``), so that the step is the same computation in
every variant but for the MLP's selection. The selection microbenchmark times
one ReLU ``MlpBlock`` (1024 tokens, d 512, d_ff 2048, k 128) forward and
backward for each method against the dense block.

Needs only jax, flax and optax, so it runs unchanged on GPU and TPU hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from topk_transformers import layers
from topk_transformers import topk
from topk_transformers.benchmarks import machine
from topk_transformers.errors import ConfigError
from topk_transformers.t5 import network as t5_network
from topk_transformers.t5 import sizes as t5_sizes
from topk_transformers.vit import network as vit_network

MODELS = ("t5_1.0", "t5_1.1", "vit")
SIZES = ("tiny", "small", "base", "large")
# "tiny" is no published model: T5's CPU test shape and ViT's "Test" variant, for quick checks.
VIT_VARIANTS = {"tiny": "Test/16", "small": "S/16", "base": "B/16", "large": "L/16"}
DTYPES = ("float32", "bfloat16")
SELECTION_SHAPE = {"tokens": 1024, "d_model": 512, "d_ff": 2048, "k": 128}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to benchmark; ``topk-bench-train``'s flags."""

  models: Tuple[str, ...] = MODELS
  sizes: Tuple[str, ...] = ("small", "base", "large")
  ks: Tuple[int, ...] = (64, 128, 256)
  methods: Tuple[str, ...] = ("exact", "approx", "threshold")
  """Selection methods, each timed as its own variant (``auto`` is timed as what it resolves to)."""
  num_layers: Optional[int] = 2
  """Layers in each stack (T5 encoder and decoder, ViT encoder); ``None``: the published depth."""
  batch_size: int = 8
  input_length: int = 128
  """T5 encoder tokens per example."""
  target_length: int = 32
  """T5 decoder tokens per example."""
  image_size: int = 224
  """ViT input side (16x16 patches: 196 patch tokens and the class token)."""
  vocab_size: Optional[int] = None
  """T5 embedding rows (default: the published 32128); smaller for quick checks."""
  dtype: str = "float32"
  """Activation dtype; parameters are float32."""
  reps: int = 5
  """Timed steps per variant (the median is reported)."""
  selection: bool = True
  """Also run the selection microbenchmark on one MLP."""
  selection_reps: int = 20
  seed: int = 0

  def __post_init__(self):
    for name, values, allowed in (("models", self.models, MODELS), ("sizes", self.sizes, SIZES),
                                  ("methods", self.methods, topk.METHODS), ("dtype", (self.dtype,), DTYPES)):
      bad = [v for v in values if v not in allowed]
      if bad or not values:
        raise ConfigError(f"--{name} must list {', '.join(allowed)}, got {','.join(values) or 'nothing'}")
    if not self.ks or min(self.ks) <= 0:
      raise ConfigError(f"--k must list positive integers, got {self.ks}")
    for name in ("batch_size", "input_length", "target_length", "image_size", "reps", "selection_reps"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
    if self.num_layers is not None and self.num_layers <= 0:
      raise ConfigError(f"--num_layers must be positive, got {self.num_layers}")
    if self.vocab_size is not None and self.vocab_size <= 2:  # tokens are drawn from [2, vocab_size)
      raise ConfigError(f"--vocab_size must be above 2, got {self.vocab_size}")
    if self.image_size % 16:
      raise ConfigError(f"--image_size must be a multiple of the patch size 16, got {self.image_size}")


# ---------------------------------------------------------------------------
# The models: a module factory (top_k, method) -> module, a loss, a batch.
# ---------------------------------------------------------------------------


class TruncatedViT(nn.Module):
  """``vit_network.ViT`` (token pooling) with ``depth`` encoder blocks instead of the variant's.

  The stem, the encoder (``vit_network.Encoder``, the same blocks and Top-k MLPs)
  and the head are ViT's; ``ViT`` itself takes its depth from the variant string.
  """

  variant: str
  depth: int
  num_classes: int = 1000
  top_k: Optional[int] = None
  top_k_method: str = topk.DEFAULT_METHOD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    cfg = vit_network.decode_variant(self.variant)
    patch, width = cfg["patch_size"], cfg["width"]
    x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID", dtype=self.dtype,
                name="embedding")(jnp.asarray(images, self.dtype))
    x = x.reshape(x.shape[0], -1, width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
    x = jnp.concatenate([jnp.tile(jnp.asarray(cls, self.dtype), (x.shape[0], 1, 1)), x], axis=1)
    x = x + jnp.asarray(self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:]), self.dtype)
    x = vit_network.Encoder(depth=self.depth, mlp_dim=cfg["mlp_dim"], num_heads=cfg["num_heads"],
                            mlp_activation="relu", top_k=self.top_k, top_k_method=self.top_k_method,
                            dtype=self.dtype, name="Transformer")(x, not train)
    return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0]), jnp.float32)


@dataclasses.dataclass
class Case:
  """One model at one size: how to build it with or without Top-k, its loss, optimizer and batch."""

  model: str
  size: str
  shape: Dict[str, Any]
  make: Callable[[Optional[int], str], nn.Module]
  loss: Callable[[nn.Module, Any, Dict[str, jax.Array]], jax.Array]
  optimizer: optax.GradientTransformation
  batch: Dict[str, jax.Array]
  init_args: Tuple[Any, ...]
  init_kwargs: Dict[str, Any]


def t5_loss(module, params, batch):
  logits = module.apply({"params": params}, batch["inputs"], batch["decoder_inputs"], batch["targets"],
                        enable_dropout=False)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]))


def vit_loss(module, params, batch):
  logits = module.apply({"params": params}, batch["images"], train=True)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))


def make_case(model: str, size: str, settings: Settings) -> Case:
  """The :class:`Case` of ``model`` (``t5_1.0``, ``t5_1.1`` or ``vit``) at ``size``."""
  rng = np.random.default_rng(settings.seed)
  dtype = jnp.dtype(settings.dtype)
  b = settings.batch_size
  if model.startswith("t5_"):
    published = t5_sizes.published_config(model[len("t5_"):], size)
    n = settings.num_layers or published.num_encoder_layers
    base = dataclasses.replace(published, dtype=dtype, dropout_rate=0.0, top_k=None,
                               num_encoder_layers=n, num_decoder_layers=n,
                               vocab_size=settings.vocab_size or published.vocab_size)
    targets = rng.integers(2, base.vocab_size, (b, settings.target_length), dtype=np.int32)
    batch = {"inputs": rng.integers(2, base.vocab_size, (b, settings.input_length), dtype=np.int32),
             "targets": targets, "decoder_inputs": np.pad(targets[:, :-1], ((0, 0), (1, 0)))}
    shape = dict(d_model=base.emb_dim, d_ff=base.mlp_dim, num_heads=base.num_heads, layers=n, vocab=base.vocab_size,
                 published_layers=published.num_encoder_layers, mlp_activations=list(base.mlp_activations),
                 tokens_per_step=b * (settings.input_length + settings.target_length),
                 mlp_rows=[b * settings.input_length, b * settings.target_length])
    one = jnp.ones((1, 1), jnp.int32)
    return Case(model, size, shape,
                lambda k, m: t5_network.Transformer(dataclasses.replace(base, top_k=k, top_k_method=m)),
                t5_loss, optax.adafactor(1e-3), {n_: jnp.asarray(v) for n_, v in batch.items()},
                (one, one, one), {"enable_dropout": False})
  variant = VIT_VARIANTS[size]
  cfg = vit_network.decode_variant(variant)
  n = settings.num_layers or cfg["depth"]
  batch = {"images": rng.standard_normal((b, settings.image_size, settings.image_size, 3), dtype=np.float32),
           "labels": rng.integers(0, 1000, (b,), dtype=np.int32)}
  shape = dict(d_model=cfg["width"], d_ff=cfg["mlp_dim"], num_heads=cfg["num_heads"], layers=n,
               published_layers=cfg["depth"], mlp_activations=["relu"], vit_variant=variant,
               tokens_per_step=b * ((settings.image_size // 16) ** 2 + 1),
               mlp_rows=[b * ((settings.image_size // 16) ** 2 + 1)])
  return Case(model, size, shape,
              lambda k, m: TruncatedViT(variant=variant, depth=n, top_k=k, top_k_method=m, dtype=dtype),
              vit_loss, optax.adamw(1e-3, weight_decay=1e-4), {n_: jnp.asarray(v) for n_, v in batch.items()},
              (jnp.zeros((1, settings.image_size, settings.image_size, 3)),), {"train": False})


def random_params(module: nn.Module, init_args, init_kwargs, seed: int = 0) -> Any:
  """Random float32 parameters of ``module``'s shapes, drawn with NumPy (nothing is compiled).

  Kernels are N(0, 1/fan_in), which keeps activations O(1) as the models' own
  initialisers do; scales are ones, everything else N(0, 0.02^2).
  """
  shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args, **init_kwargs)))
  rng = np.random.default_rng(seed)

  def init(path, s):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      return jnp.ones(s.shape, jnp.float32)
    x = rng.standard_normal(s.shape, dtype=np.float32)
    x *= np.float32(1.0 / np.sqrt(int(np.prod(s.shape[:-1])) or 1) if name == "kernel" else 0.02)
    return jax.device_put(x)

  return jax.tree_util.tree_map_with_path(init, shapes["params"])


def train_step(loss_fn, module, optimizer, params, opt_state, batch):
  """One step: loss, gradients, optimizer update. Bound with ``functools.partial`` and jitted."""
  loss, grads = jax.value_and_grad(functools.partial(loss_fn, module))(params, batch)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


def time_interleaved(calls: Dict[str, Callable[[], Any]], reps: int) -> Dict[str, List[float]]:
  """Seconds of each call, ``reps`` rounds of one call of each in turn (so load hits all alike)."""
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  return times


def summarise(times: Dict[str, List[float]], baseline: str = "dense") -> Dict[str, Dict[str, float]]:
  """Median, best and the ratios against ``baseline`` of the same run, per variant.

  ``ratio``: of the medians; ``paired_ratio``: the median of the per-repetition
  ratios; ``best_ratio``: of the fastest runs, which load from other processes
  can only slow down, so it is the steadiest of the three on a shared machine.
  """
  base = statistics.median(times[baseline])
  return {name: dict(median_s=statistics.median(t), min_s=min(t), ratio=statistics.median(t) / base,
                     paired_ratio=statistics.median(x / y for x, y in zip(t, times[baseline])),
                     best_ratio=min(t) / min(times[baseline]), all_s=t)
          for name, t in times.items()}


def variants(d_ff: int, settings: Settings) -> Dict[str, Tuple[Optional[int], str]]:
  """``name -> (top_k, method)``: dense first, then each method and each k below ``d_ff``."""
  out = {"dense": (None, "exact")}
  for method in settings.methods:
    for k in settings.ks:
      if k < d_ff:
        out[f"{method}/{k}"] = (k, method)
  return out


def bench_case(case: Case, settings: Settings) -> List[Dict[str, Any]]:
  """The rows of one model and size: dense, and every (method, k) against it."""
  load = machine.load_average()
  print(f"\n== {case.model} {case.size}: " + ", ".join(f"{k} {v}" for k, v in case.shape.items())
        + f"; load average {load}", flush=True)
  params = random_params(case.make(None, "exact"), case.init_args, case.init_kwargs, settings.seed)
  opt_state = case.optimizer.init(params)
  calls, losses, compile_s = {}, {}, {}
  for name, (k, method) in variants(case.shape["d_ff"], settings).items():
    step = jax.jit(functools.partial(train_step, case.loss, case.make(k, method), case.optimizer))
    call = functools.partial(step, params, opt_state, case.batch)
    t0 = time.perf_counter()
    losses[name] = float(jax.block_until_ready(call())[2])
    compile_s[name] = time.perf_counter() - t0
    calls[name] = call
  stats = summarise(time_interleaved(calls, settings.reps))
  rows = []
  print(f"   {'variant':16s} {'ms/step':>9s} {'(best)':>9s} {'ratio':>6s} {'paired':>6s} {'best':>6s}  resolves to  "
        "same loss")
  for name, (k, method) in variants(case.shape["d_ff"], settings).items():
    resolved = None if k is None else "/".join(dict.fromkeys(
        topk.resolve_method(method, (n, case.shape["d_ff"]), k, settings.dtype) for n in case.shape["mlp_rows"]))
    exact_name = f"exact/{k}"
    same = losses[name] == losses[exact_name] if k and exact_name in losses and method != "exact" else None
    row = dict(model=case.model, size=case.size, **case.shape, variant=name, method=method if k else None, k=k,
               resolves_to=resolved, loss=losses[name], same_loss_as_exact=same, compile_s=compile_s[name],
               load_average_at_start=load, **stats[name])
    rows.append(row)
    print(f"   {name:16s} {row['median_s'] * 1e3:9.1f} {row['min_s'] * 1e3:9.1f} {row['ratio']:6.3f} "
          f"{row['paired_ratio']:6.3f} {row['best_ratio']:6.3f}  {str(resolved):11s}  {same}", flush=True)
  return rows


def mlp_grad(block: layers.MlpBlock, params, x):
  """Gradients of ``sum(block(x)^2)`` with respect to the parameters and the input (fwd + bwd)."""
  def loss(p, x):
    return jnp.sum(jnp.square(block.apply({"params": p}, x, deterministic=True)))
  return jax.grad(loss, argnums=(0, 1))(params, x)


def bench_selection(settings: Settings) -> List[Dict[str, Any]]:
  """One ReLU MLP (``SELECTION_SHAPE``) forward and backward: dense, and each selection method."""
  s = SELECTION_SHAPE
  print(f"\n== selection: one MLP, " + ", ".join(f"{k} {v}" for k, v in s.items()) + ", fwd + bwd", flush=True)
  x = jnp.asarray(np.random.default_rng(settings.seed).standard_normal((s["tokens"], s["d_model"]), np.float32),
                  settings.dtype)

  def block(k, method):
    return layers.MlpBlock(intermediate_dim=s["d_ff"], activations=("relu",), intermediate_dropout_rate=0.0,
                           dtype=jnp.dtype(settings.dtype), top_k=k, top_k_method=method)

  params = block(None, "exact").init(jax.random.PRNGKey(settings.seed), x)["params"]
  named = {"dense": (None, "exact"), **{m: (s["k"], m) for m in topk.METHODS}}
  calls = {name: functools.partial(jax.jit(functools.partial(mlp_grad, block(k, m))), params, x)
           for name, (k, m) in named.items()}
  grads = {name: jax.block_until_ready(call()) for name, call in calls.items()}
  stats = summarise(time_interleaved(calls, settings.selection_reps))
  rows = []
  for name, (k, method) in named.items():
    same = None if k is None else all(bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree_util.tree_leaves(grads[name]), jax.tree_util.tree_leaves(grads["exact"])))
    resolved = topk.resolve_method(method, (s["tokens"], s["d_ff"]), k, settings.dtype) if k else None
    rows.append(dict(variant=name, method=method if k else None, k=k, resolves_to=resolved, tokens=s["tokens"],
                     d_model=s["d_model"], d_ff=s["d_ff"], same_gradients_as_exact=same, **stats[name]))
    print(f"   {name:10s} {stats[name]['median_s'] * 1e3:8.2f} ms (best {stats[name]['min_s'] * 1e3:8.2f})  "
          f"ratio {stats[name]['ratio']:.3f}  paired {stats[name]['paired_ratio']:.3f}  "
          f"best {stats[name]['best_ratio']:.3f}  resolves to {resolved}  "
          f"same gradients as exact: {same}", flush=True)
  return rows


def run(settings: Settings, command: str = "") -> Dict[str, Any]:
  """Every model and size of ``settings`` (and the selection microbenchmark); the JSON-ready result."""
  info = machine.machine_info()
  print(f"backend {info['platform']} ({info['device_kind']}), cpu {info['cpu']}, {info['cores']} cores, "
        f"jax {info['jax']}, load average {info['load_average_at_start']}", flush=True)
  selection = bench_selection(settings) if settings.selection else []
  rows = []
  for model in settings.models:
    for size in settings.sizes:
      rows.extend(bench_case(make_case(model, size, settings), settings))
  info["load_average_at_end"] = machine.load_average()
  return {"command": command, "machine": info, "settings": dataclasses.asdict(settings), "selection": selection,
          "results": rows}


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def markdown(result: Dict[str, Any]) -> str:
  """The result as Markdown: the machine, the selection table and the training-step table."""
  m = result["machine"]
  lines = [f"`{result['command']}`", "",
           f"{m['platform']} ({m['device_kind']}), {m['cpu']}, {m['cores']} cores, jax {m['jax']}, {m['date']}; "
           f"load average {m.get('load_average_at_start')} at the start, {m.get('load_average_at_end')} at the end.",
           ""]
  if result["selection"]:
    s = SELECTION_SHAPE
    lines += [f"One ReLU MLP, {s['tokens']} tokens, d {s['d_model']}, d_ff {s['d_ff']}, k {s['k']}, forward + "
              "backward:", "",
              "| variant | resolves to | ms | ratio to dense | paired | best | same gradients as exact |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in result["selection"]:
      lines.append(f"| {r['variant']} | {r['resolves_to'] or '-'} | {r['median_s'] * 1e3:.2f} | {r['ratio']:.3f} | "
                   f"{r['paired_ratio']:.3f} | {r['best_ratio']:.3f} | {_flag(r['same_gradients_as_exact'])} |")
    lines.append("")
  if result["results"]:
    lines += ["Training step (forward, backward, optimizer), medians; ratio = Top-k / dense in the same run:", "",
              "| model | size | layers | d_ff | method | k | dense ms | Top-k ms | ratio | paired | best | "
              "same loss as exact | load |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    dense = {}
    for r in result["results"]:
      if r["k"] is None:
        dense[(r["model"], r["size"])] = r
        continue
      d = dense[(r["model"], r["size"])]
      method = r["method"] + (f" ({r['resolves_to']})" if r["method"] == "auto" else "")
      lines.append(f"| {r['model']} | {r['size']} | {r['layers']} | {r['d_ff']} | {method} | {r['k']} | "
                   f"{d['median_s'] * 1e3:.0f} | {r['median_s'] * 1e3:.0f} | {r['ratio']:.3f} | "
                   f"{r['paired_ratio']:.3f} | {r['best_ratio']:.3f} | {_flag(r['same_loss_as_exact'])} | "
                   f"{_load(r.get('load_average_at_start'))} |")
  return "\n".join(lines) + "\n"


def _flag(value: Optional[bool]) -> str:
  return "-" if value is None else ("yes" if value else "no")


def _load(value) -> str:
  return "-" if not value else f"{value[0]:.1f}"


def write_markdown(path: Optional[str], result: Dict[str, Any]) -> None:
  """Writes :func:`markdown` of ``result`` to ``path`` (its directory is made), if a path is given."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(markdown(result))
