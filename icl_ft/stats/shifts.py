"""Circuit-shift metrics between two conditions' effect arrays (docs/circuits.md), with pair-bootstrap CIs and
noise floors, and ``shift_report`` (every shift between a study's conditions).

Effects are arrays over components κ (e.g. heads [L, H], MLPs [L], residual [L, P]); the layer axis is axis 0.
Shifts between two conditions a, b: ``tv_shift`` (headline CS_TV), ``rank_shift`` (1 - Spearman rho),
``topk_shift`` (1 - Jaccard of the top-k |e| sets: a fixed-k stand-in for CS_set, whose K needs a joint
re-patch), ``centroid_shift`` (signed layer-centroid move of b relative to a).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from scipy import stats

from icl_ft.stats import resampling, significance
from icl_ft.stats.effects import DEFAULT_TOL, PatchRuns, normalized_importance
from icl_ft.stats.resampling import ALPHA

Metric = Callable[[np.ndarray, np.ndarray], float]


# ---------------------------------------------------------------------------------------------- shift metrics

def _pair(e_a, e_b) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(e_a, np.float64), np.asarray(e_b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"effect shapes differ: {a.shape} vs {b.shape}")
  if a.size == 0:
    raise ValueError("empty effect arrays")
  return a, b


def tv_shift(e_a, e_b) -> float:
  """CS_TV = ½ Σ_κ |p_a(κ) - p_b(κ)| ∈ [0, 1]; NaN if either condition has no non-zero effect (or a NaN)."""
  a, b = _pair(e_a, e_b)
  if not (np.abs(a).sum() > 0 and np.abs(b).sum() > 0):
    return math.nan
  return float(0.5 * np.abs(normalized_importance(a) - normalized_importance(b)).sum())


def spearman(e_a, e_b) -> float:
  """Spearman ρ of two effect arrays (ties averaged); NaN if either is constant or contains NaN."""
  a, b = (x.ravel() for x in _pair(e_a, e_b))
  if a.size < 2 or np.isnan(a).any() or np.isnan(b).any() or np.ptp(a) == 0 or np.ptp(b) == 0:
    return math.nan
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return float(stats.spearmanr(a, b).statistic)


def rank_shift(e_a, e_b, absolute: bool = False) -> float:
  """CS_rank = 1 - Spearman ρ of the (signed, or |e| if ``absolute``) effects; in [0, 2]; NaN as ``spearman``."""
  a, b = _pair(e_a, e_b)
  if absolute:
    a, b = np.abs(a), np.abs(b)
  return 1.0 - spearman(a, b)


def ranked(effects, k: int) -> list[int]:
  """Flat indices of the k largest |e|, largest first (ties broken by lower index)."""
  a = np.abs(np.asarray(effects, np.float64)).ravel()
  if not 1 <= k <= a.size:
    raise ValueError(f"k must be in 1..{a.size}, got {k}")
  return [int(i) for i in np.argsort(-a, kind="stable")[:k]]


def top_k(effects, k: int) -> set[int]:
  """The set of ``ranked(effects, k)``."""
  return set(ranked(effects, k))


def topk_recall(estimate, truth, k: int) -> float:
  """|top-k of ``estimate`` ∩ top-k of ``truth``| / k: how many of the true top components an estimate finds."""
  return len(top_k(estimate, k) & top_k(truth, k)) / k


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


# ---------------------------------------------------------------------------------------------- bootstrap

def replicates(runs: Mapping[str, PatchRuns], n_boot: int, seed: int, *, paired: bool = True,
               tol: float = DEFAULT_TOL) -> Iterator[dict[str, np.ndarray]]:
  """Per bootstrap replicate, every condition's effects on a resample of its pairs: one stream of indices from
  ``seed``, shared by all conditions when ``paired`` (they must hold the same pairs, in the same order), drawn
  per condition in order otherwise. Every bootstrap and noise floor in this module is computed from it."""
  rng = np.random.default_rng(seed)
  n = {name: r.n for name, r in runs.items()}
  for _ in range(n_boot):
    shared = resampling.indices(rng, next(iter(n.values()))) if paired else None
    yield {name: r.take(shared if paired else resampling.indices(rng, n[name])).effects(tol)[0]
           for name, r in runs.items()}


def effect_intervals(run: PatchRuns, n_boot: int, seed: int, tol: float = DEFAULT_TOL
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(effects, lo, hi): a condition's effects and their per-component 95% percentile intervals over pair
  resamples (all NaN when the condition does not separate clean from corrupt)."""
  effects, separated = run.effects(tol)
  if not separated:
    nan = np.full(effects.shape, np.nan)
    return effects, nan, nan
  boots = np.stack([e["a"] for e in replicates({"a": run}, n_boot, seed, tol=tol)])
  return (effects, *resampling.component_intervals(boots))


