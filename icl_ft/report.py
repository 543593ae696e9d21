"""Results: atomic JSON/JSONL/CSV writers, accuracy summaries with Wilson intervals, and plots."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


def is_writer() -> bool:
  """Whether this process writes result files: only process 0 of a multi-host run (all compute the same)."""
  import jax
  return jax.process_index() == 0


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  """Writes ``text`` to ``path`` through a temporary file and ``os.replace``: readers never see half a file.

  On multi-host runs only process 0 writes."""
  path = Path(path)
  if not is_writer():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path


def json_safe(obj: Any) -> Any:
  """Nested containers with numpy scalars/arrays converted and NaN/inf replaced by None (strict JSON)."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(path, obj: Any) -> Path:
  return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")


def write_jsonl(path, rows: Iterable[dict]) -> Path:
  return atomic_write_text(path, "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_csv(path, rows: Sequence[dict]) -> Path:
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return atomic_write_text(path, buf.getvalue())


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion."""
  if n == 0:
    return (math.nan, math.nan)
  p = hits / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (max(0.0, centre - half), min(1.0, centre + half))


GROUP_KEYS = ("model", "method", "samples", "task", "variant", "format", "shots")


def summarize(records: Sequence[dict]) -> list[dict]:
  """Accuracy (lenient and strict) with 95% Wilson intervals per group of ``GROUP_KEYS`` present."""
  keys = [k for k in GROUP_KEYS if records and k in records[0]]
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for r in records:
    groups[tuple(r[k] for k in keys)].append(r)
  rows = []
  for key, rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
    row = dict(zip(keys, key), n=len(rs))
    for rule in ("lenient", "strict"):
      hits = sum(bool(r[f"correct_{rule}"]) for r in rs)
      lo, hi = wilson(hits, len(rs))
      row.update({f"acc_{rule}": hits / len(rs), f"ci_{rule}_lo": lo, f"ci_{rule}_hi": hi})
    diffs = [r["logit_diff"] for r in rs if r.get("logit_diff") is not None]
    row["mean_logit_diff"] = sum(diffs) / len(diffs) if diffs else None
    rows.append(row)
  return rows


def best_of_shots(summary: Sequence[dict], rule: str = "lenient") -> list[dict]:
  """The release's ICL score: max accuracy over shot counts (> 0), per group without ``shots``."""
  best: dict[tuple, dict] = {}
  for row in summary:
    if row.get("shots", 0) == 0:
      continue
    key = tuple((k, row[k]) for k in GROUP_KEYS if k in row and k != "shots")
    if key not in best or row[f"acc_{rule}"] > best[key][f"acc_{rule}"]:
      best[key] = row
  return [dict(k, best_shots=v["shots"], **{c: v[c] for c in v if c.startswith(("acc_", "ci_"))}, n=v["n"])
          for k, v in best.items()]


def plot_accuracy(summary: Sequence[dict], path, x: str = "shots", rule: str = "strict", title: str = "") -> Path:
  """Accuracy vs ``x`` ("shots": demonstrations; "samples": fine-tuning examples seen) with 95% intervals.

  One line per combination of the other grouping keys present.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lines: dict[str, list[dict]] = defaultdict(list)
  hidden = {x, "method"} if x == "shots" else {x}  # 0-shot (method "base") starts each ICL curve
  for row in summary:
    label = " / ".join(str(row[k]) for k in GROUP_KEYS if k in row and k not in hidden)
    lines[label].append(row)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, rows in sorted(lines.items()):
    rows = sorted(rows, key=lambda r: r[x])
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
  return save_figure(fig, path)


def save_figure(fig, path, dpi: int = 120) -> Path:
  """Saves and closes a matplotlib figure atomically (process 0 only on multi-host runs)."""
  import matplotlib.pyplot as plt
  path = Path(path)
  if is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
  plt.close(fig)
  return path


# -- the study report -------------------------------------------------------------------------------------

def _cell(row: dict | None, rule: str) -> dict | None:
  return None if row is None else dict(acc=row[f"acc_{rule}"], lo=row[f"ci_{rule}_lo"], hi=row[f"ci_{rule}_hi"],
                                       n=row["n"])


def package_versions() -> dict[str, str]:
  """Versions of Python and the packages whose behaviour the numbers depend on."""
  import importlib.metadata
  import platform
  out = {"python": platform.python_version()}
  for name in ("icl_ft", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "numpy"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def study_results(config: dict, icl_summary: dict, ft_summary: Sequence[dict], metrics: Sequence[dict],
                  circuits: dict, timings: dict) -> dict:
  """Every number of a study run: the comparison table (base 0-shot / fine-tuned 0-shot at the last
  checkpoint / ICL best of shots, per task and variant, lenient and strict), the per-cell summaries,
  training statistics, circuit-shift results per task, timings, the config and package versions."""
  cells = icl_summary["cells"]
  last = max((r["samples"] for r in ft_summary if r.get("shots") == 0), default=None)
  table = []
  for task, variant in sorted({(r["task"], r["variant"]) for r in cells}):
    base = next((r for r in cells if (r["task"], r["variant"], r["shots"]) == (task, variant, 0)), None)
    ft = next((r for r in ft_summary if (r["task"], r["variant"], r.get("shots"), r.get("samples"))
               == (task, variant, 0, last)), None)
    row = dict(task=task, variant=variant, ft_samples=last)
    for rule in ("lenient", "strict"):
      best = [r for r in best_of_shots(cells, rule) if (r["task"], r["variant"]) == (task, variant)]
      row[rule] = dict(base_0shot=_cell(base, rule), ft_0shot=_cell(ft, rule),
                       icl_best=dict(_cell(best[0], rule), shots=best[0]["best_shots"]) if best else None)
    table.append(row)
  steady = list(metrics[1:] or metrics)  # the first step includes compilation
  train = dict(steps=len(metrics), samples=metrics[-1]["samples"] if metrics else 0,
               first_loss=metrics[0]["loss"] if metrics else None, final_loss=metrics[-1]["loss"] if metrics else None,
               median_tokens_per_s=float(np.median([m["tokens_per_s"] for m in steady])) if steady else None,
               median_mfu=float(np.median([m["mfu"] for m in steady])) if steady else None)
  return json_safe(dict(config=config, versions=package_versions(), table=table, icl=icl_summary,
                        ft_eval=list(ft_summary), training=train, circuits=circuits, timings_s=timings))


def _fmt(cell: dict | None, extra: str = "") -> str:
  if cell is None:
    return "–"
  return f"{cell['acc']:.3f} [{cell['lo']:.2f}, {cell['hi']:.2f}]{extra}"


def _ci(item: dict) -> str:
  if item.get("point") is None:
    return "n/a"
  lo, hi = item.get("lo"), item.get("hi")
  ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
  flag = " *" if item.get("exceeds_floor") else ""
  return f"{item['point']:.3f}{ci}{flag}"


def render_study(results: dict, figures: dict[str, str]) -> str:
  """``REPORT.md``: the comparison table, figures, circuit-shift numbers, training, config and versions."""
  cfg = results["config"]
  lines = [f"# icl_ft study: {cfg['name']}", "",
           f"Model `{cfg['model']}` ({cfg['dtype']}); tasks {cfg['tasks']}; prompt format `{cfg['format']}`; "
           f"{cfg['icl']['n']} queries per cell; shots {cfg['icl']['shots']}; fine-tuning: {cfg['ft']['method']}, "
           f"{cfg['ft']['steps']} steps x {cfg['ft']['batch_size']} examples.", ""]
  if cfg.get("note"):
    lines += [f"> {cfg['note']}", ""]
  lines += ["## ICL vs fine-tuning", "",
            "Accuracy with 95% Wilson intervals. Base and fine-tuned models are evaluated 0-shot (the paper's "
            "FT condition, last checkpoint); ICL is the paper's best of the shot counts k > 0 (the best k in parentheses). "
            "Lenient: the gold answer is a substring of the continuation (the release's rule); strict: the first "
            "answer-typed span equals the gold answer.", "",
            "| task | variant | rule | base 0-shot | fine-tuned 0-shot | ICL best of shots |",
            "|---|---|---|---|---|---|"]
  for row in results["table"]:
    for rule in ("lenient", "strict"):
      c = row[rule]
      icl = c["icl_best"]
      lines.append(f"| {row['task']} | {row['variant']} | {rule} | {_fmt(c['base_0shot'])} | {_fmt(c['ft_0shot'])} | "
                   f"{_fmt(icl, ' (k = {})'.format(icl['shots']) if icl else '')} |")
  samples = results["table"][0]["ft_samples"] if results["table"] else None
  t = results["training"]
  lines += ["", f"Fine-tuned on {samples} samples ({t['steps']} steps); loss {t['first_loss']:.3f} -> "
            f"{t['final_loss']:.3f}; median {t['median_tokens_per_s']:.0f} tokens/s, MFU {t['median_mfu']:.2f}."
            if t["steps"] else "", ""]
  for title, path in figures.items():
    if "circuit" not in title and "MLP" not in title:
      lines += [f"### {title[0].upper() + title[1:]}", "", f"![{title}]({path})", ""]
  if results["circuits"]:
    lines += ["## Circuit shift", "",
              "Denoising activation patching (corrupted run, clean activations patched in) over attention heads "
              "(layer x head, all positions) and MLPs per layer; effects are normalised patching effects. Shift "
              "from the base model's 0-shot circuit: TV = total-variation distance of normalised importance, "
              "rank = 1 - Spearman, topk = 1 - top-k overlap, centroid = layer-profile centroid shift (signed). "
              "Point [95% bootstrap CI]; * = above the 95th percentile of the resampling noise floor.", ""]
    for task, res in results["circuits"].items():
      pairs = res["pairs"]
      lines += [f"### {task}", "", "Prompt pairs (kept of tried, dropped by reason): " + "; ".join(
          f"{n}: {p['n_pairs']} of {p['n_tried']}, {p['length']} tokens, dropped {p['dropped']}"
          for n, p in pairs.items()), ""]
      conds = res["heads"]["conditions"]
      lines += ["| condition | clean-corrupt logit-diff gap | separated |", "|---|---|---|"]
      lines += [f"| {n} | {c['separation']:.3f} | {c['separated']} |" if c["separation"] is not None else
                f"| {n} | n/a | {c['separated']} |" for n, c in conds.items()]
      lines += ["", "| shift | components | TV | rank | topk | centroid |", "|---|---|---|---|---|---|"]
      for family in ("heads", "mlps"):
        for key, entry in res[family]["shifts"].items():
          if key.startswith("base|"):
            lines.append(f"| {key.replace('|', ' → ')} | {family} | " +
                         " | ".join(_ci(entry[m]) for m in ("tv", "rank", "topk", "centroid")) + " |")
      for family in ("heads", "mlps"):
        for key, entry in res[family]["contrasts"].items():
          lines.append(f"| contrast {key} (shift from base) | {family} | " +
                       " | ".join(_ci(entry[m]) for m in ("tv", "rank", "topk", "centroid")) + " |")
      att = res.get("attribution", {})
      if att:
        lines += ["", "Attribution patching vs exact (heads): " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in att.items() if not isinstance(v, (list, dict))) + "."]
      lines.append("")
      for title, path in figures.items():
        if title.startswith(f"{task}:"):
          lines += [f"![{title}]({path})", ""]
  lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {s} | {v:.0f} |" for s, v in results["timings_s"].items()]
  lines += ["", "## Config and versions", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", "",
            "| package | version |", "|---|---|"] + [f"| {k} | {v} |" for k, v in results["versions"].items()]
  return "\n".join(lines) + "\n"
