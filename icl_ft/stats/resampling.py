"""Resampling over prompt pairs: indices of bootstrap replicates and percentile intervals."""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05  # 95% percentile intervals


def interval(samples: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
  """The (alpha/2, 1 - alpha/2) percentile interval of the finite samples; NaN if there are none."""
  ok = np.asarray(samples)[np.isfinite(samples)]
  if ok.size == 0:
    return math.nan, math.nan
  lo, hi = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return float(lo), float(hi)


def indices(rng: np.random.Generator, n: int) -> np.ndarray:
  """One bootstrap resample of n items (with replacement)."""
  return rng.integers(0, n, size=n)
