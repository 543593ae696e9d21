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


# Circuit figure name -> draw(directory, results, per-condition effects) -> path.
CIRCUIT_FIGURES = {"heatmaps": plot_heatmaps, "mlps": plot_mlps, "shifts": plot_shifts}
