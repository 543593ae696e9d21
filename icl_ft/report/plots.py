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


# -- the grid (``icl_ft.aggregate``) -------------------------------------------------------------------------------

def _grid_point(row: dict, key: str) -> tuple[float, float, float]:
  """(value, lo, hi) of an aggregated row: across data seeds when there are several (no bar for runs of one data
  seed), else the one run's."""
  a = row.get("across")
  if a is not None:
    return a["mean"], (a["mean"] if a["lo"] is None else a["lo"]), (a["mean"] if a["hi"] is None else a["hi"])
  r = row["runs"][0]
  return (np.nan, np.nan, np.nan) if r[key] is None else (r[key], r["lo"], r["hi"])


def _size_axis(group: dict):
  """(x position by model label, a function that labels an axis): log parameters when every model has a distinct
  known size; otherwise the models in size order, by name (e.g. one model at two dtypes)."""
  sizes = [m["params"] for m in group["models"]]
  if len(sizes) > 1 and all(sizes) and len(set(sizes)) == len(sizes):
    from matplotlib.ticker import NullLocator
    def label(ax):
      ax.set_xscale("log")
      ax.xaxis.set_minor_locator(NullLocator())
      ax.set_xticks(sizes, [f"{m['label']}\n{m['params'] / 1e9:.2g}B" for m in group["models"]], fontsize=7)
      ax.set_xlabel("parameters (log)")
    return {m["label"]: m["params"] for m in group["models"]}, label, 1.04
  labels = [m["label"] for m in group["models"]]
  def label(ax):
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=7)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xlabel("model (by size)")
  return {name: i for i, name in enumerate(labels)}, label, None


def _offset(x: float, i: int, scale: float | None) -> float:
  """Condition ``i``'s point beside the others at ``x``: a factor on a log axis, a shift on a categorical one."""
  return x * scale ** i if scale else x + 0.08 * i


def _panels(plt, keys: Sequence, width: float = 4.0):
  cols = min(len(keys), 3)
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.2 * rows), squeeze=False)
  for ax in axes.flat[len(keys):]:
    ax.set_visible(False)
  return fig, list(axes.flat)


def _errorbar(ax, xs, points, **kw):
  y = np.array([p[0] for p in points], np.float64)
  err = np.abs(np.array([[p[0] - p[1] for p in points], [p[2] - p[0] for p in points]], np.float64))
  ax.errorbar(xs, y, yerr=err, marker="o", capsize=3, **kw)


def plot_grid_accuracy(group: dict, path, rule: str = "strict"):
  """Accuracy vs parameter count (log; by model in size order when sizes repeat or are unknown), one panel per
  task and variant, one line per condition (95% intervals: across data seeds when replicated, else the run's)."""
  from icl_ft.report.aggregation import CONDITIONS
  plt = _plt()
  xpos, axis, scale = _size_axis(group)
  panels = sorted({(r["task"], r["variant"]) for r in group["accuracy"]})
  fig, axes = _panels(plt, panels)
  for ax, (task, variant) in zip(axes, panels):
    for offset, (cond, name) in enumerate(CONDITIONS.items()):
      rows = sorted((r for r in group["accuracy"] if (r["task"], r["variant"], r["rule"], r["condition"]) == (
          task, variant, rule, cond)), key=lambda r: xpos[r["model"]])
      if rows:
        _errorbar(ax, [_offset(xpos[r["model"]], offset, scale) for r in rows], [_grid_point(r, "acc") for r in rows],
                  label=name)
    axis(ax)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{task} / {variant}", fontsize=9)
    ax.set_ylabel(f"accuracy ({rule})")
    ax.grid(alpha=0.3)
  if axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=7)
  return files.save_figure(fig, path, dpi=110)


def plot_grid_gap(group: dict, path, rule: str = "strict"):
  """ICL - FT (paired, 95% interval) vs parameter count (as ``plot_grid_accuracy``), one panel per task, one line
  per variant and ICL choice (dev-chosen k where the runs have a dev split, else the best k on test)."""
  plt = _plt()
  xpos, axis, scale = _size_axis(group)
  tasks_ = sorted({r["task"] for r in group["gaps"]})
  fig, axes = _panels(plt, tasks_ or ["(no gaps)"])
  for ax, task in zip(axes, tasks_):
    rows = [r for r in group["gaps"] if r["task"] == task and r["rule"] == rule]
    choice = "icl_dev" if any(r["condition"] == "icl_dev" for r in rows) else "icl_best"
    for offset, variant in enumerate(sorted({r["variant"] for r in rows})):
      line = sorted((r for r in rows if r["variant"] == variant and r["condition"] == choice),
                    key=lambda r: xpos[r["model"]])
      _errorbar(ax, [_offset(xpos[r["model"]], offset, scale) for r in line], [_grid_point(r, "diff") for r in line],
                label=f"{variant} ({choice.replace('icl_', '')} k)")
    ax.axhline(0, color="k", lw=1)
    axis(ax)
    ax.set_ylim(-1.02, 1.02)
    ax.set_title(task, fontsize=9)
    ax.set_ylabel(f"ICL − FT accuracy ({rule})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return files.save_figure(fig, path, dpi=110)


def plot_grid_circuits(group: dict, path, family: str = "heads"):
  """The cross-fitted TV contrasts (ICL - FT, ICL - few-shot FT and the ICL controls) per model, one panel per task, with 95% intervals;
  contrasts without a number (a condition has no circuit) are left out."""
  plt = _plt()
  labels = [m["label"] for m in group["models"]]
  rows = [r for r in group["circuits"] if r["family"] == family]
  tasks_ = sorted({r["task"] for r in rows})
  fig, axes = _panels(plt, tasks_ or ["(no circuits)"], width=5.0)
  for ax, task in zip(axes, tasks_):
    keys = sorted({(r["a"], r["b"]) for r in rows if r["task"] == task})
    for offset, (a, b) in enumerate(keys):
      line = [r for r in rows if (r["task"], r["a"], r["b"]) == (task, a, b)
              and all(x["point"] is not None for x in r["runs"])]
      if line:
        xs = [labels.index(r["model"]) + 0.1 * (offset - len(keys) / 2) for r in line]
        _errorbar(ax, xs, [_grid_point(r, "point") for r in line], ls="none", label=f"{a} − {b}")
    ax.axhline(0, color="k", lw=1)
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_title(f"{task}: {family}", fontsize=9)
    ax.set_ylabel("cross-fitted TV contrast (95% CI)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  return files.save_figure(fig, path, dpi=110)


GRID_FIGURES = {"accuracy vs model size (strict)": ("accuracy_vs_size.png", plot_grid_accuracy),
                "ICL − FT vs model size (strict)": ("gap_vs_size.png", plot_grid_gap),
                "circuit-shift contrasts (heads)": ("circuit_contrasts.png", plot_grid_circuits)}
