"""The circuit-shift analysis: which heads and MLPs carry the pattern under base 0-shot, ICL k-shot, its
controls and fine-tuned 0-shot, and whether ICL moves them more than FT does (docs/circuits.md).

Conditions, all on the same query items: ``base`` (0-shot), ``icl{k}`` (k demos), ``icl{k}-shuffled`` and
``icl{k}-irrelevant`` (the controls, at the largest k), and each tuned model 0-shot (``ft``, ``ft-fewshot``).
Per condition, on clean/corrupt pairs (``pairs.build_pairs``), every run starts after the prompt prefix the two
prompts share (``patching.shared_prefix``), and:
  1. screen: attribution estimates of every head and MLP, and the exact residual (layer, position) sweep;
  2. verify: exact patches of the union over conditions of each one's top ``verify`` components;
  3. faithfulness: the condition's top-k components patched jointly, and every condition's circuit in it.
Then the statistics (``shifts.shift_report``: gaps, per-component intervals, split-half floors, shifts and
tested contrasts), function vectors and FT -> base transfer. With ``units`` each step of each condition is
saved as it finishes, so a killed analysis resumes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from icl_ft import faults, tasks
from icl_ft.interp import faithfulness, pairs as pairs_lib, patching, screen, vectors
from icl_ft.io import records
from icl_ft.io.units import Units
from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params
from icl_ft.model.sharding import to_host
from icl_ft.stats import resampling, shifts
from icl_ft.stats.effects import PatchRuns
from icl_ft.tasks import controls as controls_lib

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class CircuitConfig:
  task: str
  fmt: str = "fixed"
  n_pairs: int = 32
  seed: int = 0
  icl_shots: tuple[int, ...] = (4,)
  controls: tuple[str, ...] = controls_lib.CONTROLS  # ICL controls, at the largest of icl_shots
  verify: int = 24  # per family and condition, the top components by |screen| patched exactly; 0: every one
  chunk: int = 16
  resid_last: int = 0  # residual (layer, position) sweep over the last N patched positions; 0: all of them
  n_boot: int = 200
  n_splits: int = 50  # split-half floors
  n_perm: int = 200  # permutation test of each contrast
  top_k: int = 10
  tol: float = 1e-3  # conditions whose clean-corrupt logit-diff gap is below this are not separated (no effects)
  threshold: float = 0.8  # a circuit is the smallest top-k set recovering this share of the gap
  single_token_answers: bool = True  # keep pairs whose answers are one token each (pairs.build_pairs)

  def __post_init__(self):
    for c in self.controls:
      if c not in controls_lib.CONTROLS:
        raise ValueError(f"unknown control {c!r}; valid: {', '.join(controls_lib.CONTROLS)}")
    if self.controls and max(self.icl_shots, default=0) < 2:
      raise ValueError(f"the ICL controls replace demos and need icl_shots with a k >= 2, got {self.icl_shots}")
    if self.n_pairs < 4:
      raise ValueError(f"n_pairs must be at least 4 (split-half floors), got {self.n_pairs}")

  def prompt_conditions(self) -> dict[str, tuple[int, str | None]]:
    """Conditions of the base model: name -> (shots, control)."""
    out = {"base": (0, None)}
    out.update({f"icl{k}": (k, None) for k in self.icl_shots})
    k = max(self.icl_shots, default=0)
    out.update({f"icl{k}-{c}": (k, c) for c in tasks.controls_of(self.task, self.controls)})
    return out


@dataclasses.dataclass
class CircuitAnalysis:
  """Everything ``analyze`` finds for one task: ``numbers`` (JSON-ready) and ``effects`` (per condition, the
  effects of heads [L, H], MLPs [L] and residual positions [L, P], for figures)."""

  numbers: dict
  effects: dict[str, dict[str, np.ndarray]]


def condition_pairs(tokenizer, ccfg: CircuitConfig, tuned: Sequence[str] = ()) -> dict[str, pairs_lib.PairSet]:
  """The prompt pairs of each condition (tuned models use the base pairs), restricted to the query items that
  form a valid pair in every condition, in one order (so every resample is paired)."""
  sets = {name: pairs_lib.build_pairs(ccfg.task, tokenizer, ccfg.n_pairs, ccfg.seed, ccfg.fmt, k, control=c,
                                      single_token=ccfg.single_token_answers)
          for name, (k, c) in ccfg.prompt_conditions().items()}
  common = set.intersection(*(set(p.query_index.tolist()) for p in sets.values()))
  if len(common) < 4:
    raise ValueError(f"only {len(common)} query items form a valid pair in every condition (need 4); increase "
                     "n_pairs")
  for name, p in sets.items():
    order = {q: i for i, q in enumerate(p.query_index.tolist())}
    sets[name] = p.take([order[q] for q in sorted(common)])
  return dict(sets, **{name: sets["base"] for name in tuned})


@dataclasses.dataclass
class _Prepared:
  """One condition's batches after their shared prefix, the unpatched metrics and the clean activations."""
  clean: patching.Batch
  corrupt: patching.Batch
  target: np.ndarray
  source: np.ndarray
  cache: dict


