"""Replicates (runs of the same cell with other seeds): their mean with a Student-t interval, the across-seed
spread a single run's interval does not contain."""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats


def across(values: Sequence[float], level: float = 0.95) -> dict | None:
  """Mean of ``values`` (one per replicate) with the Student-t interval on ``len(values) - 1`` degrees of freedom
  and the sample standard deviation; None for fewer than two replicates (no spread to measure)."""
  values = [float(v) for v in values if v is not None]
  n = len(values)
  if n < 2:
    return None
  mean = sum(values) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
  return dict(mean=mean, lo=mean - half, hi=mean + half, sd=sd, n=n)
