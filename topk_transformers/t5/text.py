"""Text in and out of T5: encode input strings, render token ids, decode texts with a loaded run."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import numpy as np

EOS_ID = 1


def render(ids: Sequence[int], vocabulary) -> str:
  """Token ids as text, sentinels shown as ``<extra_id_i>`` and EOS/padding dropped."""
  ids = [int(i) for i in ids]
  if 1 in ids:
    ids = ids[:ids.index(1)]
  extra = getattr(vocabulary, "extra_ids", 0) or 0
  first_sentinel = vocabulary.vocab_size - extra
  out, run = [], []

  def flush():
    if run:
      out.append(vocabulary.decode(run))
      run.clear()

  for i in ids:
    if i == 0:
      continue
    if extra and i >= first_sentinel:
      flush()
      out.append(f"<extra_id_{vocabulary.vocab_size - 1 - i}>")
    else:
      run.append(i)
  flush()
  return " ".join(s for s in out if s)


def encode_texts(texts: Sequence[str], vocabulary) -> np.ndarray:
  """Token ids ``[n, longest + 1]``: each text, then EOS, padded with 0."""
  ids = [list(vocabulary.encode(t)) + [EOS_ID] for t in texts]
  out = np.zeros((len(ids), max(len(i) for i in ids)), np.int32)
  for row, i in enumerate(ids):
    out[row, :len(i)] = i
  return out


def decode_texts(run: Any, texts: Sequence[str], max_decode_length: int, all_decodes: bool = False,
                 **decode_kwargs) -> Dict[str, Any]:
  """Decodes ``texts`` with ``run`` (a ``runs.Run`` of a T5 model) through ``model.predict_batch``.

  ``decode_kwargs`` go to ``t5.decoding.predict_batch`` (``decode_method``, ``num_decodes``, ``alpha``,
  ``temperature``, ``topk``, ``topp``, ``rng``). Returns ``{"step", "seconds", "results"}``, with
  per input its ``outputs`` (text, score, ids; every decode, best first, with ``all_decodes``).
  """
  model = run.model
  inputs = encode_texts(texts, model.input_vocabulary)
  start = time.perf_counter()
  tokens, scores = model.predict_batch(run.params, {"encoder_input_tokens": inputs},
                                       max_decode_length=max_decode_length, eos_id=EOS_ID,
                                       return_all_decodes=True, return_scores=True, **decode_kwargs)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  seconds = time.perf_counter() - start
  results: List[Dict[str, Any]] = []
  for i, text in enumerate(texts):
    shown = range(tokens.shape[1]) if all_decodes else range(1)
    results.append({"input": text, "outputs": [
        {"text": render(tokens[i, j], model.output_vocabulary), "score": float(scores[i, j]),
         "ids": [int(t) for t in tokens[i, j]]} for j in shown]})
  return {"step": run.step, "seconds": seconds, "results": results}
