"""Figures: accuracy against shots or training samples, circuit heatmaps, MLP profiles and shift bars. Each
returns the path it wrote (``io.files.save_figure``: atomic, process 0 only)."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from icl_ft.io import files
from icl_ft.report.tables import GROUP_KEYS


# The accuracy figures' titles, by their x axis: how stages name them (figure guard) and the report heads them.
TITLES = {"shots": "accuracy vs shots", "samples": "accuracy vs training samples"}


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_accuracy(summary: Sequence[dict], path, x: str = "shots", rule: str = "strict", title: str = ""):
  """Accuracy vs ``x`` ("shots": demonstrations; "samples": fine-tuning examples seen) with 95% intervals.

  One line per combination of the other grouping keys present.
  """
  plt = _plt()
  lines: dict[str, list[dict]] = defaultdict(list)
  hidden = ({x, "method"} if x == "shots" else {x}) | {"split"}  # 0-shot (method "base") starts each ICL curve
  for row in summary:
    label = " / ".join(str(row[k]) for k in GROUP_KEYS if k in row and k not in hidden)
    lines[label].append(row)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, rows in sorted(lines.items()):
    rows = sorted((r for r in rows if r[f"acc_{rule}"] is not None), key=lambda r: r[x])  # n = 0: all skipped
    xs = [r[x] for r in rows]
    y = [r[f"acc_{rule}"] for r in rows]
    err = [[yy - r[f"ci_{rule}_lo"] for yy, r in zip(y, rows)], [r[f"ci_{rule}_hi"] - yy for yy, r in zip(y, rows)]]
    ax.errorbar(xs, y, yerr=err, marker="o", capsize=3, label=label)
  ax.set_xscale("symlog", linthresh=1)
  ticks = sorted({r[x] for r in summary})
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.set_xlabel({"shots": "shots (demonstrations)", "samples": "fine-tuning samples seen"}.get(x, x))
  ax.set_ylabel(f"accuracy ({rule})")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(title or f"accuracy vs {x} ({rule} scoring, 95% Wilson CI)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return files.save_figure(fig, path)


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
  """Shift of each condition from base, per metric: the point, its 95% interval (drawn as the interval: a basic
  interval need not contain its point) and the split-half noise floor (a tick); conditions without a circuit
  are left empty."""
  del effects
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  get = lambda v, key: np.nan if v.get(key) is None else v[key]
  for ax, family in zip(axes, ("heads", "mlps")):
    shifts = results[family]["shifts"]
    keys = [k for k in shifts if k.startswith("base|")]
    for offset, metric in enumerate(("tv_sel", "rank_sel", "topk")):
      x = np.arange(len(keys)) + 0.25 * offset
      vals = [shifts[k].get(metric, {}) for k in keys]
      ax.bar(x, [get(v, "point") for v in vals], width=0.25, label=metric, alpha=0.7)
      ax.vlines(x, [get(v, "lo") for v in vals], [get(v, "hi") for v in vals], color="k")
      ax.scatter(x, [get(v, "floor") for v in vals], marker="_", s=200, color="r")
    ax.set_xticks(np.arange(len(keys)) + 0.25)
    ax.set_xticklabels([k.split("|")[1] for k in keys], rotation=20, fontsize=8)
    ax.set_ylabel("shift from base (95% CI; red: noise floor)")
    ax.set_title(f"circuit shift: {family}")
    ax.legend(fontsize=7)
  return files.save_figure(fig, files.as_path(outdir) / "circuit_shift.png", dpi=110)


def plot_faithfulness(outdir: files.PathLike, results: dict, effects: dict):
  """Share of each condition's clean-corrupt gap recovered by its top-k components patched jointly."""
  del effects
  plt = _plt()
  f = results["faithfulness"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, c in f["conditions"].items():
    if "recovered" not in c:
      continue
    get = lambda key: [np.nan if r[key] is None else r[key] for r in c["recovered"]]
    line, = ax.plot(f["ks"], get("point"), marker="o", label=name)
    ax.vlines(f["ks"], get("lo"), get("hi"), color=line.get_color(), alpha=0.6)  # intervals need not hold the point
  ax.axhline(f["threshold"], color="k", ls=":", lw=1)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("top-k components patched jointly (heads and MLPs)")
  ax.set_ylabel("share of the gap recovered (95% CI)")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "no condition separates clean from corrupt", ha="center", transform=ax.transAxes)
  return files.save_figure(fig, files.as_path(outdir) / "circuit_faithfulness.png", dpi=110)


def plot_vectors(outdir: files.PathLike, results: dict, effects: dict):
  """Function-vector injection by layer: the held-out 0-shot score with the vector added, against the 0-shot and
  k-shot scores."""
  del effects
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  fv = results.get("vectors")
  if fv:
    get = lambda key: np.array([np.nan if r["score"][key] is None else r["score"][key] for r in fv["layers"]])
    x = np.arange(len(fv["layers"]))
    ax.plot(x, get("point"), marker="o", label="0-shot + vector")
    ax.fill_between(x, get("lo"), get("hi"), alpha=0.3)
    for (name, ref), style in zip(fv["references"].items(), (":", "--")):
      ax.axhline(ref["score"]["point"], color="k", ls=style, lw=1, label=name)
    ax.set_xlabel("layer the vector is added at")
    ax.set_ylabel("logit(own answer) - logit(other), 95% CI")
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  return files.save_figure(fig, files.as_path(outdir) / "circuit_vectors.png", dpi=110)


# Circuit figure name -> draw(directory, results, per-condition effects) -> path.
CIRCUIT_FIGURES = {"heatmaps": plot_heatmaps, "mlps": plot_mlps, "shifts": plot_shifts,
                   "faithfulness": plot_faithfulness, "vectors": plot_vectors}
