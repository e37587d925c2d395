"""Bootstrap intervals over seeds and eval batches, and paired differences on matched seeds (numpy only).

A measurement such as a layer's % nonzero varies for two reasons: the training run (its seed) and the eval
batches it is measured on. The interval here resamples both, in that order (a hierarchical bootstrap):

1. draw ``n_seeds`` seeds with replacement;
2. within each drawn seed, draw its batches with replacement;
3. the statistic of the replicate is the mean over the drawn seeds of each seed's (weighted) batch mean.

The estimate is the same statistic on the data (every seed counts the same, whatever its number of batches), and
the interval is the percentile interval of the replicates::

  iv = hierarchical_interval([[31.2, 30.8, 32.0], [29.5, 30.1, 29.9], [33.0, 32.1, 32.4]])  # 3 seeds x 3 batches
  iv.estimate, iv.low, iv.high          # mean of the seed means, and its 95% interval
  paired_difference_interval(a, b)      # A - B on matched seeds (and, given per-batch values, matched batches)

``weights`` (e.g. tokens per batch) make a seed's value the ratio sum(w * x) / sum(w), what a layer's % nonzero
over several batches is. Everything is deterministic given ``seed``.

How far to trust it: a bootstrap never reaches beyond its data, so with very few seeds the interval is narrow.
With 3 seeds the seed level of the interval cannot leave the range of the 3 seed means, which holds the true mean
with probability 1 - 2 / 2**3 = 75% for a symmetric spread: read a 3-seed interval as the spread measured, not as a
95% guarantee. tests/test_intervals.py checks the coverage with 20 seeds and shows the 3-seed shortfall.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

ArrayLike = Union[Sequence[float], np.ndarray]
Groups = Union[Sequence[ArrayLike], np.ndarray]
"""Per seed, its per-batch values: a list of 1-D arrays (ragged allowed) or a 2-D array ``[seeds, batches]``."""

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
  """A point estimate and its bootstrap interval."""

  estimate: float
  """The statistic on the data: the mean over seeds of each seed's (weighted) batch mean (a difference: A - B)."""
  low: float
  """Lower end of the percentile interval."""
  high: float
  """Upper end of the percentile interval."""
  level: float
  """Nominal coverage, e.g. 0.95."""
  n_seeds: int
  """Seeds (top-level units) resampled."""
  n_batches: int
  """Batches per seed, summed over the seeds (``n_seeds`` when each seed has one value)."""
  n_resamples: int
  seed_means: tuple
  """Each seed's own (weighted) batch mean (for a difference: each seed's A - B)."""

  @property
  def half_width(self) -> float:
    return 0.5 * (self.high - self.low)

  def as_dict(self, digits: Optional[int] = None) -> dict:
    """JSON-ready; ``digits`` rounds the floats."""
    r = (lambda v: float(v)) if digits is None else (lambda v: round(float(v), digits))
    return {"estimate": r(self.estimate), "low": r(self.low), "high": r(self.high), "level": self.level,
            "n_seeds": self.n_seeds, "n_batches": self.n_batches, "n_resamples": self.n_resamples,
            "seed_means": [r(v) for v in self.seed_means]}

  def __str__(self) -> str:
    return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

def _groups(values: Groups, name: str = "values") -> list:
  if isinstance(values, np.ndarray):
    if values.ndim == 1:
      raise ValueError(f"{name}: give per-seed lists of per-batch values (2-D); for one value per seed use "
                       "seed_interval")
    if values.ndim != 2:
      raise ValueError(f"{name}: expected [seeds, batches], got shape {values.shape}")
    groups = [np.asarray(row, np.float64) for row in values]
  else:
    groups = [np.atleast_1d(np.asarray(g, np.float64)) for g in values]
  if len(groups) < 2:
    raise ValueError(f"{name}: a bootstrap over seeds needs at least 2 seeds, got {len(groups)}")
  for i, g in enumerate(groups):
    if g.ndim != 1 or g.size == 0:
      raise ValueError(f"{name}: seed {i} has no batch values (shape {g.shape})")
    if not np.all(np.isfinite(g)):
      raise ValueError(f"{name}: seed {i} has a non-finite value")
  return groups


