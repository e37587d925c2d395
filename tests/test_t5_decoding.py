"""T5's decoding wiring (``t5/decoding.py``): greedy against teacher forcing, EOS, sampling, beams, the cached
cross-attention keys and values, and ``topk-decode`` on a checkpoint."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from topk_transformers import decoding
from topk_transformers.errors import ConfigError
from topk_transformers.t5 import decoding as t5_decoding
from topk_transformers.t5 import network

from conftest import tiny_t5_config  # the fixture's function: this module-scoped fixture cannot take it


def random_params(module, enc, dec, seed=0):
  """Random parameters of the right shapes, without compiling ``module.init`` (slow on a busy CPU)."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), enc, dec, dec,
                                                            enable_dropout=False)))["params"]
  r = np.random.RandomState(seed)

  def init(path, s):
    # Kernels scaled by 1/sqrt(fan_in) keep activations O(1); embeddings and the rest N(0, 1).
    scale = 1.0 / np.sqrt(s.shape[0]) if path[-1].key == "kernel" else 1.0
    return jnp.asarray(r.randn(*s.shape) * scale, jnp.float32)

  return jax.tree_util.tree_map_with_path(init, shapes)


@functools.partial(jax.jit, static_argnums=0)
def forced_log_probs(module, params, enc, tokens):
  """Teacher-forced log-probabilities ``[batch, length, vocab]`` of the decoder inputs ``0, tokens[:-1]``."""
  dec_in = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
  logits = module.apply({"params": params}, enc, dec_in, jnp.ones_like(tokens), enable_dropout=False)
  return jax.nn.log_softmax(logits)


def same_logits_at_every_step(old, new, tokens, cache, min_std=0.0):
  """Feeds ``tokens`` one position at a time to two ``tokens_to_logits`` steps, each with its own cache, and
  checks their logits agree at every step (and are not flat); returns the two final caches."""
  both = jax.jit(lambda i, t, c0, c1: (old(decoding.DecodingState(i, t, None, c0)),
                                       new(decoding.DecodingState(i, t, None, c1))))
  caches = [cache, cache]
  for i in range(tokens.shape[1]):
    (l_old, c_old), (l_new, c_new) = both(jnp.int32(i), tokens[:, i:i + 1], *caches)
    np.testing.assert_allclose(l_new, l_old, rtol=1e-5, atol=1e-5)
    assert np.std(np.asarray(l_old)) > min_std, "flat logits would make this test weak"
    caches = [c_old, c_new]
  return caches


@pytest.fixture(scope="module")
def t5():
  module = network.Transformer(tiny_t5_config(vocab_size=32, emb_dim=32, head_dim=16, mlp_dim=64, num_decoder_layers=2,
                                              top_k=16))
  enc = jnp.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 0, 0, 0], [3, 3, 4, 4, 0, 0]], jnp.int32)
  params = random_params(module, enc, jnp.ones((3, 6), jnp.int32))
  return module, params, enc


def test_greedy_equals_argmax_of_teacher_forced_logits(t5):
  module, params, enc = t5
  # eos_id=None: all rows decode the full length, which makes every step checkable.
  tokens, logp = t5_decoding.predict_batch(module, params, {"encoder_input_tokens": enc}, max_decode_length=6,
                                           eos_id=None, return_scores=True)
  tokens = np.asarray(tokens)
  assert len(np.unique(tokens)) > 2, "degenerate decodes would make this test weak"
  lp = np.asarray(forced_log_probs(module, params, enc, tokens))
  np.testing.assert_array_equal(np.argmax(lp, -1), tokens)
  np.testing.assert_allclose(np.asarray(logp), np.take_along_axis(lp, tokens[..., None], -1).sum((1, 2)), rtol=1e-4)


