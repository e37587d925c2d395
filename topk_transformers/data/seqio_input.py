"""seqio Tasks as the trainer's datasets: feature conversion, host sharding, fixed-shape batches.

The trainer reads every dataset (text or images) through one small interface::

    dataset.train_split, dataset.eval_split
    dataset.get_dataset(split, batch_size, shard_id=0, num_shards=1, seed=0,
                        shuffle=True, repeat=True) -> tf.data.Dataset of dict batches

``batch_size`` is the per-host batch; ``shard_id``/``num_shards`` are seqio's
``ShardInfo`` (one shard per host). Training batches drop the remainder; eval
batches (``repeat=False``) keep every example and pad the last batch with zeros,
which the models' loss weights ignore.
"""

from __future__ import annotations

from typing import Mapping, Optional

import seqio
import tensorflow as tf

from topk_transformers.data import tasks


def pad_batch(batch: Mapping[str, tf.Tensor], batch_size: int) -> dict:
  """Zero-pads every feature of a (possibly short) batch to ``batch_size`` rows."""
  out = {}
  for name, value in batch.items():
    pad = batch_size - tf.shape(value)[0]
    paddings = [[0, pad]] + [[0, 0]] * (len(value.shape) - 1)
    out[name] = tf.pad(value, paddings)
    out[name].set_shape([batch_size] + value.shape[1:].as_list())
  return out


class SeqioDataset:
  """A seqio Task or Mixture, converted for an encoder-decoder model.

  Args:
    mixture_or_task_name: a registered seqio name (see ``data/tasks.py``).
    task_feature_lengths: e.g. ``{'inputs': 512, 'targets': 114}``.
    pack: pack several examples per row (``EncDecFeatureConverter(pack=True)``).
    train_split, eval_split: the splits the trainer reads.
    use_cached: read a seqio cache (``seqio_cache_tasks``) instead of preprocessing on the fly.
    shuffle_buffer_size: seqio's shuffle buffer for training.
  """

  def __init__(
      self,
      mixture_or_task_name: str,
      task_feature_lengths: Mapping[str, int],
      pack: bool = True,
      train_split: str = "train",
      eval_split: str = "validation",
      use_cached: bool = False,
      shuffle_buffer_size: Optional[int] = 10_000,
      feature_converter_cls=seqio.EncDecFeatureConverter,
  ):
    self.mixture_or_task_name = mixture_or_task_name
    self.task_feature_lengths = dict(task_feature_lengths)
    self.pack = pack
    self.train_split = train_split
    self.eval_split = eval_split
    self.use_cached = use_cached
    self.shuffle_buffer_size = shuffle_buffer_size
    self.feature_converter_cls = feature_converter_cls

  def get_dataset(self, split: str, batch_size: int, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                  shuffle: bool = True, repeat: bool = True) -> tf.data.Dataset:
    task = tasks.get_task(self.mixture_or_task_name)
    if split not in task.splits:
      raise ValueError(f"{self.mixture_or_task_name!r} has no split {split!r}; it has {sorted(task.splits)}")
    ds = task.get_dataset(
        sequence_length=self.task_feature_lengths,
        split=split,
        use_cached=self.use_cached,
        shuffle=shuffle,
        shuffle_buffer_size=self.shuffle_buffer_size,
        seed=seed,
        shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
        num_epochs=None if repeat else 1,
    )
    ds = self.feature_converter_cls(pack=self.pack)(ds, self.task_feature_lengths)
    if repeat:
      return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.batch(batch_size).map(lambda b: pad_batch(b, batch_size)).prefetch(tf.data.AUTOTUNE)


def task_vocabulary(mixture_or_task_name: str, feature: str = "targets") -> seqio.Vocabulary:
  """The vocabulary of a Task's feature, so a gin MODEL can share its Task's (e.g. trained) vocabulary."""
  return tasks.get_task(mixture_or_task_name).output_features[feature].vocabulary
