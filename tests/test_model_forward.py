"""What ``t5.model.EncoderDecoderModel`` hands its network: every array of the batch, and dropout exactly in training.

Two checks. A recording module, run eagerly so that what it receives is
concrete, stores the arguments of the call ``_forward`` (the forward pass of
``loss_fn``, ``eval_fn`` and ``score_batch``) makes, compared with the batch
they came from, with a dropout rng and without. And the real (tiny)
Transformer on a packed batch: each packed row must score the sum of its
examples' scores unpacked, one a row, as packing only saves space; that holds
only if the segment ids reach the network, which the same row as one segment
shows.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from topk_transformers.t5 import model as t5_model
from topk_transformers.t5 import network

# Row 0 packs example 1 (segment 1) and example 2 (segment 2), then padding; row 1 holds example 2 alone; row 2
# is all padding.
PACKED = dict(
    encoder_input_tokens=np.array([[5, 6, 7, 8, 11, 12, 13, 0], [11, 12, 13, 0, 0, 0, 0, 0], [0] * 8], np.int32),
    encoder_segment_ids=np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0, 0, 0], [0] * 8], np.int32),
    encoder_positions=np.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 0, 0, 0, 0, 0], [0] * 8], np.int32),
    decoder_target_tokens=np.array([[21, 22, 23, 31, 32, 33, 34, 0], [31, 32, 33, 34, 0, 0, 0, 0], [0] * 8],
                                   np.int32),
    decoder_input_tokens=np.array([[0, 21, 22, 0, 31, 32, 33, 0], [0, 31, 32, 33, 0, 0, 0, 0], [0] * 8], np.int32),
    decoder_segment_ids=np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0, 0], [0] * 8], np.int32),
    decoder_positions=np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 0, 0, 0], [0] * 8], np.int32),
)
# The same three examples, one a row (as a packer leaves a row holding one example).
_ENC = np.array([[5, 6, 7, 8, 0, 0, 0, 0], [11, 12, 13, 0, 0, 0, 0, 0], [11, 12, 13, 0, 0, 0, 0, 0]], np.int32)
_TGT = np.array([[21, 22, 23, 0, 0, 0, 0, 0], [31, 32, 33, 34, 0, 0, 0, 0], [31, 32, 33, 34, 0, 0, 0, 0]], np.int32)
UNPACKED = dict(
    encoder_input_tokens=_ENC, encoder_segment_ids=(_ENC > 0).astype(np.int32),
    encoder_positions=np.arange(8, dtype=np.int32) * (_ENC > 0),
    decoder_target_tokens=_TGT, decoder_input_tokens=np.pad(_TGT[:, :-1], ((0, 0), (1, 0))),
    decoder_segment_ids=(_TGT > 0).astype(np.int32), decoder_positions=np.arange(8, dtype=np.int32) * (_TGT > 0),
)
ARRAYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "encoder_segment_ids",
          "decoder_segment_ids", "encoder_positions", "decoder_positions")
VOCAB = 40

CALLS = []


class Recorder(nn.Module):
  """The Transformer's signature (``enable_dropout`` defaults to True there too); records each call's arguments."""

  @nn.compact
  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None, *, enable_dropout=True):
    got = dict(encoder_input_tokens=encoder_input_tokens, decoder_input_tokens=decoder_input_tokens,
               decoder_target_tokens=decoder_target_tokens, encoder_segment_ids=encoder_segment_ids,
               decoder_segment_ids=decoder_segment_ids, encoder_positions=encoder_positions,
               decoder_positions=decoder_positions, enable_dropout=enable_dropout)
    if enable_dropout:
      got["dropout_key"] = self.make_rng("dropout")  # as nn.Dropout does: fails without a "dropout" rng
    CALLS.append(got)
    return jnp.broadcast_to(self.param("bias", nn.initializers.zeros, (VOCAB,)), decoder_target_tokens.shape + (VOCAB,))


def test_forward_hands_the_network_every_array_of_the_batch_and_dropout_only_with_an_rng():
  model = t5_model.EncoderDecoderModel(Recorder())
  params = {"bias": jnp.zeros((VOCAB,))}
  for rng in (jax.random.PRNGKey(0), None):  # training (loss_fn's rng), evaluation and scoring (None)
    CALLS.clear()
    model._forward(params, PACKED, rng)  # pylint: disable=protected-access
    (got,) = CALLS
    for key in ARRAYS:
      assert got[key] is not None, key
      np.testing.assert_array_equal(np.asarray(got[key]), PACKED[key], err_msg=key)
    assert got["enable_dropout"] is (rng is not None)
  CALLS.clear()
  model._forward(params, {k: PACKED[k] for k in ARRAYS[:3]})  # pylint: disable=protected-access
  (got,) = CALLS  # no segment ids or positions in the batch: the network gets its defaults, None
  assert all(got[key] is None for key in ARRAYS[3:])


def _random_params(module, batch):
  """Random parameters of the right shapes, drawn in NumPy (tracing T5's initialisers is slow)."""
  args = [batch[k] for k in ARRAYS[:3]]
  abstract = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, enable_dropout=False)))
  rng = np.random.RandomState(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name in ("embedding", "rel_embedding"):
      value = rng.standard_normal(leaf.shape)
    else:  # kernels [fan_in, fan_out]
      value = rng.standard_normal(leaf.shape) / math.sqrt(leaf.shape[0])
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract["params"])


def test_packed_rows_score_the_sum_of_their_examples_unpacked(tiny_t5_config):
  cfg = tiny_t5_config(vocab_size=VOCAB, mlp_dim=16, mlp_activations=("relu",), logits_via_embedding=True)
  model = t5_model.EncoderDecoderModel(network.Transformer(cfg))
  params = _random_params(model.module, PACKED)
  score = jax.jit(model.score_batch)  # one program: the batches below share their shapes and keys
  alone = np.asarray(score(params, UNPACKED), np.float64)  # examples 1, 2, 2
  packed = np.asarray(score(params, PACKED), np.float64)
  np.testing.assert_allclose(packed, [alone[0] + alone[1], alone[2], 0.0], rtol=1e-5, atol=1e-5)
  assert alone[0] < -1 and alone[1] < -1  # random weights: every target token costs something
  # Row 0 as one segment: its two examples see each other, and its score is another.
  crossed = dict(PACKED, encoder_segment_ids=np.minimum(PACKED["encoder_segment_ids"], 1),
                 decoder_segment_ids=np.minimum(PACKED["decoder_segment_ids"], 1))
  assert abs(float(score(params, crossed)[0]) - packed[0]) > 1e-3
