"""The circuit-shift analysis: which heads and MLPs carry the pattern under base 0-shot, ICL k-shot and
fine-tuned 0-shot, and how much ICL vs FT moves them (docs/circuits.md).

Per condition, on clean/corrupted pairs (``pairs.build_pairs``): denoising sweeps (clean -> corrupted) over
heads (``attn_z``, all positions), MLPs (``mlp_out``) and the residual stream by position (``resid_pre``);
normalised effects as ratios of means; shifts between conditions with paired bootstrap CIs and noise
floors (``shifts.shift_report``); mechanism transfer from the fine-tuned model into the base model
(cross-model patching); attribution patching over the full (layer, head, position) grid checked against
the exact sweep on its top-k.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from icl_ft.interp import pairs as pairs_lib
from icl_ft import faults
from icl_ft.interp import patching
from icl_ft.stats import shifts
from icl_ft.stats.effects import PatchRuns
from icl_ft.io import records
from icl_ft.io.units import Units
from icl_ft.model.config import ModelConfig
from icl_ft.model.decoder import Params
from icl_ft.model.sharding import to_host


@dataclasses.dataclass(frozen=True)
class CircuitConfig:
  task: str
  fmt: str = "fixed"
  n_pairs: int = 16
  seed: int = 0
  icl_shots: tuple[int, ...] = (4,)
  chunk: int = 16
  resid_last: int = 0  # residual (layer, position) sweep over the query's last N positions; 0: the whole query
  n_boot: int = 200
  top_k: int = 10
  tol: float = 1e-3  # conditions whose clean-corrupt logit-diff gap is below this are not separated (no effects)


def _batches(p: pairs_lib.PairSet) -> tuple[patching.Batch, patching.Batch]:
  mk = lambda ids: patching.Batch(ids, p.valid, p.answer_pos, p.clean_answer, p.corrupt_answer)
  return mk(p.clean_ids), mk(p.corrupt_ids)


def condition_runs(cfg: ModelConfig, params: Params, p: pairs_lib.PairSet, chunk: int = 16,
                   resid_last: int = 0) -> dict:
  """Denoising sweeps of one condition: per-pair metrics for heads [N, L, H], MLPs [N, L] and the residual
  stream over the query segment [N, L, P] (positions ``min(query_first)`` .. T-1, shared by all pairs;
  demo positions are not patched), with the unpatched corrupted (target) and clean (source) metrics [N]."""
  clean, corrupt = _batches(p)
  clean_ld, cache = patching.capture(cfg, params, clean, taps=("attn_z", "mlp_out", "resid_pre"))
  corrupt_ld, _ = patching.capture(cfg, params, corrupt)
  def sweep(site, gran, pos=None):
    out = to_host(patching.patch_sweep(cfg, params, corrupt, cache, site, gran, chunk, pos))
    faults.point("circuits.sweep")
    return out

  query = np.arange(int(p.roles["query_first"].min()), p.length)[-resid_last:]  # [-0:] keeps all
  runs = {"heads": sweep("attn_z", ("layer", "head")), "mlps": sweep("mlp_out", ("layer",))[:, 0],
          "resid": sweep("resid_pre", ("layer", "pos"), query)}
  target, source = to_host((corrupt_ld, clean_ld))
  return {name: PatchRuns(np.moveaxis(v, -1, 0), target, source) for name, v in runs.items()}


def transfer_runs(cfg: ModelConfig, base: Params, tuned: Params, p: pairs_lib.PairSet, chunk: int = 16) -> PatchRuns:
  """Mechanism transfer: each head of the fine-tuned model patched into the base model on the same clean
  prompt. Effect = (LD_B(x | head <- F) - LD_B(x)) / (LD_F(x) - LD_B(x)), per head [N, L, H]."""
  clean, _ = _batches(p)
  tuned_ld, cache = patching.capture(cfg, tuned, clean, taps=("attn_z",))
  base_ld, _ = patching.capture(cfg, base, clean)
  swept, base_ld, tuned_ld = to_host((patching.patch_sweep(cfg, base, clean, cache, "attn_z", ("layer", "head"), chunk),
                                      base_ld, tuned_ld))
  return PatchRuns(np.moveaxis(swept, -1, 0), base_ld, tuned_ld)


def attribution_check(cfg: ModelConfig, params: Params, p: pairs_lib.PairSet, exact: PatchRuns, k: int) -> dict:
  """Attribution patching of every (layer, head, position) in one backward pass, summed per head, against
  the exact head sweep: Spearman correlation and the exact effects of AtP's top-k heads."""
  clean, corrupt = _batches(p)
  _, cache = patching.capture(cfg, params, clean, taps=("attn_z",))
  atp = to_host(patching.attribution_patch(cfg, params, corrupt, cache, ("attn_z",))["attn_z"])
  grid = atp.sum(axis=-1)  # [L, N, T, H]: per (layer, head, position)
  est = grid.sum(axis=2).mean(axis=1)  # [L, H]: estimated E[patched] - E[target] per head
  true = exact.patched.mean(axis=0) - exact.target.mean()
  k = min(k, est.size)
  return {
      "spearman_atp_vs_exact": shifts.spearman(est, true),
      "topk_overlap_with_exact": shifts.topk_recall(est, true, k),
      "topk": [{"layer": int(i // est.shape[1]), "head": int(i % est.shape[1]), "atp": float(est.ravel()[i]),
                "exact": float(true.ravel()[i])} for i in shifts.ranked(est, k)],
      "grid_shape_layer_pair_pos_head": list(grid.shape),
  }


@dataclasses.dataclass
class CircuitAnalysis:
  """Everything ``analyze`` finds for one task: ``numbers`` (JSON-ready: config, pairs, per-family shift
  reports, residual effects, the AtP check, FT->base transfer) and ``effects`` (per condition, the normalised
  effects of heads [L, H], MLPs [L] and residual positions [L, P], for figures)."""

  numbers: dict
  effects: dict[str, dict[str, np.ndarray]]


def condition_pairs(tokenizer, ccfg: CircuitConfig, tuned: Sequence[str] = ()) -> dict[str, pairs_lib.PairSet]:
  """The prompt pairs of each condition: ``base`` (0-shot), ``icl{k}`` (k demos) and each tuned model (the base
  pairs), restricted to the query items that form a valid pair in every condition (so bootstraps are paired)."""
  sets = {"base": pairs_lib.build_pairs(ccfg.task, tokenizer, ccfg.n_pairs, ccfg.seed, ccfg.fmt, 0)}
  for k in ccfg.icl_shots:
    sets[f"icl{k}"] = pairs_lib.build_pairs(ccfg.task, tokenizer, ccfg.n_pairs, ccfg.seed, ccfg.fmt, k)
  common = set.intersection(*(set(p.query_index.tolist()) for p in sets.values()))
  if not common:
    raise ValueError("no query item forms a valid pair in every condition; increase n_pairs")
  for name, p in sets.items():
    order = {q: i for i, q in enumerate(p.query_index.tolist())}
    sets[name] = p.take([order[q] for q in sorted(common)])
  return dict(sets, **{name: sets["base"] for name in tuned})


def _saved(units: Units | None, key: str, compute: Callable[[], dict[str, PatchRuns]]
           ) -> dict[str, PatchRuns]:
  """PatchRuns by name, computed or (with ``units``) reloaded exactly from a saved unit."""
  if units is None:
    return compute()
  return records.patch_runs_from_arrays(units.arrays(key, lambda: records.patch_runs_arrays(compute())))


def analyze(cfg: ModelConfig, base: Params, tokenizer, ccfg: CircuitConfig,
            tuned: Mapping[str, Params] | None = None, units: Units | None = None) -> CircuitAnalysis:
  """Runs every condition: ``base`` (0-shot), ``icl{k}`` (k shots, base model) and, per entry of ``tuned``
  (e.g. {"ft": params}), the fine-tuned model 0-shot, on the same query items. With ``units``, each condition's
  sweeps are saved as they finish, so a killed analysis resumes from its last completed condition."""
  tuned = dict(tuned or {})
  sets = condition_pairs(tokenizer, ccfg, tuple(tuned))
  params_of = {name: tuned.get(name, base) for name in sets}
  runs = {name: _saved(units, name, lambda name=name: condition_runs(cfg, params_of[name], sets[name], ccfg.chunk,
                                                                     ccfg.resid_last)) for name in sets}
  effects = {n: {f: r[f].effects(ccfg.tol)[0] for f in ("heads", "mlps", "resid")} for n, r in runs.items()}
  numbers = {"config": dataclasses.asdict(ccfg), "pairs": {n: p.summary() for n, p in sets.items()},
             "example_pair": {"clean": sets["base"].prompts[0][0], "corrupt": sets["base"].prompts[0][1],
                              "answers": sets["base"].answers[0]},
             "resid_effects": {n: e["resid"] for n, e in effects.items()},
             "attribution": attribution_check(cfg, base, sets["base"], runs["base"]["heads"], ccfg.top_k),
             "transfer": {}}
  for family in ("heads", "mlps"):
    numbers[family] = shifts.shift_report({n: r[family] for n, r in runs.items()}, baseline="base",
                                          n_boot=ccfg.n_boot, seed=ccfg.seed, k=ccfg.top_k, tol=ccfg.tol)
  for name, params in tuned.items():
    t = _saved(units, f"transfer-{name}",
               lambda: {"transfer": transfer_runs(cfg, base, params, sets["base"], ccfg.chunk)})["transfer"]
    eff, separated = t.effects(ccfg.tol)
    numbers["transfer"][name] = {"effects": np.asarray(eff), "separated": bool(separated),
                                 "separation": float(t.source.mean() - t.target.mean())}
  return CircuitAnalysis(numbers, effects)
