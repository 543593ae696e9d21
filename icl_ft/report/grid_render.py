"""GRID.md from grid.json (``aggregation.aggregate``): the paper's table per scoring rule (rows: models by size;
columns: task x variant; cells: base 0-shot, FT 0-shot, ICL at the best k and at the dev-chosen k), the ICL - FT
gap, the circuit-shift contrasts with their controls, and the runs left out."""

from __future__ import annotations

from typing import Sequence

from icl_ft.report.aggregation import CONDITIONS
from icl_ft.report.tables import RULES

GAP_CHOICES = {"icl_best": "ICL best", "icl_dev": "ICL dev-chosen"}


def _interval(value: float, lo: float | None, hi: float | None, signed: bool = False) -> str:
  f = "{:+.2f}" if signed else "{:.2f}"
  return f"{f.format(value)} [{f.format(lo)}, {f.format(hi)}]" if lo is not None and hi is not None else \
      f"{f.format(value)} [no interval]"


def _shots(reps: Sequence[dict]) -> str:
  ks = sorted({r["shots"] for r in reps if r.get("shots") is not None})
  return f" (k={','.join(map(str, ks))})" if ks else ""


def value_text(row: dict, key: str, signed: bool = False) -> str:
  """One run: ``0.53 [0.43, 0.62]`` (its own interval). Several data seeds: the mean with its interval (``aggregation.replicated``),
  how many, and the runs' mean half-width: ``0.55 [0.41, 0.69] (2 data seeds; runs ±0.10)``. Runs of one data
  seed: their mean and sd, no interval: ``0.55 (mean of 3 FT seeds, sd 0.02; runs ±0.10)``. A value some runs
  lack: ``— (computed in 1 of 2 runs)``."""
  reps, a = row["runs"], row.get("across")
  have = [r for r in reps if r[key] is not None]
  if len(have) < len(reps):
    return f"— (computed in {len(have)} of {len(reps)} runs)" if have else "not computed"
  widths = [r["hi"] - r["lo"] for r in reps if r["lo"] is not None and r["hi"] is not None]
  within = f"runs ±{sum(widths) / (2 * len(widths)):.2f}" if widths else "no run intervals"
  if a is None:
    return _interval(reps[0][key], reps[0]["lo"], reps[0]["hi"], signed)
  f = "{:+.2f}" if signed else "{:.2f}"
  if a["lo"] is None:
    return f"{f.format(a['mean'])} (mean of {a['n']} {a['over']}, sd {a['sd']:.2f}; {within})"
  spread = f"; FT seeds differ by up to {a['spread']:.2f}" if a["spread"] else ""
  return f"{_interval(a['mean'], a['lo'], a['hi'], signed)} ({a['n']} {a['over']}; {within}{spread})"


def _detected(row: dict) -> bool:
  """The difference's interval excludes 0: the across-seed interval where there is one, else every run's own
  interval, on the same side."""
  a = row.get("across")
  if a is not None and a["lo"] is not None:
    return a["lo"] > 0 or a["hi"] < 0
  runs = row["runs"]
  if any(r["lo"] is None or r["hi"] is None for r in runs):
    return False
  return all(r["lo"] > 0 for r in runs) or all(r["hi"] < 0 for r in runs)


def _columns(group: dict) -> list[tuple[str, str]]:
  return sorted({(r["task"], r["variant"]) for r in group["accuracy"]})


def _accuracy_table(group: dict, rule: str) -> list[str]:
  cols = _columns(group)
  rows = {(r["model"], r["task"], r["variant"], r["condition"]): r for r in group["accuracy"] if r["rule"] == rule}
  lines = [f"### Accuracy ({rule})", "",
           "| model | parameters | " + " | ".join(f"{t} / {v}" for t, v in cols) + " |",
           "|---|---:|" + "---|" * len(cols)]
  for m in group["models"]:
    cells = []
    for t, v in cols:
      parts = [f"{name}{_shots(row['runs'])}: {value_text(row, 'acc')}" for cond, name in CONDITIONS.items()
               if (row := rows.get((m["label"], t, v, cond)))]
      cells.append("<br>".join(parts) or "—")
    lines.append(f"| {m['label']} | {_params(m['params'])} | " + " | ".join(cells) + " |")
  return lines + [""]


def _params(n: int | None) -> str:
  if n is None:
    return "?"
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _gap_table(group: dict, rule: str) -> list[str]:
  cols = _columns(group)
  rows = {(r["model"], r["task"], r["variant"], r["condition"]): r for r in group["gaps"] if r["rule"] == rule}
  if not rows:
    return []
  lines = [f"### ICL − FT ({rule}), paired on the same items", "",
           "| model | " + " | ".join(f"{t} / {v}" for t, v in cols) + " |", "|---|" + "---|" * len(cols)]
  for m in group["models"]:
    cells = []
    for t, v in cols:
      parts = []
      for choice, name in GAP_CHOICES.items():
        if row := rows.get((m["label"], t, v, choice)):
          text = f"{name}{_shots(row['runs'])}: {value_text(row, 'diff', signed=True)}"
          parts.append(f"**{text}**" if _detected(row) else f"{text} n.d.")
      cells.append("<br>".join(parts) or "—")
    lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
  return lines + [""]


