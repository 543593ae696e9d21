"""Accuracy tables: per-cell summaries with Wilson intervals and shortcut statistics, the release's best of shots
and the dev-chosen k, and ``study_results`` (every number of a study run)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from icl_ft import tasks
from icl_ft.io import files
from icl_ft.io.files import json_safe
from icl_ft.stats.proportions import wilson


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
  rows_in = (*records, *skipped)
  keys = [k for k in GROUP_KEYS if any(r.get(k) is not None for r in rows_in)]  # (e.g. no "step" for ICL)
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
  kind = tasks.answer_kind(records[0]["task"])
  return {cue: sum(tasks.same_answer(r["cues"][cue], r["gold"], kind) for r in records) / len(records)
          for cue in records[0]["cues"]}


def ft_data_cues(task_names: Sequence[str], n: int, seed: int, fmt: str) -> dict[str, dict[str, float]]:
  """Per task of a fine-tuning mixture, ``cue_holding`` on its training examples (as ``dataset.build`` draws
  them): whether the data shows the implicit pattern at all, and how often."""
  return {t: cue_holding([dict(task=t, gold=ex.answer, cues=tasks.get_task(t).cue_predictions(ex))
                          for ex in tasks.make_ft_examples(t, n, seed, fmt)]) for t in task_names}


def formats(config: dict, circuit_formats: dict[str, str]) -> dict:
  """The prompt format of every condition's inputs, and the comparisons that cross formats."""
  study = config["format"]
  crossing = {t: f for t, f in circuit_formats.items() if f != study}
  return dict(icl=study, ft_data=study, ft_eval=study, circuits=circuit_formats,
              warnings=[f"circuits on {t} use format {f!r}, the ICL and fine-tuning conditions {study!r}: the "
                        "circuit comparison crosses formats (circuits.format)" for t, f in crossing.items()])


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
  """The ICL cells (k > 0 real demos; not the controls, ``icl-<control>``) of ``split``."""
  return [r for r in summary if r.get("shots", 0) > 0 and not str(r.get("method", "")).startswith("icl-")
          and r.get("split", "test") == split]


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


def _training(metrics: Sequence[dict], fewshot_metrics: Sequence[dict], ft_cues: dict | None,
              heldout: dict[str, list[dict]] | None) -> dict:
  """Training statistics: steps, samples, first and last loss, median real tokens/s and MFU (the first step,
  which compiles, left out), the few-shot control's losses, the data's cue shares and the held-out losses."""
  steady = list(metrics[1:] or metrics)  # the first step includes compilation
  train = dict(steps=len(metrics), samples=metrics[-1]["samples"] if metrics else 0,
               first_loss=metrics[0]["loss"] if metrics else None, final_loss=metrics[-1]["loss"] if metrics else None,
               median_tokens_per_s=float(np.median([m["tokens_per_s"] for m in steady])) if steady else None,
               median_mfu=float(np.median([m["mfu"] for m in steady])) if steady else None,
               fewshot=dict(steps=len(fewshot_metrics), first_loss=fewshot_metrics[0]["loss"],
                            final_loss=fewshot_metrics[-1]["loss"]) if fewshot_metrics else None)
  train.update(data_cues=ft_cues, heldout=heldout or {})
  return train


def study_results(config: dict, icl_summary: dict, ft_summary: Sequence[dict], metrics: Sequence[dict],
                  circuits: dict, timings: dict, report_step: int | None = None,
                  fewshot_metrics: Sequence[dict] = (), ft_cues: dict | None = None,
                  cue_analysis: Sequence[dict] = (), differences: Sequence[dict] = (),
                  heldout: dict[str, list[dict]] | None = None) -> dict:
  """Every number of a study run: the comparison table (per task and variant, lenient and strict: base
  0-shot, fine-tuned 0-shot at ``report_step`` (default: the last checkpoint), ICL at the best shot count on the
  test set (the release's, optimistic) and at the shot count chosen on the dev split, the controls (ICL with
  shuffled labels / irrelevant demos next to real demos at the same k, few-shot FT on one prompt's demos); the
  shortcut-breaking share and skipped counts), the per-cell summaries, the cue analysis of every condition
  (``cues.analyse``) and its accuracy difference from the base model (``cues.differences_from_base``), training
  statistics (with the held-out loss per saved step), circuit-shift results per task,
  timings, the config and package versions."""
  cells = [r for r in icl_summary["cells"] if r.get("split", "test") == "test"]
  steps = sorted({r["step"] for r in ft_summary if r.get("shots") == 0 and r.get("method") == "ft"})
  step = report_step if report_step is not None else (steps[-1] if steps else None)
  table = []
  for task, variant in sorted({(r["task"], r["variant"]) for r in cells}):
    base = _find(cells, task=task, variant=variant, shots=0)
    ft = _find(ft_summary, task=task, variant=variant, shots=0, step=step, method="ft")
    fewshot = _find(ft_summary, task=task, variant=variant, shots=0, method="ft-fewshot")
    controls = {r["method"]: r for r in cells if (r["task"], r["variant"]) == (task, variant)
                and r["method"].startswith("icl-")}  # the ICL controls, at their k
    controls.update({f"icl{r['shots']}": _find(cells, task=task, variant=variant, method="icl", shots=r["shots"])
                     for r in list(controls.values())})  # and the real demos at the same k
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
                       icl_dev_breaking=_cell(dev, rule, "_breaking"), ft_fewshot=_cell(fewshot, rule),
                       controls={m: _cell(r, rule) for m, r in controls.items()})
    table.append(row)
  train = _training(metrics, fewshot_metrics, ft_cues, heldout)
  circuit_formats = {t: c["config"]["fmt"] for t, c in circuits.items()}
  return json_safe(dict(config=config, versions=package_versions(), formats=formats(config, circuit_formats),
                        table=table, cues=list(cue_analysis),
                        differences=list(differences), icl=icl_summary,
                        ft_eval=list(ft_summary), ft_report_step=step, training=train, circuits=circuits,
                        timings_s=timings))


