"""The T5 loss against NumPy on small hand-made logits: cross-entropy, z-loss, accuracy, label smoothing, score_batch.

The model is ``t5.model.EncoderDecoderModel`` around a module whose output is
its one parameter, so the logits are exactly the ones written here. The
oracles are written from the definitions (softmax probabilities, a KL
divergence for label smoothing), not from the library's formulas.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from topk_transformers.t5 import model as t5_model

# [batch 2, length 3, vocab 5], no ties in any row's maximum.
LOGITS = np.array([
    [[2.0, -1.0, 0.5, 0.0, 1.0], [0.1, 0.2, 3.0, -2.0, 0.0], [-1.0, -1.5, 0.0, 4.0, 2.0]],
    [[0.0, 5.0, 1.0, 1.0, -3.0], [1.5, 0.5, 0.2, 0.1, 2.5], [-4.0, 0.0, 0.5, 0.0, 1.0]],
], np.float32)
TARGETS = np.array([[2, 2, 3], [1, 4, 0]], np.int32)  # the last token of example 2 is padding


class FixedLogits(nn.Module):
  """Takes the Transformer's arguments and returns its ``logits`` parameter: the logits are the params."""

  shape: tuple

  @nn.compact
  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, *, enable_dropout=False,
               **segments_and_positions):
    del encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, enable_dropout, segments_and_positions
    return self.param("logits", nn.initializers.zeros, self.shape)


def make(**kwargs):
  return t5_model.EncoderDecoderModel(FixedLogits(LOGITS.shape), **kwargs)


def batch(targets=TARGETS, **extra):
  enc = np.array([[3, 4, 1, 0], [5, 1, 0, 0]], np.int32)
  return dict(encoder_input_tokens=enc, decoder_input_tokens=np.zeros_like(targets), decoder_target_tokens=targets,
              **extra)


def np_log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_log_z(x):
  x = x.astype(np.float64)
  return np.log(np.exp(x).sum(-1))


def oracle(logits, targets, weights, z_loss=0.0, label_smoothing=0.0):
  """Per-token (cross-entropy, z-loss) from the definitions."""
  logp = np_log_softmax(logits)
  vocab = logits.shape[-1]
  if label_smoothing:
    q = np.full(logits.shape, label_smoothing / (vocab - 1))
    np.put_along_axis(q, targets[..., None], 1.0 - label_smoothing, -1)
    ce = np.sum(q * (np.log(q) - logp), -1)  # KL(q || p): 0 for a model that predicts q
  else:
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  zl = z_loss * np_log_z(logits) ** 2
  return ce * weights, zl * weights


def test_cross_entropy_with_z_loss_equals_numpy():
  w = (TARGETS > 0).astype(np.float32)
  fn = jax.jit(t5_model.cross_entropy_with_z_loss, static_argnames="label_smoothing")  # z_loss traced
  for z in (0.0, 1e-4, 0.3):
    for ls in (0.0, 0.1, 0.4):
      total, zsum = fn(LOGITS, TARGETS, w, z_loss=z, label_smoothing=ls)
      ce, zl = oracle(LOGITS, TARGETS, w, z, ls)
      np.testing.assert_allclose(float(total), ce.sum() + zl.sum(), rtol=1e-5, err_msg=f"z={z} ls={ls}")
      np.testing.assert_allclose(float(zsum), zl.sum(), rtol=1e-5, atol=1e-12, err_msg=f"z={z} ls={ls}")


def test_label_smoothed_loss_is_zero_for_the_smoothed_target_and_positive_otherwise():
  ls, vocab = 0.2, 5
  q = np.full((1, 1, vocab), ls / (vocab - 1))
  q[0, 0, 3] = 1 - ls
  targets, w = np.array([[3]]), np.ones((1, 1))
  fn = jax.jit(lambda logits: t5_model.cross_entropy_with_z_loss(logits, targets, w, label_smoothing=ls)[0])
  assert abs(float(fn(np.log(q).astype(np.float32)))) < 1e-6
  for other in ((np.log(q) + np.arange(vocab) * 0.1), np.zeros((1, 1, vocab))):
    assert float(fn(other.astype(np.float32))) > 1e-3


