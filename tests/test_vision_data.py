"""Tests for topk_transformers/data/vision.py and data/digits.py: tfds pipelines, padding, label noise."""

import dataclasses
import math
import os

import gin
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from topk_transformers.data import corruptions
from topk_transformers.data import digits
from topk_transformers.data import vision


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """The digits tfds dataset, built once for this module in a temporary data dir."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  digits.ensure_built(data_dir)
  return data_dir


def _digits(data_dir, **kw):
  return vision.ImageDataset(tfds_name="digits", image_size=8, data_dir=data_dir, **kw)


def _all(ds):
  return list(ds.as_numpy_iterator())


def _real(batches, key):
  """Concatenated ``key`` of the weight-1 examples of finite batches."""
  return np.concatenate([b[key][b["weight"] > 0] for b in batches])


# ---- digits


def test_digits_builder_reads_back_sklearn_digits(digits_dir):
  from sklearn.datasets import load_digits

  ref = load_digits()
  builder = digits.ensure_built(digits_dir)  # Second call: reuses the prepared files.
  assert builder.info.splits["train"].num_examples == 1437
  assert builder.info.splits["test"].num_examples == 360
  rows = {}
  for split in ("train", "test"):
    ds = tfds.load("digits", split=split, data_dir=digits_dir).batch(2000)
    (ex,) = tfds.as_numpy(ds)
    row = np.array([int(i.decode().split("_")[1]) for i in ex["id"]])
    rows[split] = row
    np.testing.assert_array_equal(ex["label"], ref.target[row])
    assert ex["image"].shape[1:] == (8, 8, 1) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"][..., 0], np.round(ref.images[row] * 255 / 16).astype(np.uint8))
  # Every row exactly once, the splits as split_indices says.
  assert sorted(np.concatenate([rows["train"], rows["test"]]).tolist()) == list(range(1797))
  train, test = digits.split_indices()
  assert sorted(rows["test"].tolist()) == test.tolist() and sorted(rows["train"].tolist()) == train.tolist()


def test_digits_no_rebuild(digits_dir):
  info = os.path.join(digits_dir, "digits", "1.0.0", "dataset_info.json")
  before = os.path.getmtime(info)
  digits.ensure_built(digits_dir)
  assert os.path.getmtime(info) == before


def test_digits_train_batches(digits_dir):
  ds = _digits(digits_dir, augment="random_crop", cache=True, shuffle_buffer=128)
  assert ds.get_num_classes() == 10
  batch = next(ds.get_dataset("train", 32, seed=3).as_numpy_iterator())
  assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["weight"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert (batch["weight"] == 1.0).all()
  # Reproducible by seed (shuffle and augmentation), different for another seed.
  again = next(ds.get_dataset("train", 32, seed=3).as_numpy_iterator())
  other = next(ds.get_dataset("train", 32, seed=4).as_numpy_iterator())
  np.testing.assert_array_equal(batch["image"], again["image"])
  assert not np.array_equal(batch["image"], other["image"])


def test_training_stream_resumes_from_an_iterator_checkpoint(digits_dir, tmp_path):
  # The trainer saves the tf.data iterator with its checkpoints: no stateful op may sit in the pipeline.
  ds = _digits(digits_dir, label_noise=0.4, augment="random_crop", cache=True, shuffle_buffer=256)
  it = iter(ds.get_dataset("train", 16, seed=0))
  for _ in range(3):
    next(it)
  path = tf.train.Checkpoint(it=it).save(str(tmp_path / "data"))
  expected = [next(it) for _ in range(2)]
  resumed = iter(ds.get_dataset("train", 16, seed=0))
  tf.train.Checkpoint(it=resumed).restore(path)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_digits_eval_keeps_every_example_once_with_padding(digits_dir):
  ds = _digits(digits_dir, label_noise=0.8)  # Label noise leaves the eval split alone.
  batches = _all(ds.get_dataset("test", 64, shuffle=False, repeat=False))
  assert len(batches) == math.ceil(360 / 64)
  assert all(b["image"].shape == (64, 8, 8, 1) for b in batches)
  np.testing.assert_array_equal(batches[-1]["weight"], [1.0] * (360 % 64) + [0.0] * (64 - 360 % 64))
  assert (batches[-1]["image"][360 % 64:] == 0).all()
  clean = tfds.as_numpy(tfds.load("digits", split="test", data_dir=digits_dir, shuffle_files=False))
  np.testing.assert_array_equal(_real(batches, "label"), [ex["label"] for ex in clean])


def _pairs(batches):
  """Sorted (image bytes, label) pairs of the real examples: equal lists mean the same labelling."""
  return sorted(zip([x.tobytes() for x in _real(batches, "image")], _real(batches, "label").tolist()))


def test_sharded_eval_covers_the_split_with_equal_steps(digits_dir):
  num_shards, batch_size = 2, 100  # Shards of 719 and 718 examples: 8 steps each, the last ones padded.
  ds = _digits(digits_dir, label_noise=0.4, label_noise_seed=5)
  per_host = [_all(ds.get_dataset("train", batch_size, shard_id=i, num_shards=num_shards, shuffle=False,
                                  repeat=False)) for i in range(num_shards)]
  assert [len(b) for b in per_host] == [8, 8]  # Hosts stay in lockstep.
  assert [sum(float(b["weight"].sum()) for b in host) for host in per_host] == [719, 718]
  # Together the shards hold every example once, with the labels (noisy ones included) of the whole split.
  whole = _all(ds.get_dataset("train", 1437, shuffle=False, repeat=False))
  assert _pairs(per_host[0] + per_host[1]) == _pairs(whole)


# ---- label noise


def _noisy(labels, keys, rate, seed, num_classes=10):
  ds = tf.data.Dataset.from_tensor_slices((labels, keys))
  fn = tf.autograph.experimental.do_not_convert(lambda l, k: vision.noisy_label(l, k, rate, num_classes, seed))
  ds = ds.map(fn).batch(len(labels))
  return next(ds.as_numpy_iterator())


@pytest.mark.parametrize("rate", [0.4, 0.8])
def test_label_noise_hits_the_requested_fraction(rate):
  n, k = 5000, 10
  labels = np.arange(n, dtype=np.int64) % k
  keys = np.array([f"example_{i}" for i in range(n)])
  noisy = _noisy(labels, keys, rate, seed=0)
  changed = np.mean(noisy != labels)
  # A uniformly drawn class may be the true one: labels change with rate * (1 - 1/k).
  expected = rate * (1 - 1 / k)
  assert abs(changed - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
  # New labels are uniform: no class takes much more than its share of the flips.
  counts = np.bincount(noisy[noisy != labels], minlength=k)
  share = counts.sum() / k
  assert np.abs(counts - share).max() < 5 * math.sqrt(share)
  assert noisy.min() >= 0 and noisy.max() < k


def test_label_noise_is_a_function_of_seed_and_key():
  n = 2000
  labels = np.zeros(n, np.int64)
  keys = np.array([f"id_{i}" for i in range(n)])
  first = _noisy(labels, keys, 0.4, seed=0)
  order = np.random.default_rng(0).permutation(n)
  np.testing.assert_array_equal(_noisy(labels[order], keys[order], 0.4, seed=0), first[order])
  other_seed = _noisy(labels, keys, 0.4, seed=1)
  assert (_noisy(labels[:10], keys[:10], 0.0, seed=0) == 0).all()
  # Another seed picks another set: overlap of the changed sets as for independent draws (0.36^2).
  overlap = np.mean((first != 0) & (other_seed != 0))
  assert abs(overlap - 0.36**2) < 0.03


def test_label_noise_in_the_pipeline(digits_dir):
  clean = _digits(digits_dir)
  noisy = _digits(digits_dir, label_noise=0.4, label_noise_seed=5)
  read = lambda d, **kw: _all(d.get_dataset("train", 512, repeat=False, **kw))
  noisy_batches = read(noisy, shuffle=False)
  c, n = _real(read(clean, shuffle=False), "label"), _real(noisy_batches, "label")
  realised = np.mean(c != n)
  expected = 0.4 * 0.9
  assert abs(realised - expected) < 4 * math.sqrt(expected * (1 - expected) / len(c))
  # The same examples get the same noisy labels whatever the order (sharding: see above).
  assert _pairs(read(noisy, shuffle=True, seed=9)) == _pairs(noisy_batches)


# ---- tfds catalogue datasets, offline through mock_data


@pytest.mark.parametrize("name,split,augment,size", [("imagenet2012", "train", "inception_crop", 32),
                                                     ("cifar10", "train", "random_crop_flip", 32),
                                                     ("cifar10", "train", "none", 16)])
def test_mock_train_pipeline(name, split, augment, size):
  with tfds.testing.mock_data(num_examples=12):
    ds = vision.ImageDataset(tfds_name=name, image_size=size, augment=augment, label_noise=0.4)
    k = ds.get_num_classes()
    batch = next(ds.get_dataset(split, 4, seed=0).as_numpy_iterator())
  assert k == {"imagenet2012": 1000, "cifar10": 10}[name]
  assert batch["image"].shape == (4, size, size, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
  assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() and batch["label"].max() < k
  np.testing.assert_array_equal(batch["weight"], np.ones(4, np.float32))


def test_mock_imagenet_eval_crops_and_pads():
  with tfds.testing.mock_data(num_examples=10):
    ds = vision.ImageDataset(tfds_name="imagenet2012", image_size=24, eval_split="validation",
                             eval_crop_fraction=0.875)
    batches = _all(ds.get_dataset("validation", 4, shuffle=False, repeat=False))
  assert [b["image"].shape for b in batches] == [(4, 24, 24, 3)] * 3
  np.testing.assert_array_equal(np.concatenate([b["weight"] for b in batches]), [1.0] * 10 + [0.0] * 2)


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_mock_corrupted_datasets(name):
  with tfds.testing.mock_data(num_examples=5):
    ds = vision.ImageDataset(tfds_name=name, image_size=16)
    batches = _all(ds.get_corrupted_dataset("shot_noise", 4, 2))
  assert [b["image"].shape for b in batches] == [(2, 16, 16, 3)] * 3
  np.testing.assert_array_equal(np.concatenate([b["weight"] for b in batches]), [1, 1, 1, 1, 1, 0])
  assert "frost" in vision.corruption_names(name)
  with pytest.raises(ValueError, match="corruption"):
    vision.corrupted_dataset(name, "not_a_corruption", 1, 2, image_size=16)


def test_digits_corrupted(digits_dir):
  ds = _digits(digits_dir)
  clean = _all(ds.get_dataset("test", 128, shuffle=False, repeat=False))
  noisy = _all(ds.get_corrupted_dataset("impulse_noise", 5, 128, seed=3))
  np.testing.assert_array_equal(_real(noisy, "label"), _real(clean, "label"))
  changed = np.mean(_real(noisy, "image") != _real(clean, "image"))
  c = corruptions.severity_constant("impulse_noise", 5, ds.corruption_constants)  # 0.27 of the values hit...
  # ... a hit changes a value unless it sets 0 (-1 here) or 1 where the value already was.
  hit_value = np.isin(_real(clean, "image"), (-1.0, 1.0)).mean()
  expected = c * (1 - hit_value / 2)
  n = _real(clean, "image").size
  assert abs(changed - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
  # Each image is corrupted with its own generator, seeded by (seed, example id).
  (raw,) = tfds.as_numpy(tfds.load("digits", split="test", data_dir=digits_dir, shuffle_files=False).batch(360))
  want = [corruptions.corrupt_uint8(x, "impulse_noise", 5, 3, k, ds.corruption_constants)
          for x, k in zip(raw["image"], raw["id"])]
  np.testing.assert_allclose(_real(noisy, "image"), np.stack(want) / 255.0 * 2 - 1, atol=1e-6)  # float32 rounding
  with pytest.raises(ValueError, match="corruption"):
    ds.get_corrupted_dataset("fog", 1, 128)


# ---- configuration


def test_gin_binding():
  gin.clear_config()
  try:
    gin.parse_config("vision.ImageDataset.label_noise = 0.8\nvision.ImageDataset.tfds_name = 'cifar10'")
    ds = vision.ImageDataset()
    assert ds.label_noise == 0.8 and ds.tfds_name == "cifar10"
  finally:
    gin.clear_config()


@pytest.mark.parametrize("kw", [dict(label_noise=1.5), dict(augment="mixup"), dict(image_size=0),
                                dict(corruption_constants="svhn"), dict(eval_crop_fraction=0.0)])
def test_bad_settings(kw):
  with pytest.raises(ValueError):
    vision.ImageDataset(**kw)


def test_bad_shard(digits_dir):
  with pytest.raises(ValueError, match="shard_id"):
    _digits(digits_dir).get_dataset("test", 8, shard_id=2, num_shards=2)


# ---- augmentation against eval preprocessing, and label noise across dense and Top-k runs


def _windows(image, pad):
  """Every ``size x size`` window of ``image`` zero-padded by ``pad``, keyed by its offset (dy, dx)."""
  size = image.shape[0]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  return {(dy, dx): padded[dy:dy + size, dx:dx + size] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}


@pytest.mark.parametrize("augment", ["random_crop", "random_crop_flip"])
def test_random_crop_is_a_shifted_window_of_the_padded_image_mirrored_only_with_flip(augment):
  size = 16
  image = tf.constant(np.random.default_rng(0).random((size, size, 3)), tf.float32)
  fn = tf.function(lambda seed: vision.augment_image(image, augment, size, seed))
  eval_image = vision.resize_and_center_crop(image, size).numpy()
  np.testing.assert_array_equal(eval_image, image.numpy())  # eval: the image itself at its own size
  windows = _windows(image.numpy(), size // 8)
  offsets, flips = [], []
  for s in range(40):
    out = fn(tf.constant([s, 7], tf.int64)).numpy()
    hits = [(o, False) for o, w in windows.items() if np.array_equal(out, w)]
    hits += [(o, True) for o, w in windows.items() if np.array_equal(out, w[:, ::-1])]
    assert len(hits) == 1, f"seed {s}: not one window of the padded image"
    offsets.append(hits[0][0])
    flips.append(hits[0][1])
  assert len(set(offsets)) >= 8  # 25 offsets for a pad of 2: the shift is random
  assert np.mean([o != (2, 2) for o in offsets]) > 0.7  # mostly not the centred (eval) window
  if augment == "random_crop_flip":
    assert 0.2 < np.mean(flips) < 0.8
  else:
    assert not any(flips)
  np.testing.assert_array_equal(fn(tf.constant([3, 7], tf.int64)).numpy(), fn(tf.constant([3, 7], tf.int64)).numpy())


def test_inception_crop_differs_from_eval_and_none_is_the_eval_crop():
  size = 16
  image = tf.constant(np.random.default_rng(1).random((24, 32, 3)), tf.float32)
  eval_image = vision.resize_and_center_crop(image, size).numpy()
  none = vision.augment_image(image, "none", size, tf.constant([0, 0], tf.int64)).numpy()
  np.testing.assert_array_equal(none, eval_image)
  fn = tf.function(lambda seed: vision.augment_image(image, "inception_crop", size, seed))
  outs = [fn(tf.constant([s, 1], tf.int64)).numpy() for s in range(12)]
  assert all(o.shape == (size, size, 3) for o in outs)
  assert all(np.abs(o - eval_image).max() > 0.05 for o in outs)  # random crops, not the centre crop
  assert len({o.tobytes() for o in outs}) == len(outs)
  # A crop of at most the whole image, resized: values stay within the image's range.
  assert all(o.min() >= image.numpy().min() - 1e-6 and o.max() <= image.numpy().max() + 1e-6 for o in outs)


def test_training_batches_are_shifted_crops_of_the_eval_images_of_the_same_examples(digits_dir):
  ds = _digits(digits_dir, augment="random_crop", cache=True)
  evals = _all(ds.get_dataset("train", 1437, shuffle=False, repeat=False))[0]
  # Eval preprocessing: the normalized image, unshifted ([-1, 1], background -1).
  clean = tfds.as_numpy(tfds.load("digits", split="train", data_dir=digits_dir, shuffle_files=False).batch(2000))
  (raw,) = list(clean)
  np.testing.assert_allclose(evals["image"], raw["image"] / 255.0 * 2 - 1, atol=1e-6)
  batch = next(ds.get_dataset("train", 64, seed=1).as_numpy_iterator())
  # The augmentation pads the [0, 1] image with zeros, i.e. with -1 after normalisation.
  offsets = list(_windows(evals["image"][0], 1))
  windows = np.stack([np.stack(list(_windows(e + 1.0, 1).values())) for e in evals["image"]])  # [N, 9, 8, 8, 1]
  unshifted = 0
  for image, label in zip(batch["image"], batch["label"]):
    match = np.abs(windows - (image + 1.0)).max(axis=(2, 3, 4)) <= 1e-6  # [N, 9]
    assert match.any(), "a training image that is no 1-pixel shift of any eval image"
    assert np.any(evals["label"][np.flatnonzero(match.any(axis=1))] == label)
    unshifted += bool(match[:, offsets.index((1, 1))].any())
  assert unshifted < 0.5 * len(batch["image"])  # 1 in 9 offsets is the unshifted one


def test_label_noise_changes_the_same_examples_in_dense_and_top_k_runs(digits_dir):
  from topk_transformers import gin_utils, runs

  labels = {}
  for name, files in (("topk", ["vit/runs/cpu_smoke.gin"]), ("dense", ["vit/runs/cpu_smoke.gin", "vit/relu.gin"])):
    gin_utils.configure(files, ["MODEL_DIR = '/nonexistent'", f"vision.ImageDataset.data_dir = '{digits_dir}'",
                                "LABEL_NOISE = 0.4", "LABEL_NOISE_SEED = 3"])
    model, dataset = gin_utils.get_macro("MODEL"), runs.build_from_gin("train.train.dataset")
    assert (model.module.top_k is None) == (name == "dense")
    batches = _all(dataset.get_dataset("train", 1437, shuffle=False, repeat=False))
    labels[name] = _real(batches, "label")
    clean = _real(_all(dataclasses.replace(dataset, label_noise=0.0).get_dataset(
        "train", 1437, shuffle=False, repeat=False)), "label")
  gin.clear_config()
  np.testing.assert_array_equal(labels["topk"], labels["dense"])
  changed = labels["topk"] != clean
  expected = 0.4 * 0.9
  assert abs(changed.mean() - expected) < 4 * math.sqrt(expected * (1 - expected) / len(clean))
