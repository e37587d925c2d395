"""Random images: uniform-noise pixels with random labels, the "not the data" control of the paper's Section 3.

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
