"""tfds image pipelines for ViT: ImageNet-1k / -21k, CIFAR-10, the embedded digits, and their corrupted copies.

:class:`ImageDataset` is what the trainer reads (``train.train(dataset=...)``)::

    ds = ImageDataset(tfds_name="cifar10", image_size=32, augment="random_crop_flip")
    train = ds.get_dataset("train", batch_size=128, shard_id=0, num_shards=1, seed=0)
    evals = ds.get_dataset("test", batch_size=128, shuffle=False, repeat=False)

Each element is a per-host batch ``{"image": float32 [B, H, W, C] in [-1, 1],
"label": int32 [B], "weight": float32 [B]}``. Training iteration (``repeat=True``)
drops the remainder and weighs every example 1. Finite iteration (``repeat=False``)
keeps every example once: the last batch is padded with zero images whose weight is 0.

Label noise (``label_noise=p``) replaces, for a fraction ``p`` of the *training
split*'s examples, the label by a class drawn uniformly from *all* classes, the
true one included (as in Zhang et al., 2017), so a label actually changes with
probability ``p * (1 - 1 / num_classes)``. Which examples are hit and what they
become depends only on ``(label_noise_seed, example key)``: the key is the
dataset's own example id (``id`` for cifar10 and digits, ``file_name`` for
ImageNet, else the ``tfds_id``), hashed with FarmHash Fingerprint64 (stable
across versions) and fed to Philox stateless draws. Shuffling, sharding, batch
size, training seed and model (dense or Top-k) therefore do not change it.

:func:`corrupted_dataset` is the eval stream of a corrupted copy:
``imagenet2012_corrupted/{corruption}_{severity}`` and
``cifar10_corrupted/{corruption}_{severity}`` come from tfds; for ``digits`` the
test split is corrupted here by :mod:`topk_transformers.data.corruptions`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Tuple

import gin
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from topk_transformers.data import corruptions as corruptions_lib
from topk_transformers.errors import ConfigError

AUGMENTATIONS = ("inception_crop", "random_crop_flip", "random_crop", "none")

# tfds datasets with a corrupted copy: (its tfds name, the split it corrupts).
CORRUPTED = {
    "imagenet2012": ("imagenet2012_corrupted", "validation"),
    "cifar10": ("cifar10_corrupted", "test"),
}
# Datasets corrupted by this project's own code, and the split it corrupts.
LOCALLY_CORRUPTED = {"digits": "test"}

_KEY_FEATURES = ("id", "file_name", "tfds_id")  # First present names the example.
_ALG = "philox"  # Pinned so the draws do not depend on the device that runs the pipeline.
_AUTOTUNE = tf.data.AUTOTUNE
# The map functions branch on Python values only: tracing them as they are is exact,
# and skips AutoGraph's source conversion (a second per pipeline on a busy CPU).
_graph_fn = tf.autograph.experimental.do_not_convert


def tfds_builder(tfds_name: str, data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """The tfds builder of ``tfds_name``; ``digits`` is prepared on first use under its cache dir."""
  if tfds_name == "digits":
    from topk_transformers.data import digits  # Registers the builder with tfds.

    return digits.ensure_built(data_dir)
  return tfds.builder(tfds_name, data_dir=data_dir)


def example_key(example: Dict[str, tf.Tensor]) -> tf.Tensor:
  """The string that names an example: its ``id``, else ``file_name``, else ``tfds_id``."""
  for name in _KEY_FEATURES:
    if name in example:
      return tf.strings.as_string(example[name]) if example[name].dtype != tf.string else example[name]
  raise ValueError(f"example has none of the key features {_KEY_FEATURES}: {sorted(example)}")


def noisy_label(label: tf.Tensor, key: tf.Tensor, rate: float, num_classes: int, seed: int) -> tf.Tensor:
  """``label``, or with probability ``rate`` a class drawn uniformly from ``[0, num_classes)``.

  A pure function of ``(seed, key)``: the same key always draws the same outcome.
  """
  fingerprint = tf.strings.to_hash_bucket_fast(key, 2**62)
  pair = tf.stack([tf.constant(seed, tf.int64), fingerprint])
  flip_seed, class_seed = tf.unstack(tf.random.experimental.stateless_split(pair, 2, alg=_ALG))
  flip = tf.random.stateless_uniform([], flip_seed, alg=_ALG) < rate
  new = tf.random.stateless_uniform([], class_seed, minval=0, maxval=num_classes, dtype=tf.int64, alg=_ALG)
  return tf.where(flip, tf.cast(new, label.dtype), label)


# ---- image ops (float32 images in [0, 1])


def _to_float(image: tf.Tensor) -> tf.Tensor:
  return tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  static = image.shape[:2]
  if static[0] == height and static[1] == width:
    return image
  return tf.image.resize(image, [height, width], method="bilinear", antialias=True)


def resize_and_center_crop(image: tf.Tensor, size: int, crop_fraction: float = 1.0) -> tf.Tensor:
  """Resizes the shorter side to ``size / crop_fraction`` and keeps the central ``size x size``."""
  target = int(round(size / crop_fraction))
  if image.shape[0] == image.shape[1] == target:
    scaled = image
  else:
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.cast(tf.math.round(hw * (target / tf.reduce_min(hw))), tf.int32)
    new_hw = tf.maximum(new_hw, target)
    scaled = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
  top = (tf.shape(scaled)[0] - size) // 2
  left = (tf.shape(scaled)[1] - size) // 2
  out = scaled[top:top + size, left:left + size]
  return tf.ensure_shape(out, [size, size, image.shape[-1]])


def inception_crop(image: tf.Tensor, size: int, seed: tf.Tensor, area_range=(0.05, 1.0)) -> tf.Tensor:
  """A random crop of 5%-100% of the area and aspect ratio in [3/4, 4/3], resized to ``size`` (Szegedy et al.)."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([1, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=area_range, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  return tf.ensure_shape(tf.image.resize(crop, [size, size], method="bilinear"), [size, size, image.shape[-1]])


