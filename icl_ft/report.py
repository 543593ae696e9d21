"""Results: accuracy summaries with Wilson intervals, best-of-shots and dev-chosen k, plots, the study report."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from icl_ft.files import json_safe, save_figure


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion."""
  if n == 0:
    return (math.nan, math.nan)
  p = hits / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (max(0.0, centre - half), min(1.0, centre + half))


GROUP_KEYS = ("model", "method", "step", "samples", "task", "variant", "format", "split", "shots")
RULES = ("lenient", "strict")


def _sort_key(values: tuple) -> tuple:
  """Orders numbers numerically (2 before 16) and everything else as text."""
  return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
               for v in values)


def _accuracy(rs: Sequence[dict], suffix: str = "") -> dict:
  out = {}
  for rule in RULES:
    hits = sum(bool(r[f"correct_{rule}"]) for r in rs)
    lo, hi = wilson(hits, len(rs))
    out.update({f"acc_{rule}{suffix}": hits / len(rs) if rs else None, f"ci_{rule}{suffix}_lo": lo,
                f"ci_{rule}{suffix}_hi": hi})
  return out


def summarize(records: Sequence[dict], skipped: Sequence[dict] = ()) -> list[dict]:
  """Per group of ``GROUP_KEYS`` present: accuracy (lenient and strict) with 95% Wilson intervals, the mean
  first-token logit difference, the number of skipped (too long) queries, and the shortcut statistics:
  ``shortcut_breaking`` (share of items whose target cue disagrees with the gold), ``shortcut_holding`` (share
  where it agrees) and the accuracy on the shortcut-breaking items alone (``acc_*_breaking``)."""
  first = records[0] if records else skipped[0] if skipped else {}
  keys = [k for k in GROUP_KEYS if k in first]
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for r in records:
    groups[tuple(r.get(k) for k in keys)].append(r)
  n_skipped = defaultdict(int)
  for r in skipped:  # a cell whose every query was skipped still gets a row (n = 0)
    n_skipped[key := tuple(r.get(k) for k in keys)] += 1
    groups.setdefault(key, [])
  rows = []
  for key, rs in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
    row = dict(zip(keys, key), n=len(rs), n_skipped=n_skipped[key], **_accuracy(rs))
    diffs = [r["logit_diff"] for r in rs if r.get("logit_diff") is not None]
    row["mean_logit_diff"] = sum(diffs) / len(diffs) if diffs else None
    if any(r.get("shortcut_right") is not None for r in rs):
      breaking = [r for r in rs if r.get("shortcut_right") is False]
      row.update(shortcut_cue=rs[0].get("shortcut_cue"), shortcut_breaking=len(breaking) / len(rs),
                 shortcut_holding=sum(r.get("shortcut_right") is True for r in rs) / len(rs),
                 n_breaking=len(breaking), **_accuracy(breaking, "_breaking"))
    if rs and rs[0].get("cues"):
      row["cue_holding"] = cue_holding(rs)
    rows.append(row)
  return rows


def cue_holding(records: Sequence[dict]) -> dict[str, float]:
  """Per cue, the share of ``records`` on which the cue's prediction equals the gold."""
  from icl_ft import scoring, tasks
  kind = tasks.answer_kind(records[0]["task"])
  return {cue: sum(scoring.same_answer(r["cues"][cue], r["gold"], kind) for r in records) / len(records)
          for cue in records[0]["cues"]}


def _ungrouped(row: dict, drop: tuple[str, ...]) -> tuple:
  return tuple((k, row[k]) for k in GROUP_KEYS if k in row and k not in drop)


def _best_rows(rows: Sequence[dict], rule: str) -> dict[tuple, dict]:
  """Per group without ``shots``/``split``: the row with the highest accuracy under ``rule`` (ties: fewest
  shots)."""
  best: dict[tuple, dict] = {}
  for row in sorted((r for r in rows if r[f"acc_{rule}"] is not None), key=lambda r: r["shots"]):
    key = _ungrouped(row, ("shots", "split"))
    if key not in best or row[f"acc_{rule}"] > best[key][f"acc_{rule}"]:
      best[key] = row
  return best


def _icl_rows(summary: Sequence[dict], split: str) -> list[dict]:
  return [r for r in summary if r.get("shots", 0) > 0 and r.get("split", "test") == split]


def _cell_stats(row: dict) -> dict:
  return {c: row[c] for c in row if c.startswith(("acc_", "ci_")) or c in ("n", "n_skipped", "n_breaking")}


