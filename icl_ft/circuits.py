"""The circuit-shift analysis: which heads and MLPs carry the pattern under base 0-shot, ICL k-shot and
fine-tuned 0-shot, and how much ICL vs FT moves them (study §8).

Per condition, on clean/corrupted pairs (``pairs.build_pairs``): denoising sweeps (clean -> corrupted) over
heads (``attn_z``, all positions), MLPs (``mlp_out``) and the residual stream by position (``resid_pre``);
normalised effects as ratios of means; shifts between conditions with paired bootstrap CIs and noise
floors (``shift.shift_report``); mechanism transfer from the fine-tuned model into the base model
(cross-model patching); attribution patching over the full (layer, head, position) grid checked against
the exact sweep on its top-k.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from icl_ft import pairs as pairs_lib
from icl_ft import faults, files, patching, shift, workdir
from icl_ft.config import ModelConfig
from icl_ft.model import Params
from icl_ft.sharding import to_host


@dataclasses.dataclass(frozen=True)
class CircuitConfig:
  task: str = "parity"
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
  return {name: shift.PatchRuns(np.moveaxis(v, -1, 0), target, source) for name, v in runs.items()}


def transfer_runs(cfg: ModelConfig, base: Params, tuned: Params, p: pairs_lib.PairSet, chunk: int = 16) -> shift.PatchRuns:
  """Mechanism transfer: each head of the fine-tuned model patched into the base model on the same clean
  prompt. Effect = (LD_B(x | head <- F) - LD_B(x)) / (LD_F(x) - LD_B(x)), per head [N, L, H]."""
  clean, _ = _batches(p)
  tuned_ld, cache = patching.capture(cfg, tuned, clean, taps=("attn_z",))
  base_ld, _ = patching.capture(cfg, base, clean)
  swept, base_ld, tuned_ld = to_host((patching.patch_sweep(cfg, base, clean, cache, "attn_z", ("layer", "head"), chunk),
                                      base_ld, tuned_ld))
  return shift.PatchRuns(np.moveaxis(swept, -1, 0), base_ld, tuned_ld)


def attribution_check(cfg: ModelConfig, params: Params, p: pairs_lib.PairSet, exact: shift.PatchRuns, k: int) -> dict:
  """Attribution patching of every (layer, head, position) in one backward pass, summed per head, against
  the exact head sweep: Spearman correlation and the exact effects of AtP's top-k heads."""
  clean, corrupt = _batches(p)
  _, cache = patching.capture(cfg, params, clean, taps=("attn_z",))
  atp = to_host(patching.attribution_patch(cfg, params, corrupt, cache, ("attn_z",))["attn_z"])
  grid = atp.sum(axis=-1)  # [L, N, T, H]: per (layer, head, position)
  est = grid.sum(axis=2).mean(axis=1)  # [L, H]: estimated E[patched] - E[target] per head
  true = exact.patched.mean(axis=0) - exact.target.mean()
  top = np.argsort(-np.abs(est).ravel())[:k]
  from scipy.stats import spearmanr
  return {
      "spearman_atp_vs_exact": float(spearmanr(est.ravel(), true.ravel()).statistic),
      "topk_overlap_with_exact": float(len(set(top) & set(np.argsort(-np.abs(true).ravel())[:k])) / k),
      "topk": [{"layer": int(i // est.shape[1]), "head": int(i % est.shape[1]), "atp": float(est.ravel()[i]),
                "exact": float(true.ravel()[i])} for i in top],
      "grid_shape_layer_pair_pos_head": list(grid.shape),
  }


def analyze(cfg: ModelConfig, base: Params, tokenizer, ccfg: CircuitConfig,
            tuned: Mapping[str, Params] | None = None, units: workdir.Units | None = None) -> dict:
  """Runs every condition and returns all numbers (JSON-ready) plus the per-condition mean effects.

  Conditions: ``base`` (0-shot), ``icl{k}`` (k shots, base model) and, per entry of ``tuned``
  (e.g. {"ft": params} or {"ft@100": ...}), the fine-tuned model 0-shot. All conditions use the same
  query items (pairs kept in every condition), so bootstraps are paired. With ``units``, each condition's
  sweeps are saved as they finish, so a killed analysis resumes from its last completed condition.
  """
  tuned = dict(tuned or {})
  sets = {"base": pairs_lib.build_pairs(ccfg.task, tokenizer, ccfg.n_pairs, ccfg.seed, ccfg.fmt, 0)}
  for k in ccfg.icl_shots:
    sets[f"icl{k}"] = pairs_lib.build_pairs(ccfg.task, tokenizer, ccfg.n_pairs, ccfg.seed, ccfg.fmt, k)
  common = set.intersection(*(set(p.query_index.tolist()) for p in sets.values()))
  if not common:
    raise ValueError("no query item forms a valid pair in every condition; increase n_pairs")
  for name, p in sets.items():
    order = {q: i for i, q in enumerate(p.query_index.tolist())}
    sets[name] = p.take([order[q] for q in sorted(common)])
  params_of = {name: base for name in sets}
  for name, params in tuned.items():
    sets[name], params_of[name] = sets["base"], params
  def cached_runs(name: str) -> dict[str, shift.PatchRuns]:
    compute = lambda: condition_runs(cfg, params_of[name], sets[name], ccfg.chunk, ccfg.resid_last)
    if units is None:
      return compute()
    arrays = units.arrays(name, lambda: {f"{f}.{k}": getattr(r, k) for f, r in compute().items()
                                         for k in ("patched", "target", "source")})
    return {f: shift.PatchRuns(*(arrays[f"{f}.{k}"] for k in ("patched", "target", "source")))
            for f in ("heads", "mlps", "resid")}

  runs = {name: cached_runs(name) for name in sets}
  out = {"config": dataclasses.asdict(ccfg), "pairs": {n: p.summary() for n, p in sets.items()},
         "example_pair": {"clean": sets["base"].prompts[0][0], "corrupt": sets["base"].prompts[0][1],
                          "answers": sets["base"].answers[0]}}
  for family in ("heads", "mlps"):
    out[family] = shift.shift_report({n: r[family] for n, r in runs.items()}, baseline="base",
                                     n_boot=ccfg.n_boot, seed=ccfg.seed, k=ccfg.top_k, tol=ccfg.tol)
  out["resid_effects"] = {n: r["resid"].effects(ccfg.tol)[0] for n, r in runs.items()}
  out["attribution"] = attribution_check(cfg, base, sets["base"], runs["base"]["heads"], ccfg.top_k)
  out["transfer"] = {}
  for name, params in tuned.items():
    compute = lambda: transfer_runs(cfg, base, params, sets["base"], ccfg.chunk)
    t = compute() if units is None else shift.PatchRuns(**units.arrays(f"transfer-{name}", lambda: dataclasses.asdict(compute())))
    eff, separated = t.effects(ccfg.tol)
    out["transfer"][name] = {"effects": np.asarray(eff), "separated": bool(separated),
                             "separation": float(t.source.mean() - t.target.mean())}
  out["_effects"] = {n: {f: r[f].effects(ccfg.tol)[0] for f in ("heads", "mlps", "resid")} for n, r in runs.items()}
  return out


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_heatmaps(outdir: files.PathLike, results: dict, effects: dict):
  """Head and residual-position effects (denoising NPE) per condition."""
  del results
  plt = _plt()
  names = list(effects)
  fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 7), squeeze=False)
  for j, name in enumerate(names):
    for i, (family, xlabel) in enumerate((("heads", "head"), ("resid", "position"))):
      e = np.asarray(effects[name][family], np.float64)
      lim = np.nanmax(np.abs(e)) if np.isfinite(e).any() else 1.0
      im = axes[i, j].imshow(e, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
      axes[i, j].set_title(f"{name}: {family} (denoising NPE)")
      axes[i, j].set_xlabel(xlabel)
      axes[i, j].set_ylabel("layer")
      fig.colorbar(im, ax=axes[i, j])
  return files.save_figure(fig, files.as_path(outdir) / "circuit_heatmaps.png", dpi=110)


def plot_mlps(outdir: files.PathLike, results: dict, effects: dict):
  """MLP effects per layer, one line per condition."""
  del results
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in effects:
    ax.plot(np.asarray(effects[name]["mlps"], np.float64), marker="o", label=name)
  ax.set_xlabel("layer")
  ax.set_ylabel("MLP denoising NPE")
  ax.legend()
  ax.grid(alpha=0.3)
  return files.save_figure(fig, files.as_path(outdir) / "circuit_mlps.png", dpi=110)


def plot_shifts(outdir: files.PathLike, results: dict, effects: dict):
  """Shift of each condition from base, per metric: the point and its 95% interval drawn as the interval (a
  percentile interval need not contain its point)."""
  del effects
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, family in zip(axes, ("heads", "mlps")):
    shifts = results[family]["shifts"]
    keys = [k for k in shifts if k.startswith("base|")]
    for offset, metric in enumerate(("tv", "rank", "topk")):
      x = np.arange(len(keys)) + 0.25 * offset
      vals = [shifts[k][metric] for k in keys]
      nan = lambda v: np.nan if v is None else v
      ax.bar(x, [nan(v["point"]) for v in vals], width=0.25, label=metric, alpha=0.7)
      ax.vlines(x, [nan(v["lo"]) for v in vals], [nan(v["hi"]) for v in vals], color="k")
    ax.set_xticks(np.arange(len(keys)) + 0.25)
    ax.set_xticklabels([k.split("|")[1] for k in keys])
    ax.set_ylabel("shift from base (95% CI)")
    ax.set_title(f"circuit shift: {family}")
    ax.legend()
  return files.save_figure(fig, files.as_path(outdir) / "circuit_shift.png", dpi=110)


# Figure name -> draw(directory, results, per-condition effects) -> path.
FIGURES = {"heatmaps": plot_heatmaps, "mlps": plot_mlps, "shifts": plot_shifts}


def write(outdir: files.PathLike, results: dict, figure: files.FigureGuard = files.draw) -> dict[str, str | None]:
  """``circuits.json`` (every number, written first) then the figures, each through ``figure(name, draw)``
  (the study's guard turns a failed figure into a warning). Returns the paths by name."""
  results = dict(results)
  effects = results.pop("_effects")
  out = files.as_path(outdir)
  paths = {"json": files.write_json(out / "circuits.json", results)}
  for name, fn in FIGURES.items():
    paths[name] = figure(name, lambda: fn(out, results, effects))
  return paths