@pytest.mark.parametrize("z_loss, label_smoothing", [(0.0, 0.0), (1e-4, 0.0), (0.25, 0.0), (0.25, 0.1)])
def test_loss_fn_metrics_equal_numpy(z_loss, label_smoothing):
  model = make(z_loss=z_loss, label_smoothing=label_smoothing)
  params = {"logits": jnp.asarray(LOGITS)}
  loss, aux = jax.jit(lambda p, b: model.loss_fn(p, b, None))(params, batch())
  m = aux["metrics"]
  w = (TARGETS > 0).astype(np.float64)
  ce, zl = oracle(LOGITS, TARGETS, w, z_loss, label_smoothing)
  n = w.sum()  # 5 target tokens
  np.testing.assert_allclose(float(loss), (ce.sum() + zl.sum()) / n, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-6)
  np.testing.assert_allclose(float(m["z_loss"]), zl.sum() / n, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(float(m["cross_ent_loss"]), ce.sum() / n, rtol=1e-5)
  correct = (LOGITS.argmax(-1) == TARGETS) & (TARGETS > 0)  # rows: [0, 2, 3] vs [2, 2, 3]; [1, 4, -] vs [1, 4, pad]
  assert correct.sum() == 4
  np.testing.assert_allclose(float(m["accuracy"]), 4 / 5, rtol=1e-6)
  assert float(aux["weight"]) == n == float(m["num_tokens"])
  assert float(m["num_input_tokens"]) == 5  # nonzero encoder tokens


def test_z_loss_weight_is_visible_in_the_total():
  params = {"logits": jnp.asarray(LOGITS)}
  w = (TARGETS > 0).astype(np.float64)
  mean_log_z2 = (np_log_z(LOGITS) ** 2 * w).sum() / w.sum()
  base = float(jax.jit(lambda p: make(z_loss=0.0).loss_fn(p, batch(), None)[0])(params))
  for z in (1e-4, 0.01, 0.5):
    total = float(jax.jit(lambda p, z=z: make(z_loss=z).loss_fn(p, batch(), None)[0])(params))
    np.testing.assert_allclose(total - base, z * mean_log_z2, rtol=1e-4)
  # T5's default weight, pinned: z_loss=1e-4 unless a config says otherwise.
  assert make().z_loss == 1e-4


def test_loss_gradient_wrt_logits_equals_numpy():
  z = 0.1
  model = make(z_loss=z)
  grad = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch(), None)[0]))({"logits": jnp.asarray(LOGITS)})["logits"]
  w = (TARGETS > 0).astype(np.float64)
  p = np.exp(np_log_softmax(LOGITS))
  onehot = np.eye(LOGITS.shape[-1])[TARGETS]
  want = (p - onehot + 2 * z * np_log_z(LOGITS)[..., None] * p) * w[..., None] / w.sum()
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-7)


def test_loss_weights_and_normalizing_factor():
  params = {"logits": jnp.asarray(LOGITS)}
  weights = np.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]], np.float32)
  model = make(z_loss=0.1)
  loss, aux = model.loss_fn(params, batch(decoder_loss_weights=weights), None)
  ce, zl = oracle(LOGITS, TARGETS, weights, 0.1)
  np.testing.assert_allclose(float(loss), (ce.sum() + zl.sum()) / weights.sum(), rtol=1e-5)
  correct = ((LOGITS.argmax(-1) == TARGETS) * weights).sum()
  np.testing.assert_allclose(float(aux["metrics"]["accuracy"]), correct / weights.sum(), rtol=1e-6)
  loss, aux = make(z_loss=0.1, loss_normalizing_factor=64.0).loss_fn(params, batch(), None)
  ce, zl = oracle(LOGITS, TARGETS, (TARGETS > 0).astype(np.float64), 0.1)
  np.testing.assert_allclose(float(loss), (ce.sum() + zl.sum()) / 64.0, rtol=1e-5)
  np.testing.assert_allclose(float(aux["metrics"]["cross_ent_loss"]), ce.sum() / 5, rtol=1e-5)  # still per token


def test_eval_fn_equals_loss_fn_without_the_token_counts():
  model = make(z_loss=0.1, label_smoothing=0.1)
  params = {"logits": jnp.asarray(LOGITS)}
  train = model.loss_fn(params, batch(), None)[1]
  ev = model.eval_fn(params, batch())
  assert set(ev["metrics"]) == {"loss", "z_loss", "cross_ent_loss", "accuracy"}
  for name, value in ev["metrics"].items():
    np.testing.assert_allclose(float(value), float(train["metrics"][name]), rtol=1e-6, err_msg=name)
  assert float(ev["weight"]) == 5


