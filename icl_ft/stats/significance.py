"""When is a circuit-shift number more than noise? Split-half floors, cross-fitted (noise-corrected) shifts and
contrasts, per-component intervals, a gap interval and a paired permutation test (docs/circuits.md).

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
  splits = halves(run.n, n_splits, np.random.default_rng(seed))
  return np.array([fn(run.take(h1).effects(tol)[0], run.take(h2).effects(tol)[0]) for h1, h2 in splits])


def halves(n: int, n_splits: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
  """``n_splits`` random splits of ``n`` pairs into two disjoint halves (an odd pair out is dropped)."""
  out = []
  for _ in range(n_splits):
    order = rng.permutation(n)
    out.append((order[:n // 2], order[n // 2:2 * (n // 2)]))
  return out


def crossfit_terms(fn: Metric, runs: dict[str, PatchRuns], a: str, b: str,
                   splits: list[tuple[np.ndarray, np.ndarray]], tol: float = DEFAULT_TOL) -> np.ndarray:
  """Per split (h1, h2), the noise-corrected shift between conditions a and b:
  ½[fn(a_h1, b_h2) + fn(b_h1, a_h2)] - ½[fn(a_h1, a_h2) + fn(b_h1, b_h2)]. Every term compares two independent
  half-size estimates, so noise enters the between- and the within-condition terms alike and largely cancels:
  a condition that is only noisier than another does not look shifted (its expectation is ~0 when a and b
  have the same effects, however noisy each is)."""
  out = np.empty(len(splits))
  for i, (h1, h2) in enumerate(splits):
    e = {(n, h): runs[n].take(idx).effects(tol)[0] for n in dict.fromkeys((a, b)) for h, idx in ((1, h1), (2, h2))}
    out[i] = (0.5 * (fn(e[a, 1], e[b, 2]) + fn(e[b, 1], e[a, 2]))
              - 0.5 * (fn(e[a, 1], e[a, 2]) + fn(e[b, 1], e[b, 2])))
  return out


def crossfit(stat: Callable[[dict[str, PatchRuns], list], np.ndarray], runs: dict[str, PatchRuns],
             n_boot: int = 200, n_splits: int = 20, seed: int = 0) -> tuple[float, float, float]:
  """(point, lo, hi) of a cross-fitted statistic ``stat(runs, splits) -> per-split values``: the point averages
  ``n_splits`` random half splits of all pairs; each of ``n_boot`` replicates draws a random split and resamples
  pairs with replacement within each half (paired across conditions), so the halves stay disjoint and
  half-sized and the noise a resample adds enters the between- and within-condition terms alike; 95%
  percentile interval."""
  n = next(iter(runs.values())).n
  rng = np.random.default_rng(seed)
  point = float(np.nanmean(stat(runs, halves(n, n_splits, rng))))
  boots = np.full(n_boot, np.nan)
  for r in range(n_boot):
    (h1, h2), = halves(n, 1, rng)
    with np.errstate(all="ignore"):
      boots[r] = stat(runs, [(rng.choice(h1, h1.size), rng.choice(h2, h2.size))])[0]
  lo, hi = resampling.interval(boots)
  return point, lo, hi


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
  (1 + #finite nulls). Its null is exchangeability, so it also rejects when a and b differ only in noise; the
  cross-fitted contrast (``crossfit``) is the test of equal shifts."""
  if not base.n == a.n == b.n:
    raise ValueError(f"a paired permutation test needs the same pairs in every condition: {base.n}, {a.n}, {b.n}")
  e_base = base.effects(tol)[0]
  contrast = lambda x, y: fn(e_base, x.effects(tol)[0]) - fn(e_base, y.effects(tol)[0])
  observed = contrast(a, b)
  if not math.isfinite(observed):
    return observed, math.nan
  rng = np.random.default_rng(seed)
  extreme = valid = 0
  for _ in range(n_perm):
    swap = rng.random(base.n) < 0.5
    x = PatchRuns(np.where(_expand(swap, a.patched), b.patched, a.patched), np.where(swap, b.target, a.target),
                  np.where(swap, b.source, a.source))
    y = PatchRuns(np.where(_expand(swap, a.patched), a.patched, b.patched), np.where(swap, a.target, b.target),
                  np.where(swap, a.source, b.source))
    null = contrast(x, y)
    if math.isfinite(null):  # a permutation whose statistic is undefined counts for neither side
      valid += 1
      extreme += abs(null) >= abs(observed)
  return observed, (1 + extreme) / (1 + valid)


def _expand(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
