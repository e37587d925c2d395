"""Noise corruptions of Hendrycks & Dietterich (2019), in NumPy, for datasets tfds has no corrupted copy of.

The paper's Table 1 evaluates on ``imagenet2012_corrupted`` (ImageNet-C); tfds reads
those (and ``cifar10_corrupted``) as they are. The embedded digits dataset has no
such copy, so this module makes one with the same three noises and the same
severity constants:

* ``gaussian_noise``: ``clip(x + N(0, c^2))``;
* ``shot_noise``: ``clip(Poisson(c * x) / c)`` (photon noise: variance ``x / c``);
* ``impulse_noise``: salt and pepper; each value is replaced with probability
  ``c``, by 0 or 1 with equal odds (scikit-image's ``random_noise(mode='s&p')``,
  which ImageNet-C uses; it draws per value, so per channel).

Images are float in ``[0, 1]``; results are clipped back to ``[0, 1]``.
:func:`corrupt_uint8` then rounds to ``uint8`` as tfds stores its corrupted copies.
Each image gets its own generator seeded from ``(seed, example key)``, so a
corrupted dataset is the same whatever the batching, order or process.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, Sequence, Union

import numpy as np

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise")
SEVERITIES = (1, 2, 3, 4, 5)

# Severity constants, one tuple per corruption, severities 1..5. "imagenet2012" is
# ImageNet-C (make_imagenet_c.py, also tfds's imagenet2012_corrupted); "cifar10" is
# CIFAR-10-C (make_cifar_c.py, the data behind tfds's cifar10_corrupted), milder
# for gaussian and shot noise and for impulse noise.
SEVERITY_CONSTANTS: Dict[str, Dict[str, Sequence[float]]] = {
    "imagenet2012": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    },
    "cifar10": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    },
}

Seed = Union[int, Sequence[int], np.random.SeedSequence]


def gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
  """Adds zero-mean Gaussian noise of standard deviation ``c`` and clips to ``[0, 1]``."""
  return np.clip(x + rng.normal(scale=c, size=x.shape), 0.0, 1.0)


def shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
  """Poisson photon noise: ``Poisson(c * x) / c`` (mean ``x``, variance ``x / c``), clipped to ``[0, 1]``."""
  return np.clip(rng.poisson(x * c) / float(c), 0.0, 1.0)


def impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
  """Salt and pepper: a fraction ``c`` of the values becomes 0 or 1 (equal odds)."""
  out = np.array(x, dtype=np.float64, copy=True)
  hit = rng.random(x.shape) < c
  salt = rng.random(x.shape) < 0.5
  out[hit & salt] = 1.0
  out[hit & ~salt] = 0.0
  return out


_FUNCTIONS: Dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
}


def severity_constant(corruption: str, severity: int, constants: str = "imagenet2012") -> float:
  """The constant ``c`` of ``corruption`` at ``severity`` (1..5) in the ``constants`` table."""
  if constants not in SEVERITY_CONSTANTS:
    raise ValueError(f"constants must be one of {sorted(SEVERITY_CONSTANTS)}, got {constants!r}")
  if corruption not in _FUNCTIONS:
    raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
  if isinstance(severity, bool) or int(severity) != severity or severity not in SEVERITIES:
    raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
  return SEVERITY_CONSTANTS[constants][corruption][int(severity) - 1]


def corrupt(x: np.ndarray, corruption: str, severity: int, rng: Union[np.random.Generator, Seed],
            constants: str = "imagenet2012") -> np.ndarray:
  """Applies ``corruption`` at ``severity`` to float images in ``[0, 1]`` (any shape); returns float64 in [0, 1]."""
  c = severity_constant(corruption, severity, constants)
  x = np.asarray(x, dtype=np.float64)
  if x.size and (x.min() < 0.0 or x.max() > 1.0):
    raise ValueError(f"images must lie in [0, 1], got values in [{x.min()}, {x.max()}]")
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  return _FUNCTIONS[corruption](x, c, rng)


def key_seed(key: Union[bytes, str]) -> int:
  """A stable 64-bit integer from an example key (a tfds ``id`` / ``tfds_id``), the same on every machine."""
  if isinstance(key, str):
    key = key.encode("utf-8")
  return int.from_bytes(hashlib.sha256(bytes(key)).digest()[:8], "little")


def corrupt_uint8(image: np.ndarray, corruption: str, severity: int, seed: int, key: Union[bytes, str],
                  constants: str = "imagenet2012") -> np.ndarray:
  """Corrupts one ``uint8`` image, seeded by ``(seed, key)``; rounds back to ``uint8`` like tfds's copies."""
  rng = np.random.default_rng([int(seed), key_seed(key)])
  out = corrupt(np.asarray(image, np.float64) / 255.0, corruption, severity, rng, constants)
  return np.round(out * 255.0).astype(np.uint8)
