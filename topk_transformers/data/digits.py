"""scikit-learn's bundled digits, written once as a real tfds dataset named ``digits``.

The embedded ViT default trains on this so that the code path is the one used for
ImageNet: ``tfds.builder(...).as_dataset(...)`` over prepared TFRecords, with
tfds's splits, ``tfds_id``s and ``even_splits`` sharding. The data ship with the
scikit-learn wheel, so nothing is downloaded.

The dataset (version 1.0.0):

* ``image``: ``uint8 [8, 8, 1]``, the 17 grey levels 0..16 of ``load_digits``
  mapped to ``round(v * 255 / 16)``; kept at their native 8x8 (a patch size of 2
  gives 16 patches, a ViT that trains in minutes on two CPU cores);
* ``label``: ``ClassLabel`` 0..9;
* ``id``: ``"digits_{i:04d}"``, ``i`` the row of ``load_digits``;
* splits ``train`` (1437) and ``test`` (360): a fixed permutation
  (``np.random.RandomState(0)``) of the 1797 rows, the first 360 for test.

:func:`ensure_built` prepares it once under :func:`default_data_dir`
(``$TOPK_TRANSFORMERS_CACHE/tfds``, else ``~/.cache/topk_transformers/tfds``)
and reuses it afterwards.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

NAME = "digits"
NUM_TEST = 360
SPLIT_SEED = 0


def default_data_dir() -> str:
  """The tfds data dir of the project's own datasets: ``$TOPK_TRANSFORMERS_CACHE/tfds`` or ``~/.cache/...``."""
  root = os.environ.get("TOPK_TRANSFORMERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "topk_transformers")
  return os.path.join(root, "tfds")


def split_indices() -> Tuple[np.ndarray, np.ndarray]:
  """Rows of ``load_digits`` in the (train, test) splits; fixed by ``RandomState(0)``, which NumPy keeps stable."""
  from sklearn.datasets import load_digits  # Imported late: only building needs scikit-learn.

  n = len(load_digits().target)
  order = np.random.RandomState(SPLIT_SEED).permutation(n)
  return np.sort(order[NUM_TEST:]), np.sort(order[:NUM_TEST])


def to_uint8(images: np.ndarray) -> np.ndarray:
  """``load_digits().images`` (floats 0..16, ``[N, 8, 8]``) as ``uint8 [N, 8, 8, 1]`` in 0..255."""
  return np.round(np.asarray(images, np.float64) * (255.0 / 16.0)).astype(np.uint8)[..., None]


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as a tfds dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn load_digits, 8x8x1 uint8, train 1437 / test 360."}
  # No checksums file to look up next to this module (nothing is downloaded). tfds 4.9.10
  # would otherwise probe the package path through the `importlib_resources` backport,
  # which its dependencies no longer install on Python >= 3.11.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="scikit-learn's load_digits (UCI optical recognition of handwritten digits, 8x8).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ship with scikit-learn.
    train, test = split_indices()
    return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

  def _generate_examples(self, rows):
    from sklearn.datasets import load_digits

    data = load_digits()
    images = to_uint8(data.images)
    for i in rows:
      i = int(i)
      yield i, {"image": images[i], "label": int(data.target[i]), "id": f"digits_{i:04d}"}


def ensure_built(data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """Prepares the dataset under ``data_dir`` (default :func:`default_data_dir`) unless it is there; returns the builder."""
  builder = Digits(data_dir=data_dir or default_data_dir())
  if not builder.is_prepared():
    # No GCS lookup: the dataset is local by construction and the machine may be offline.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