def test_predict_batch_eos_sampling_and_beam(t5):
  module, params, enc = t5
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": np.zeros((3, 6), np.int32)}
  greedy = np.asarray(t5_decoding.predict_batch(module, params, batch, eos_id=None))
  assert greedy.shape == (3, 6)
  # Make the greedy token at step 2 of row 0 the EOS: the row must stop there and pad with 0.
  eos = int(greedy[0, 2])
  stopped = np.asarray(t5_decoding.predict_batch(module, params, batch, eos_id=eos))
  first = list(stopped[0]).index(eos)
  assert first <= 2 and np.all(stopped[0, first + 1:] == 0)
  np.testing.assert_array_equal(stopped[0, :first + 1], greedy[0, :first + 1])

  def sample(seed):
    return np.asarray(t5_decoding.predict_batch(module, params, batch, decode_method="sample", num_decodes=2,
                                                temperature=1.0, rng=jax.random.PRNGKey(seed), eos_id=None,
                                                return_all_decodes=True))
  a, b, c = sample(0), sample(0), sample(1)
  assert a.shape == (3, 2, 6)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)

  beams, scores = t5_decoding.predict_batch(module, params, batch, decode_method="beam", num_decodes=3, alpha=0.6,
                                            eos_id=None, return_all_decodes=True, return_scores=True)
  assert beams.shape == (3, 3, 6) and np.all(np.diff(np.asarray(scores), axis=1) <= 0)
  # Beam scores are the model's log p of the beam (alpha applies with length 6 for all).
  best = np.asarray(beams[:, 0])
  lp = np.take_along_axis(np.asarray(forced_log_probs(module, params, enc, best)), best[..., None], -1).sum((1, 2))
  np.testing.assert_allclose(np.asarray(scores[:, 0]), lp / ((5 + 6) / 6) ** 0.6, rtol=1e-4)
  with pytest.raises(ValueError, match="decode_method"):
    t5_decoding.predict_batch(module, params, batch, decode_method="nucleus")


def test_decode_command_reads_a_checkpoint(tmp_path, capsys):
  import json  # pylint: disable=g-import-not-at-top

  from topk_transformers import checkpoints, gin_utils  # pylint: disable=g-import-not-at-top
  from topk_transformers.commands import decode as decode_command  # pylint: disable=g-import-not-at-top
  from topk_transformers.t5 import text  # pylint: disable=g-import-not-at-top

  # The tiny T5 with a byte vocabulary (no SentencePiece model to train or download).
  gin_file = tmp_path / "bytes.gin"
  gin_file.write_text("from __gin__ import dynamic_registration\nimport seqio\n"
                      "include 't5/t5_1_0/tiny.gin'\nVOCABULARY = @seqio.ByteVocabulary()\n")
  gin_flags = [f"--gin_file={gin_file}", "--gin.NUM_EMBEDDINGS=384", "--gin.TOP_K=32",
               "--gin.network.T5Config.num_encoder_layers=1"]
  gin_utils.configure(*gin_utils.parse_gin_flags(gin_flags)[:2])
  model = gin_utils.get_macro("MODEL")
  inputs = text.encode_texts(["hello there"], model.input_vocabulary)
  np.testing.assert_array_equal(inputs[0], [b + 3 for b in b"hello there"] + [1])  # bytes shifted by 3, EOS
  params = random_params(model.module, jnp.asarray(inputs), jnp.ones((1, 8), jnp.int32), seed=1)
  manager = checkpoints.CheckpointManager(str(tmp_path / "run"), async_save=False)
  manager.save(5, {"params": params, "step": 0})
  manager.close()
  out = tmp_path / "out.json"
  assert decode_command.main([*gin_flags, f"--checkpoint={tmp_path / 'run'}", "--input", "hello there",
                              "--max_decode_length=8", f"--json={out}"]) == 0
  results = json.loads(out.read_text())["results"]
  expected = model.predict_batch(params, {"encoder_input_tokens": inputs}, max_decode_length=8)
  assert results[0]["outputs"][0]["ids"] == [int(t) for t in np.asarray(expected)[0]]
  assert "checkpoint step 5" in capsys.readouterr().out
  # No input is a usage error: one line, exit 2.
  assert decode_command.main([*gin_flags, f"--checkpoint={tmp_path / 'run'}"]) == 2


