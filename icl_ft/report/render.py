"""``REPORT.md``: the comparison table, the shortcut-breaking items, figures, circuit shifts, training, timings,
config and versions, rendered from ``results.json``'s numbers."""

from __future__ import annotations

import json

from icl_ft.report import circuit_report, cues
from icl_ft.report.tables import RULES


def _fmt(cell: dict | None, extra: str = "") -> str:
  if cell is None:
    return "–"
  skipped = f", {cell['n_skipped']} skipped" if cell.get("n_skipped") else ""
  return f"{cell['acc']:.3f} [{cell['lo']:.2f}, {cell['hi']:.2f}]{extra}{skipped}"


def render_study(results: dict, figures: dict[str, str], circuit_figures: dict[str, dict[str, str]]) -> str:
  """``REPORT.md`` from ``results.json``'s numbers: header and warnings, the comparison table, the
  shortcut-breaking items, training, the accuracy figures (title -> path), per task the circuit shift (with its
  figures, name -> path), timings, config and versions."""
  lines = _header(results) + _headline(results) + _comparison(results) + _controls(results) + _breaking(results) + _training(results)
  for title, path in figures.items():
    lines += [f"### {title[0].upper() + title[1:]}", "", f"![{title}]({path})", ""]
  if results["circuits"]:
    lines += circuit_report.intro(results.get("ft_report_step"))
    for task, res in results["circuits"].items():
      lines += circuit_report.task_section(task, res, circuit_figures.get(task, {}))
  return "\n".join(lines + _footer(results)) + "\n"


def _demos(icl: dict) -> str:
  """How the demonstrations of different k relate."""
  if icl.get("nested_demos"):
    return ("Demonstrations: nested (a query's k-shot demos are the first k of one list per query; the few-shot FT "
            "comparison trains on the first query's), so the differences across k are paired on the demos as well as "
            "the items. The circuits' prompt pairs use one k and keep per-k draws.")
  return ("Demonstrations: drawn independently for each k (the release's method); the differences across k are "
          "paired on the items, not on the demos.")


def _header(results: dict) -> list[str]:
  cfg = results["config"]
  lines = [f"# icl_ft study: {cfg['name']}", "",
           f"Model `{cfg['model']}` ({cfg['dtype']}); tasks {cfg['tasks']}; prompt format `{cfg['format']}`; "
           f"{cfg['icl']['n']} queries per cell{_cell_sizes(cfg['icl'])}; shots {cfg['icl']['shots']}; fine-tuning: {cfg['ft']['method']}, "
           f"{cfg['ft']['steps']} steps x {cfg['ft']['batch_size']} examples.", "", _demos(cfg['icl']), ""]
  if cfg.get("note"):
    lines += [f"> {cfg['note']}", ""]
  if results.get("warnings"):
    lines += ["**Warnings** (the numbers below are complete; these figures are not):", ""]
    lines += [f"- {w}" for w in results["warnings"]] + [""]
  return lines


def _cell_sizes(icl: dict) -> str:
  return f" ({icl['n_by_shots']} shots:queries)" if icl.get("n_by_shots") else ""


def _headline(results: dict) -> list[str]:
  """Per task and condition: the rule its answers follow, each rule's agreement, accuracy where the rules
  conflict, and per variant the accuracy difference from the base model."""
  rows = results.get("cues") or []
  if not rows:
    return []
  lines = ["## Headline: which rule do the answers follow?", "",
           "Per condition, all variants pooled, the model's answers (strict parse) against each rule: the gold "
           "answer (the pattern), each shortcut cue of the task, and the condition's most frequent answer "
           "(constant). A condition *follows* a rule when, against every rule it can be told apart from, the "
           "share of the items where the two disagree that it answers that rule's way (answers matching neither "
           "count against both) has its 95% Wilson interval above 0.5; rules disputed on too few items to decide "
           "are named as not told apart. Agreement: share of the items a rule predicts whose answer equals its "
           "prediction. Conflict accuracy: accuracy on the items where the rules (gold and cues) do not all "
           "agree, next to what the modal answer alone would score there. Difference from base: accuracy minus "
           "the base model's 0-shot accuracy on the same items (strict rule), Newcombe's paired 95% interval, "
           "bold where it excludes 0. Every interval is per comparison, not adjusted for the number of cells.",
           ""]
  diffs = results.get("differences") or []
  for task in dict.fromkeys(r["task"] for r in rows):
    mine = [r for r in rows if r["task"] == task]
    rules = list(dict.fromkeys(rule for r in mine for rule in r["agreement"]))
    variants = sorted({d["variant"] for d in diffs if d["task"] == task})
    lines += [f"### {task}", "", "| condition | n | answers follow | " + " | ".join(f"agree: {r}" for r in rules)
              + " | conflict accuracy (modal answer alone) | " + "".join(f"vs base: {v} | " for v in variants),
              "|---" * (4 + len(rules) + len(variants)) + "|"]
    for r in mine:
      agree = [_share(r["agreement"].get(rule)) for rule in rules]
      vs = [next((cues.difference_text(d) for d in diffs if d["task"] == task and d["condition"] == r["condition"]
                  and d["variant"] == v), "–") for v in variants]
      lines.append(f"| {r['condition']} | {r['n']} | {cues.verdict_text(r)} | " + " | ".join(agree)
                   + f" | {_share(r['conflict'])} ({_share(r['conflict_modal'])}; n = {r['conflict']['n']}) | "
                   + "".join(f"{v} | " for v in vs))
    lines.append("")
  return lines


