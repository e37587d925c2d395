"""Tests for topk_transformers/data/random_images.py: the infinite random-image stream (the paper's infinite data).

The fixed random-image set of experiment 3 is tested in tests/test_experiments.py.
"""

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf

from topk_transformers import train
from topk_transformers.data import random_images
from topk_transformers.vit import model as vit_model
from topk_transformers.vit import network


def _stream(ds, batches, batch_size=16, **kw):
  it = iter(ds.get_dataset(ds.train_split, batch_size, **kw))
  return [{k: v.numpy() for k, v in next(it).items()} for _ in range(batches)]


def _images(batches):
  return np.concatenate([b["image"] for b in batches]).reshape(sum(len(b["label"]) for b in batches), -1)


def test_no_training_image_repeats_and_none_is_an_eval_image():
  ds = random_images.InfiniteRandomImageDataset(image_size=4, num_classes=3, seed=0, num_eval=50)
  images = _images(_stream(ds, 60))  # 960 training images
  assert len(np.unique(images, axis=0)) == len(images)
  evals = _images(list(ds.get_dataset("test", 25, repeat=False).as_numpy_iterator()))
  assert len(evals) == 50
  assert not (images[:, None, :] == evals[None, :, :]).all(-1).any()
  # Uniform noise in [-1, 1] and labels over every class, not constants.
  assert images.min() >= -1.0 and images.max() <= 1.0 and abs(images.mean()) < 0.05 and images.std() > 0.5
  labels = np.concatenate([b["label"] for b in _stream(ds, 60)])
  assert set(labels.tolist()) == {0, 1, 2} and np.bincount(labels).min() > 250


def test_the_stream_is_a_function_of_the_seeds():
  make = lambda seed: random_images.InfiniteRandomImageDataset(image_size=4, seed=seed)
  a, again = _stream(make(3), 5), _stream(make(3), 5)
  for x, y in zip(a, again):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(_images(a), _images(_stream(make(4), 5)))  # the dataset's seed
  assert not np.array_equal(_images(a), _images(_stream(make(3), 5, seed=1)))  # the training seed
  # The eval set does not depend on the training seed; finite iteration is the same twice.
  ds = make(3)
  e0 = list(ds.get_dataset("test", 60, seed=0, repeat=False).as_numpy_iterator())
  e1 = list(ds.get_dataset("test", 60, seed=1, repeat=False).as_numpy_iterator())
  assert len(e0) == 6 and sum(b["weight"].sum() for b in e0) == 360  # 360 = 6 x 60: no padding batch
  np.testing.assert_array_equal(_images(e0), _images(e1))


def test_hosts_read_their_slices_of_the_same_global_batches():
  ds = random_images.InfiniteRandomImageDataset(image_size=4, seed=2)
  whole = _stream(ds, 3, batch_size=8)
  parts = [_stream(ds, 3, batch_size=4, shard_id=h, num_shards=2) for h in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[0][step]["image"], parts[1][step]["image"]]),
                                  whole[step]["image"])


def test_finite_iteration_of_the_training_split_is_the_start_of_the_stream():
  ds = random_images.InfiniteRandomImageDataset(image_size=4, seed=1, num_train_measured=40)
  finite = list(ds.get_dataset("train", 16, repeat=False).as_numpy_iterator())
  assert [int(b["weight"].sum()) for b in finite] == [16, 16, 8]
  np.testing.assert_array_equal(_images(finite)[:40], _images(_stream(ds, 3))[:40])
  assert ds.num_examples("train") == 40 and ds.num_examples("test") == 360


def test_iterator_checkpoint_continues_the_same_stream(tmp_path):
  # The trainer saves the data position with tf.train.Checkpoint(iterator=...) (checkpoints.py).
  ds = random_images.InfiniteRandomImageDataset(image_size=4, seed=5)
  straight = _stream(ds, 6, batch_size=8)
  it = iter(ds.get_dataset("train", 8))
  for _ in range(3):
    next(it)
  path = tf.train.Checkpoint(iterator=it).write(str(tmp_path / "data"))
  resumed = iter(ds.get_dataset("train", 8))
  tf.train.Checkpoint(iterator=resumed).read(path).assert_consumed()
  for step in range(3, 6):
    np.testing.assert_array_equal(next(resumed)["image"].numpy(), straight[step]["image"])


def _train(model_dir, steps):
  model = vit_model.ClassificationModel(network.ViT(variant="Test/2", num_classes=3, image_size=4, pool_type="gap",
                                                    mlp_activation="relu"))
  ds = random_images.InfiniteRandomImageDataset(image_size=4, num_classes=3, seed=0, num_eval=8)
  return train.train(model=model, dataset=ds, model_dir=str(model_dir), train_steps=steps, batch_size=8,
                     optimizer=optax.adam, learning_rate=optax.constant_schedule(1e-2), eval_period=100,
                     eval_steps=1, log_period=100, checkpoint_period=2, keep_checkpoints=1)


def test_a_resumed_run_trains_on_the_images_the_straight_run_sees(tmp_path):
  straight = _train(tmp_path / "straight", 4).state.params
  _train(tmp_path / "resumed", 2)
  resumed = _train(tmp_path / "resumed", 4).state.params
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                         straight, resumed)
  # The data position was saved as a tf.data iterator checkpoint (not the fallback that skips batches).
  assert list((tmp_path / "resumed" / "checkpoints_data").glob("*/*.index"))


def test_bad_arguments_are_errors():
  with pytest.raises(ValueError, match="num_eval must be a positive integer"):
    random_images.InfiniteRandomImageDataset(num_eval=0)
  with pytest.raises(ValueError, match="must differ"):
    random_images.InfiniteRandomImageDataset(train_split="test")
  with pytest.raises(ValueError, match="no split 'validation'"):
    random_images.InfiniteRandomImageDataset().get_dataset("validation", 2)
  with pytest.raises(ValueError, match="shard_id"):
    random_images.InfiniteRandomImageDataset().get_dataset("train", 2, shard_id=2, num_shards=2)