def bootstrap_samples(fn: Metric, per_pair_a, per_pair_b, n_boot: int = 1000, seed: int = 0, *,
                      paired: bool = True, tol: float = DEFAULT_TOL) -> np.ndarray:
  """fn(effects_a*, effects_b*) on ``n_boot`` resamples of pairs (``replicates``)."""
  a, b = PatchRuns.of(per_pair_a), PatchRuns.of(per_pair_b)
  if paired and a.n != b.n:
    raise ValueError(f"paired bootstrap needs the same pairs in both conditions, got {a.n} and {b.n}")
  return np.array([fn(e["a"], e["b"]) for e in replicates({"a": a, "b": b}, n_boot, seed, paired=paired, tol=tol)])


def bootstrap(fn: Metric, per_pair_a, per_pair_b, n_boot: int = 1000, seed: int = 0, *, paired: bool = True,
              tol: float = DEFAULT_TOL) -> tuple[float, float, float]:
  """(point, lo, hi): fn on the full sets' ratio-of-means effects and its 95% percentile interval over pair
  resamples (NaN resamples, e.g. non-separating ones, are left out)."""
  a, b = PatchRuns.of(per_pair_a), PatchRuns.of(per_pair_b)
  point = float(fn(a.effects(tol)[0], b.effects(tol)[0]))
  lo, hi = resampling.interval(bootstrap_samples(fn, a, b, n_boot, seed, paired=paired, tol=tol))
  return point, lo, hi


def floor_stats(samples: np.ndarray) -> dict[str, Any]:
  """(median, 95th percentile, count) of the finite floor samples (None where there are none)."""
  ok = samples[np.isfinite(samples)]
  return dict(median=_num(np.median(ok)) if ok.size else None, p95=_num(np.percentile(ok, 95)) if ok.size else None,
              n_valid=int(ok.size))


# ---------------------------------------------------------------------------------------------- report

SIGNED_METRICS = frozenset({"centroid"})  # floors of signed metrics are taken on |value|
SELECTABLE = ("tv", "rank", "topk")  # metrics also computed on the components distinguishable from 0
CROSSFIT = ("tv",)  # metrics also given as cross-fitted (noise-corrected) shifts and contrasts: the tested ones
CROSSFIT_SPLITS = 20


def default_metrics(k: int = 10) -> dict[str, Metric]:
  return {"tv": tv_shift, "rank": rank_shift, "topk": lambda a, b: topk_shift(a, b, min(k, a.size)),
          "centroid": centroid_shift}


