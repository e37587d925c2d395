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

:func:`predict_batch` wires these to ``t5.network.Transformer``: encode once,
compute every decoder layer's cross-attention keys and values once
(``Transformer.cross_attention_kv``; beams and samples of one input share them),
create the cache, decode. When the Top-k MLPs are active, the decoder steps use
the sparse product of ``topk.sparse_matmul`` (``T5Config.sparse_decode``); with
predictors (``predictors.py``, ``T5Config.decode_candidates``) they compute only
the candidate units the predictors propose.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers import predictors as predictors_lib
from topk_transformers.errors import ConfigError

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


def _validate(max_decode_length: int, eos_id) -> None:
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
  _validate(max_decode_length, eos_id)
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
  _validate(max_decode_length, eos_id)
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


# ---------------------------------------------------------------------------
# T5 encoder-decoder.
# ---------------------------------------------------------------------------


def init_cache(module, params, encoded: jax.Array, encoder_input_tokens: jax.Array, max_decode_length: int) -> Any:
  """The zero KV cache of ``module`` (a ``t5.network.Transformer``) for ``max_decode_length`` steps.

  Its shapes come from an abstract evaluation of the decoder (nothing is
  computed); every cache variable starts at zero, as the decoder creates them.
  """
  batch = encoded.shape[0]
  dummy = jnp.ones((batch, max_decode_length), jnp.int32)

  def create():
    _, variables = module.apply({"params": params}, encoded, encoder_input_tokens, dummy, dummy,
                                enable_dropout=False, decode=True, mutable=["cache"], method=module.decode)
    return variables["cache"]

  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(create))


def make_tokens_to_logits(module, params, encoded: Optional[jax.Array], encoder_input_tokens: jax.Array,
                          max_decode_length: int, *, cross_kv: Any = None,
                          predictors: Any = None) -> TokensToLogits:
  """The decoder step of ``module`` as a ``tokens_to_logits`` callback (no dropout).

  Args:
    module, params: the ``t5.network.Transformer`` and its parameters.
    encoded: ``[rows, in_length, emb_dim]`` encoder output, one row per decoder row; the step then projects it to
      cross-attention keys and values itself. ``None`` with ``cross_kv``.
    encoder_input_tokens: ``[rows, in_length]``, or with ``cross_kv`` ``[batch, in_length]`` (one row per input).
    max_decode_length: the cache length.
    cross_kv: the cross-attention keys and values (``Transformer.cross_attention_kv``), computed once per input:
      the step reads only the ``query`` and ``out`` kernels of each cross-attention, and the ``rows = batch * n``
      decoder rows (row ``b * n + j``) share their input's keys and values.
    predictors: the ``predictors`` collection (``predictors.prepare``) for predicted-neuron MLPs
      (``T5Config.decode_candidates``); ``None``: the exact path.
  """
  variables = {"params": params}
  if predictors is not None:
    variables["predictors"] = predictors

  def tokens_to_logits(state: DecodingState):
    logits, new = module.apply(
        {**variables, "cache": state.cache}, encoded, encoder_input_tokens, state.cur_token,
        state.cur_token, enable_dropout=False, decode=True, max_decode_length=max_decode_length,
        cross_kv=cross_kv, mutable=["cache"], method=module.decode)
    return logits[:, 0, :], new["cache"]

  return tokens_to_logits


def encode_for_decoding(module, params, encoder_input_tokens: jax.Array, max_decode_length: int):
  """Encodes once: ``(cross_kv, cache)``, the cross-attention keys and values of every decoder layer and the zero
  self-attention cache, both for the ``batch`` inputs (not yet expanded to beams or samples)."""
  encoded = module.apply({"params": params}, encoder_input_tokens, enable_dropout=False, method=module.encode)
  cross_kv = module.apply({"params": params}, encoded, method=module.cross_attention_kv)
  cache = init_cache(module, params, encoded, encoder_input_tokens, max_decode_length)
  return cross_kv, cache


@functools.partial(jax.jit, static_argnames=("module", "method", "num_decodes", "topk", "topp",
                                             "max_decode_length"))
def _predict(params, predictors, encoder_input_tokens, rng, alpha, temperature, eos_id, *, module, method,
             num_decodes, topk, topp, max_decode_length):
  # alpha, temperature and eos_id are traced: changing them does not recompile (eos_id -1 = no EOS).
  batch = encoder_input_tokens.shape[0]
  # Explicitly once per input, before the loop: the cross-attention keys and values (shared by the num_decodes
  # rows b*n .. b*n+n-1 of each input, never copied per beam) and, with predictors, wi in row layout.
  cross_kv, cache = encode_for_decoding(module, params, encoder_input_tokens, max_decode_length)
  if predictors is not None:
    predictors = predictors_lib.prepare(params, predictors)
  step = make_tokens_to_logits(module, params, None, encoder_input_tokens, max_decode_length, cross_kv=cross_kv,
                               predictors=predictors)
  if method == "beam":
    return beam_search(step, cache, batch, num_decodes, max_decode_length, alpha=alpha, eos_id=eos_id)
  cache = expand_batch(cache, num_decodes)
  seqs, log_probs = temperature_sample(
      step, cache, batch * num_decodes, max_decode_length, rng,
      temperature=0.0 if method == "greedy" else temperature, topk=topk, topp=topp, eos_id=eos_id)
  seqs = seqs.reshape(batch, num_decodes, max_decode_length)
  log_probs = log_probs.reshape(batch, num_decodes)
  order = jnp.argsort(-log_probs, axis=1)  # best first, like beam search
  return jnp.take_along_axis(seqs, order[..., None], axis=1), jnp.take_along_axis(log_probs, order, axis=1)