def _weights(weights: Optional[Groups], groups: list, name: str = "weights") -> list:
  if weights is None:
    return [np.ones_like(g) for g in groups]
  ws = [np.atleast_1d(np.asarray(w, np.float64)) for w in weights]
  if len(ws) != len(groups) or any(w.shape != g.shape for w, g in zip(ws, groups)):
    raise ValueError(f"{name}: must have the shape of the values, seed by seed")
  for i, w in enumerate(ws):
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"{name}: seed {i} needs finite, non-negative weights with a positive sum")
  return ws


def _flat(x) -> bool:
  """Whether ``x`` is one value per seed (1-D) rather than per-seed lists of batch values."""
  if isinstance(x, np.ndarray):
    return x.ndim == 1
  return all(np.ndim(e) == 0 for e in x)


def _check(level: float, n_resamples: int) -> None:
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if int(n_resamples) < 100:
    raise ValueError(f"n_resamples must be at least 100, got {n_resamples}")


def _percentiles(replicates: np.ndarray, level: float) -> tuple:
  tail = 0.5 * (1.0 - level)
  low, high = np.quantile(replicates, [tail, 1.0 - tail])
  return float(low), float(high)


# ---------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------

def _resampled_seed_means(rng: np.random.Generator, groups: list, weights: list, picks: np.ndarray,
                          paired_with: Optional[tuple] = None) -> np.ndarray:
  """``[R, S]``: for each replicate and drawn slot, the weighted mean of the picked seed's resampled batches.

  With ``paired_with = (groups_b, weights_b)`` the same batch indices are drawn for B, and A - B is returned.
  """
  out = np.empty(picks.shape, np.float64)
  for s, (g, w) in enumerate(zip(groups, weights)):
    where = picks == s
    k = int(where.sum())
    if not k:
      continue
    idx = rng.integers(0, g.size, size=(k, g.size))  # k independent resamples of this seed's batches
    wi = w[idx]
    values = (wi * g[idx]).sum(1) / np.maximum(wi.sum(1), 1e-300)
    if paired_with is not None:
      gb, wb = paired_with[0][s], paired_with[1][s]
      wbi = wb[idx]
      values = values - (wbi * gb[idx]).sum(1) / np.maximum(wbi.sum(1), 1e-300)
    out[where] = values
  return out


def _weighted_mean(g: np.ndarray, w: np.ndarray) -> float:
  return float((w * g).sum() / w.sum())


def hierarchical_interval(values: Groups, weights: Optional[Groups] = None, level: float = DEFAULT_LEVEL,
                          n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
  """Bootstrap interval of the mean over seeds, resampling seeds and then the batches within each seed.

  Args:
    values: per seed, its per-batch values (at least 2 seeds, at least 1 batch each; ragged allowed).
    weights: optional, the same shape: each batch's weight in its seed's mean (e.g. its token count).
    level: nominal coverage.
    n_resamples: bootstrap replicates (at least 100).
    seed: the resampling's random seed (the same seed gives the same interval).
  """
  _check(level, n_resamples)
  groups = _groups(values)
  ws = _weights(weights, groups)
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(groups), size=(int(n_resamples), len(groups)))
  replicates = _resampled_seed_means(rng, groups, ws, picks).mean(1)
  seed_means = tuple(_weighted_mean(g, w) for g, w in zip(groups, ws))
  low, high = _percentiles(replicates, level)
  return Interval(float(np.mean(seed_means)), low, high, level, len(groups), int(sum(g.size for g in groups)),
                  int(n_resamples), seed_means)


