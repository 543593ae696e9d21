"""Replicates (runs of the same cell with other seeds): their mean with a Student-t interval, the across-seed
spread a single run's interval does not contain."""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats


def across(values: Sequence[float], level: float = 0.95, bounds: tuple[float, float] | None = None) -> dict | None:
  """Mean of ``values`` (one per replicate) with the Student-t interval on ``len(values) - 1`` degrees of freedom
  (clipped to ``bounds``, e.g. (0, 1) for an accuracy) and the sample standard deviation; None for fewer than two
  replicates (no spread to measure)."""
  values = [float(v) for v in values if v is not None]
  n = len(values)
  if n < 2:
    return None
  mean = sum(values) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
  lo, hi = mean - half, mean + half
  if bounds is not None:
    lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
  return dict(mean=mean, lo=lo, hi=hi, sd=sd, n=n)
