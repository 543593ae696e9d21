"""When is a circuit-shift number more than noise? Split-half floors, per-component intervals, a gap interval and
a paired permutation test for the ICL - FT contrast (docs/circuits.md, "Noise").

All of them resample prompt pairs, the unit of replication: a condition's effects are ratio-of-means over its
pairs (``effects.PatchRuns``), so every statistic below recomputes effects on resampled pair sets.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from icl_ft.stats import resampling
from icl_ft.stats.effects import DEFAULT_TOL, PatchRuns

Metric = Callable[[np.ndarray, np.ndarray], float]


def split_half_shifts(fn: Metric, run: PatchRuns, n_splits: int = 100, seed: int = 0,
                      tol: float = DEFAULT_TOL) -> np.ndarray:
  """``fn`` between the effects of two disjoint random halves of one condition's pairs, per split: the shift
  a condition shows against itself. Two independent half-size estimates are noisier than the full-size ones a
  between-condition shift compares, so a floor from these is conservative."""
  if run.n < 4:
    raise ValueError(f"split-half floors need at least 4 pairs, got {run.n}")
  rng = np.random.default_rng(seed)
  out = np.empty(n_splits)
  for s in range(n_splits):
    order = rng.permutation(run.n)
    half = run.n // 2
    out[s] = fn(run.take(order[:half]).effects(tol)[0], run.take(order[half:2 * half]).effects(tol)[0])
  return out


def distinguishable(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  """Components whose interval excludes 0."""
  return (lo > 0) | (hi < 0)


def gap_interval(run: PatchRuns, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
  """(point, lo, hi) of the clean-corrupt gap E[source] - E[target] over pair resamples: a condition whose
  interval includes 0 does not separate its pairs, and has no circuit to compare."""
  point, lo, hi = resampling.mean_interval(run.source - run.target, n_boot, seed)
  return float(point), float(lo), float(hi)


def contrast_permutation(fn: Metric, base: PatchRuns, a: PatchRuns, b: PatchRuns, n_perm: int = 1000,
                         seed: int = 0, tol: float = DEFAULT_TOL) -> tuple[float, float]:
  """(observed, two-sided p) of the contrast fn(base, a) - fn(base, b) against the null that conditions a and
  b are exchangeable on every pair: each permutation swaps a's and b's results on a random subset of pairs
  (all three conditions must hold the same pairs, in the same order). p = (1 + #{|null| >= |observed|}) /
  (1 + n_perm)."""
  if not base.n == a.n == b.n:
    raise ValueError(f"a paired permutation test needs the same pairs in every condition: {base.n}, {a.n}, {b.n}")
  e_base = base.effects(tol)[0]
  contrast = lambda x, y: fn(e_base, x.effects(tol)[0]) - fn(e_base, y.effects(tol)[0])
  observed = contrast(a, b)
  if not math.isfinite(observed):
    return observed, math.nan
  rng = np.random.default_rng(seed)
  extreme = 0
  for _ in range(n_perm):
    swap = rng.random(base.n) < 0.5
    x = PatchRuns(np.where(_expand(swap, a.patched), b.patched, a.patched), np.where(swap, b.target, a.target),
                  np.where(swap, b.source, a.source))
    y = PatchRuns(np.where(_expand(swap, a.patched), a.patched, b.patched), np.where(swap, a.target, b.target),
                  np.where(swap, a.source, b.source))
    extreme += abs(contrast(x, y)) >= abs(observed)
  return observed, (1 + extreme) / (1 + n_perm)


def _expand(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
