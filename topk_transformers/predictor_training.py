"""Training decoding predictors from a checkpoint's own activations, and measuring what they cost in quality.

``topk-train-predictors`` (``commands/train_predictors.py``) is a few flags over :func:`train` and :func:`quality`.

:func:`train` runs the checkpoint's decoder teacher-forced over ``num_batches`` batches of a split (the run's train
split by default), accumulates ``X^T X`` of every decoder MLP's input (the output of ``pre_mlp_layer_norm``, padding
skipped) and fits the least-squares low-rank predictors of ``predictors.fit`` for each rank, saved beside the
checkpoint (``RUN/predictors/r<r>.npz``).

:func:`quality` compares, on held-out data (the run's eval split), decoding with predictors at each ``(r, c)``
against exact Top-k decoding of the same checkpoint:

* ``recall``: the share of the exact Top-k units of each decoder MLP that are among the ``c`` candidates (so that the
  predicted step selects them), averaged over real tokens and layers, on the MLP inputs of the exact model;
* ``loss`` / ``accuracy``: held-out cross-entropy (nats per target token) and next-token accuracy, teacher-forced
  through the decoding step itself (the KV cache, the cached cross-attention, the predicted MLPs), so they measure
  the path that decodes; the exact figures come from the same steps without predictors;
* ``greedy_token_agreement``: greedy decodes of the held-out inputs, the share of the exact decode's tokens (up to its
  EOS) that the predicted decode reproduces at the same position, and ``greedy_sequence_agreement``, the share of
  identical decodes;
* ``bound``: what the same setting would allow at T5 v1.0 Large's shape (k = 128; ``large_candidates`` keeps the
  ratio c / k), the bytes bound on the speedup over dense of ``benchmarks/decoding.py``.

Examples are not packed here (``pack=False``), so each row is one example.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers import decoding
from topk_transformers import layers
from topk_transformers import predictors
from topk_transformers import topk as topk_lib
from topk_transformers.errors import ConfigError
from topk_transformers.t5 import decoding as t5_decoding

EOS_ID = 1


def _batches(run, split: str, num_batches: int) -> Iterator[Dict[str, np.ndarray]]:
  dataset = copy.copy(run.dataset)
  if hasattr(dataset, "pack"):
    dataset.pack = False  # one example per row: decoding steps cannot run packed rows
  ds = dataset.get_dataset(split, run.host_batch, shuffle=False, repeat=False)
  for i, batch in enumerate(ds.as_numpy_iterator()):
    if i >= num_batches:
      break
    yield batch


@functools.partial(jax.jit, static_argnums=0)
def _mlp_inputs(module, params, enc, dec_in, dec_tgt):
  """Every decoder MLP's input ``{'layers_i': [batch, length, embed]}``, teacher-forced (no dropout)."""
  _, state = module.apply({"params": params}, enc, dec_in, dec_tgt, enable_dropout=False,
                          capture_intermediates=lambda m, name: m.name == "pre_mlp_layer_norm")
  dec = state["intermediates"]["decoder"]
  return {name: v["pre_mlp_layer_norm"]["__call__"][0] for name, v in dec.items() if name.startswith("layers_")}


def collect_moments(run, split: str, num_batches: int) -> predictors.Moments:
  """``X^T X`` of the decoder MLP inputs over ``num_batches`` batches of ``split`` (real target tokens only)."""
  moments = predictors.Moments()
  module = run.model.module
  for batch in _batches(run, split, num_batches):
    xs = jax.device_get(_mlp_inputs(module, run.params, batch["encoder_input_tokens"],
                                    batch["decoder_input_tokens"], batch["decoder_target_tokens"]))
    for name, x in xs.items():
      moments.add(name, x, weights=batch["decoder_target_tokens"] > 0)
  if not moments.count:
    raise ConfigError(f"split {split!r} gave no batches")
  return moments


def train(run, ranks: Sequence[int], out_dir: str, split: Optional[str] = None, num_batches: int = 50,
          ridge: float = 1e-6) -> Dict[int, str]:
  """Fits rank-``r`` predictors for every ``r`` of ``ranks`` on ``run``'s activations; returns ``{r: path}``."""
  split = split or run.dataset.train_split
  start = time.perf_counter()
  moments = collect_moments(run, split, num_batches)
  fits = predictors.fit(run.params, moments, ranks, ridge=ridge)
  seconds = time.perf_counter() - start
  tokens = int(next(iter(moments.count.values())))
  paths = {}
  for r, preds in fits.items():
    meta = {"checkpoint": run.checkpoint, "step": run.step, "split": split, "batches": num_batches, "tokens": tokens,
            "ridge": ridge, "seconds": round(seconds, 1), "fit": "least-squares low-rank pre-activations"}
    paths[r] = predictors.save(f"{out_dir}/r{r}.npz", preds, meta)
  return paths


# ---------------------------------------------------------------------------
# Quality on held-out data.
# ---------------------------------------------------------------------------