def random_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """Resizes to ``size``, zero-pads by ``size // 8`` (4 for CIFAR's 32) and crops ``size x size`` at random."""
  image = _resize(image, size, size)
  pad = max(1, size // 8)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, [size, size, image.shape[-1]], seed=seed)


def augment_image(image: tf.Tensor, augment: str, size: int, seed: tf.Tensor) -> tf.Tensor:
  """Training augmentation ``augment`` (one of :data:`AUGMENTATIONS`) of a float image, seeded by ``seed`` [2]."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg=_ALG))
  if augment == "inception_crop":
    return tf.image.stateless_random_flip_left_right(inception_crop(image, size, crop_seed), flip_seed)
  if augment == "random_crop_flip":
    return tf.image.stateless_random_flip_left_right(random_crop(image, size, crop_seed), flip_seed)
  if augment == "random_crop":  # No flip: a mirrored digit is another glyph.
    return random_crop(image, size, crop_seed)
  if augment == "none":
    return resize_and_center_crop(image, size)
  raise ConfigError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")


def _normalize(image: tf.Tensor) -> tf.Tensor:
  return image * 2.0 - 1.0  # [0, 1] -> [-1, 1], the ViT convention (big_vision value_range(-1, 1)).


# ---- batching


def _eval_batches(ds: tf.data.Dataset, batch_size: int, num_batches: Optional[int]) -> tf.data.Dataset:
  """Batches a finite stream of weighted examples, padding the last batch with weight-0 zeros.

  ``num_batches`` (needed when several hosts must run the same number of steps)
  pads with whole batches of zeros up to that count; ``None`` gives exactly
  ``ceil(n / batch_size)`` batches.
  """
  pad = tf.data.Dataset.from_tensors(tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec))
  if num_batches is None:
    # n real + (B - 1) pads, remainder dropped: ceil(n / B) batches, the last one padded.
    return ds.concatenate(pad.repeat(batch_size - 1)).batch(batch_size, drop_remainder=True)
  return ds.concatenate(pad.repeat()).batch(batch_size, drop_remainder=True).take(num_batches)


def _host_split(split: str, shard_id: int, num_shards: int):
  if not 0 <= shard_id < num_shards:
    raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id!r}")
  return split if num_shards == 1 else tfds.even_splits(split, n=num_shards, drop_remainder=False)[shard_id]


def _num_eval_batches(builder, split: str, batch_size: int, num_shards: int) -> Optional[int]:
  """Batches every host must run: the largest host shard, rounded up (``None`` on one host)."""
  if num_shards == 1:
    return None
  n = builder.info.splits[split].num_examples
  return math.ceil(math.ceil(n / num_shards) / batch_size)


def _check_batch_size(batch_size: int) -> None:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _eval_stream(examples: tf.data.Dataset, image_size: int, crop_fraction: float, batch_size: int,
                 num_batches: Optional[int]) -> tf.data.Dataset:
  @_graph_fn
  def prepare(ex):
    image = resize_and_center_crop(_to_float(ex["image"]), image_size, crop_fraction)
    return {"image": _normalize(image), "label": tf.cast(ex["label"], tf.int32),
            "weight": tf.constant(1.0, tf.float32)}

  ds = examples.map(prepare, num_parallel_calls=_AUTOTUNE)
  return _eval_batches(ds, batch_size, num_batches).prefetch(_AUTOTUNE)


@gin.configurable
@dataclasses.dataclass
class ImageDataset:
  """A tfds image classification dataset as per-host batches for the trainer.

  Attributes:
    tfds_name: ``imagenet2012``, ``imagenet21k`` (not in the tfds catalogue: a
      dataset prepared under ``data_dir``, split ``full``, 21843 classes, as
      big_vision reads it), ``cifar10``, ``digits`` (this project's), or any tfds
      name with ``image`` and ``label`` features.
    image_size: side of the square images fed to the model.
    num_classes: ``None`` reads it from the tfds ``label`` feature.
    train_split, eval_split: tfds split strings (slicing allowed, ``full[51200:]``).
    label_noise: fraction of training-split examples whose label is redrawn uniformly.
    label_noise_seed: seed of that draw, kept fixed across compared runs.
    augment: training augmentation, one of :data:`AUGMENTATIONS`
      (``random_crop`` is ``random_crop_flip`` without the flip, for digits).
    data_dir: tfds data dir (``None``: tfds's default; digits: its cache dir).
    eval_crop_fraction: eval resizes the shorter side to ``image_size / fraction``
      and crops the centre; ImageNet uses 0.875 (256 -> 224), 1.0 keeps it all.
    shuffle_buffer: examples in the training shuffle buffer (per host).
    cache: keep decoded examples in memory (small datasets).
    corruption_constants: severity table (``imagenet2012`` or ``cifar10``) of the
      corruptions this project applies itself (digits); tfds copies bring their own.
      ImageNet-C's, the paper's Table 1 severities, by default: CIFAR-10-C's milder
      ones barely move accuracy on digits (a logistic regression: 95.8% clean,
      93.6-95.6% averaged over severities, against 83.8-88.8% with ImageNet-C's).
  """

  tfds_name: str = "digits"
  image_size: int = 8
  num_classes: Optional[int] = None
  train_split: str = "train"
  eval_split: str = "test"
  label_noise: float = 0.0
  label_noise_seed: int = 0
  augment: str = "none"
  data_dir: Optional[str] = None
  eval_crop_fraction: float = 1.0
  shuffle_buffer: int = 10_000
  cache: bool = False
  corruption_constants: str = "imagenet2012"

  def __post_init__(self):
    if not 0.0 <= float(self.label_noise) <= 1.0:
      raise ConfigError(f"label_noise must be in [0, 1], got {self.label_noise!r}")
    if self.augment not in AUGMENTATIONS:
      raise ConfigError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
    if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
      raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
    if not 0.0 < float(self.eval_crop_fraction) <= 1.0:
      raise ValueError(f"eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction!r}")
    if self.corruption_constants not in corruptions_lib.SEVERITY_CONSTANTS:
      raise ValueError(f"corruption_constants must be one of {sorted(corruptions_lib.SEVERITY_CONSTANTS)}, "
                       f"got {self.corruption_constants!r}")
    self._builder = None

  @property
  def builder(self) -> tfds.core.DatasetBuilder:
    if self._builder is None:
      self._builder = tfds_builder(self.tfds_name, self.data_dir)
    return self._builder

  def get_num_classes(self) -> int:
    """``num_classes`` if set, else the number of classes of the tfds ``label`` feature."""
    if self.num_classes is not None:
      return int(self.num_classes)
    return int(self.builder.info.features["label"].num_classes)

  def num_examples(self, split: str) -> int:
    """Examples in ``split`` (all hosts together), from the prepared dataset's metadata."""
    return int(self.builder.info.splits[split].num_examples)

  def get_dataset(self, split: str, batch_size: int, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                  shuffle: bool = True, repeat: bool = True) -> tf.data.Dataset:
    """Per-host batches of ``split`` (see the module docstring for the element format).

    Augmentation runs when ``shuffle and repeat`` (training iteration); label noise
    whenever ``split == train_split``, however it is read.
    """
    _check_batch_size(batch_size)
    host_split = _host_split(split, shard_id, num_shards)
    read_config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=seed)
    ds = self.builder.as_dataset(split=host_split, shuffle_files=shuffle, read_config=read_config)
    noise = float(self.label_noise) if split == self.train_split else 0.0
    num_classes = self.get_num_classes() if noise > 0 else None

    @_graph_fn
    def select(ex):
      label = tf.cast(ex["label"], tf.int64)
      if noise > 0:
        label = noisy_label(label, example_key(ex), noise, num_classes, self.label_noise_seed)
      return {"image": ex["image"], "label": tf.cast(label, tf.int32)}

    ds = ds.map(select, num_parallel_calls=_AUTOTUNE)
    if self.cache:
      ds = ds.cache()
    if shuffle:
      ds = ds.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if not repeat:
      return _eval_stream(ds, self.image_size, self.eval_crop_fraction, batch_size,
                          _num_eval_batches(self.builder, split, batch_size, num_shards))
    ds = ds.repeat()
    train = shuffle
    # One independent [2] seed per example, from a seeded stream: augmentation is
    # reproducible for a given (seed, shard) and stays checkpointable (no stateful ops).
    seeds = tf.data.Dataset.random(seed=seed * 1_000_003 + shard_id).batch(2)
    size, augment = self.image_size, self.augment

    @_graph_fn
    def prepare(ex, pair):
      image = _to_float(ex["image"])
      if train:
        image = augment_image(image, augment, size, pair)
      else:
        image = resize_and_center_crop(image, size, self.eval_crop_fraction)
      return {"image": _normalize(image), "label": ex["label"], "weight": tf.constant(1.0, tf.float32)}

    ds = tf.data.Dataset.zip((ds, seeds)).map(prepare, num_parallel_calls=_AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(_AUTOTUNE)

  def get_corrupted_dataset(self, corruption: str, severity: int, batch_size: int, shard_id: int = 0,
                            num_shards: int = 1, seed: int = 0) -> tf.data.Dataset:
    """:func:`corrupted_dataset` of this dataset, with its image size, data dir and constants."""
    return corrupted_dataset(self.tfds_name, corruption, severity, batch_size, image_size=self.image_size,
                             shard_id=shard_id, num_shards=num_shards, data_dir=self.data_dir, seed=seed,
                             constants=self.corruption_constants)


def corruption_names(tfds_name: str) -> Tuple[str, ...]:
  """The corruptions :func:`corrupted_dataset` offers for ``tfds_name``."""
  if tfds_name in LOCALLY_CORRUPTED:
    return corruptions_lib.CORRUPTIONS
  if tfds_name in CORRUPTED:
    configs = tfds.builder_cls(CORRUPTED[tfds_name][0]).BUILDER_CONFIGS
    return tuple(dict.fromkeys(c.name.rsplit("_", 1)[0] for c in configs))
  raise ValueError(f"no corrupted copy of {tfds_name!r}; have {sorted(CORRUPTED) + sorted(LOCALLY_CORRUPTED)}")


@functools.lru_cache(maxsize=4)
def _clean_examples(tfds_name: str, data_dir: Optional[str], split: str, shard_id: int,
                    num_shards: int) -> Tuple[np.ndarray, np.ndarray, Tuple[bytes, ...]]:
  """This host's ``(uint8 images, labels, example keys)`` of a small split, read once through tfds.

  The 15 corrupted copies of a locally corrupted dataset then cost one read, not 15.
  """
  ds = tfds_builder(tfds_name, data_dir).as_dataset(split=_host_split(split, shard_id, num_shards),
                                                    shuffle_files=False, read_config=tfds.ReadConfig(add_tfds_id=True))
  ds = ds.map(_graph_fn(lambda ex: (ex["image"], ex["label"], example_key(ex))))
  images, labels, keys = [], [], []
  for i, l, k in tfds.as_numpy(ds.batch(4096)):
    images.append(i), labels.append(l), keys.extend(k)
  return np.concatenate(images), np.concatenate(labels), tuple(keys)


def corrupted_dataset(tfds_name: str, corruption: str, severity: int, batch_size: int, image_size: int,
                      shard_id: int = 0, num_shards: int = 1, data_dir: Optional[str] = None, seed: int = 0,
                      constants: str = "imagenet2012") -> tf.data.Dataset:
  """Finite, padded eval batches (as :meth:`ImageDataset.get_dataset` with ``repeat=False``) of a corrupted copy.

  ``imagenet2012`` and ``cifar10`` read ``{name}_corrupted/{corruption}_{severity}``
  from tfds (ImageNet-C images are already 224x224 centre crops, so they are only
  resized). ``digits`` corrupts its test split (read once per process) with
  :mod:`corruptions` at the ``constants`` severities, each image seeded by ``(seed, its id)``.
  """
  _check_batch_size(batch_size)
  if corruption not in corruption_names(tfds_name):
    raise ValueError(f"corruption must be one of {corruption_names(tfds_name)} for {tfds_name}, got {corruption!r}")
  if isinstance(severity, bool) or severity not in corruptions_lib.SEVERITIES:
    raise ValueError(f"severity must be one of {corruptions_lib.SEVERITIES}, got {severity!r}")
  if tfds_name in LOCALLY_CORRUPTED:
    split = LOCALLY_CORRUPTED[tfds_name]
    builder = tfds_builder(tfds_name, data_dir)
    images, labels, keys = _clean_examples(tfds_name, data_dir, split, shard_id, num_shards)
    corrupted = np.stack([corruptions_lib.corrupt_uint8(image, corruption, severity, seed, key, constants)
                          for image, key in zip(images, keys)]) if len(keys) else images
    ds = tf.data.Dataset.from_tensor_slices({"image": corrupted, "label": labels})
  else:
    name, split = CORRUPTED[tfds_name]
    builder = tfds.builder(f"{name}/{corruption}_{int(severity)}", data_dir=data_dir)
    ds = builder.as_dataset(split=_host_split(split, shard_id, num_shards), shuffle_files=False)
    ds = ds.map(_graph_fn(lambda ex: {"image": ex["image"], "label": ex["label"]}), num_parallel_calls=_AUTOTUNE)
  return _eval_stream(ds, image_size, 1.0, batch_size, _num_eval_batches(builder, split, batch_size, num_shards))
