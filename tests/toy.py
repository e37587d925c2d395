"""A toy model and dataset with the trainer's interfaces, for fast trainer tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from topk_transformers import layers, models


class ToyNet(nn.Module):
  width: int = 16
  hidden: int = 64
  classes: int = 4
  top_k: int | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = layers.DenseGeneral(self.width, kernel_axes=("vocab", "embed"), name="embed")(x)
    h = h + layers.MlpBlock(self.hidden, top_k=self.top_k, intermediate_dropout_rate=0.1, name="mlp")(
        h[:, None, :], deterministic=not train)[:, 0]
    return layers.DenseGeneral(self.classes, kernel_axes=("embed", "vocab"), name="head")(h)


class ToyModel(models.BaseModel):
  def __init__(self, module=None, nan_at_step=None):
    self.module = module or ToyNet()
    self.nan_at_step = nan_at_step

  def get_initial_variables(self, rng, input_shapes, input_types=None):
    return self.module.init(rng, jnp.ones(input_shapes["x"], jnp.float32))

  def _aux(self, params, batch, rng):
    logits, state = self.module.apply(
        {"params": params}, batch["x"], train=rng is not None, rngs={"dropout": rng} if rng is not None else None,
        mutable=["intermediates"])
    onehot = jax.nn.one_hot(batch["y"], logits.shape[-1])
    loss = jnp.mean(-jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
    if self.nan_at_step is not None:
      loss = jnp.where(batch["step"][0] >= self.nan_at_step, jnp.nan, loss)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    weight = jnp.asarray(batch["y"].shape[0], jnp.float32)
    return loss, {"metrics": {"loss": loss, "accuracy": acc}, "weight": weight,
                  "intermediates": state["intermediates"]}

  def loss_fn(self, params, batch, dropout_rng):
    return self._aux(params, batch, dropout_rng)

  def eval_fn(self, params, batch):
    return self._aux(params, batch, None)[1]

  def predict_batch(self, params, batch, **kwargs):
    return jnp.argmax(self.module.apply({"params": params}, batch["x"]), -1)

  def default_input_shapes(self, batch_size=1):
    return {"x": (batch_size, 8)}

  def describe(self):
    m = self.module
    return models.ModelDescription(
        config={"width": m.width, "hidden": m.hidden}, top_k=m.top_k,
        mlp=models.MlpDescription(d=m.width, ff=m.hidden, n_wi=1, top_k=m.top_k, stacks={"mlp": 1}))


class ToyDataset:
  """Gaussian blobs; deterministic given the seed; each example carries its index as 'step' marker."""

  train_split = "train"
  eval_split = "validation"

  def __init__(self, dim=8, classes=4, n=4096):
    rng = np.random.RandomState(0)
    self.centers = rng.normal(size=(classes, dim)).astype(np.float32) * 2
    self.y = rng.randint(0, classes, size=n).astype(np.int32)
    self.x = (self.centers[self.y] + rng.normal(size=(n, dim))).astype(np.float32)

  def get_dataset(self, split, batch_size, shard_id=0, num_shards=1, seed=0, shuffle=True, repeat=True):
    n = len(self.y)
    idx = np.arange(n) if split == "train" else np.arange(n // 8)
    ds = tf.data.Dataset.from_tensor_slices({"x": self.x[idx], "y": self.y[idx]})
    ds = ds.shard(num_shards, shard_id)
    if shuffle:
      ds = ds.shuffle(512, seed=seed, reshuffle_each_iteration=True)
    if repeat:
      ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    # 'step' = running batch index, so a model can misbehave from a given step on.
    ds = ds.enumerate().map(lambda i, b: {**b, "step": tf.fill([batch_size], tf.cast(i, tf.int32))})
    return ds


class ReverseCopyDataset:
  """Seq2seq toy task for T5: targets are the first half of the inputs, reversed, then EOS."""

  train_split = "train"
  eval_split = "validation"

  def __init__(self, vocab_size=128, inputs_length=32, n=512):
    self.vocab_size, self.inputs_length, self.n = vocab_size, inputs_length, n

  def get_dataset(self, split, batch_size, shard_id=0, num_shards=1, seed=0, shuffle=True, repeat=True):
    rng = np.random.RandomState(0 if split == "train" else 1)
    enc = rng.randint(2, self.vocab_size, size=(self.n, self.inputs_length)).astype(np.int32)
    half = self.inputs_length // 2
    tgt = np.concatenate([enc[:, :half - 1][:, ::-1], np.ones((self.n, 1), np.int32)], 1)
    dec_in = np.concatenate([np.zeros((self.n, 1), np.int32), tgt[:, :-1]], 1)
    ds = tf.data.Dataset.from_tensor_slices(dict(
        encoder_input_tokens=enc, decoder_target_tokens=tgt, decoder_input_tokens=dec_in,
        decoder_loss_weights=np.ones_like(tgt, np.float32)))
    ds = ds.shard(num_shards, shard_id)
    if repeat:
      ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=repeat)


def train_gin(model_bindings: str, **train_settings: str) -> str:
  """A gin file that trains the toy model: ``model_bindings``, then ``train.train`` with ``train_settings`` (gin
  values as text) over the settings every toy run shares."""
  settings = dict(model="@toy.ToyModel()", dataset="@toy.ToyDataset()", model_dir="%MODEL_DIR",
                  train_steps="%TRAIN_STEPS", batch_size="32", optimizer="@optax.adam", eval_period="0")
  settings.update(train_settings)
  body = "\n".join(f"  {name} = {value}" for name, value in settings.items())
  return ("from __gin__ import dynamic_registration\nimport optax\nimport toy\nfrom topk_transformers import train\n\n"
          f"{model_bindings}\ntrain.train:\n{body}\n")
