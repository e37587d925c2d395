"""Autoregressive decoding over a KV cache: greedy, sampling and beam search.

The search functions know nothing about T5. They drive a callback

  ``tokens_to_logits(state: DecodingState) -> (logits [batch, vocab], new_cache)``

that runs one decoder step for ``state.cur_token`` (``[batch, 1]``) at position
``state.cur_index`` against ``state.cache``. Everything is a ``lax.while_loop``
over a fixed-size ``[batch, max_decode_length]`` buffer, so one decoder step is
compiled once whatever the output length; the loop stops early when every
sequence has emitted ``eos_id``.

Conventions (T5X's): decoding starts from token 0; output sequences include the
EOS token and hold 0 (padding) after it; a sequence that reaches
``max_decode_length`` without EOS is complete as it is. Cache leaves with a
leading axis are batch-major (``cached_key [batch, heads, head_dim, length]``);
scalar leaves (``cache_index``) are shared by the batch.

A model wires them to its network: T5's ``predict_batch`` is in ``t5/decoding.py``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1.0e7  # finite, so sums of dead beams' scores never become NaN
METHODS = ("greedy", "sample", "beam")


class DecodingState(NamedTuple):
  """What ``tokens_to_logits`` sees at one step."""

  cur_index: jax.Array
  """``[]`` int32: the output position being predicted (0 for the first token)."""
  cur_token: jax.Array
  """``[batch, 1]`` int32: the previous token (0, the decoder start, at step 0)."""
  sequences: jax.Array
  """``[batch, max_decode_length]`` int32: tokens decoded so far, 0 from ``cur_index`` on."""
  cache: Any
  """The model's cache (e.g. the ``cache`` collection of a Flax decoder)."""


TokensToLogits = Callable[[DecodingState], Tuple[jax.Array, Any]]


