"""Tests for topk_transformers/data/corruptions.py: the noises have the intended pixel statistics."""

import math

import numpy as np
import pytest

from topk_transformers.data import corruptions as C

SHAPE = (64, 64, 3)  # 12288 values per image: statistics to ~1%.


def _grey(value=0.5):
  return np.full(SHAPE, value)


def _normal_tail(z):
  """P(|N(0, 1)| > z)."""
  return math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("constants", ["imagenet2012", "cifar10"])
def test_gaussian_residual_std_is_c_before_clipping(constants):
  for severity in (1, 2, 3):  # c <= 0.18: |noise| > 0.5 is a > 2.7-sigma event at most, clipping is rare.
    c = C.severity_constant("gaussian_noise", severity, constants)
    out = C.corrupt(_grey(), "gaussian_noise", severity, rng=severity, constants=constants)
    residual = out - 0.5
    np.testing.assert_allclose(residual.std(), c, rtol=0.03)
    assert abs(residual.mean()) < 4 * c / math.sqrt(residual.size) + 1e-3


def test_gaussian_clips_where_the_noise_leaves_the_range():
  c = C.severity_constant("gaussian_noise", 5)  # 0.38: |noise| > 0.5 for ~19% of values.
  out = C.corrupt(_grey(), "gaussian_noise", 5, rng=0)
  assert out.min() == 0.0 and out.max() == 1.0
  clipped = np.mean((out == 0.0) | (out == 1.0))
  expected = _normal_tail(0.5 / c)
  assert abs(clipped - expected) < 4 * math.sqrt(expected * (1 - expected) / out.size)


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_shot_noise_is_poisson_mean_x_variance_x_over_c(severity):
  c = C.severity_constant("shot_noise", severity)  # 60, 25, 12 photons at full brightness.
  x = 0.3
  out = C.corrupt(_grey(x), "shot_noise", severity, rng=severity)
  n = out.size
  assert abs(out.mean() - x) < 4 * math.sqrt(x / c / n)
  np.testing.assert_allclose(out.var(), x / c, rtol=0.05)
  # Counts divided by c: values sit on the lattice k / c.
  np.testing.assert_allclose(out * c, np.round(out * c), atol=1e-9)


def test_shot_noise_keeps_black_black_and_clips_white():
  out = C.corrupt(np.stack([_grey(0.0), _grey(1.0)]), "shot_noise", 5, rng=0)
  assert (out[0] == 0.0).all()  # Poisson(0) = 0: no photons, no noise.
  assert out[1].max() == 1.0 and out[1].min() < 1.0


@pytest.mark.parametrize("constants", ["imagenet2012", "cifar10"])
@pytest.mark.parametrize("severity", [1, 5])
def test_impulse_changes_a_fraction_c_of_values_to_0_or_1(constants, severity):
  c = C.severity_constant("impulse_noise", severity, constants)
  out = C.corrupt(_grey(), "impulse_noise", severity, rng=severity, constants=constants)
  changed = out != 0.5
  assert set(np.unique(out[changed])) <= {0.0, 1.0}
  assert abs(changed.mean() - c) < 4 * math.sqrt(c * (1 - c) / out.size)
  salt = np.mean(out[changed] == 1.0)
  assert abs(salt - 0.5) < 4 * math.sqrt(0.25 / changed.sum())


def test_severity_tables_are_hendrycks_constants():
  assert C.SEVERITY_CONSTANTS["imagenet2012"]["gaussian_noise"] == (0.08, 0.12, 0.18, 0.26, 0.38)
  assert C.SEVERITY_CONSTANTS["cifar10"]["shot_noise"] == (500, 250, 100, 75, 50)
  # Severity grows: more noise (gaussian, impulse) or fewer photons (shot).
  for table in C.SEVERITY_CONSTANTS.values():
    for corruption, cs in table.items():
      assert list(cs) == sorted(cs, reverse=corruption == "shot_noise")


@pytest.mark.parametrize("corruption", C.CORRUPTIONS)
def test_value_range_kept_and_uint8_rounding(corruption):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
  for constants in C.SEVERITY_CONSTANTS:
    for severity in C.SEVERITIES:
      out = C.corrupt(image / 255.0, corruption, severity, rng=severity, constants=constants)
      assert out.dtype == np.float64 and out.min() >= 0.0 and out.max() <= 1.0
  as_uint8 = C.corrupt_uint8(image, corruption, 3, seed=1, key="a")
  again = C.corrupt(image / 255.0, corruption, 3, rng=np.random.default_rng([1, C.key_seed("a")]))
  assert as_uint8.dtype == np.uint8 and as_uint8.shape == image.shape
  np.testing.assert_array_equal(as_uint8, np.round(again * 255).astype(np.uint8))


def test_deterministic_by_seed_and_key():
  image = np.full((8, 8, 1), 128, np.uint8)
  a = C.corrupt_uint8(image, "gaussian_noise", 3, seed=0, key=b"digits_0001")
  np.testing.assert_array_equal(a, C.corrupt_uint8(image, "gaussian_noise", 3, seed=0, key="digits_0001"))
  assert not np.array_equal(a, C.corrupt_uint8(image, "gaussian_noise", 3, seed=0, key="digits_0002"))
  assert not np.array_equal(a, C.corrupt_uint8(image, "gaussian_noise", 3, seed=1, key="digits_0001"))


@pytest.mark.parametrize("args", [("gaussian_noise", 0), ("gaussian_noise", 6), ("gaussian_noise", True),
                                  ("motion_blur", 1)])
def test_bad_corruption_or_severity(args):
  with pytest.raises(ValueError):
    C.corrupt(_grey(), *args, rng=0)


def test_bad_constants_and_range():
  with pytest.raises(ValueError, match="constants"):
    C.corrupt(_grey(), "shot_noise", 1, rng=0, constants="mnist")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    C.corrupt(_grey(255.0), "shot_noise", 1, rng=0)