def _prepare(cfg: ModelConfig, params: Params, p: pairs_lib.PairSet, taps=("attn_z", "mlp_out")) -> _Prepared:
  mk = lambda ids: patching.Batch(ids, p.valid, p.answer_pos, p.clean_answer, p.corrupt_answer)
  clean, corrupt = patching.shared_prefix(cfg, params, mk(p.clean_ids), mk(p.corrupt_ids),
                                          int(p.roles["changed_first"].min()))
  source, cache = patching.capture(cfg, params, clean, taps=taps)
  target, _ = patching.capture(cfg, params, corrupt)
  return _Prepared(clean, corrupt, *to_host((target, source)), cache)


class _Runner:
  """Runs and saves the steps of every condition, logging progress with an estimate of the time left."""

  def __init__(self, cfg: ModelConfig, ccfg: CircuitConfig, units: Units | None, log: Log, n_steps: int):
    self.cfg, self.ccfg, self.units, self.log = cfg, ccfg, units, log
    self.n_steps, self.done, self.start = n_steps, 0, time.perf_counter()

  def arrays(self, key: str, what: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    out = compute() if self.units is None else self.units.arrays(key, compute)
    faults.point("circuits.sweep")
    self.done += 1
    spent = time.perf_counter() - self.start
    left = spent / self.done * (self.n_steps - self.done)
    note = "; includes compilation" if self.done == 1 else ""
    self.log(f"[circuits] {self.ccfg.task}: {what} {time.perf_counter() - t0:.1f}s ({self.done}/{self.n_steps}; "
             f"{spent:.0f}s so far, ~{left:.0f}s left{note})")
    return out


def _screen(cfg: ModelConfig, params: Params, p: pairs_lib.PairSet, ccfg: CircuitConfig) -> dict[str, np.ndarray]:
  """Step 1 of a condition: the screen of both families and the exact residual sweep, as PatchRuns arrays."""
  prep = _prepare(cfg, params, p, ("attn_z", "mlp_out", "resid_pre"))
  est = screen.estimate(cfg, params, prep.corrupt, prep.cache)
  T = prep.corrupt.tokens.shape[1]
  positions = np.arange(T)[-ccfg.resid_last:]  # [-0:] keeps all
  resid = to_host(patching.patch_sweep(cfg, params, prep.corrupt, prep.cache, "resid_pre", ("layer", "pos"),
                                       ccfg.chunk, positions))
  runs = {f: PatchRuns(est[f], prep.target, prep.source) for f in screen.FAMILIES}
  runs["resid"] = PatchRuns(np.moveaxis(resid, -1, 0), prep.target, prep.source)
  return records.patch_runs_arrays(runs)


def _verify(cfg: ModelConfig, params: Params, p: pairs_lib.PairSet, chosen: dict[str, np.ndarray],
            chunk: int) -> dict[str, np.ndarray]:
  """Step 2: the exact patched metrics [N, M] of the chosen components of each family."""
  prep = _prepare(cfg, params, p)
  return {f: screen.exact(cfg, params, prep.corrupt, prep.cache, f, chosen[f], chunk) for f in screen.FAMILIES}


def _faithful(cfg: ModelConfig, params: Params, p: pairs_lib.PairSet, sets: list) -> dict[str, np.ndarray]:
  """Step 3: the metric [N, K] with each component set patched jointly."""
  prep = _prepare(cfg, params, p)
  return {"patched": faithfulness.recovery(cfg, params, prep.corrupt, prep.cache, sets)}


def _vectors(cfg: ModelConfig, params: Params, base: pairs_lib.PairSet, icl: pairs_lib.PairSet
             ) -> dict[str, np.ndarray]:
  """Function vectors from the k-shot and 0-shot prompts of the even pairs, injected into the 0-shot prompts of
  the odd pairs: per layer the signed score (logit of the prompt's own answer minus the other's) [L, n, 2],
  with the 0-shot and k-shot scores [n, 2] (clean, corrupt)."""
  fit, held = np.arange(0, len(base), 2), np.arange(1, len(base), 2)
  def both(p):
    prep = _prepare(cfg, params, p, ())
    return prep.clean, prep.corrupt
  resid = lambda p: np.concatenate([to_host(vectors.answer_residuals(cfg, params, b)) for b in both(p)], axis=1)
  v = resid(icl.take(fit)).mean(axis=1) - resid(base.take(fit)).mean(axis=1)  # [L, D]
  score = lambda ld: np.stack([ld[..., 0], -ld[..., 1]], axis=-1)  # the corrupt prompt's own answer is the foil
  runs = lambda p, fn: score(np.stack([to_host(fn(b)) for b in both(p.take(held))], axis=-1))
  return dict(injected=runs(base, lambda b: vectors.inject(cfg, params, b, v)),
              zero_shot=runs(base, lambda b: patching.capture(cfg, params, b)[0]),
              k_shot=runs(icl, lambda b: patching.capture(cfg, params, b)[0]), norms=np.linalg.norm(v, axis=-1))


def _transfer(cfg: ModelConfig, base: Params, tuned: Params, p: pairs_lib.PairSet, heads: np.ndarray,
              chunk: int) -> dict[str, np.ndarray]:
  """Mechanism transfer: each of ``heads`` (flat [L*H] indices) of the tuned model patched into the base model on
  the same clean prompt (no shared prefix: the two models' prefixes differ), as PatchRuns arrays with
  target = LD_base and source = LD_tuned."""
  clean = patching.Batch(p.clean_ids, p.valid, p.answer_pos, p.clean_answer, p.corrupt_answer)
  tuned_ld, cache = patching.capture(cfg, tuned, clean, taps=("attn_z",))
  base_ld, _ = patching.capture(cfg, base, clean)
  patched = screen.exact(cfg, base, clean, cache, "heads", heads, chunk)
  return records.patch_runs_arrays({"transfer": PatchRuns(patched, *to_host((base_ld, tuned_ld)))})


def analyze(cfg: ModelConfig, base: Params, tokenizer, ccfg: CircuitConfig,
            tuned: Mapping[str, Params] | None = None, units: Units | None = None,
            log: Log = lambda s: None) -> CircuitAnalysis:
  """Runs every condition (``CircuitConfig.prompt_conditions`` on the base model, and each entry of ``tuned``,
  e.g. {"ft": params}, 0-shot) on the same query items, and every statistic on them (module docstring).

  Long: the analysis's four steps per condition and its summaries in one place, in order."""
  tuned = dict(tuned or {})
  sets = condition_pairs(tokenizer, ccfg, tuple(tuned))
  params_of = {name: tuned.get(name, base) for name in sets}
  k_fv = max(ccfg.icl_shots, default=0)
  run = _Runner(cfg, ccfg, units, log, 4 * len(sets) + bool(k_fv) + len(tuned))  # cross steps may be fewer
  log(f"[circuits] {ccfg.task}: {len(sets['base'])} pairs per condition; conditions {', '.join(sets)}")
  screened = {n: records.patch_runs_from_arrays(run.arrays(f"{n}.screen", f"{n}: screen",
                                                           lambda n=n: _screen(cfg, params_of[n], sets[n], ccfg)))
              for n in sets}
  chosen = {f: screen.chosen([screened[n][f].patched for n in sets], [screened[n][f].target.mean() for n in sets],
                             ccfg.verify) for f in screen.FAMILIES}
  hybrid = {}
  for n in sets:
    exact = run.arrays(f"{n}.exact", f"{n}: exact patches of {sum(map(len, chosen.values()))} components",
                       lambda n=n: _verify(cfg, params_of[n], sets[n], chosen, ccfg.chunk))
    hybrid[n] = {f: dataclasses.replace(screened[n][f], patched=screen.combine(screened[n][f].patched, chosen[f],
                                                                               exact[f])) for f in screen.FAMILIES}
  effects = {n: {f: r.effects(ccfg.tol)[0] for f, r in hybrid[n].items()} for n in sets}
  for n in sets:
    effects[n]["resid"] = screened[n]["resid"].effects(ccfg.tol)[0]
  verified = {f: np.isin(np.arange(int(np.prod(screen.family_shape(cfg, f)))), chosen[f]).reshape(
      screen.family_shape(cfg, f)) for f in screen.FAMILIES}
  numbers = {"config": dataclasses.asdict(ccfg), "pairs": {n: p.summary() for n, p in sets.items()},
             "example_pair": {"clean": sets["base"].prompts[0][0], "corrupt": sets["base"].prompts[0][1],
                              "answers": sets["base"].answers[0]},
             "resid_effects": {n: e["resid"] for n, e in effects.items()},
             "screen": {n: {f: screen.agreement(screened[n][f], hybrid[n][f], verified[f], ccfg.top_k, ccfg.tol)
                            for f in screen.FAMILIES} for n in sets}}
  icl = f"icl{k_fv}"
  contrasts = [(icl, n) for n in sets if n not in ("base", icl)] if k_fv else None  # ICL against each other
  for f in screen.FAMILIES:
    numbers[f] = shifts.shift_report({n: hybrid[n][f] for n in sets}, baseline="base", n_boot=ccfg.n_boot,
                                     seed=ccfg.seed, k=ccfg.top_k, tol=ccfg.tol, n_splits=ccfg.n_splits,
                                     n_perm=ccfg.n_perm, contrasts=contrasts)
  has_circuit = {n: numbers["heads"]["conditions"][n]["has_circuit"] for n in sets}
  numbers["faithfulness"] = _faithfulness(cfg, ccfg, sets, params_of, effects, has_circuit,
                                          {n: screened[n]["heads"] for n in sets}, run)
  if k_fv:
    fv = run.arrays("vectors", f"function vectors (icl{k_fv} -> base)",
                    lambda: _vectors(cfg, base, sets["base"], sets[f"icl{k_fv}"]))
    numbers["vectors"] = _vector_numbers(fv, k_fv, len(sets["base"]), ccfg)
  numbers["transfer"] = {}
  for name, params in tuned.items():
    heads = np.array(shifts.ranked(np.nan_to_num(effects[name]["heads"]), min(ccfg.top_k, effects[name]["heads"].size)))
    t = records.patch_runs_from_arrays(run.arrays(
        f"transfer-{name}", f"{name} -> base transfer of {len(heads)} heads",
        lambda: _transfer(cfg, base, params, sets["base"], heads, ccfg.chunk)))["transfer"]
    eff, lo, hi = shifts.effect_intervals(t, ccfg.n_boot, ccfg.seed, ccfg.tol)
    H = cfg.num_heads
    numbers["transfer"][name] = dict(
        separated=bool(t.effects(ccfg.tol)[1]), separation=float(t.source.mean() - t.target.mean()),
        heads=[dict(layer=int(i // H), head=int(i % H), effect=_num(e), lo=_num(a), hi=_num(b))
               for i, e, a, b in zip(heads, eff, lo, hi)])
  numbers["seconds"] = round(time.perf_counter() - run.start, 1)
  return CircuitAnalysis(numbers, effects)


def _faithfulness(cfg: ModelConfig, ccfg: CircuitConfig, sets, params_of, effects, has_circuit: dict[str, bool],
                  unpatched: dict[str, PatchRuns], run: _Runner) -> dict:
  """Per condition with a circuit (its gap's interval excludes 0): the recovered share of its gap by its top-k
  sets (k = 1, 2, 4, ... all) with intervals, its circuit (smallest set whose point estimate reaches
  ``threshold``; ranked and measured on the same pairs), and every condition's circuit patched in it."""
  shapes = {f: screen.family_shape(cfg, f) for f in screen.FAMILIES}
  total = sum(int(np.prod(s)) for s in shapes.values())
  ks = faithfulness.sizes(total)
  orders = {n: faithfulness.ranking(effects[n]) if has_circuit[n] else [] for n in sets}
  curves, circuits = {}, {}
  for n in sets:  # each condition's own curve first: its circuit is needed by the cross-condition patches
    if not orders[n]:
      curves[n] = None
      continue
    r = run.arrays(f"{n}.faithful", f"{n}: {len(ks)} joint patches", lambda n=n: _faithful(
        cfg, params_of[n], sets[n], [faithfulness.top_set(orders[n], k, shapes) for k in ks]))
    curves[n] = PatchRuns(r["patched"], unpatched[n].target, unpatched[n].source)
    point, _, _ = shifts.effect_intervals(curves[n], 1, ccfg.seed, ccfg.tol)
    size = faithfulness.circuit_size(point, ks, ccfg.threshold)
    circuits[n] = None if size is None else faithfulness.top_set(orders[n], size, shapes)
  have = [n for n in sets if circuits.get(n) is not None]
  out = {"ks": ks, "threshold": ccfg.threshold, "conditions": {}}
  for n in sets:
    if curves[n] is None:
      out["conditions"][n] = dict(reason="no circuit: the gap's interval includes 0")
      continue
    cross = run.arrays(f"{n}.cross", f"{n}: {len(have)} circuits patched in it", lambda n=n: _faithful(
        cfg, params_of[n], sets[n], [circuits[a] for a in have])) if have else {"patched": np.zeros((curves[n].n, 0))}
    both = PatchRuns(np.concatenate([curves[n].patched, cross["patched"]], axis=1), curves[n].target, curves[n].source)
    e, lo, hi = shifts.effect_intervals(both, ccfg.n_boot, ccfg.seed, ccfg.tol)
    c = circuits.get(n)
    out["conditions"][n] = dict(
        recovered=[_ci(e[i], lo[i], hi[i]) for i in range(len(ks))],
        circuit_size=None if c is None else int(sum(m.sum() for m in c.values())),
        circuit=None if c is None else _components(c),
        cross={a: _ci(e[len(ks) + j], lo[len(ks) + j], hi[len(ks) + j]) for j, a in enumerate(have)})
  out["jaccard"] = {f"{a}|{b}": _jaccard(circuits[a], circuits[b]) for i, a in enumerate(have) for b in have[i + 1:]}
  return out


def _vector_numbers(fv: dict[str, np.ndarray], k: int, n_pairs: int, ccfg: CircuitConfig) -> dict:
  """Per layer: the mean signed score with the vector injected, its gain over 0-shot and the pairwise preference
  (share of prompts whose own answer's first token beats the other's), each with a pair-bootstrap interval, next
  to the 0-shot and k-shot references."""
  per_pair = lambda s: s.mean(axis=-1)  # [..., n, 2] -> [..., n]: the pair is the unit
  right = lambda s: (s > 0).mean(axis=-1)
  inj, zero, icl = fv["injected"], fv["zero_shot"], fv["k_shot"]
  stats = lambda x: resampling.mean_interval(x, ccfg.n_boot, ccfg.seed)
  cols = dict(score=stats(per_pair(inj).T), gain=stats((per_pair(inj) - per_pair(zero)[None]).T),
              preference=stats(right(inj).T))
  ref = {name: dict(score=_ci(*stats(per_pair(s))), preference=_ci(*stats(right(s)))) for name, s in
         (("zero_shot", zero), (f"icl{k}", icl))}
  layers = [{c: _ci(v[0][l], v[1][l], v[2][l]) for c, v in cols.items()} | {"norm": float(fv["norms"][l])}
            for l in range(inj.shape[0])]
  helps = [l for l, row in enumerate(layers) if (row["gain"]["lo"] or 0) > 0]
  return dict(shots=k, n_fit=n_pairs - int(zero.shape[0]), n_held_out=int(zero.shape[0]), references=ref,
              layers=layers, layers_with_gain=helps)


def _ci(point, lo, hi) -> dict:
  return dict(point=_num(point), lo=_num(lo), hi=_num(hi))


def _num(x) -> float | None:
  x = float(x)
  return x if np.isfinite(x) else None


def _components(c: dict[str, np.ndarray]) -> dict[str, list]:
  return {f: [[int(v) for v in idx] for idx in zip(*np.nonzero(m))] for f, m in c.items()}


def _jaccard(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
  inter = sum(int((a[f] & b[f]).sum()) for f in a)
  union = sum(int((a[f] | b[f]).sum()) for f in a)
  return inter / union if union else 1.0