def brevity_penalty(alpha: float, length) -> jax.Array:
  """Google NMT / T5X length penalty ``((5 + length) / 6) ** alpha``; scores are ``log p / penalty``."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def expand_batch(tree: Any, n: int) -> Any:
  """Repeats every leaf with a leading (batch) axis ``n`` times: row ``b`` becomes rows ``b*n .. b*n+n-1``."""
  if n == 1:
    return tree
  return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, n, axis=0), tree)


def _gather_rows(tree: Any, rows: jax.Array) -> Any:
  """``x[rows]`` for every leaf with a leading (batch) axis; scalar leaves unchanged."""
  return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, rows, axis=0), tree)


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def validate(max_decode_length: int, eos_id) -> None:
  """Raises ``ValueError`` for a length that is not a positive integer or an EOS id that is not one of >= 0."""
  if not isinstance(max_decode_length, (int, np.integer)) or max_decode_length <= 0:
    raise ValueError(f"max_decode_length must be a positive integer, got {max_decode_length!r}")
  # eos_id may be traced (one compiled function for every EOS id).
  if eos_id is not None and _concrete(eos_id) and (np.ndim(eos_id) != 0 or int(eos_id) != eos_id or eos_id < 0):
    raise ValueError(f"eos_id must be a non-negative integer or None, got {eos_id!r}")


# ---------------------------------------------------------------------------
# Greedy and sampling.
# ---------------------------------------------------------------------------


def filter_logits(logits: jax.Array, topk: int = 0, topp: float = 0.0) -> jax.Array:
  """Sets to ``NEG_INF`` the logits outside the ``topk`` largest and outside the nucleus of mass ``topp``.

  ``topk=0`` and ``topp=0`` (or ``1``) disable each filter. The nucleus is the
  smallest set of most likely tokens whose probability reaches ``topp``; the
  most likely token is always kept.
  """
  if topk:
    kth = jax.lax.top_k(logits, topk)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if 0.0 < topp < 1.0:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < topp  # a prefix of the sorted tokens, never empty
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def temperature_sample(
    tokens_to_logits: TokensToLogits,
    cache: Any,
    batch_size: int,
    max_decode_length: int,
    rng: Optional[jax.Array] = None,
    *,
    temperature: float = 1.0,
    topk: int = 0,
    topp: float = 0.0,
    eos_id: Optional[int] = 1,
) -> Tuple[jax.Array, jax.Array]:
  """Samples one continuation per row; ``temperature=0`` is greedy (argmax).

  Args:
    tokens_to_logits: the decoder step (see module docstring).
    cache: the initial cache, for ``batch_size`` rows.
    batch_size: rows to decode.
    max_decode_length: static length of the output buffer.
    rng: PRNG key (unused when ``temperature == 0``); step ``i`` uses ``fold_in(rng, i)``,
      so a seed gives the same samples on every call.
    temperature, topk, topp: sampling from ``softmax(filter_logits(logits / temperature, topk, topp))``.
    eos_id: end-of-sequence token, or ``None`` to always decode ``max_decode_length`` tokens.

  Returns:
    ``(sequences [batch, max_decode_length] int32, log_probs [batch] float32)``,
    the log-probability of each sequence under the model's unmodified
    distribution (temperature 1, no filtering), EOS included.
  """
  validate(max_decode_length, eos_id)
  # temperature may be traced (then it must be > 0); topk and topp shape the computation and are static.
  greedy = _concrete(temperature) and temperature == 0
  if _concrete(temperature) and temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature!r}")
  if topk < 0 or not 0.0 <= topp <= 1.0:
    raise ValueError(f"need topk >= 0 and 0 <= topp <= 1, got topk={topk!r}, topp={topp!r}")
  if not greedy and rng is None:
    raise ValueError("sampling with temperature > 0 needs an rng")

  def cond(carry):
    i, _, _, finished, _, _ = carry
    return (i < max_decode_length) & ~jnp.all(finished)

  def body(carry):
    i, cur, seqs, finished, log_prob, cache = carry
    logits, cache = tokens_to_logits(DecodingState(i, cur[:, None], seqs, cache))
    logits = logits.astype(jnp.float32)
    if greedy:
      nxt = jnp.argmax(logits, axis=-1)
    else:
      scaled = filter_logits(logits / temperature, topk, topp)
      nxt = jax.random.categorical(jax.random.fold_in(rng, i), scaled, axis=-1)
    nxt = jnp.where(finished, 0, nxt).astype(jnp.int32)
    token_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), nxt[:, None], axis=-1)[:, 0]
    log_prob = log_prob + jnp.where(finished, 0.0, token_log_prob)
    seqs = jax.lax.dynamic_update_slice(seqs, nxt[:, None], (0, i))
    if eos_id is not None:
      finished = finished | (nxt == eos_id)
    return i + 1, nxt, seqs, finished, log_prob, cache

  init = (
      jnp.array(0, jnp.int32),
      jnp.zeros((batch_size,), jnp.int32),
      jnp.zeros((batch_size, max_decode_length), jnp.int32),
      jnp.zeros((batch_size,), bool),
      jnp.zeros((batch_size,), jnp.float32),
      cache,
  )
  _, _, seqs, _, log_prob, _ = jax.lax.while_loop(cond, body, init)
  return seqs, log_prob


def greedy_decode(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int, max_decode_length: int,
                  eos_id: Optional[int] = 1) -> Tuple[jax.Array, jax.Array]:
  """Argmax decoding; returns ``(sequences [batch, length], log_probs [batch])`` as :func:`temperature_sample`."""
  return temperature_sample(tokens_to_logits, cache, batch_size, max_decode_length, None,
                            temperature=0.0, eos_id=eos_id)


# ---------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------


def beam_search(
    tokens_to_logits: TokensToLogits,
    cache: Any,
    batch_size: int,
    beam_size: int,
    max_decode_length: int,
    alpha: float = 0.6,
    eos_id: Optional[int] = 1,
) -> Tuple[jax.Array, jax.Array]:
  """Beam search with the length penalty :func:`brevity_penalty`.

  Keeps ``beam_size`` live (unfinished) hypotheses; each step expands them, the
  ``2 * beam_size`` best continuations feed both the live set (those without
  EOS) and the finished set (those with EOS, or at ``max_decode_length``), which
  keeps the ``beam_size`` best by ``log p / brevity_penalty(alpha, length)``,
  length counting the EOS. The search stops when no live hypothesis can beat
  the worst finished one (scores only fall as a hypothesis grows, for
  ``alpha >= 0``).

  Args:
    tokens_to_logits: the decoder step; it sees ``batch_size * beam_size`` rows
      (row ``b * beam_size + j`` is beam ``j`` of example ``b``).
    cache: the initial cache for ``batch_size`` rows (expanded here).

  Returns:
    ``(sequences [batch, beam, length], scores [batch, beam])``, best first.
    Slots left without a complete hypothesis (tiny vocabularies) score ``NEG_INF``.
  """
  validate(max_decode_length, eos_id)
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size!r}")
  if _concrete(alpha) and alpha < 0:
    raise ValueError(f"alpha must be >= 0, got {alpha!r}")
  b, k, length = batch_size, beam_size, max_decode_length
  max_penalty = brevity_penalty(alpha, length)
  batch_rows = jnp.arange(b)[:, None]

  def cond(carry):
    i, _, live_logp, _, fin_scores, fin_flags, _ = carry
    # Best any live hypothesis can still reach: its log p can only fall, its penalty rise at most to the max.
    best_live = live_logp[:, 0] / max_penalty
    done = jnp.all(fin_flags, axis=1) & (jnp.min(fin_scores, axis=1) >= best_live)
    return (i < length) & ~jnp.all(done)

  def body(carry):
    i, live_seqs, live_logp, fin_seqs, fin_scores, fin_flags, cache = carry
    prev = jax.lax.dynamic_index_in_dim(live_seqs, jnp.maximum(i - 1, 0), axis=2, keepdims=False)
    cur = jnp.where(i == 0, 0, prev).reshape(b * k, 1)
    logits, cache = tokens_to_logits(DecodingState(i, cur, live_seqs.reshape(b * k, length), cache))
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, vocab)
    cand_logp, cand = jax.lax.top_k((live_logp[..., None] + log_probs).reshape(b, k * vocab), 2 * k)
    cand_beam, cand_token = cand // vocab, (cand % vocab).astype(jnp.int32)
    cand_seqs = live_seqs[batch_rows, cand_beam]  # [b, 2k, length]
    cand_seqs = jax.lax.dynamic_update_slice(cand_seqs, cand_token[..., None], (0, 0, i))
    valid = cand_logp > NEG_INF / 2  # not descended from the dead beams of step 0
    is_eos = (cand_token == eos_id) if eos_id is not None else jnp.zeros_like(valid)
    complete = valid & (is_eos | (i == length - 1))

    # Live set: the best continuations without EOS; their caches follow their parent beams.
    live_logp, pick = jax.lax.top_k(jnp.where(is_eos, NEG_INF, cand_logp), k)
    live_seqs = cand_seqs[batch_rows, pick]
    parent = jnp.take_along_axis(cand_beam, pick, axis=1)
    cache = _gather_rows(cache, (batch_rows * k + parent).reshape(-1))

    # Finished set: merge the complete continuations with the hypotheses finished before.
    new_scores = jnp.where(complete, cand_logp / brevity_penalty(alpha, i + 1), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, cand_seqs], axis=1)
    all_flags = jnp.concatenate([fin_flags, complete], axis=1)
    fin_scores, keep = jax.lax.top_k(all_scores, k)
    fin_seqs = all_seqs[batch_rows, keep]
    fin_flags = jnp.take_along_axis(all_flags, keep, axis=1)
    return i + 1, live_seqs, live_logp, fin_seqs, fin_scores, fin_flags, cache

  # All beams start as copies of one empty hypothesis; only beam 0 is alive, so
  # the first step does not pick the same token k times.
  live_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  init = (
      jnp.array(0, jnp.int32),
      jnp.zeros((b, k, length), jnp.int32),
      live_logp,
      jnp.zeros((b, k, length), jnp.int32),
      jnp.full((b, k), NEG_INF, jnp.float32),
      jnp.zeros((b, k), bool),
      expand_batch(cache, k),
  )
  _, _, _, fin_seqs, fin_scores, _, _ = jax.lax.while_loop(cond, body, init)
  return fin_seqs, fin_scores
