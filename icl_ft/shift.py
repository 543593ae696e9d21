"""Circuit-shift metrics over component-effect arrays (study §8), with pair-bootstrap CIs and noise floors.

Effects are arrays over components κ (e.g. heads [L, H], MLPs [L], residual [L, roles]); the layer axis is
axis 0. Per-pair raw metrics (logit differences) become effects as ratios of means, never means of ratios:

    e(κ) = (E[patched(κ)] - E[target]) / (E[source] - E[target])

Denoising (NPE): target = LD of the corrupt run x~, source = LD of the clean run x, patched = LD(x~ <- x at κ).
Noising: target = LD(x), source = LD(x~), patched = LD(x <- x~ at κ) (this gives (E[LD(x)] - E[LD(x <- x~)]) /
(E[LD(x)] - E[LD(x~)]), the study's n_m). A condition whose |E[source] - E[target]| < tol does not separate the
pair: its effects are NaN and it is flagged.

Shifts between two conditions a, b: ``tv_shift`` (headline CS_TV), ``rank_shift`` (1 - Spearman rho),
``topk_shift`` (1 - Jaccard of the top-k |e| sets: a fixed-k stand-in for the study's CS_set, whose K needs a
joint re-patch), ``centroid_shift`` (signed layer-centroid move of b relative to a).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Any, Callable, Mapping

import numpy as np
from scipy import stats

DEFAULT_TOL = 1e-3  # |E[source] - E[target]| below this (in metric units, e.g. logits): the pair is not separated
ALPHA = 0.05  # 95% percentile intervals

Metric = Callable[[np.ndarray, np.ndarray], float]


# ---------------------------------------------------------------------------------------------- shift metrics

def _pair(e_a, e_b) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(e_a, np.float64), np.asarray(e_b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"effect shapes differ: {a.shape} vs {b.shape}")
  if a.size == 0:
    raise ValueError("empty effect arrays")
  return a, b


def normalized_importance(effects) -> np.ndarray:
  """p(κ) = |e(κ)| / Σ_κ' |e(κ')| over all components (same shape as ``effects``); all zeros if Σ|e| = 0,
  all NaN if any effect is NaN."""
  a = np.abs(np.asarray(effects, np.float64))
  total = a.sum()
  if np.isnan(total):
    return np.full(a.shape, np.nan)
  return np.zeros(a.shape) if total == 0 else a / total


def tv_shift(e_a, e_b) -> float:
  """CS_TV = ½ Σ_κ |p_a(κ) - p_b(κ)| ∈ [0, 1]; NaN if either condition has no non-zero effect (or a NaN)."""
  a, b = _pair(e_a, e_b)
  if not (np.abs(a).sum() > 0 and np.abs(b).sum() > 0):
    return math.nan
  return float(0.5 * np.abs(normalized_importance(a) - normalized_importance(b)).sum())


def rank_shift(e_a, e_b, absolute: bool = False) -> float:
  """CS_rank = 1 - Spearman ρ of the (signed, or |e| if ``absolute``) effects, ties averaged; in [0, 2].
  NaN if either input is constant or contains NaN."""
  a, b = _pair(e_a, e_b)
  if absolute:
    a, b = np.abs(a), np.abs(b)
  a, b = a.ravel(), b.ravel()
  if a.size < 2 or np.isnan(a).any() or np.isnan(b).any() or np.ptp(a) == 0 or np.ptp(b) == 0:
    return math.nan
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    rho = stats.spearmanr(a, b).statistic
  return float(1.0 - rho)


def top_k(effects, k: int) -> set[int]:
  """Flat indices of the k largest |e| (ties broken by lower index)."""
  a = np.abs(np.asarray(effects, np.float64)).ravel()
  if not 1 <= k <= a.size:
    raise ValueError(f"k must be in 1..{a.size}, got {k}")
  return {int(i) for i in np.argsort(-a, kind="stable")[:k]}


def topk_overlap(e_a, e_b, k: int) -> float:
  """Jaccard |K_a ∩ K_b| / |K_a ∪ K_b| of the top-k |e| sets; NaN if an input has a NaN."""
  a, b = _pair(e_a, e_b)
  if np.isnan(a).any() or np.isnan(b).any():
    return math.nan
  ka, kb = top_k(a, k), top_k(b, k)
  return len(ka & kb) / len(ka | kb)


def topk_shift(e_a, e_b, k: int) -> float:
  """1 - topk_overlap."""
  return 1.0 - topk_overlap(e_a, e_b, k)


def layer_profile(effects) -> np.ndarray:
  """P(l) = Σ over every non-layer axis of p (layer axis 0); sums to 1 (0 if all effects are 0)."""
  p = normalized_importance(effects)
  if p.ndim == 0:
    raise ValueError("effects need a layer axis (axis 0)")
  return p.reshape(p.shape[0], -1).sum(axis=1)


def layer_centroid(effects) -> float:
  """Σ_l l·P(l); NaN if all effects are 0."""
  prof = layer_profile(effects)
  return float(np.arange(prof.size) @ prof) if prof.sum() > 0 else math.nan


def centroid_shift(e_a, e_b) -> float:
  """Δℓ = Σ_l l·(P_b(l) - P_a(l)): positive when b's importance sits in later layers; NaN if either is all 0."""
  a, b = _pair(e_a, e_b)
  return layer_centroid(b) - layer_centroid(a)


