"""Bootstrap intervals: coverage on synthetic data with a known mean, paired against unpaired, clear errors."""

import numpy as np
import pytest

from topk_transformers import intervals


def _synthetic(rng, n_seeds, n_batches, mean=30.0, seed_sd=2.0, batch_sd=3.0):
  """Per seed a run effect, per batch measurement noise: the true mean over seeds is ``mean``."""
  effects = rng.normal(0.0, seed_sd, n_seeds)
  return [mean + e + rng.normal(0.0, batch_sd, n_batches) for e in effects]


def test_estimate_is_the_mean_of_the_seed_means_and_weights_make_it_a_ratio():
  iv = intervals.hierarchical_interval([[1.0, 3.0], [10.0], [4.0, 4.0, 4.0]], n_resamples=500)
  assert iv.seed_means == (2.0, 10.0, 4.0) and iv.estimate == pytest.approx(16.0 / 3)
  assert iv.n_seeds == 3 and iv.n_batches == 6 and iv.low <= iv.estimate <= iv.high
  # Weighted: seed 0 counts 1 token at 1.0 and 3 tokens at 3.0.
  w = intervals.hierarchical_interval([[1.0, 3.0], [10.0]], weights=[[1, 3], [2]], n_resamples=500)
  assert w.seed_means == (2.5, 10.0)
  assert w.as_dict(2)["seed_means"] == [2.5, 10.0]


def test_the_same_seed_gives_the_same_interval_and_another_seed_a_different_one():
  data = _synthetic(np.random.default_rng(0), 5, 20)
  a = intervals.hierarchical_interval(data, seed=7)
  assert a == intervals.hierarchical_interval(data, seed=7)
  assert (a.low, a.high) != (intervals.hierarchical_interval(data, seed=8).low,
                             intervals.hierarchical_interval(data, seed=8).high)


def test_coverage_of_the_known_mean_with_20_seeds_is_near_95_percent():
  rng = np.random.default_rng(1)
  trials, hits = 200, 0
  for t in range(trials):
    iv = intervals.hierarchical_interval(_synthetic(rng, 20, 10), n_resamples=1000, seed=t)
    hits += iv.low <= 30.0 <= iv.high
  assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_with_3_seeds_the_interval_covers_less_than_its_nominal_level_as_documented():
  # The seed level cannot leave the range of 3 seed means (75% coverage of a symmetric spread): the module's
  # docstring says to read a 3-seed interval as the spread measured. Batch noise widens it a little.
  rng = np.random.default_rng(2)
  trials, hits = 300, 0
  for t in range(trials):
    iv = intervals.hierarchical_interval(_synthetic(rng, 3, 10, batch_sd=0.5), n_resamples=500, seed=t)
    hits += iv.low <= 30.0 <= iv.high
  assert 0.6 <= hits / trials <= 0.85, hits / trials


def test_batches_matter_only_through_their_spread():
  rng = np.random.default_rng(3)
  effects = rng.normal(0, 2.0, 6)
  quiet = [30 + e + rng.normal(0, 0.01, 50) for e in effects]
  noisy = [30 + e + rng.normal(0, 20.0, 50) for e in effects]  # adds 2.8 to each seed mean's sd of 2
  assert intervals.hierarchical_interval(noisy).half_width > 1.3 * intervals.hierarchical_interval(quiet).half_width
  # Identical seeds with noisy batches: the interval is the batch noise of the mean, about 1.96 * sd / sqrt(n).
  same = [np.linspace(-1, 1, 40) * 3 + 30] * 4
  iv = intervals.hierarchical_interval(same, n_resamples=4000)
  sd_mean = np.std(same[0]) / np.sqrt(4 * 40)
  assert iv.half_width == pytest.approx(1.96 * sd_mean, rel=0.15)