def _share(c: dict | None) -> str:
  return "–" if not c or not c["n"] else f"{c['share']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}]"


def _comparison(results: dict) -> list[str]:
  step = results.get("ft_report_step")
  lines = ["## ICL vs fine-tuning", "",
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
  return lines


def _controls(results: dict) -> list[str]:
  """The ICL controls next to real demos at the same k, and few-shot FT on one prompt's demos (strict rule)."""
  rows = [r for r in results["table"] if r["strict"].get("controls") or r["strict"].get("ft_fewshot")]
  if not rows:
    return []
  names = sorted({m for r in rows for m in r["strict"].get("controls", {})}, key=lambda m: (m.startswith("icl-"), m))
  cfg = results["config"]
  lines = ["", f"Controls (strict rule): ICL with {cfg['icl']['control_shots']} real demos next to the same number "
           "with their labels shuffled among them (Min et al., 2022) and another task's demos of the same token "
           f"length; few-shot FT: the first query's {cfg['ft']['fewshot_k']} ICL demos per task, fine-tuned on "
           f"for {cfg['ft']['fewshot_steps']} steps{_fewshot_loss(results)}, then 0-shot (Mosbach et al., 2023).", "",
           "| task | variant | " + " | ".join(_control_name(m) for m in names) + " | few-shot FT 0-shot | "
           "fine-tuned 0-shot |",
           "|---|---|" + "---|" * (len(names) + 2)]
  for r in rows:
    c = r["strict"]
    lines.append(f"| {r['task']} | {r['variant']} | " + " | ".join(_fmt(c.get("controls", {}).get(m)) for m in names)
                 + f" | {_fmt(c.get('ft_fewshot'))} | {_fmt(c['ft_0shot'])} |")
  return lines


def _control_name(method: str) -> str:
  return {"icl-shuffled": "ICL, shuffled labels", "icl-irrelevant": "ICL, irrelevant demos"}.get(
      method, f"ICL, {method.removeprefix('icl')} real demos")


def _fewshot_loss(results: dict) -> str:
  f = results["training"].get("fewshot")
  return f" (training loss {f['first_loss']:.3f} -> {f['final_loss']:.3f})" if f else ""


def _breaking(results: dict) -> list[str]:
  mis = [row for row in results["table"] if row["variant"] != "correct" and row.get("shortcut_breaking")]
  if not mis:
    return []
  lines = ["", "On the shortcut-breaking items alone (the items of each misleading set where the target cue is "
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
  return lines


def _training(results: dict) -> list[str]:
  t, f = results["training"], results.get("formats") or {}
  lines = ["", f"Fine-tuned for {t['steps']} steps ({t['samples']} samples); loss {t['first_loss']:.3f} -> "
           f"{t['final_loss']:.3f}; median {t['median_tokens_per_s']:.0f} tokens/s, MFU {t['median_mfu']:.2f}."
           if t["steps"] else ""]
  for name, rows in (t.get("heldout") or {}).items():
    label = {"ft": "fine-tuning", "ft-fewshot": "few-shot fine-tuning"}.get(name, name)
    lines += ["", f"Held-out loss of {label} ({results['config']['ft']['n_heldout']} unseen examples per task, per "
              "scored token as trained / on the answer tokens alone), by step: " + ", ".join(
                  f"{h['step']}: {h['loss']:.3f} / {h['answer_loss']:.3f}" for h in rows) + "."]
  if t.get("data_cues"):
    lines += ["", "The fine-tuning data's patterns: per task, the share of its training examples each cue answers "
              "right (0: the data never shows that pattern): " + "; ".join(
                  f"{task}: " + ", ".join(f"{c} {v:.2f}" for c, v in cues.items())
                  for task, cues in t["data_cues"].items()) + "."]
  if f:
    circuits = ", ".join(f"{task} `{fmt}`" for task, fmt in f["circuits"].items()) or "none"
    lines += ["", f"Prompt formats: ICL demos and queries `{f['icl']}`, fine-tuning data `{f['ft_data']}`, fine-tuned "
              f"evaluation `{f['ft_eval']}`, circuit prompt pairs: {circuits}."]
  return lines + [""]


def _footer(results: dict) -> list[str]:
  lines = ["## Timings", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {s} | {v:.0f} |" for s, v in results["timings_s"].items()]
  return lines + ["", "## Config and versions", "", "```json", json.dumps(results["config"], indent=2, sort_keys=True),
                  "```", "", "| package | version |", "|---|---|"] + [
                      f"| {k} | {v} |" for k, v in results["versions"].items()]