def _circuit_table(group: dict) -> list[str]:
  if not group["circuits"]:
    return ["No run of this group has circuit results.", ""]
  order = {m["label"]: i for i, m in enumerate(group["models"])}
  lines = ["| model | task | family | A − B | cross-fitted TV contrast | reading |", "|---|---|---|---|---|---|"]
  for row in sorted(group["circuits"], key=lambda r: (r["task"], r["family"], order[r["model"]], r["contrast"])):
    reasons = sorted({r["reason"] for r in row["runs"] if r["reason"]})
    text = value_text(row, "point", signed=True)
    a, b = row["a"], row["b"]
    point = row["across"]["mean"] if row.get("across") else row["runs"][0]["point"]
    reading = ("; ".join(reasons) if reasons else "not computed" if any(r["point"] is None for r in row["runs"]) else
               f"{a if point > 0 else b} moves the circuit more" if _detected(row) else "no difference detected")
    lines.append(f"| {row['model']} | {row['task']} | {row['family']} | {row['a']} − {row['b']} | {text} | {reading} |")
  return lines + [""]


def _left_out(grid: dict) -> list[str]:
  if not grid["unfinished"]:
    return []
  lines = ["## Runs left out (unfinished)", "", "| run | why | stages done | interrupted |", "|---|---|---|---|"]
  lines += [f"| {u['run']} | {u['reason']} | {', '.join(u['done']) or '—'} | {', '.join(u['interrupted']) or '—'} |"
            for u in grid["unfinished"]]
  return lines + [""]


def render(grid: dict, figures: dict[str, str]) -> str:
  """GRID.md: the runs left out, how to read the cells, then per group the accuracy tables (lenient, strict),
  the ICL - FT gaps, the circuit contrasts and the figures."""
  n_runs = sum(len(g["runs"]) for g in grid["groups"])
  lines = ["# Grid: in-context learning vs fine-tuning across models", "",
           f"{n_runs} finished run(s) in {len(grid['groups'])} group(s). Every number is read from a run's "
           "results.json (grid.json holds them with each run's values); nothing is recomputed.", ""]
  lines += _left_out(grid)
  lines += ["## How to read the cells", "",
            "- One run: the value with its 95% interval (accuracy: Wilson; ICL − FT: Newcombe's paired interval on "
            "the same items; circuits: the bootstrap interval of the cross-fitted TV contrast).",
            "- Several data seeds: runs are averaged within each data seed, then the mean over data seeds with a "
            "95% interval: the wider of the Student-t interval over the seeds and the runs' own intervals combined "
            "(so two seeds that happen to agree do not give a zero-width interval); `runs ±` is the runs' mean "
            "half-width (the noise one run sees). Runs of one "
            "data seed (several FT seeds) share their test items: their mean and sd are shown without an interval, "
            "and a difference counts as detected only when every run's own interval excludes 0 on the same side.",
            "- ICL best k is the best shot count on the test set (the release's, optimistic; averaged over seeds it "
            "keeps that selection bias); ICL dev-chosen k is chosen on a disjoint dev split (absent when the runs "
            "have none).",
            "- A gap or contrast is bold when its interval excludes 0; `n.d.`: no difference detected. Intervals are "
            "per comparison, not adjusted for the number of cells.", ""]
  for g in grid["groups"]:
    title = ", ".join(f"{k}={v}" for k, v in g["key"].items()) or "all runs"
    seeds = ", ".join(f"({r['seed']}, {r['ft_seed']})" for r in g["replicates"])
    lines += [f"## Group: {title}", "", f"Models (smallest first): {', '.join(m['label'] for m in g['models'])}. "
              f"Tasks: {', '.join(g['tasks'])}. (data seed, FT seed) replicates: {seeds}.", ""]
    mixtures = sorted({(m, t) for t, m in g["mixtures"].items()})
    lines += ["Fine-tuning mixtures: " + "; ".join(f"{m} (for {', '.join(t for mm, t in mixtures if mm == m)})"
                                                   for m in dict.fromkeys(m for m, _ in mixtures)) + ".", ""]
    if g["without_circuits"]:
      lines += [f"Runs without a circuit stage: {', '.join(g['without_circuits'])}.", ""]
    if g["without_gaps"]:
      lines += [f"Runs whose results.json predates the ICL − FT gaps (rerun their report stage to add them): "
                f"{', '.join(g['without_gaps'])}.", ""]
    for rule in RULES:
      lines += _accuracy_table(g, rule)
    for rule in RULES:
      lines += _gap_table(g, rule)
    lines += ["### Circuit shift: contrasts between conditions", ""] + _circuit_table(g)
  if figures:
    lines += ["## Figures", ""] + [f"![{title}]({path})" for title, path in figures.items()] + [""]
  return "\n".join(lines)