def predict_recomputing_cross_kv(module, params, enc, method, n, length, rng=None):
  """The decoding of ``predict_batch`` before the cross-attention cache: every step projects the (expanded) encoder
  output to keys and values itself."""
  encoded = module.apply({"params": params}, enc, enable_dropout=False, method=module.encode)
  cache = t5_decoding.init_cache(module, params, encoded, enc, length)
  step = t5_decoding.make_tokens_to_logits(module, params, decoding.expand_batch(encoded, n),
                                           decoding.expand_batch(enc, n), length)
  if method == "beam":
    return decoding.beam_search(step, cache, enc.shape[0], n, length, alpha=0.6, eos_id=None)
  seqs, logp = decoding.temperature_sample(step, decoding.expand_batch(cache, n), enc.shape[0] * n, length, rng,
                                           temperature=0.0 if method == "greedy" else 1.0, eos_id=None)
  return seqs.reshape(enc.shape[0], n, length), logp.reshape(enc.shape[0], n)


@pytest.mark.parametrize("method,n", [("greedy", 1), ("sample", 2), ("beam", 3)])
def test_cross_attention_cache_gives_the_decodes_of_recomputed_keys_and_values(t5, method, n):
  module, params, enc = t5
  rng = jax.random.PRNGKey(4)
  ref_seqs, ref_scores = jax.jit(predict_recomputing_cross_kv, static_argnums=(0, 3, 4, 5))(
      module, params, enc, method, n, 6, rng)
  seqs, scores = t5_decoding.predict_batch(module, params, {"encoder_input_tokens": enc}, decode_method=method,
                                           num_decodes=n, max_decode_length=6, eos_id=None, rng=rng,
                                           return_all_decodes=True, return_scores=True)
  if method == "sample":  # predict_batch orders the samples best first
    order = np.argsort(-np.asarray(ref_scores), axis=1)
    ref_seqs, ref_scores = (np.take_along_axis(np.asarray(ref_seqs), order[..., None], 1),
                            np.take_along_axis(np.asarray(ref_scores), order, 1))
  np.testing.assert_array_equal(seqs, ref_seqs)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
  assert len(np.unique(np.asarray(seqs))) > 2, "degenerate decodes would make this test weak"


def test_cross_attention_cache_step_logits_and_shared_keys(t5):
  module, params, enc = t5
  encoded = module.apply({"params": params}, enc, enable_dropout=False, method=module.encode)
  cross_kv = module.apply({"params": params}, encoded, method=module.cross_attention_kv)
  # One set of keys and values per input, per decoder layer, whatever the beams.
  # [batch, heads, head_dim, in_length]: the layout a step reads as it lies.
  assert sorted(cross_kv) == ["layers_0", "layers_1"] and cross_kv["layers_0"]["key"].shape == (3, 2, 16, 6)
  n, length = 2, 4
  cache = decoding.expand_batch(t5_decoding.init_cache(module, params, encoded, enc, length), n)
  old = t5_decoding.make_tokens_to_logits(module, params, decoding.expand_batch(encoded, n),
                                          decoding.expand_batch(enc, n), length)
  new = t5_decoding.make_tokens_to_logits(module, params, None, enc, length, cross_kv=cross_kv)
  tokens = jnp.asarray(np.random.RandomState(0).randint(2, 32, (3 * n, length)), jnp.int32)
  caches = same_logits_at_every_step(old, new, tokens, cache)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *caches)
  with pytest.raises(ValueError, match="do not divide"):  # 6 rows cannot be beams of 4 inputs
    module.apply({"params": params, "cache": cache}, None, jnp.concatenate([enc, enc[:1]]), tokens[:, :1],
                 tokens[:, :1], enable_dropout=False, decode=True, max_decode_length=length,
                 cross_kv=jax.tree.map(lambda x: jnp.concatenate([x, x[:1]]), cross_kv), mutable=["cache"],
                 method=module.decode)


