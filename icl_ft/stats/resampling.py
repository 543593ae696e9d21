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


def basic_interval(point: float, samples: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
  """The basic (reverse-percentile) bootstrap interval (2θ̂ - q_hi, 2θ̂ - q_lo): it corrects a statistic's
  first-order bias (shift metrics are biased by noise in small components), where the percentile interval
  carries the bias twice."""
  lo, hi = interval(samples, alpha)
  return 2 * point - hi, 2 * point - lo


def component_intervals(samples: np.ndarray, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
  """``interval`` of each component over the replicates of ``samples`` [R, ...] (NaN replicates left out)."""
  samples = np.where(np.isfinite(samples), samples, np.nan)
  if np.isnan(samples).all():
    nan = np.full(samples.shape[1:], np.nan)
    return nan, nan.copy()
  with np.errstate(all="ignore"):
    lo, hi = np.nanpercentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
  return np.asarray(lo), np.asarray(hi)


def indices(rng: np.random.Generator, n: int) -> np.ndarray:
  """One bootstrap resample of n items (with replacement)."""
  return rng.integers(0, n, size=n)


def mean_interval(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = ALPHA):
  """(mean, lo, hi) over axis 0 of ``values`` [N, ...], with per-entry percentile intervals over resamples of
  the N rows (one resample shared by every entry, so entries stay paired)."""
  values = np.asarray(values, np.float64)
  rng = np.random.default_rng(seed)
  boots = np.stack([values[indices(rng, values.shape[0])].mean(axis=0) for _ in range(n_boot)])
  lo, hi = component_intervals(boots, alpha)
  return values.mean(axis=0), lo, hi
