"""Intervals for proportions."""

from __future__ import annotations

import math


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion."""
  if n == 0:
    return (math.nan, math.nan)
  p = hits / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # exact at p = 0 and 1 (rounding)