# ---------------------------------------------------------------------------------------------- effects

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


# ---------------------------------------------------------------------------------------------- bootstrap

def _interval(samples: np.ndarray) -> tuple[float, float]:
  ok = samples[np.isfinite(samples)]
  if ok.size == 0:
    return math.nan, math.nan
  lo, hi = np.percentile(ok, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
  return float(lo), float(hi)


def _indices(rng: np.random.Generator, n: int) -> np.ndarray:
  return rng.integers(0, n, size=n)


def bootstrap_samples(fn: Metric, per_pair_a, per_pair_b, n_boot: int = 1000, seed: int = 0, *,
                      paired: bool = True, tol: float = DEFAULT_TOL) -> np.ndarray:
  """fn(effects_a*, effects_b*) on ``n_boot`` resamples of pairs (the same indices for a and b if ``paired``)."""
  a, b = PatchRuns.of(per_pair_a), PatchRuns.of(per_pair_b)
  if paired and a.n != b.n:
    raise ValueError(f"paired bootstrap needs the same pairs in both conditions, got {a.n} and {b.n}")
  rng = np.random.default_rng(seed)
  out = np.empty(n_boot)
  for r in range(n_boot):
    ia = _indices(rng, a.n)
    ib = ia if paired else _indices(rng, b.n)
    out[r] = fn(a.take(ia).effects(tol)[0], b.take(ib).effects(tol)[0])
  return out


def bootstrap(fn: Metric, per_pair_a, per_pair_b, n_boot: int = 1000, seed: int = 0, *, paired: bool = True,
              tol: float = DEFAULT_TOL) -> tuple[float, float, float]:
  """(point, lo, hi): fn on the full sets' ratio-of-means effects and its 95% percentile interval over pair
  resamples (NaN resamples, e.g. non-separating ones, are left out)."""
  a, b = PatchRuns.of(per_pair_a), PatchRuns.of(per_pair_b)
  point = float(fn(a.effects(tol)[0], b.effects(tol)[0]))
  lo, hi = _interval(bootstrap_samples(fn, a, b, n_boot, seed, paired=paired, tol=tol))
  return point, lo, hi


def noise_floor(fn: Metric, per_pair_a, n_boot: int = 1000, seed: int = 0, *,
                tol: float = DEFAULT_TOL) -> tuple[float, float]:
  """(median, 95th percentile) of fn(effects of a on all pairs, effects of a on a resample of its pairs): the
  shift CS(B, B*) that resampling alone produces."""
  a = PatchRuns.of(per_pair_a)
  full = a.effects(tol)[0]
  rng = np.random.default_rng(seed)
  samples = np.array([fn(full, a.take(_indices(rng, a.n)).effects(tol)[0]) for _ in range(n_boot)])
  ok = samples[np.isfinite(samples)]
  if ok.size == 0:
    return math.nan, math.nan
  return float(np.median(ok)), float(np.percentile(ok, 95))


# ---------------------------------------------------------------------------------------------- report

SIGNED_METRICS = frozenset({"centroid"})  # floors of signed metrics are taken on |value|


def default_metrics(k: int = 10) -> dict[str, Metric]:
  return {"tv": tv_shift, "rank": rank_shift, "topk": lambda a, b: topk_shift(a, b, min(k, a.size)),
          "centroid": centroid_shift}


def _num(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def _json_array(a: np.ndarray) -> list:
  return [_num(v) for v in np.asarray(a, np.float64).ravel()]


def shift_report(effects_by_condition: Mapping[str, Any], baseline: str = "base", n_boot: int = 1000,
                 seed: int = 0, *, k: int = 10, tol: float = DEFAULT_TOL, paired: bool = True,
                 metrics: Mapping[str, Metric] | None = None, include_effects: bool = True) -> dict[str, Any]:
  """Every circuit-shift number between the conditions, as JSON-serialisable values (NaN -> None).

  ``effects_by_condition`` maps a condition name to its per-pair runs (anything ``PatchRuns.of`` accepts);
  one component family (heads, MLPs or residual) per call. All conditions share one resample of pair
  indices per bootstrap replicate when ``paired`` (they must then hold the same pairs, in the same order).

  Returns ``conditions`` (per condition: n_pairs, separation E[source] - E[target], separated, effects,
  importance, layer profile, noise floor per metric = (median, p95) of CS(m, m*)), ``shifts`` (per pair of
  conditions "a|b", baseline first: point, 95% CI, the first condition's floor, point minus floor median and
  whether the point exceeds the floor's p95; signed metrics compare |point|), and ``contrasts`` ("m-m'":
  CS(baseline, m) - CS(baseline, m') with its paired CI; the study's claim is contrasts["icl-ft"] > 0).
  """
  if baseline not in effects_by_condition:
    raise ValueError(f"baseline {baseline!r} not among the conditions {list(effects_by_condition)}")
  if n_boot < 1:
    raise ValueError(f"n_boot must be positive, got {n_boot}")
  runs = {baseline: PatchRuns.of(effects_by_condition[baseline])}
  runs.update((name, PatchRuns.of(v)) for name, v in effects_by_condition.items() if name != baseline)
  names = list(runs)
  shapes = {name: r.patched.shape[1:] for name, r in runs.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"component shapes differ between conditions: {shapes}")
  if paired and len({r.n for r in runs.values()}) != 1:
    raise ValueError(f"paired bootstrap needs the same pairs in every condition: {({n: r.n for n, r in runs.items()})}")
  metric_fns = dict(metrics) if metrics is not None else default_metrics(k)
  point = {name: r.effects(tol) for name, r in runs.items()}
  pairs = list(itertools.combinations(names, 2))
  others = names[1:]
  contrasts = list(itertools.combinations(others, 2))

  def all_metrics(eff: Mapping[str, np.ndarray]) -> dict[tuple, float]:
    out = {}
    for m, fn in metric_fns.items():
      for a, b in pairs:
        out["shift", a, b, m] = float(fn(eff[a], eff[b]))
      for a, b in contrasts:
        out["contrast", a, b, m] = out["shift", baseline, a, m] - out["shift", baseline, b, m]
    return out

  full = all_metrics({n: e for n, (e, _) in point.items()})
  rng = np.random.default_rng(seed)
  boot = {key: np.empty(n_boot) for key in full}
  floor = {(name, m): np.empty(n_boot) for name in names for m in metric_fns}
  for r in range(n_boot):
    shared = _indices(rng, runs[baseline].n) if paired else None
    eff = {n: run.take(shared if paired else _indices(rng, run.n)).effects(tol)[0] for n, run in runs.items()}
    for key, value in all_metrics(eff).items():
      boot[key][r] = value
    for name in names:
      for m, fn in metric_fns.items():
        v = float(fn(point[name][0], eff[name]))
        floor[name, m][r] = abs(v) if m in SIGNED_METRICS else v

  def floor_stats(name: str, m: str) -> dict[str, Any]:
    s = floor[name, m][np.isfinite(floor[name, m])]
    return dict(median=_num(np.median(s)) if s.size else None, p95=_num(np.percentile(s, 95)) if s.size else None,
                n_valid=int(s.size))

  def ci(key) -> dict[str, Any]:
    lo, hi = _interval(boot[key])
    return dict(point=_num(full[key]), lo=_num(lo), hi=_num(hi), n_valid=int(np.isfinite(boot[key]).sum()))

  conditions = {}
  for name, run in runs.items():
    e, separated = point[name]
    info: dict[str, Any] = dict(
        n_pairs=run.n, mean_target=_num(run.target.mean()), mean_source=_num(run.source.mean()),
        separation=_num(run.source.mean() - run.target.mean()), separated=bool(separated),
        noise_floor={m: floor_stats(name, m) for m in metric_fns})
    if include_effects:
      info.update(shape=list(e.shape), effects=_json_array(e), importance=_json_array(normalized_importance(e)),
                  layer_profile=_json_array(layer_profile(e)) if e.ndim else None)
    conditions[name] = info
  shifts = {}
  for a, b in pairs:
    entry = {}
    for m in metric_fns:
      item = ci(("shift", a, b, m))
      fl = conditions[a]["noise_floor"][m]
      value = item["point"]
      if value is not None and m in SIGNED_METRICS:
        value = abs(value)
      item.update(floor_median=fl["median"], floor_p95=fl["p95"],
                  minus_floor=None if value is None or fl["median"] is None else value - fl["median"],
                  exceeds_floor=None if value is None or fl["p95"] is None else bool(value > fl["p95"]))
      entry[m] = item
    shifts[f"{a}|{b}"] = entry
  return dict(
      baseline=baseline, conditions=conditions, shifts=shifts,
      contrasts={f"{a}-{b}": {m: ci(("contrast", a, b, m)) for m in metric_fns} for a, b in contrasts},
      n_boot=n_boot, seed=seed, k=k, tol=tol, paired=paired, alpha=ALPHA, metrics=list(metric_fns))