def _with_candidates(module, c: Optional[int]):
  return module.clone(config=dataclasses.replace(module.config, decode_candidates=c))


@functools.partial(jax.jit, static_argnums=0)
def forced_step_logits(module, params, preds, enc, dec_in):
  """Logits ``[batch, length, vocab]`` of ``dec_in`` fed through the decoding step one position at a time."""
  length = dec_in.shape[1]
  cross_kv, cache = t5_decoding.encode_for_decoding(module, params, enc, length)
  if preds is not None:
    params, preds = predictors.prepare(params, preds)
  step = t5_decoding.make_tokens_to_logits(module, params, None, enc, length, cross_kv=cross_kv, predictors=preds)

  def body(cache, xs):
    i, token = xs
    logits, cache = step(decoding.DecodingState(i, token[:, None], None, cache))
    return cache, logits

  _, logits = jax.lax.scan(body, cache, (jnp.arange(length, dtype=jnp.int32), dec_in.T))
  return jnp.transpose(logits, (1, 0, 2))


@functools.partial(jax.jit, static_argnames=("acts", "k", "c"))
def _recall(x, wi, a, b, *, acts, k, c):
  """Per token, the share of the exact Top-k units of ``act(x @ wi)`` among the ``c`` best predicted."""
  fs = [layers.resolve_activation(f) for f in acts]
  gated = len(acts) > 1
  h = functools.reduce(lambda u, v: u * v, [f(x @ w) for f, w in zip(fs, wi)])
  _, exact = topk_lib.select(h, k, "exact", by_magnitude=gated)
  p = jnp.einsum("td,dr,nrf->ntf", x, a, b)
  score = p[0] if not gated else jnp.abs(functools.reduce(lambda u, v: u * v, [f(q) for f, q in zip(fs, p)]))
  _, cand = jax.lax.top_k(score, min(c, score.shape[-1]))
  hit = jnp.any(exact[:, :, None] == cand[:, None, :], axis=-1)
  return jnp.mean(hit.astype(jnp.float32), axis=-1)


LARGE_K = 128


def large_bound(r: int, c: int, k: int = LARGE_K) -> float:
  """The bytes bound on the speedup over dense of predicted decoding at T5 v1.0 Large's shape (float32)."""
  from topk_transformers.benchmarks import decoding as bench  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import sizes  # pylint: disable=g-import-not-at-top

  cfg = sizes.published_config("1.0", "large")
  dense = bench.weight_bytes_per_token(cfg, None, 4)["total"]
  return dense / bench.weight_bytes_per_token(cfg, k, 4, r, c)["total"]


