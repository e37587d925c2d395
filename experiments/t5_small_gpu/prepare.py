#!/usr/bin/env python
"""Span-corruption examples of the embedded corpus, written once for a machine that has no TensorFlow.

The device image has JAX with CUDA but no TensorFlow, seqio or gin, so the training examples are made here by the
project's own pipeline (``tasks.register_local_text_task``: the Wikipedia extract that gensim ships, its trained
4096-id vocabulary, T5's span corruption at inputs 512 / targets 114) and saved as one ``.npz`` that travels with
the working tree::

    python experiments/t5_small_gpu/prepare.py --out=runs/t5_small_gpu/examples.npz [--passes=16]

``train_inputs`` / ``train_targets`` hold ``--passes`` passes over the train split, each drawn with its own seed
(span corruption picks other spans every pass); ``eval_inputs`` / ``eval_targets`` the whole validation split,
once. Token ids are ``uint16``, padded with 0; EOS is in them, as seqio appends it. The archive also stores its
``meta`` (JSON): lengths, vocabulary size, passes and the examples per split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Sequence

import numpy as np

from topk_transformers import startup

startup.quiet_start()

from topk_transformers.data import tasks  # noqa: E402
from topk_transformers.errors import ConfigError  # noqa: E402

LENGTHS = {"inputs": 512, "targets": 114}  # T5's pretraining lengths


def split_arrays(task, split: str, lengths: Dict[str, int], seed: int, limit: int = 0) -> Dict[str, np.ndarray]:
  """One pass over ``split``: ``{'inputs': [n, L_in], 'targets': [n, L_t]}`` uint16, zero-padded."""
  dataset = task.get_dataset(lengths, split=split, shuffle=split == "train", seed=seed, num_epochs=1,
                             use_cached=False)
  rows = {k: [] for k in lengths}
  for example in dataset.as_numpy_iterator():
    for key, length in lengths.items():
      ids = np.asarray(example[key])
      row = np.zeros(length, np.uint16)
      row[:ids.size] = ids
      rows[key].append(row)
    if limit and len(rows["inputs"]) >= limit:
      break
  if not rows["inputs"]:
    raise ConfigError(f"the {split} split gave no example")
  return {k: np.stack(v) for k, v in rows.items()}


def prepare(out: str, passes: int, lengths: Dict[str, int], limit: int = 0) -> dict:
  """Writes the ``.npz`` at ``out``; returns its ``meta``."""
  task = tasks.get_task(tasks.LOCAL_TEXT_TASK)
  vocab_size = int(task.output_features["targets"].vocabulary.vocab_size)
  if vocab_size > np.iinfo(np.uint16).max + 1:
    raise ConfigError(f"a vocabulary of {vocab_size} ids does not fit uint16")
  train = [split_arrays(task, "train", lengths, seed, limit) for seed in range(passes)]
  evaluation = split_arrays(task, "validation", lengths, 0, limit)
  meta = {"task": tasks.LOCAL_TEXT_TASK, "corpus": "the Wikipedia extract shipped by gensim",
          "lengths": lengths, "vocab_size": vocab_size, "passes": passes, "seeds": list(range(passes)),
          "train_examples": int(sum(len(t["inputs"]) for t in train)), "eval_examples": int(len(evaluation["inputs"]))}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = f"{out}.tmp-{os.getpid()}.npz"
  np.savez_compressed(tmp, train_inputs=np.concatenate([t["inputs"] for t in train]),
                      train_targets=np.concatenate([t["targets"] for t in train]),
                      eval_inputs=evaluation["inputs"], eval_targets=evaluation["targets"],
                      meta=np.asarray(json.dumps(meta)))
  os.replace(tmp, out)
  return meta


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="the .npz to write")
  parser.add_argument("--passes", type=int, default=16, help="passes over the train split, one seed each")
  parser.add_argument("--inputs_length", type=int, default=LENGTHS["inputs"])
  parser.add_argument("--targets_length", type=int, default=LENGTHS["targets"])
  parser.add_argument("--limit", type=int, default=0, help="at most this many examples per pass (0: all); for tests")
  args = parser.parse_args(argv)
  try:
    for name in ("passes", "inputs_length", "targets_length"):
      if getattr(args, name) <= 0:
        raise ConfigError(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.out.endswith(".npz"):
      raise ConfigError(f"--out must name a .npz file, got {args.out!r}")
    meta = prepare(args.out, args.passes, {"inputs": args.inputs_length, "targets": args.targets_length},
                   args.limit)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {meta['train_examples']} train examples ({meta['passes']} passes), "
        f"{meta['eval_examples']} held-out, vocabulary {meta['vocab_size']}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
