"""Intervals for proportions."""

from __future__ import annotations

import math
from typing import Sequence


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion."""
  if n == 0:
    return (math.nan, math.nan)
  p = hits / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))  # exact at p = 0 and 1 (rounding)




def paired_difference(x: Sequence[bool], y: Sequence[bool], z: float = 1.959964) -> tuple[float, float, float]:
  """(mean(x) - mean(y), lower, upper): the difference of two proportions measured on the same items, with
  Newcombe's (1998, method 10) hybrid score interval for paired data: the Wilson limits of each proportion,
  combined through the pairs' phi correlation (continuity-corrected: (AD - BC - N/2) / sqrt(EFGH) when
  AD - BC > N/2, 0 when 0 <= AD - BC <= N/2)."""
  if len(x) != len(y) or not len(x):
    raise ValueError(f"paired proportions need the same, non-zero number of items, got {len(x)} and {len(y)}")
  n = len(x)
  a = sum(bool(u) and bool(v) for u, v in zip(x, y))
  b = sum(bool(u) and not v for u, v in zip(x, y))
  c = sum(bool(v) and not u for u, v in zip(x, y))
  d = n - a - b - c
  p1, p2 = (a + b) / n, (a + c) / n
  (l1, u1), (l2, u2) = wilson(a + b, n, z), wilson(a + c, n, z)
  denom = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
  cross = a * d - b * c
  phi = 0.0 if not denom or 0 <= cross <= n / 2 else (cross - n / 2 if cross > n / 2 else cross) / denom
  theta = p1 - p2
  lower = theta - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
  upper = theta + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
  return theta, max(-1.0, min(theta, lower)), min(1.0, max(theta, upper))