def batch_interval(values: ArrayLike, weights: Optional[ArrayLike] = None, level: float = DEFAULT_LEVEL,
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
  """Bootstrap interval of one seed's (weighted) batch mean, resampling its batches only.

  The spread of the measurement itself (how many eval batches are enough), not of the training run.
  """
  _check(level, n_resamples)
  g = np.asarray(values, np.float64)
  if g.ndim != 1 or g.size < 2:
    raise ValueError(f"values: a bootstrap over batches needs at least 2 batch values (1-D), got shape {g.shape}")
  if not np.all(np.isfinite(g)):
    raise ValueError("values: a batch value is non-finite")
  (w,) = _weights(None if weights is None else [weights], [g])
  rng = np.random.default_rng(seed)
  replicates = _resampled_seed_means(rng, [g], [w], np.zeros((int(n_resamples), 1), np.int64))[:, 0]
  low, high = _percentiles(replicates, level)
  estimate = _weighted_mean(g, w)
  return Interval(estimate, low, high, level, 1, int(g.size), int(n_resamples), (estimate,))


def seed_interval(values: ArrayLike, level: float = DEFAULT_LEVEL, n_resamples: int = DEFAULT_RESAMPLES,
                  seed: int = 0) -> Interval:
  """Bootstrap interval of the mean of one value per seed (e.g. each seed's test accuracy)."""
  v = np.asarray(values, np.float64)
  if v.ndim != 1:
    raise ValueError(f"values: expected one value per seed (1-D), got shape {v.shape}")
  return hierarchical_interval([[x] for x in v], level=level, n_resamples=n_resamples, seed=seed)


def paired_difference_interval(a: Union[ArrayLike, Groups], b: Union[ArrayLike, Groups],
                               weights_a: Optional[Groups] = None, weights_b: Optional[Groups] = None,
                               level: float = DEFAULT_LEVEL, n_resamples: int = DEFAULT_RESAMPLES,
                               seed: int = 0) -> Interval:
  """Interval of mean(A) - mean(B) on matched seeds: seed i of A is compared with seed i of B.

  ``a`` and ``b`` are either one value per seed (1-D, equal length) or per-seed per-batch values measured on
  the same batches (equal shapes): the replicate draws the seeds, and within a seed the same batch indices for
  A and B, so what the seed and the batches share cancels. Use this, not two separate intervals, whenever the
  runs are matched: the difference's interval is then much narrower when seeds vary more than the effect.
  """
  _check(level, n_resamples)
  if _flat(a) != _flat(b):
    raise ValueError("a and b must both be one value per seed, or both per-seed lists of per-batch values")
  if _flat(a):
    a, b = [[x] for x in np.asarray(a, np.float64)], [[x] for x in np.asarray(b, np.float64)]
  ga, gb = _groups(a, "a"), _groups(b, "b")
  if len(ga) != len(gb) or any(x.shape != y.shape for x, y in zip(ga, gb)):
    raise ValueError(f"a and b must be matched: the same seeds and, per seed, the same batches "
                     f"(got {[x.size for x in ga]} and {[y.size for y in gb]})")
  wa, wb = _weights(weights_a, ga, "weights_a"), _weights(weights_b, gb, "weights_b")
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(ga), size=(int(n_resamples), len(ga)))
  replicates = _resampled_seed_means(rng, ga, wa, picks, paired_with=(gb, wb)).mean(1)
  diffs = tuple(_weighted_mean(x, u) - _weighted_mean(y, v) for x, u, y, v in zip(ga, wa, gb, wb))
  low, high = _percentiles(replicates, level)
  return Interval(float(np.mean(diffs)), low, high, level, len(ga), int(sum(x.size for x in ga)),
                  int(n_resamples), diffs)


def unpaired_difference_interval(a: Groups, b: Groups, level: float = DEFAULT_LEVEL,
                                 n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Interval:
  """Interval of mean(A) - mean(B) when the seeds are not matched: A and B are resampled independently."""
  _check(level, n_resamples)
  ga, gb = _groups(a, "a"), _groups(b, "b")
  rng = np.random.default_rng(seed)
  reps = []
  for groups in (ga, gb):
    picks = rng.integers(0, len(groups), size=(int(n_resamples), len(groups)))
    reps.append(_resampled_seed_means(rng, groups, [np.ones_like(g) for g in groups], picks).mean(1))
  replicates = reps[0] - reps[1]
  low, high = _percentiles(replicates, level)
  mean_a = float(np.mean([g.mean() for g in ga]))
  mean_b = float(np.mean([g.mean() for g in gb]))
  return Interval(mean_a - mean_b, low, high, level, len(ga) + len(gb), int(sum(g.size for g in ga + gb)),
                  int(n_resamples), ())