def test_paired_difference_is_much_narrower_than_unpaired_when_seeds_vary_more_than_the_effect():
  rng = np.random.default_rng(4)
  n_seeds, n_batches = 10, 20
  seed_effects = rng.normal(0, 5.0, n_seeds)
  batch_effects = rng.normal(0, 3.0, n_batches)  # the same eval batches for A and B
  a = [30 + s + batch_effects + rng.normal(0, 0.2, n_batches) for s in seed_effects]
  b = [29 + s + batch_effects + rng.normal(0, 0.2, n_batches) for s in seed_effects]
  paired = intervals.paired_difference_interval(a, b)
  unpaired = intervals.unpaired_difference_interval(a, b)
  assert paired.estimate == pytest.approx(unpaired.estimate)
  assert paired.low <= 1.0 <= paired.high and paired.low > 0  # the effect of 1 is resolved
  assert unpaired.low < 0 < unpaired.high  # ...and is not without the pairing
  assert paired.half_width < 0.2 * unpaired.half_width


def test_paired_difference_of_one_value_per_seed_equals_the_interval_of_the_differences():
  a = np.array([0.80, 0.71, 0.75, 0.90, 0.66])
  b = np.array([0.78, 0.70, 0.71, 0.86, 0.65])
  paired = intervals.paired_difference_interval(a, b, seed=3)
  direct = intervals.seed_interval(a - b, seed=3)
  assert paired.estimate == pytest.approx(direct.estimate)
  assert (paired.low, paired.high) == pytest.approx((direct.low, direct.high))
  assert paired.seed_means == pytest.approx(tuple(a - b))


def test_batch_interval_is_the_measurements_own_spread_and_shrinks_with_more_batches():
  rng = np.random.default_rng(5)
  few, many = rng.normal(30, 4, 10), rng.normal(30, 4, 160)
  a, b = intervals.batch_interval(few), intervals.batch_interval(many)
  assert a.n_seeds == 1 and a.estimate == pytest.approx(few.mean())
  assert b.half_width == pytest.approx(a.half_width / 4, rel=0.4)  # 16x the batches: about 1/4 the width
  w = intervals.batch_interval([1.0, 3.0], weights=[3, 1], n_resamples=500)
  assert w.estimate == 1.5 and 1.0 <= w.low <= w.high <= 3.0
  with pytest.raises(ValueError, match="at least 2 batch values"):
    intervals.batch_interval([1.0])


def test_degenerate_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="at least 2 seeds"):
    intervals.hierarchical_interval([[1.0, 2.0]])
  with pytest.raises(ValueError, match="at least 2 seeds"):
    intervals.seed_interval([0.5])
  with pytest.raises(ValueError, match="seed 1 has no batch values"):
    intervals.hierarchical_interval([[1.0], []])
  with pytest.raises(ValueError, match="non-finite"):
    intervals.hierarchical_interval([[1.0], [np.nan]])
  with pytest.raises(ValueError, match="level"):
    intervals.hierarchical_interval([[1.0], [2.0]], level=95)
  with pytest.raises(ValueError, match="n_resamples"):
    intervals.hierarchical_interval([[1.0], [2.0]], n_resamples=10)
  with pytest.raises(ValueError, match="2-D"):
    intervals.hierarchical_interval(np.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="weights"):
    intervals.hierarchical_interval([[1.0], [2.0]], weights=[[1.0], [0.0]])
  with pytest.raises(ValueError, match="matched"):
    intervals.paired_difference_interval([[1.0, 2.0], [3.0]], [[1.0], [3.0]])
  with pytest.raises(ValueError, match="matched"):
    intervals.paired_difference_interval([1.0, 2.0, 3.0], [1.0, 2.0])
  with pytest.raises(ValueError, match="both"):
    intervals.paired_difference_interval([1.0, 2.0], [[1.0], [2.0]])


def test_constant_data_gives_a_zero_width_interval_at_the_value():
  iv = intervals.hierarchical_interval([[5.0, 5.0], [5.0, 5.0, 5.0]], n_resamples=200)
  assert (iv.estimate, iv.low, iv.high) == (5.0, 5.0, 5.0)
