"""T5's decoding: encode once, cache the cross-attention keys and values, then search (``decoding.py``).

:func:`predict_batch` wires the generic searches of ``decoding.py`` to ``t5.network.Transformer``: encode once,
compute every decoder layer's cross-attention keys and values once (``Transformer.cross_attention_kv``; beams and
samples of one input share them), create the cache, decode. When the Top-k MLPs are active, the decoder steps use
``mlp_steps.sparse_step`` (``T5Config.sparse_decode``); with predictors (``predictors.py``,
``T5Config.decode_candidates``) ``mlp_steps.predicted_step``, which computes only the candidate units the
predictors propose.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers import layers
from topk_transformers import predictors as predictors_lib
from topk_transformers import topk as topk_lib
from topk_transformers.decoding import (METHODS, DecodingState, TokensToLogits, beam_search, expand_batch,
                                        temperature_sample, validate)
from topk_transformers.errors import ConfigError


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


_STEP_KERNELS = (("self_attention", ("query", "key", "value", "out")), ("encoder_decoder_attention", ("query", "out")),
                 ("mlp", ("wi", "wi_0", "wi_1", "wo")))
TRANSPOSE_MAX_ROWS = 32
"""``predict_batch`` transposes the step's kernels on CPU for at most this many decoder rows (batch x decodes): the
``[out, in]`` layout was measured faster at every row count from 1 to 32, and not beyond."""


def transpose_for_decoding(params: Mapping[str, Any], keep_wo: bool) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """``(params, transposed)``: every kernel a decoder step reads in full, moved from ``params`` into the
  ``transposed`` collection (``layers.TRANSPOSED``) as ``[out, in]``; the layers then read it from there.

  A step multiplies one or a few tokens by each kernel. XLA:CPU streams ``[out, in]`` weights (each output's
  weights contiguous) at the machine's vector-matrix rate, but T5X's ``[in, out]`` at about two thirds of it
  (``docs/design/decoding_paths.md``). The step's kernels are the decoder's self-attention ``query``, ``key``,
  ``value`` and ``out``, the cross-attention ``query`` and ``out`` (its ``key`` and ``value`` project the encoder
  output once per input, and stay), the MLPs' ``wi`` (kernels that ``predictors.prepare`` already moved are
  skipped) and ``wo``, and ``logits_dense`` (v1.1; v1.0's tied embedding is read as it lies). ``keep_wo``: leave
  ``wo`` as it is, because the sparse and predicted steps read its rows (a model with an active Top-k).

  Values are unchanged; the products sum in another order, so logits agree to float rounding. The returned
  ``params`` decode only with ``transposed``; encode and create the cache with the full ones. Call it once per set
  of parameters, outside the decoding loop.
  """
  params = nn.meta.unbox(params)
  decoder = dict(params["decoder"])
  transposed: Dict[str, Any] = {}

  def move(tree: Dict[str, Any], path: Tuple[str, ...]) -> None:
    node = tree
    for name in path[:-1]:
      if name not in node:
        return
      node = node[name]
    layer = node.get(path[-1])
    if not isinstance(layer, Mapping) or "kernel" not in layer:
      return
    kernel = jnp.asarray(layer["kernel"])
    if kernel.ndim != 2:
      raise ConfigError(f"cannot transpose the {kernel.ndim}-D kernel of decoder/{'/'.join(path)} for decoding")
    node[path[-1]] = {k: v for k, v in layer.items() if k != "kernel"}
    target = transposed
    for name in path[:-1]:
      target = target.setdefault(name, {})
    target[path[-1]] = {"kernel": jnp.transpose(kernel)}

  for layer_name in [n for n in decoder if n.startswith("layers_")]:
    layer = decoder[layer_name] = dict(decoder[layer_name])
    for block, names in _STEP_KERNELS:
      if block not in layer:
        continue
      layer[block] = dict(layer[block])
      for name in names:
        if not (keep_wo and name == "wo"):
          move(decoder, (layer_name, block, name))
  move(decoder, ("logits_dense",))
  return {**params, "decoder": decoder}, {"decoder": transposed}


def make_tokens_to_logits(module, params, encoded: Optional[jax.Array], encoder_input_tokens: jax.Array,
                          max_decode_length: int, *, cross_kv: Any = None,
                          predictors: Any = None, transposed: Any = None) -> TokensToLogits:
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
    predictors: the ``predictors`` collection for predicted-neuron MLPs (``T5Config.decode_candidates``), with
      ``params`` as ``predictors.prepare`` returns both; ``None``: the exact path.
    transposed: the step's kernels as ``transpose_for_decoding`` lays them out, with ``params`` as it returns
      them; ``None``: as ``params`` holds them.
  """
  variables = {"params": params}
  if predictors is not None:
    variables["predictors"] = predictors
  if transposed is not None:
    variables[layers.TRANSPOSED] = transposed

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
  # rows b*n .. b*n+n-1 of each input, never copied per beam) and, with predictors, wi in row layout in place of
  # the kernels the step no longer reads.
  cross_kv, cache = encode_for_decoding(module, params, encoder_input_tokens, max_decode_length)
  if predictors is not None:
    params, predictors = predictors_lib.prepare(params, predictors)
  transposed = None
  if jax.default_backend() == "cpu" and batch * num_decodes <= TRANSPOSE_MAX_ROWS:
    params, transposed = transpose_for_decoding(
        params, keep_wo=topk_lib.is_active(module.config.top_k, module.config.mlp_dim))
    transposed = jax.lax.optimization_barrier(transposed)  # laid out once, before the loop
  step = make_tokens_to_logits(module, params, None, encoder_input_tokens, max_decode_length, cross_kv=cross_kv,
                               predictors=predictors, transposed=transposed)
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
    temperature, topk, topp: sampling settings (see ``decoding.temperature_sample``).
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
  validate(max_decode_length, eos_id)
  if rng is None:
    rng = jax.random.PRNGKey(0)
  params = nn.meta.unbox(params)
  if alpha < 0 or temperature <= 0 and decode_method == "sample":
    raise ValueError(f"need alpha >= 0 and, for sampling, temperature > 0; got alpha={alpha!r}, "
                     f"temperature={temperature!r}")
  if predictors is not None:
    if getattr(module.config, "decode_candidates", None) is None:
      raise ConfigError("predicted decoding needs network.T5Config.decode_candidates (the candidates per MLP step)")
    if not topk_lib.is_active(module.config.top_k, module.config.mlp_dim):
      raise ConfigError(f"predicted decoding needs an active Top-k (network.T5Config.top_k below mlp_dim "
                        f"{module.config.mlp_dim}), got top_k={module.config.top_k}")
    predictors_lib.check(params, predictors)
  seqs, scores = _predict(
      params, predictors, jnp.asarray(batch["encoder_input_tokens"], jnp.int32), rng, jnp.float32(alpha),
      jnp.float32(temperature), jnp.int32(-1 if eos_id is None else eos_id), module=module, method=decode_method,
      num_decodes=int(num_decodes), topk=int(topk), topp=float(topp), max_decode_length=int(max_decode_length))
  if not return_all_decodes:
    seqs, scores = seqs[:, 0], scores[:, 0]
  return (seqs, scores) if return_scores else seqs