def predict_batch(
    model_or_module,
    params,
    batch: Mapping[str, Any],
    *,
    decode_method: str = "greedy",
    num_decodes: int = 1,
    alpha: float = 0.6,
    temperature: float = 1.0,
    topk: int = 0,
    topp: float = 0.0,
    rng: Optional[jax.Array] = None,
    max_decode_length: Optional[int] = None,
    eos_id: Optional[int] = 1,
    return_all_decodes: bool = False,
    return_scores: bool = False,
    predictors: Any = None,
):
  """Decodes ``batch['encoder_input_tokens']`` with a T5 ``Transformer`` (or a model wrapping it as ``.module``).

  Encodes once, creates the KV cache, then runs the chosen search, all in one
  compiled function (cached per module and settings).

  Args:
    model_or_module: ``t5.network.Transformer`` or an object with ``.module``.
    params: its parameters (the ``params`` collection, boxed or not).
    batch: ``encoder_input_tokens [batch, in_length]`` (0 = padding); the length of
      ``decoder_input_tokens``, if present, is the default ``max_decode_length``.
    decode_method: ``'greedy'``, ``'sample'`` (temperature / top-k / top-p) or ``'beam'``.
    num_decodes: beams, or samples per example (greedy: must be 1).
    alpha: beam search length penalty.
    temperature, topk, topp: sampling settings (see :func:`temperature_sample`).
    rng: PRNG key for ``'sample'`` (default ``PRNGKey(0)``).
    max_decode_length: output length (static).
    eos_id: end-of-sequence id (T5: 1); ``None`` decodes to full length.
    return_all_decodes: return all ``num_decodes`` per example (best first) instead of the best.
    return_scores: also return the scores (beam: penalised log p; else log p).
    predictors: decode with predicted-neuron MLPs: a predictor tree (``predictors.restore``) for the module's
      decoder MLPs, whose config sets ``decode_candidates``. ``None``: the exact (sparse) path.

  Returns:
    ``tokens [batch, length]`` (or ``[batch, num_decodes, length]``), and with
    ``return_scores`` the pair ``(tokens, scores)``.
  """
  module = getattr(model_or_module, "module", model_or_module)
  if decode_method not in METHODS:
    raise ValueError(f"decode_method must be one of {METHODS}, got {decode_method!r}")
  if not isinstance(num_decodes, (int, np.integer)) or num_decodes < 1:
    raise ValueError(f"num_decodes must be a positive integer, got {num_decodes!r}")
  if decode_method == "greedy" and num_decodes != 1:
    raise ValueError(f"greedy decoding gives one decode per example, got num_decodes={num_decodes}")
  if "encoder_input_tokens" not in batch:
    raise ValueError(f"batch needs 'encoder_input_tokens', got keys {sorted(batch)}")
  if max_decode_length is None:
    if "decoder_input_tokens" not in batch:
      raise ValueError("give max_decode_length or a batch with 'decoder_input_tokens'")
    max_decode_length = int(np.shape(batch["decoder_input_tokens"])[1])
  _validate(max_decode_length, eos_id)
  if rng is None:
    rng = jax.random.PRNGKey(0)
  params = nn.meta.unbox(params)
  if alpha < 0 or temperature <= 0 and decode_method == "sample":
    raise ValueError(f"need alpha >= 0 and, for sampling, temperature > 0; got alpha={alpha!r}, "
                     f"temperature={temperature!r}")
  if predictors is not None:
    if getattr(module.config, "decode_candidates", None) is None:
      raise ConfigError("predicted decoding needs network.T5Config.decode_candidates (the candidates per MLP step)")
    predictors_lib.check(params, predictors)
  seqs, scores = _predict(
      params, predictors, jnp.asarray(batch["encoder_input_tokens"], jnp.int32), rng, jnp.float32(alpha),
      jnp.float32(temperature), jnp.int32(-1 if eos_id is None else eos_id), module=module, method=decode_method,
      num_decodes=int(num_decodes), topk=int(topk), topp=float(topp), max_decode_length=int(max_decode_length))
  if not return_all_decodes:
    seqs, scores = seqs[:, 0], scores[:, 0]
  return (seqs, scores) if return_scores else seqs