@pytest.mark.parametrize("gated, top_k", [(False, None), (False, 16), (True, None), (True, 16)],
                         ids=["v1.0", "v1.0-topk", "v1.1", "v1.1-topk"])
def test_transposed_kernels_decode_as_t5x_layout_does(gated, top_k):
  """``transpose_for_decoding``: each step kernel held once, [out, in]; the same logits at every step."""
  cfg = tiny_t5_config(vocab_size=32, emb_dim=32, head_dim=16, mlp_dim=64, num_decoder_layers=2, top_k=top_k,
                       logits_via_embedding=not gated, **(dict(mlp_activations=("gelu", "linear")) if gated else {}))
  module = network.Transformer(cfg)
  enc = jnp.array([[5, 6, 7, 8, 9, 0], [10, 11, 12, 0, 0, 0]], jnp.int32)
  params = random_params(module, enc, jnp.ones((2, 6), jnp.int32), seed=1)
  keep_wo = top_k is not None
  step_params, transposed = t5_decoding.transpose_for_decoding(params, keep_wo=keep_wo)

  layer = params["decoder"]["layers_1"]
  moved = [("self_attention", n) for n in ("query", "key", "value", "out")] + [
      ("encoder_decoder_attention", n) for n in ("query", "out")] + [
      ("mlp", n) for n in (("wi_0", "wi_1") if gated else ("wi",)) + (() if keep_wo else ("wo",))]
  for block, name in moved:
    np.testing.assert_array_equal(transposed["decoder"]["layers_1"][block][name]["kernel"],
                                  layer[block][name]["kernel"].T)
    assert "kernel" not in step_params["decoder"]["layers_1"][block][name], (block, name)
  # Kept as they lie: the cross-attention keys and values (projected once per input), wo's rows for Top-k.
  for block, name in [("encoder_decoder_attention", "key"), ("encoder_decoder_attention", "value")] + (
      [("mlp", "wo")] if keep_wo else []):
    assert step_params["decoder"]["layers_1"][block][name]["kernel"] is layer[block][name]["kernel"]
    assert name not in transposed["decoder"]["layers_1"][block]
  assert ("logits_dense" in transposed["decoder"]) == gated and "encoder" not in transposed

  length = 5
  cross_kv, cache = t5_decoding.encode_for_decoding(module, params, enc, length)
  old = t5_decoding.make_tokens_to_logits(module, params, None, enc, length, cross_kv=cross_kv)
  new = t5_decoding.make_tokens_to_logits(module, step_params, None, enc, length, cross_kv=cross_kv,
                                          transposed=transposed)
  tokens = jnp.asarray(np.random.RandomState(0).randint(2, 32, (2, length)), jnp.int32)
  same_logits_at_every_step(old, new, tokens, cache, min_std=0.1)
  # predict_batch lays the kernels out itself on CPU (2 rows): its decodes are the untransposed steps' decodes.
  greedy, _ = jax.jit(lambda c: decoding.greedy_decode(old, c, 2, length, eos_id=None))(cache)
  np.testing.assert_array_equal(
      t5_decoding.predict_batch(module, params, {"encoder_input_tokens": enc}, max_decode_length=length, eos_id=None),
      greedy)


def test_top_k_steps_refuse_a_transposed_wo(t5):
  """The sparse step reads rows of wo: a layout without them is one clear error, not a wrong product."""
  module, params, enc = t5
  step_params, transposed = t5_decoding.transpose_for_decoding(params, keep_wo=False)
  cross_kv, cache = t5_decoding.encode_for_decoding(module, params, enc, 4)
  step = t5_decoding.make_tokens_to_logits(network.Transformer(dataclasses.replace(module.config, sparse_decode=True)),
                                           step_params, None, enc, 4, cross_kv=cross_kv, transposed=transposed)
  with pytest.raises(ConfigError, match="read rows of 'wo'"):
    step(decoding.DecodingState(jnp.int32(0), enc[:, :1], None, cache))