def attach_measured_speedups(rows: Sequence[Dict[str, Any]], bench: Mapping[str, Any], k: int) -> int:
  """Adds ``measured_speedup`` (and the benchmark row's ``size``) to the predicted quality ``rows`` whose setting
  a ``topk-bench-decode --predicted`` result ``bench`` timed, matching ``(r, c)`` of a model with Top-k ``k`` to
  the benchmark's ``(r, c * k_bench / k)`` (the same rank and candidates per kept unit, as ``bound`` maps them).
  Only rows that read through the same path as the README's (the row kernels where they ran) count. Returns how
  many rows matched."""
  timed = {}
  for b in bench["results"]:
    if b.get("variant") == "predicted" and b.get("row_kernels", True):
      timed[(b["predictor_rank"], b["candidates"] * k // b["k"])] = b
  matched = 0
  for row in rows:
    hit = timed.get((row.get("predictor_rank"), row.get("candidates")))
    if row.get("variant") == "predicted" and hit is not None:
      row.update(measured_speedup=hit["speedup"], measured_candidates=hit["candidates"],
                 measured_on=f"T5 v{hit['version']} {hit['size']}, {hit['num_decoder_layers']} decoder layers, "
                             f"{hit['dtype']}, k={hit['k']}")
      matched += 1
  return matched


def quality(run, predictor_sets: Dict[int, Any], candidates: Sequence[int], split: Optional[str] = None,
            num_batches: int = 10, decode_batches: int = 2, log=print) -> Dict[str, Any]:
  """Recall, held-out loss / accuracy and greedy agreement for every ``(r, c)`` against exact Top-k decoding."""
  split = split or run.dataset.eval_split
  module = _with_candidates(run.model.module, None)
  cfg = module.config
  if not topk_lib.is_active(cfg.top_k, cfg.mlp_dim):
    raise ConfigError("the checkpoint's MLPs have no active Top-k: there is nothing to predict")
  k = cfg.top_k
  bad = [c for c in candidates if c < k]
  if bad:
    raise ConfigError(f"--candidates must be at least k = {k}, got {bad}")
  settings = [(None, None)] + [(r, c) for r in sorted(predictor_sets) for c in sorted(candidates)]
  totals = {s: {"nll": 0.0, "correct": 0.0, "recall": 0.0, "recall_n": 0.0, "agree": 0.0, "agree_n": 0.0,
                "seq_agree": 0.0, "seqs": 0.0} for s in settings}
  weight = 0.0
  kernels = predictors.mlp_kernels(run.params)
  exact_decodes: List[np.ndarray] = []
  start = time.perf_counter()
  for bi, batch in enumerate(_batches(run, split, num_batches)):
    enc, dec_in, tgt = batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"]
    mask = (tgt > 0).astype(np.float32)
    weight += float(mask.sum())
    xs = jax.device_get(_mlp_inputs(module, run.params, enc, dec_in, tgt))
    real = mask.reshape(-1) > 0
    for s in settings:
      r, c = s
      mod = _with_candidates(module, c)
      preds = predictor_sets[r] if r is not None else None
      logits = np.asarray(forced_step_logits(mod, run.params, preds, enc, dec_in), np.float32)
      logp = jax.nn.log_softmax(logits)
      nll = -np.take_along_axis(np.asarray(logp), tgt[..., None], -1)[..., 0]
      totals[s]["nll"] += float((nll * mask).sum())
      totals[s]["correct"] += float(((np.argmax(logits, -1) == tgt) * mask).sum())
      if r is not None:
        layers_ = predictors.layers_of(preds)
        for name, x in xs.items():
          rec = _recall(jnp.asarray(x.reshape(-1, x.shape[-1])[real]), jnp.asarray(kernels[name]),
                        jnp.asarray(layers_[name]["a"]), jnp.asarray(layers_[name]["b"]),
                        acts=tuple(cfg.mlp_activations), k=k, c=c)
          totals[s]["recall"] += float(np.sum(rec))
          totals[s]["recall_n"] += float(rec.shape[0])
      if bi < decode_batches:
        tokens = np.asarray(t5_decoding.predict_batch(mod, run.params, {"encoder_input_tokens": enc},
                                                      max_decode_length=tgt.shape[1], eos_id=EOS_ID, predictors=preds))
        keep = enc.any(axis=1)  # padding rows of the last batch
        if r is None:
          exact_decodes.append(tokens)
        ref = exact_decodes[bi]
        upto = np.cumsum(ref == EOS_ID, axis=1) - (ref == EOS_ID) == 0  # positions up to and with the first EOS
        upto &= keep[:, None]
        totals[s]["agree"] += float(((tokens == ref) & upto).sum())
        totals[s]["agree_n"] += float(upto.sum())
        totals[s]["seq_agree"] += float((np.all(tokens == ref, axis=1) & keep).sum())
        totals[s]["seqs"] += float(keep.sum())
    log(f"  batch {bi + 1}: {time.perf_counter() - start:.0f}s")
  rows = []
  exact = totals[(None, None)]
  exact_loss = exact["nll"] / weight
  for s in settings:
    t = totals[s]
    loss = t["nll"] / weight
    row = {"variant": "exact" if s[0] is None else "predicted", "predictor_rank": s[0], "candidates": s[1],
           "k": k, "d_ff": cfg.mlp_dim, "loss": loss, "accuracy": t["correct"] / weight,
           "loss_vs_exact": loss / exact_loss - 1.0,
           "within_1pct_of_exact": bool(loss <= 1.01 * exact_loss),
           "greedy_token_agreement": t["agree"] / max(t["agree_n"], 1.0),
           "greedy_sequence_agreement": t["seq_agree"] / max(t["seqs"], 1.0)}
    if s[0] is not None:
      row["recall"] = t["recall"] / max(t["recall_n"], 1.0)
      row["large_candidates"] = s[1] * LARGE_K // k
      row["bound"] = large_bound(s[0], row["large_candidates"])
    rows.append(row)
  return {"checkpoint": run.checkpoint, "step": run.step, "split": split, "batches": num_batches,
          "decode_batches": decode_batches, "target_tokens": weight, "k": k, "d_ff": cfg.mlp_dim,
          "emb_dim": cfg.emb_dim, "num_decoder_layers": cfg.num_decoder_layers, "rows": rows,
          "seconds": time.perf_counter() - start}


def format_table(result: Dict[str, Any]) -> str:
  """The quality rows as a Markdown table."""
  lines = ["| setting (r, c) | recall of exact Top-k | held-out loss | vs exact | accuracy | greedy token agreement "
           "| identical greedy decodes | loss within 1% |", "|---|---|---|---|---|---|---|---|"]
  for row in result["rows"]:
    name = "exact Top-k" if row["variant"] == "exact" else f"r={row['predictor_rank']}, c={row['candidates']}"
    recall = f"{row['recall']:.3f}" if "recall" in row else "1"
    lines.append(f"| {name} | {recall} | {row['loss']:.4f} | {100 * row['loss_vs_exact']:+.2f}% | "
                 f"{row['accuracy']:.4f} | {row['greedy_token_agreement']:.3f} | "
                 f"{row['greedy_sequence_agreement']:.3f} | {'yes' if row['within_1pct_of_exact'] else 'no'} |")
  return "\n".join(lines)
