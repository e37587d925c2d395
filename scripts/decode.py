#!/usr/bin/env python
"""Decodes text with a trained T5 checkpoint (greedy, beam search or sampling).

  python scripts/decode.py --gin_file=configs/t5/runs/cpu_smoke.gin --checkpoint=/tmp/topk_t5_smoke \
      --input "The cat <extra_id_0> on the mat." [--input "..."] [--method=beam --num_decodes=4 --alpha=0.6]

``--gin_file`` / ``--gin.NAME=VALUE`` are the run's own gin flags (the model and
its vocabulary come from ``MODEL``). ``--checkpoint`` is a run directory (its
latest step) or one step, ``RUN_DIR/checkpoints/<step>``, as the trainer writes
them: an orbax ``CheckpointManager`` directory whose ``state`` item holds the
train state; only its ``params`` subtree is read (``checkpoints.restore_params``).

Top-k models decode on the sparse path automatically at batch 1 (see
``MlpBlock.sparse_decode``); ``--gin.network.T5Config.sparse_decode=False``
forces the dense path, ``=True`` the sparse one at any batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from topk_transformers import checkpoints  # noqa: E402
from topk_transformers import decoding  # noqa: E402
from topk_transformers import gin_utils  # noqa: E402
from topk_transformers import partitioning  # noqa: E402
from topk_transformers.t5 import report  # noqa: E402

EOS_ID = 1


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="run directory or RUN_DIR/checkpoints/<step>")
  p.add_argument("--input", action="append", default=[], help="text to decode (repeatable)")
  p.add_argument("--input_file", default=None, help="more inputs, one per line")
  p.add_argument("--method", default="greedy", choices=decoding.METHODS)
  p.add_argument("--num_decodes", type=int, default=1, help="beams, or samples per input")
  p.add_argument("--alpha", type=float, default=0.6, help="beam search length penalty")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--topk", type=int, default=0, help="sample among the topk most likely tokens (0: all)")
  p.add_argument("--topp", type=float, default=0.0, help="nucleus sampling mass (0: off)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max_decode_length", type=int, default=64)
  p.add_argument("--all_decodes", action="store_true", help="print every beam / sample, best first")
  p.add_argument("--json", default=None, help="also write the outputs here")
  return p.parse_args(argv)


def encode_inputs(texts, vocabulary) -> np.ndarray:
  """Token ids ``[n, max_len]`` (each text + EOS, padded with 0)."""
  ids = [list(vocabulary.encode(t)) + [EOS_ID] for t in texts]
  out = np.zeros((len(ids), max(len(i) for i in ids)), np.int32)
  for row, i in enumerate(ids):
    out[row, :len(i)] = i
  return out


def load_params(model, checkpoint: str, input_shapes):
  abstract = jax.eval_shape(lambda r: model.get_initial_variables(r, input_shapes), jax.random.PRNGKey(0))
  shardings = partitioning.Partitioner().logical_shardings(abstract["params"])
  return checkpoints.restore_params(checkpoint, nn.meta.unbox(abstract["params"]), shardings)


@gin_utils.exit_on_config_error
def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  gin_files, bindings, rest = gin_utils.parse_gin_flags(argv)
  args = parse_args(rest)
  texts = list(args.input)
  if args.input_file:
    with open(args.input_file) as f:
      texts.extend(line.rstrip("\n") for line in f if line.strip())
  if not texts:
    raise SystemExit("error: give --input TEXT (repeatable) or --input_file")
  if not gin_files:
    raise SystemExit("error: give the run's --gin_file")
  gin_utils.configure(gin_files, bindings)
  model = gin_utils.get_macro("MODEL")
  in_vocab, out_vocab = model.input_vocabulary, model.output_vocabulary

  inputs = encode_inputs(texts, in_vocab)
  shapes = {"encoder_input_tokens": inputs.shape, "decoder_input_tokens": (inputs.shape[0], args.max_decode_length)}
  try:
    params, step = load_params(model, args.checkpoint, shapes)
  except checkpoints.CheckpointError as e:
    raise SystemExit(f"error: {e}") from None
  t0 = time.perf_counter()
  tokens, scores = decoding.predict_batch(
      model, params, {"encoder_input_tokens": inputs}, decode_method=args.method, num_decodes=args.num_decodes,
      alpha=args.alpha, temperature=args.temperature, topk=args.topk, topp=args.topp,
      rng=jax.random.PRNGKey(args.seed), max_decode_length=args.max_decode_length, eos_id=EOS_ID,
      return_all_decodes=True, return_scores=True)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  elapsed = time.perf_counter() - t0
  print(f"checkpoint step {step}; {args.method} decoding of {len(texts)} input(s) in {elapsed:.2f}s "
        f"(compilation included)")
  results = []
  for i, text in enumerate(texts):
    shown = range(tokens.shape[1]) if args.all_decodes else range(1)
    outputs = [{"text": report.render(tokens[i, j], out_vocab), "score": float(scores[i, j]),
                "ids": [int(t) for t in tokens[i, j]]} for j in shown]
    results.append({"input": text, "outputs": outputs})
    print(f"input:  {text}")
    for o in outputs:
      print(f"output: {o['text']}    (score {o['score']:.3f})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"checkpoint": args.checkpoint, "step": step, "method": args.method, "results": results}, f,
                indent=1)
  return results


if __name__ == "__main__":
  main()
