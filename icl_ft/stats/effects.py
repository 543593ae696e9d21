"""Patching effects: per-pair metrics of a condition and their normalised effects (docs/circuits.md).

Per-pair raw metrics (logit differences) become effects as ratios of means, never means of ratios:

    e(κ) = (E[patched(κ)] - E[target]) / (E[source] - E[target])

Denoising (NPE): target = LD of the corrupt run x~, source = LD of the clean run x, patched = LD(x~ <- x at κ).
Noising: target = LD(x), source = LD(x~), patched = LD(x <- x~ at κ). A condition whose |E[source] -
E[target]| < tol does not separate the pair: its effects are NaN and it is flagged.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

DEFAULT_TOL = 1e-3  # |E[source] - E[target]| below this (in metric units, e.g. logits): the pair is not separated


def normalized_importance(effects) -> np.ndarray:
  """p(κ) = |e(κ)| / Σ_κ' |e(κ')| over all components (same shape as ``effects``); all zeros if Σ|e| = 0,
  all NaN if any effect is NaN."""
  a = np.abs(np.asarray(effects, np.float64))
  total = a.sum()
  if np.isnan(total):
    return np.full(a.shape, np.nan)
  return np.zeros(a.shape) if total == 0 else a / total


def npe(patched, target, source, tol: float = DEFAULT_TOL) -> tuple[np.ndarray, bool]:
  """Ratio-of-means effect (E[patched] - E[target]) / (E[source] - E[target]) over pairs (axis 0 of every
  input; component axes of ``patched`` broadcast). Returns (effects, separated); effects are NaN and separated
  is False when |E[source] - E[target]| < tol."""
  patched = np.asarray(patched, np.float64)
  target, source = np.asarray(target, np.float64), np.asarray(source, np.float64)
  if target.ndim != 1 or source.shape != target.shape or patched.shape[:1] != target.shape:
    raise ValueError(f"need patched [N, ...], target [N], source [N]; got {patched.shape}, {target.shape}, "
                     f"{source.shape}")
  if target.size == 0:
    raise ValueError("no pairs")
  mean_t = target.mean()
  denom = source.mean() - mean_t
  if not abs(denom) >= tol:  # also catches NaN
    return np.full(patched.shape[1:], np.nan), False
  return (patched.mean(axis=0) - mean_t) / denom, True


@dataclasses.dataclass(frozen=True)
class PatchRuns:
  """Per-pair metrics of one condition: ``patched`` [N, *components], ``target`` [N], ``source`` [N]."""

  patched: np.ndarray
  target: np.ndarray
  source: np.ndarray

  def __post_init__(self):
    for name in ("patched", "target", "source"):
      object.__setattr__(self, name, np.asarray(getattr(self, name), np.float64))
    if self.target.ndim != 1 or self.source.shape != self.target.shape or \
        self.patched.shape[:1] != self.target.shape:
      raise ValueError(f"need patched [N, ...], target [N], source [N]; got {self.patched.shape}, "
                       f"{self.target.shape}, {self.source.shape}")

  @property
  def n(self) -> int:
    return int(self.target.shape[0])

  @classmethod
  def of(cls, value) -> PatchRuns:
    """A PatchRuns from itself, a mapping with keys patched/target/source, a (patched, target, source) tuple,
    or a plain per-pair effect array [N, ...] (whose effects are then its mean over pairs)."""
    if isinstance(value, PatchRuns):
      return value
    if isinstance(value, Mapping):
      return cls(value["patched"], value["target"], value["source"])
    if isinstance(value, tuple) and len(value) == 3:
      return cls(*value)
    arr = np.asarray(value, np.float64)
    if arr.ndim < 1:
      raise ValueError("per-pair effects need a pair axis (axis 0)")
    return cls(arr, np.zeros(arr.shape[0]), np.ones(arr.shape[0]))

  def take(self, idx) -> PatchRuns:
    return PatchRuns(self.patched[idx], self.target[idx], self.source[idx])

  def effects(self, tol: float = DEFAULT_TOL) -> tuple[np.ndarray, bool]:
    return npe(self.patched, self.target, self.source, tol)


