"""Random images: uniform-noise pixels with random labels, the "not the data" control of the paper's Section 3.

:class:`RandomImageDataset` is a fixed training set; :class:`InfiniteRandomImageDataset` draws every training image
afresh (the paper's infinite-data case).

A drop-in for :class:`~topk_transformers.data.vision.ImageDataset` in a gin file::

  from topk_transformers.data import random_images
  train.train.dataset = @random_images.RandomImageDataset()
  random_images.RandomImageDataset.image_size = %IMAGE_SIZE
"""

from __future__ import annotations

import numpy as np


class RandomImageDataset:
  """Fixed sets of uniform-noise images with uniformly random labels, with ``ImageDataset``'s interface.

  The training split has ``num_train`` images (digits has 1437), the eval split
  ``num_eval`` others, every pixel drawn i.i.d. uniform in [-1, 1] (the range the
  real pipelines produce) and every label uniform over ``num_classes``. Nothing in
  an image says anything about its label, so all a model can do is memorise.
  """

  def __init__(self, num_train: int = 1437, num_eval: int = 360, image_size: int = 8, channels: int = 1,
               num_classes: int = 10, seed: int = 0, train_split: str = "train", eval_split: str = "test"):
    for name, value in (("num_train", num_train), ("num_eval", num_eval), ("image_size", image_size),
                        ("channels", channels), ("num_classes", num_classes)):
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if train_split == eval_split:
      raise ValueError(f"train_split and eval_split must differ, got {train_split!r} for both")
    self.train_split, self.eval_split = train_split, eval_split
    self.num_classes = num_classes
    rng = np.random.RandomState(seed)
    self._data = {}
    for split, n in ((train_split, num_train), (eval_split, num_eval)):
      images = rng.uniform(-1.0, 1.0, (n, image_size, image_size, channels)).astype(np.float32)
      self._data[split] = (images, rng.randint(0, num_classes, n).astype(np.int32))

  def get_num_classes(self) -> int:
    return self.num_classes

  def num_examples(self, split: str) -> int:
    return len(self._split(split)[1])

  def _split(self, split: str):
    if split not in self._data:
      raise ValueError(f"RandomImageDataset has no split {split!r}; it has {sorted(self._data)}")
    return self._data[split]

  def get_dataset(self, split: str, batch_size: int, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                  shuffle: bool = True, repeat: bool = True):
    """Per-host batches ``{"image", "label", "weight"}``; finite iteration pads the last batch with weight 0."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    images, labels = self._split(split)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels,
                                             "weight": np.ones(len(labels), np.float32)})
    ds = ds.shard(num_shards, shard_id)
    if shuffle:
      ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
      return ds.repeat().batch(batch_size, drop_remainder=True).prefetch(2)
    pad = tf.data.Dataset.from_tensors({"image": np.zeros(images.shape[1:], np.float32), "label": np.int32(0),
                                        "weight": np.float32(0.0)}).repeat(batch_size - 1)
    return ds.concatenate(pad).batch(batch_size, drop_remainder=True)


# Salts of the two streams of InfiniteRandomImageDataset: training images and the fixed eval set never share a key.
_TRAIN_STREAM, _EVAL_STREAM = 1, 2


class InfiniteRandomImageDataset:
  """Uniform-noise images with random labels, drawn fresh for every training example: none is seen twice.

  The paper's "infinite data" control: a model that never sees an image again cannot memorise, so whatever
  sparsity emerges comes from training itself. Example ``n`` of the training stream (``n = step * global_batch
  + position``, counted over all hosts) is a pure function of ``(seed, training seed, n)``: its pixels (i.i.d.
  uniform in [-1, 1]) and its label (uniform over ``num_classes``) are Philox stateless draws keyed by it. So
  the stream is deterministic, is the same for any number of hosts at a given global batch, and its tf.data
  pipeline (``range`` -> ``map`` of stateless ops -> ``batch``) is checkpointable: a resumed run reads on from
  the example it stopped at.

  The eval split is a fixed set of ``num_eval`` images from another key, never in the training stream. Finite
  iteration of the training split (``repeat=False``: measuring a trained model "on training data") reads the
  stream's first ``num_train_measured`` examples, the images of the first training steps.
  """

  def __init__(self, num_eval: int = 360, num_train_measured: int = 1437, image_size: int = 8, channels: int = 1,
               num_classes: int = 10, seed: int = 0, train_split: str = "train", eval_split: str = "test"):
    for name, value in (("num_eval", num_eval), ("num_train_measured", num_train_measured),
                        ("image_size", image_size), ("channels", channels), ("num_classes", num_classes)):
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
      raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    if train_split == eval_split:
      raise ValueError(f"train_split and eval_split must differ, got {train_split!r} for both")
    self.train_split, self.eval_split = train_split, eval_split
    self.num_eval, self.num_train_measured = num_eval, num_train_measured
    self.image_size, self.channels, self.num_classes, self.seed = image_size, channels, num_classes, seed

  def get_num_classes(self) -> int:
    return self.num_classes

  def num_examples(self, split: str) -> int:
    """The eval set's size, or for the training split the examples its finite iteration reads."""
    return self.num_eval if self._check(split) == self.eval_split else self.num_train_measured

  def _check(self, split: str) -> str:
    if split not in (self.train_split, self.eval_split):
      raise ValueError(f"InfiniteRandomImageDataset has no split {split!r}; it has "
                       f"{sorted([self.train_split, self.eval_split])}")
    return split

  def _examples(self, stream_key, indices):
    """``{"image", "label", "weight"}`` of example numbers ``indices`` (a dataset of int64) of one stream."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    shape = [self.image_size, self.image_size, self.channels]
    num_classes = self.num_classes

    def draw(n):
      key = tf.random.experimental.stateless_fold_in(stream_key, n, alg="philox")
      image_key, label_key = tf.unstack(tf.random.experimental.stateless_split(key, 2, alg="philox"))
      return {"image": tf.random.stateless_uniform(shape, image_key, minval=-1.0, maxval=1.0, alg="philox"),
              "label": tf.random.stateless_uniform([], label_key, minval=0, maxval=num_classes, dtype=tf.int32,
                                                   alg="philox"),
              "weight": tf.constant(1.0, tf.float32)}

    return indices.map(tf.autograph.experimental.do_not_convert(draw), num_parallel_calls=tf.data.AUTOTUNE)

  def stream_key(self, split: str, seed: int = 0):
    """The ``[2]`` Philox key of a split's stream: the training one also depends on the training ``seed``."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    salt = _TRAIN_STREAM if self._check(split) == self.train_split else _EVAL_STREAM
    key = tf.constant([self.seed, salt], tf.int64)
    return tf.random.experimental.stateless_fold_in(key, seed if split == self.train_split else 0, alg="philox")

  def get_dataset(self, split: str, batch_size: int, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                  shuffle: bool = True, repeat: bool = True):
    """Per-host batches ``{"image", "label", "weight"}`` (see the class docstring).

    Training iteration (``repeat=True`` on the training split) never ends and never repeats an example; host
    ``shard_id`` of ``num_shards`` reads, at every step, its ``batch_size`` slice of the global batch. ``shuffle``
    changes nothing: the stream is already in random order. Finite iteration pads the last batch with weight 0.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    del shuffle
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not 0 <= shard_id < num_shards:
      raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id!r}")
    key = self.stream_key(split, seed)
    if split == self.train_split and repeat:
      # Local example i of this host is global example (i // b) * b * num_shards + shard_id * b + i % b.
      b = batch_size
      indices = tf.data.Dataset.range(2**62).map(
          lambda i: (i // b) * (b * num_shards) + shard_id * b + i % b)
      return self._examples(key, indices).batch(batch_size, drop_remainder=True).prefetch(2)
    n = self.num_eval if split == self.eval_split else self.num_train_measured
    ds = self._examples(key, tf.data.Dataset.range(n).shard(num_shards, shard_id))
    if repeat:
      return ds.cache().repeat().batch(batch_size, drop_remainder=True).prefetch(2)
    pad = tf.data.Dataset.from_tensors({"image": tf.zeros([self.image_size, self.image_size, self.channels]),
                                        "label": tf.constant(0, tf.int32),
                                        "weight": tf.constant(0.0, tf.float32)}).repeat(batch_size - 1)
    return ds.concatenate(pad).batch(batch_size, drop_remainder=True)