def test_score_batch_sums_target_log_likelihoods_without_padding():
  model = make(z_loss=0.5, label_smoothing=0.3)  # neither changes a score
  got = np.asarray(model.score_batch({"logits": jnp.asarray(LOGITS)}, batch()))
  logp = np_log_softmax(LOGITS)
  ll = np.take_along_axis(logp, TARGETS[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, (ll * (TARGETS > 0)).sum(-1), rtol=1e-5)
  assert got.shape == (2,)
  # the padded last position of example 2 makes token 0 unlikely: counted, it would change the score a lot
  assert abs(got[1] - ll[1].sum()) > 1e-3


def test_one_target_token_is_normalised_by_one():
  """A batch with a single target token: the loss, cross-entropy and accuracy are that token's (count 1, not 2)."""
  targets = np.array([[2, 0, 0], [0, 0, 0]], np.int32)
  params = {"logits": jnp.asarray(LOGITS)}
  loss, aux = make(z_loss=0.1).loss_fn(params, batch(targets), None)
  w = (targets > 0).astype(np.float64)
  ce, zl = oracle(LOGITS, targets, w, 0.1)
  assert w.sum() == 1
  np.testing.assert_allclose(float(loss), ce.sum() + zl.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(aux["metrics"]["cross_ent_loss"]), ce.sum(), rtol=1e-5)
  assert LOGITS[0, 0].argmax() != 2  # the one token is wrong: accuracy 0; right, it is 1
  assert float(aux["metrics"]["accuracy"]) == 0.0
  right = np.array([[0, 0, 0], [1, 0, 0]], np.int32)  # example 2's first token, which its logits predict
  assert LOGITS[1, 0].argmax() == 1
  assert float(make().loss_fn(params, batch(right), None)[1]["metrics"]["accuracy"]) == 1.0


def test_cross_entropy_defaults_are_no_z_loss_and_no_label_smoothing():
  w = (TARGETS > 0).astype(np.float32)
  total, zsum = t5_model.cross_entropy_with_z_loss(LOGITS, TARGETS, w)
  ce, _ = oracle(LOGITS, TARGETS, w)
  np.testing.assert_allclose(float(total), ce.sum(), rtol=1e-5)
  assert float(zsum) == 0.0


class DropoutLogits(nn.Module):
  """``FixedLogits`` through dropout (rate 0.5) when the model asks for it, and sowing the logits it returns."""

  shape: tuple

  @nn.compact
  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, *, enable_dropout=False,
               **segments_and_positions):
    del encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, segments_and_positions
    logits = nn.Dropout(rate=0.5)(self.param("logits", nn.initializers.zeros, self.shape),
                                  deterministic=not enable_dropout)
    self.sow("intermediates", "logits", logits)
    return logits


def test_training_loss_applies_dropout_with_its_rng_and_returns_the_intermediates():
  model = t5_model.EncoderDecoderModel(DropoutLogits(LOGITS.shape))
  params = {"logits": jnp.asarray(LOGITS)}
  plain, plain_aux = model.loss_fn(params, batch(), None)
  r1, r2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  dropped, aux = model.loss_fn(params, batch(), r1)
  assert abs(float(dropped) - float(plain)) > 1e-3  # the rng reached the network: dropout was applied
  assert float(model.loss_fn(params, batch(), r1)[0]) == float(dropped)  # the same rng, the same loss
  assert float(model.loss_fn(params, batch(), r2)[0]) != float(dropped)
  (seen,) = aux["intermediates"]["logits"]  # the network's sown values come back to the caller (sparsity)
  kept = np.asarray(seen) != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(np.asarray(seen)[kept], (LOGITS / 0.5)[kept], rtol=1e-6)
  (clean,) = plain_aux["intermediates"]["logits"]
  np.testing.assert_array_equal(np.asarray(clean), LOGITS)
  (ev,) = model.eval_fn(params, batch())["intermediates"]["logits"]  # evaluation: no dropout
  np.testing.assert_array_equal(np.asarray(ev), LOGITS)


def test_model_keeps_its_vocabularies():
  inputs, outputs = object(), object()
  model = make(input_vocabulary=inputs, output_vocabulary=outputs)
  assert model.input_vocabulary is inputs and model.output_vocabulary is outputs