def best_of_shots(summary: Sequence[dict], rule: str = "lenient") -> list[dict]:
  """The release's ICL score: the test accuracy at the best shot count > 0, chosen on the test set itself
  (optimistic: the choice and the estimate use the same items). Ties go to the fewest shots."""
  return [dict(k, best_shots=v["shots"], **_cell_stats(v))
          for k, v in _best_rows(_icl_rows(summary, "test"), rule).items()]


def dev_chosen_shots(summary: Sequence[dict], rule: str = "lenient") -> list[dict]:
  """The unbiased ICL score: the shot count > 0 with the best accuracy on the dev split (ties: fewest shots),
  reported with its test accuracy. Empty when no dev split was evaluated."""
  test = {(_ungrouped(r, ("split",))): r for r in _icl_rows(summary, "test")}
  out = []
  for key, dev in _best_rows(_icl_rows(summary, "dev"), rule).items():
    row = test.get(_ungrouped(dev, ("split",)))
    if row is not None:
      out.append(dict(key, dev_shots=dev["shots"], dev_acc=dev[f"acc_{rule}"], dev_n=dev["n"], **_cell_stats(row)))
  return out


def plot_accuracy(summary: Sequence[dict], path, x: str = "shots", rule: str = "strict", title: str = ""):
  """Accuracy vs ``x`` ("shots": demonstrations; "samples": fine-tuning examples seen) with 95% intervals.

  One line per combination of the other grouping keys present.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
  return save_figure(fig, path)


# -- the study report -------------------------------------------------------------------------------------

def _cell(row: dict | None, rule: str, suffix: str = "") -> dict | None:
  if row is None or row.get(f"acc_{rule}{suffix}") is None:
    return None
  n = row["n_breaking"] if suffix else row["n"]
  return dict(acc=row[f"acc_{rule}{suffix}"], lo=row[f"ci_{rule}{suffix}_lo"], hi=row[f"ci_{rule}{suffix}_hi"], n=n,
              n_skipped=0 if suffix else row.get("n_skipped", 0))


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


def _find(rows: Sequence[dict], **match) -> dict | None:
  return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def study_results(config: dict, icl_summary: dict, ft_summary: Sequence[dict], metrics: Sequence[dict],
                  circuits: dict, timings: dict, report_step: int | None = None) -> dict:
  """Every number of a study run: the comparison table (per task and variant, lenient and strict: base
  0-shot, fine-tuned 0-shot at ``report_step`` (default: the last checkpoint), ICL at the best shot count on the
  test set (the release's, optimistic) and at the shot count chosen on the dev split; with the variant's
  shortcut-breaking share and skipped counts), the per-cell summaries, training statistics, circuit-shift results
  per task, timings, the config and package versions."""
  cells = [r for r in icl_summary["cells"] if r.get("split", "test") == "test"]
  steps = sorted({r["step"] for r in ft_summary if r.get("shots") == 0})
  step = report_step if report_step is not None else (steps[-1] if steps else None)
  table = []
  for task, variant in sorted({(r["task"], r["variant"]) for r in cells}):
    base = _find(cells, task=task, variant=variant, shots=0)
    ft = _find(ft_summary, task=task, variant=variant, shots=0, step=step)
    row = dict(task=task, variant=variant, ft_step=step, ft_samples=ft["samples"] if ft else None,
               shortcut_cue=base.get("shortcut_cue") if base else None,
               shortcut_breaking=base.get("shortcut_breaking") if base else None,
               cue_holding=base.get("cue_holding") if base else None,
               n_skipped=sum(r.get("n_skipped", 0) for r in cells if (r["task"], r["variant"]) == (task, variant)))
    for rule in RULES:
      best = _find(best_of_shots(icl_summary["cells"], rule), task=task, variant=variant)
      dev = _find(dev_chosen_shots(icl_summary["cells"], rule), task=task, variant=variant)
      row[rule] = dict(base_0shot=_cell(base, rule), ft_0shot=_cell(ft, rule),
                       icl_best=dict(_cell(best, rule), shots=best["best_shots"]) if best else None,
                       icl_dev=dict(_cell(dev, rule), shots=dev["dev_shots"], dev_acc=dev["dev_acc"]) if dev else None,
                       base_breaking=_cell(base, rule, "_breaking"), ft_breaking=_cell(ft, rule, "_breaking"),
                       icl_dev_breaking=_cell(dev, rule, "_breaking"))
    table.append(row)
  steady = list(metrics[1:] or metrics)  # the first step includes compilation
  train = dict(steps=len(metrics), samples=metrics[-1]["samples"] if metrics else 0,
               first_loss=metrics[0]["loss"] if metrics else None, final_loss=metrics[-1]["loss"] if metrics else None,
               median_tokens_per_s=float(np.median([m["tokens_per_s"] for m in steady])) if steady else None,
               median_mfu=float(np.median([m["mfu"] for m in steady])) if steady else None)
  return json_safe(dict(config=config, versions=package_versions(), table=table, icl=icl_summary,
                        ft_eval=list(ft_summary), ft_report_step=step, training=train, circuits=circuits,
                        timings_s=timings))


def _fmt(cell: dict | None, extra: str = "") -> str:
  if cell is None:
    return "–"
  skipped = f", {cell['n_skipped']} skipped" if cell.get("n_skipped") else ""
  return f"{cell['acc']:.3f} [{cell['lo']:.2f}, {cell['hi']:.2f}]{extra}{skipped}"


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
  if results.get("warnings"):
    lines += ["**Warnings** (the numbers below are complete; these figures are not):", ""]
    lines += [f"- {w}" for w in results["warnings"]] + [""]
  step = results.get("ft_report_step")
  lines += ["## ICL vs fine-tuning", "",
            f"Accuracy with 95% Wilson intervals. Base and fine-tuned models are evaluated 0-shot (the paper's FT "
            f"condition; the fine-tuned column is checkpoint step {step}). ICL, best k on test: the release's score, "
            "the best of the shot counts k > 0 chosen on the test items themselves (optimistic). ICL, k from dev: k "
            "chosen on a disjoint dev query set, reported on the test items (unbiased). Lenient: the gold answer is "
            "a substring of the continuation (the release's rule); strict: the first answer-typed span equals the "
            "gold answer. Shortcut broken: share of the set's items on which the variant's target cue gives a wrong "
            "answer (0 on correct sets, 1 on a fully misleading set; – where the set has no shortcut). Queries "
            "too long for the context are skipped and counted in their cell.", "",
            f"| task | variant | rule | base 0-shot | fine-tuned 0-shot (step {step}) | ICL, best k on test | "
            "ICL, k from dev | shortcut broken |",
            "|---|---|---|---|---|---|---|---|"]
  for row in results["table"]:
    broken = "–" if row.get("shortcut_breaking") is None else f"{row['shortcut_breaking']:.2f} ({row['shortcut_cue']})"
    for rule in RULES:
      c = row[rule]
      icl, dev = c["icl_best"], c.get("icl_dev")
      lines.append(f"| {row['task']} | {row['variant']} | {rule} | {_fmt(c['base_0shot'])} | {_fmt(c['ft_0shot'])} | "
                   f"{_fmt(icl, ' (k = {})'.format(icl['shots']) if icl else '')} | "
                   f"{_fmt(dev, ' (k = {})'.format(dev['shots']) if dev else '')} | {broken} |")
  mis = [row for row in results["table"] if row["variant"] != "correct" and row.get("shortcut_breaking")]
  if mis:
    lines += ["", "On the shortcut-breaking items alone (the items of each misleading set where the target cue is "
              "wrong; strict rule, n in parentheses), and the share of the set each cue gets right (a cue right on "
              "every item answers the set without the pattern):", "",
              "| task | variant | target cue | cues right on the set | base 0-shot | fine-tuned 0-shot | ICL, k from dev |",
              "|---|---|---|---|---|---|---|"]
    for row in mis:
      c = row["strict"]
      held = ", ".join(f"{k} {v:.2f}" for k, v in (row.get("cue_holding") or {}).items())
      lines.append(f"| {row['task']} | {row['variant']} | {row['shortcut_cue']} | {held} | " + " | ".join(
          _fmt(c.get(k), f" (n = {c[k]['n']})" if c.get(k) else "") for k in ("base_breaking", "ft_breaking",
                                                                             "icl_dev_breaking")) + " |")
  t = results["training"]
  lines += ["", f"Fine-tuned for {t['steps']} steps ({t['samples']} samples); loss {t['first_loss']:.3f} -> "
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
              "Point [95% bootstrap CI]; * = above the 95th percentile of the resampling noise floor. The "
              f"fine-tuned condition (ft) is checkpoint step {step}, the same as the table's.", ""]
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
