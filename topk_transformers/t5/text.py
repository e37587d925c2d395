"""Text in and out of T5: encode input strings, render token ids, decode texts with a loaded run."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

EOS_ID = 1
# A long input is tokenised in pieces of this many characters, each cut after a space, so that its token ids are
# never held beyond the kept ones and one piece's (a 100 KB input once grew the encoder, and memory, without bound).
PIECE_CHARS = 1 << 16


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


def _pieces(text: str) -> Iterator[str]:
  """``text`` in consecutive pieces of at most :data:`PIECE_CHARS` characters, cut after a space where there is one."""
  start = 0
  while start < len(text):
    end = start + PIECE_CHARS
    if end < len(text):
      cut = text.rfind(" ", start, end)
      end = cut + 1 if cut > start else end
    yield text[start:end]
    start = end


def encode_text(text: str, vocabulary, length: Optional[int] = None) -> Tuple[List[int], int]:
  """``(ids, dropped)``: the token ids of ``text`` then EOS, at most ``length`` of them, and how many were cut.

  As T5X's feature lengths do, an input longer than ``length`` keeps its first ``length - 1`` tokens and EOS.
  It is tokenised piece by piece, so memory stays bounded by ``length`` and one piece whatever its size.
  """
  if length is None:
    return [int(i) for i in vocabulary.encode(text)] + [EOS_ID], 0
  if length < 1:
    raise ValueError(f"length must be a positive integer, got {length!r}")
  keep, ids, total = length - 1, [], 0
  for piece in _pieces(text):
    piece_ids = vocabulary.encode(piece)
    total += len(piece_ids)
    if len(ids) < keep:
      ids.extend(int(i) for i in piece_ids[:keep - len(ids)])
  return ids + [EOS_ID], max(total - keep, 0)


def encode_texts(texts: Sequence[str], vocabulary, length: Optional[int] = None) -> np.ndarray:
  """Token ids ``[n, longest + 1]``: each text, then EOS, padded with 0; at most ``length`` wide.

  A text longer than ``length`` tokens (EOS included) is cut to it, with one warning line saying how many of
  its tokens were dropped.
  """
  ids = []
  for n, t in enumerate(texts):
    row, dropped = encode_text(t, vocabulary, length)
    if dropped:
      logging.getLogger(__name__).warning(
          "input %d is longer than the model's input length of %d tokens: truncated to it, its last %s tokens "
          "dropped", n + 1, length, f"{dropped:,}")
    ids.append(row)
  out = np.zeros((len(ids), max(len(i) for i in ids)), np.int32)
  for row, i in enumerate(ids):
    out[row, :len(i)] = i
  return out


def decode_texts(run: Any, texts: Sequence[str], max_decode_length: int, all_decodes: bool = False,
                 inputs: Optional[np.ndarray] = None, input_length: Optional[int] = None,
                 **decode_kwargs) -> Dict[str, Any]:
  """Decodes ``texts`` with ``run`` (a ``runs.Run`` of a T5 model) through ``model.predict_batch``.

  ``decode_kwargs`` go to ``t5.decoding.predict_batch`` (``decode_method``, ``num_decodes``, ``alpha``,
  ``temperature``, ``topk``, ``topp``, ``rng``). Returns ``{"step", "seconds", "results"}``, with
  per input its ``outputs`` (text, score, ids; every decode, best first, with ``all_decodes``). ``inputs`` are
  ``encode_texts(texts, ...)`` when the caller has them already; otherwise the texts are encoded here, each cut to
  ``input_length`` tokens if given.
  """
  model = run.model
  if inputs is None:
    inputs = encode_texts(texts, model.input_vocabulary, input_length)
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