def _num(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def _json_array(a: np.ndarray) -> list:
  return [_num(v) for v in np.asarray(a, np.float64).ravel()]


def _ci(point: float, samples: np.ndarray) -> dict[str, Any]:
  """Point and basic bootstrap interval (``resampling.basic_interval``)."""
  lo, hi = resampling.basic_interval(point, samples)
  return dict(point=_num(point), lo=_num(lo), hi=_num(hi), n_valid=int(np.isfinite(samples).sum()))


def _on(fn: Metric, selected: np.ndarray, minimum: int) -> Metric:
  """``fn`` on the ``selected`` components only (NaN if fewer than ``minimum`` are selected: a rank over a
  handful, or a top-k of all of them, says nothing)."""
  return lambda a, b: fn(a[selected], b[selected]) if selected.sum() >= minimum else math.nan


def _condition(run: PatchRuns, effects: np.ndarray, boots: np.ndarray, fns: Mapping[str, Metric], n_boot: int,
               n_splits: int, seed: int, tol: float, include_effects: bool) -> dict[str, Any]:
  """One condition: its clean-corrupt gap with a CI (no circuit when the CI includes 0), per-component effect
  CIs (which components are distinguishable from 0) and split-half floors per metric."""
  gap, gap_lo, gap_hi = significance.gap_interval(run, n_boot, seed)
  lo, hi = resampling.component_intervals(boots) if run.effects(tol)[1] else (np.full(effects.shape, np.nan),) * 2
  info: dict[str, Any] = dict(
      n_pairs=run.n, mean_target=_num(run.target.mean()), mean_source=_num(run.source.mean()),
      separation=_num(gap), gap_lo=_num(gap_lo), gap_hi=_num(gap_hi), separated=bool(run.effects(tol)[1]),
      has_circuit=bool(run.effects(tol)[1] and (gap_lo > 0 or gap_hi < 0)),
      n_distinguishable=int(significance.distinguishable(lo, hi).sum()),
      split_half={m: floor_stats(np.abs(x) if m in SIGNED_METRICS else x) for m, fn in fns.items()
                  for x in [significance.split_half_shifts(fn, run, n_splits, seed, tol)]})
  if include_effects:
    info.update(shape=list(effects.shape), effects=_json_array(effects), effects_lo=_json_array(lo),
                effects_hi=_json_array(hi), importance=_json_array(normalized_importance(effects)),
                layer_profile=_json_array(layer_profile(effects)) if effects.ndim else None)
  return info


def _shift(point: float, samples: np.ndarray, floor: float | None, signed: bool) -> dict[str, Any]:
  """A shift's point and CI against a noise floor: it counts (``exceeds_floor``) only when its whole CI lies
  beyond the floor (for a signed metric, outside [-floor, floor])."""
  item = _ci(point, samples)
  lo, hi = item["lo"], item["hi"]
  exceeds = None if lo is None or floor is None else bool(lo > floor or (signed and hi < -floor))
  return dict(item, floor=floor, exceeds_floor=exceeds)


def _pair_shifts(a: str, b: str, runs: Mapping[str, PatchRuns], effects, boots, conditions, fns, k: int,
                 seed: int, tol: float, crossfit: Sequence[str]) -> dict[str, Any]:
  """Every metric between conditions a and b on all components, each against the larger of the two conditions'
  split-half floors, and for ``CROSSFIT`` metrics also cross-fitted (noise-corrected); for ``SELECTABLE``
  metrics also on the components distinguishable from 0 in a or b (``_sel``: descriptive, no test, since the
  selection is made on the same pairs)."""
  missing = [n for n in (a, b) if not conditions[n]["has_circuit"]]
  if missing:
    return {m: dict(point=None, reason=f"no circuit in {', '.join(missing)}") for m in fns}
  dist = [significance.distinguishable(*resampling.component_intervals(np.stack([e[n] for e in boots])))
          for n in (a, b)]
  selected = dist[0] | dist[1]
  out = {}
  minimum = {"tv": 2, "rank": 5, "topk": k + 1}
  for m, fn in dict(fns, **{f"{m}_sel": _on(fns[m], selected, minimum[m]) for m in SELECTABLE if m in fns}).items():
    samples = np.array([fn(e[a], e[b]) for e in boots])
    if m.endswith("_sel"):  # descriptive: the selection uses the same pairs, so no floor test
      out[m] = dict(_ci(float(fn(effects[a], effects[b])), samples), floor=None, exceeds_floor=None)
      continue
    floor = max((f for f in (conditions[n]["split_half"][m]["median"] for n in (a, b)) if f is not None), default=None)
    out[m] = _shift(float(fn(effects[a], effects[b])), samples, floor, m in SIGNED_METRICS)
    if m in crossfit:
      out[m]["corrected"] = _crossfit(lambda rs, sp, fn=fn: significance.crossfit_terms(fn, rs, a, b, sp, tol), runs,
                                      boots, seed)
  out["n_selected"] = int(selected.sum())
  return out


def _crossfit(stat, runs, boots, seed: int) -> dict[str, Any] | None:
  """A cross-fitted statistic's point and interval, with whether the interval excludes 0 (None without
  bootstrap replicates)."""
  if not boots:
    return None
  point, lo, hi = significance.crossfit(stat, runs, n_boot=len(boots), n_splits=CROSSFIT_SPLITS, seed=seed)
  return dict(point=_num(point), lo=_num(lo), hi=_num(hi),
              excludes_zero=None if not (math.isfinite(lo) and math.isfinite(hi)) else bool(lo > 0 or hi < 0))


def _contrast(a: str, b: str, baseline: str, runs, effects, boots, conditions, fns, n_perm: int, seed: int,
              tol: float, crossfit: Sequence[str]) -> dict[str, Any]:
  """CS(baseline, a) - CS(baseline, b) per metric: point, paired bootstrap CI, whether the CI excludes 0, and
  (with ``n_perm``) the paired permutation test's p-value (a and b exchanged on random pairs)."""
  missing = [n for n in dict.fromkeys((baseline, a, b)) if not conditions[n]["has_circuit"]]
  if missing:
    return {m: dict(point=None, reason=f"no circuit in {', '.join(missing)}") for m in fns}
  out = {}
  for m, fn in fns.items():
    point = fn(effects[baseline], effects[a]) - fn(effects[baseline], effects[b])
    samples = np.array([fn(e[baseline], e[a]) - fn(e[baseline], e[b]) for e in boots])
    item = _ci(point, samples)
    item["excludes_zero"] = None if item["lo"] is None else bool(item["lo"] > 0 or item["hi"] < 0)
    if m in crossfit:
      item["corrected"] = _crossfit(lambda rs, sp, fn=fn: significance.crossfit_terms(fn, rs, baseline, a, sp, tol)
                                    - significance.crossfit_terms(fn, rs, baseline, b, sp, tol), runs, boots, seed)
    if n_perm:
      item["p_value"] = _num(significance.contrast_permutation(fn, runs[baseline], runs[a], runs[b], n_perm, seed,
                                                               tol)[1])
    out[m] = item
  return out


def shift_report(effects_by_condition: Mapping[str, Any], baseline: str = "base", n_boot: int = 1000,
                 seed: int = 0, *, k: int = 10, tol: float = DEFAULT_TOL, metrics: Mapping[str, Metric] | None = None,
                 include_effects: bool = True, n_splits: int = 50, n_perm: int = 0,
                 contrasts: Sequence[tuple[str, str]] | None = None, crossfit: bool = True) -> dict[str, Any]:
  """Every circuit-shift number between the conditions, as JSON-serialisable values (NaN -> None).

  ``effects_by_condition`` maps a condition name to its per-pair runs (anything ``PatchRuns.of`` accepts), all
  on the same pairs in the same order; one component family (heads, MLPs or residual) per call. Every interval
  resamples pairs with one shared stream (``replicates``), so shifts and contrasts are paired.

  Returns ``conditions`` (per condition: the clean-corrupt gap and its CI, ``has_circuit``, per-component
  effect CIs, split-half floors per metric), ``shifts`` ("a|b", baseline first: per metric the point, CI, floor
  and whether the CI clears it; with ``crossfit``, ``corrected``: the cross-fitted shift of ``CROSSFIT`` metrics,
  the tested number; ``*_sel`` metrics on the components distinguishable from 0 in a or b, descriptive; no
  numbers when either condition has no circuit) and ``contrasts`` ("a-b": CS(baseline, a) - CS(baseline, b)
  with its CI, whether it excludes 0, with ``crossfit`` the cross-fitted contrast and, with ``n_perm``, a
  permutation p-value; default: every pair of non-baseline conditions).
  """
  runs = _checked_runs(effects_by_condition, baseline, n_boot)
  names = list(runs)
  fns = dict(metrics) if metrics is not None else default_metrics(k)
  effects = {n: r.effects(tol)[0] for n, r in runs.items()}
  boots = list(replicates(runs, n_boot, seed, tol=tol))
  cf = CROSSFIT if crossfit else ()
  conditions = {n: _condition(r, effects[n], np.stack([e[n] for e in boots]), fns, n_boot, n_splits, seed, tol,
                              include_effects) for n, r in runs.items()}
  shifts = {f"{a}|{b}": _pair_shifts(a, b, runs, effects, boots, conditions, fns, k, seed, tol, cf)
            for a, b in itertools.combinations(names, 2)}
  pairs = list(contrasts) if contrasts is not None else list(itertools.combinations(names[1:], 2))
  return dict(baseline=baseline, conditions=conditions, shifts=shifts,
              contrasts={f"{a}-{b}": _contrast(a, b, baseline, runs, effects, boots, conditions, fns, n_perm, seed, tol, cf)
                         for a, b in pairs},
              n_boot=n_boot, n_splits=n_splits, n_perm=n_perm, seed=seed, k=k, tol=tol, alpha=ALPHA,
              metrics=list(fns))


def _checked_runs(effects_by_condition: Mapping[str, Any], baseline: str, n_boot: int) -> dict[str, PatchRuns]:
  """The conditions as PatchRuns, baseline first, after checking the baseline, n_boot, shapes and pairing."""
  if baseline not in effects_by_condition:
    raise ValueError(f"baseline {baseline!r} not among the conditions {list(effects_by_condition)}")
  if n_boot < 1:
    raise ValueError(f"n_boot must be positive, got {n_boot}")
  runs = {baseline: PatchRuns.of(effects_by_condition[baseline])}
  runs.update((name, PatchRuns.of(v)) for name, v in effects_by_condition.items() if name != baseline)
  shapes = {name: r.patched.shape[1:] for name, r in runs.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"component shapes differ between conditions: {shapes}")
  if len({r.n for r in runs.values()}) != 1:
    raise ValueError(f"paired bootstrap needs the same pairs in every condition: {({n: r.n for n, r in runs.items()})}")
  return runs
