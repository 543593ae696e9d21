"""Aggregation of finished study runs into the paper's grid (``python -m icl_ft.aggregate``): every number comes
from a run's ``results.json``, per model (ordered by parameter count), task, variant, scoring rule and condition,
with each run's own interval and, where data seeds replicate a cell, their mean with an interval (``replicated``).

Runs may differ in their model, dtype, tasks, data seed and fine-tuning seed, and in how they were executed
(``EXECUTION_KEYS``: mesh, batch sizes, remat, prefix sharing); any other differing config key is refused by name, unless the
runs are split into groups by it (``group_by``). A task's numbers must come from one fine-tuning mixture in a
group (the study's tasks decide it when ``ft.tasks`` is empty). Runs that have not finished (no results.json, or
one older than a stage's latest results) are listed with what they lack, never silently dropped.

Replicates (``replicated``): runs are averaged within each data seed and the interval is taken over data seeds;
runs that share one data seed (different FT seeds) share their test items, so their spread is reported but never
taken for an interval.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Iterable, Sequence

from etils import epath

from icl_ft.io import files, loading, records
from icl_ft.report.circuit_report import split_contrast
from icl_ft.report.tables import RULES
from icl_ft.stats.replicates import across

IDENTITY_KEYS = ("model", "dtype", "tasks", "seed", "ft.seed")  # what a grid varies: rows, columns, replicates
EXECUTION_KEYS = ("name", "workdir", "note", "progress", "overwrite", "stages", "mesh.data", "mesh.fsdp",
                  "mesh.tensor", "icl.batch_size", "icl.share_prefix", "ft.grad_accum", "ft.remat", "ft.unroll_layers",
                  "circuits.chunk")
CONDITIONS = {"base_0shot": "base 0-shot", "ft_0shot": "FT 0-shot", "icl_best": "ICL best",
              "icl_dev": "ICL dev-chosen"}
TUNED = ("ft_0shot",)  # conditions that involve fine-tuning
STAGES = ("data", "icl", "finetune", "ft_eval", "circuits", "report")


class GridError(ValueError):
  """The runs cannot be aggregated as given; the message says which runs and keys, and what to do."""


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run: where it is, its results and the identity keys of its config."""
  path: str
  results: dict
  data_version: Any = None

  @property
  def config(self) -> dict:
    return self.results["config"]

  @property
  def model(self) -> tuple[str, str]:
    return str(self.config["model"]), str(self.config["dtype"])

  @property
  def params(self) -> int | None:
    """The parameter count results.json records (older runs: the model's config, where it can be read here)."""
    recorded = self.results.get("model") or loading.model_facts(*self.model)
    return recorded.get("params")

  @property
  def replicate(self) -> tuple[int, int]:
    return int(self.config["seed"]), int(self.config["ft"]["seed"])

  @property
  def mixture(self) -> tuple[str, ...]:
    """The fine-tuning mixture: ``ft.tasks``, or the study's tasks when it is empty."""
    spec = self.config["ft"].get("tasks") or self.config["tasks"]
    return tuple(sorted(t.strip() for t in str(spec).split(",") if t.strip()))

  @property
  def tasks(self) -> list[str]:
    """Every task the run has numbers for: its table's and its circuits'."""
    return sorted({row["task"] for row in self.results["table"]} | set(self.results.get("circuits") or {}))


def _stage_state(root: epath.Path) -> dict[str, list[str]]:
  done = [s for s in STAGES if (root / s / "DONE.json").exists()]
  started = [s for s in STAGES if s not in done and (root / s / "STARTED.json").exists()]
  return dict(done=done, interrupted=started, not_started=[s for s in STAGES if s not in done + started])


def _stale(root: epath.Path) -> list[str]:
  """The stages the report read whose results have been recomputed since (another fingerprint, or other files
  than it recorded), or are gone."""
  upstream = records.read_stage(root / "report" / "DONE.json")["upstream"]
  out = []
  for stage, up in upstream.items():
    path = root / stage / "DONE.json"
    rec = records.read_stage(path) if path.exists() else None
    if rec is None or up != {"fingerprint": rec["fingerprint"], "files": records.files_digest(rec["files"])}:
      out.append(stage)
  return out


def read_run(path: str) -> Run | dict:
  """The run in directory ``path`` (or of its ``results.json``), or a dict saying why it is not finished."""
  root = files.as_path(path)
  if root.name == "results.json":
    root = root.parent
  if not root.is_dir():
    return dict(run=str(root), reason="no such directory", done=[], interrupted=[], not_started=list(STAGES))
  state = _stage_state(root)
  if not (root / "results.json").exists() or "report" not in state["done"]:
    return dict(run=str(root), reason="no results.json: the report stage has not finished", **state)
  try:
    stale = _stale(root)
    results = files.read_json(root / "results.json")
    icl = records.read_stage(root / "icl" / "DONE.json") if "icl" in state["done"] else {}
  except (OSError, ValueError, KeyError, TypeError) as e:
    return dict(run=str(root), reason=f"results.json or a stage record cannot be read ({e})", **state)
  missing = [k for k in ("config", "table") if not isinstance(results, dict) or k not in results]
  if missing:
    return dict(run=str(root), reason=f"results.json lacks {', '.join(missing)}: not a study's results", **state)
  if stale:
    return dict(run=str(root), reason=f"results.json predates the latest results of stage(s) {', '.join(stale)}: "
                "rerun its study (the report stage reruns)", **state)
  return Run(str(root), results, (icl.get("inputs") or {}).get("data_version"))


def expand(patterns: Iterable[str]) -> list[str]:
  """Run directories from paths and globs, in order, each once (a glob keeps directories and results.json files;
  one matching nothing is an error naming it)."""
  out: list[str] = []
  for pattern in patterns:
    if not any(ch in pattern for ch in "*?["):
      out.append(pattern)
      continue
    parent, _, _ = pattern[:min(pattern.index(ch) for ch in "*?[" if ch in pattern)].rpartition("/")
    found = files.as_path(parent or ".").glob(pattern[len(parent) + 1:] if parent else pattern)
    matched = sorted(str(p) for p in found if p.is_dir() or p.name == "results.json")
    if not matched:
      raise GridError(f"--runs pattern {pattern!r} matches no directory")
    out += matched
  return list(dict.fromkeys(out))


def _settings(run: Run) -> dict[str, Any]:
  """The run's config keys that must agree within a group (all but identity and execution keys), with the version
  of the query generators it ran."""
  skip = set(IDENTITY_KEYS) | set(EXECUTION_KEYS) | {"ft.tasks", "circuits.tasks", "circuits.enabled"}
  flat = records.without_later_defaults(files.flat(run.config))  # a run from before a setting existed = its default
  return dict({k: v for k, v in flat.items() if k not in skip}, data_version=run.data_version)


def group(runs: Sequence[Run], group_by: Sequence[str] = ()) -> list[tuple[dict, list[Run]]]:
  """The runs split by the values of ``group_by`` keys, each group checked (``_check_group``). Raises
  ``GridError`` naming what differs."""
  groups: dict[tuple, list[Run]] = collections.defaultdict(list)
  for run in runs:
    settings = files.flat(run.config)
    unknown = [k for k in group_by if k not in settings]
    if unknown:
      raise GridError(f"--group_by key(s) {unknown} are not config keys of {run.path}; keys look like "
                      f"'ft.lr' or 'icl.n'")
    groups[tuple(str(settings[k]) for k in group_by)].append(run)
  for members in groups.values():
    _check_group(members, group_by)
  return [(dict(zip(group_by, key)), members) for key, members in sorted(groups.items())]


def _check_group(runs: Sequence[Run], group_by: Sequence[str]) -> None:
  """No setting differs, each task's numbers come from one fine-tuning mixture, and no (model, dtype, task, seed,
  FT seed) is measured twice."""
  values: dict[str, dict[str, Any]] = collections.defaultdict(dict)
  for run in runs:
    for k, v in _settings(run).items():
      values[k][run.path] = v
  differing = {k: by_run for k, by_run in values.items() if k not in group_by and (
      len(by_run) < len(runs) or len({repr(v) for v in by_run.values()}) > 1)}
  if differing:
    lines = [f"  {k}: " + ", ".join(f"{r.path} = {by_run.get(r.path, '(absent)')!r}" for r in runs)
             for k, by_run in sorted(differing.items())]
    raise GridError("the runs differ in config keys other than model, dtype, tasks and seeds:\n" + "\n".join(lines[:20])
                    + f"\nAggregate them separately, or split them into groups with --group_by="
                    f"{','.join(sorted(differing)[:3])}. Nothing was written.")
  mixtures: dict[str, dict[tuple, str]] = collections.defaultdict(dict)
  seen: dict[tuple, str] = {}
  for run in runs:
    for task in run.tasks:
      mixtures[task].setdefault(run.mixture, run.path)
      key = (*run.model, task, *run.replicate)
      if key in seen:
        raise GridError(f"{seen[key]} and {run.path} both measure {key[0]} ({key[1]}) on {task} with seed "
                        f"{key[3]} and FT seed {key[4]}: leave one out. Nothing was written.")
      seen[key] = run.path
  for task, by_mixture in mixtures.items():
    if len(by_mixture) > 1:
      raise GridError(f"{task}'s numbers come from models fine-tuned on different mixtures: " + "; ".join(
          f"{'+'.join(m)} ({path})" for m, path in by_mixture.items()) + ". Aggregate them separately (or set "
          "ft.tasks so every run trains on one mixture). Nothing was written.")


# -- numbers ------------------------------------------------------------------------------------------------------

def _models(runs: Sequence[Run]) -> list[dict]:
  """One row per (model, dtype), smallest first (models of unknown size last); labelled with the dtype only when
  the runs have several."""
  dtypes = {r.model[1] for r in runs}
  params = {r.model: r.params for r in runs}
  keys = sorted(params, key=lambda m: (params[m] is None, params[m] or 0, m))
  return [dict(model=m, dtype=d, params=params[(m, d)], label=m if len(dtypes) == 1 else f"{m} ({d})")
          for m, d in keys]


def _replicate(run: Run, **numbers) -> dict:
  seed, ft_seed = run.replicate
  return dict(run=run.path, seed=seed, ft_seed=ft_seed, **numbers)


def replicated(reps: Sequence[dict], key: str, tuned: bool, bounds: tuple[float, float]) -> dict | None:
  """The across-seed statistics of one cell's runs; None for one run or when a run lacks the value.

  Runs are averaged within each data seed (``spread``: the largest range within one; 0 for base and ICL, which
  do not depend on the FT seed). Two or more data seeds: the mean over them and, as ``lo``/``hi``, the wider of
  its Student-t interval (``t_lo``/``t_hi``) and the runs' own intervals combined side by side (``floor_lo`` /
  ``floor_hi``: the root sum of squared distances from each run's value to its bound, over the number of seeds;
  a Wilson interval at 0/n keeps its upper side), so seeds that happen to agree never give a zero-width
  interval (``over`` "data seeds"). One data seed: the mean and sd over its runs, descriptive only (None bounds):
  the runs share their test items, so their spread says nothing about item sampling (``over`` "FT seeds", or
  "runs" for a number that does not involve fine-tuning)."""
  by_seed: dict[int, list[dict]] = collections.defaultdict(list)
  for r in reps:
    if r[key] is None:
      return None
    by_seed[r["seed"]].append(r)
  mean = lambda xs: sum(xs) / len(xs)
  spread = max(max(r[key] for r in rs) - min(r[key] for r in rs) for rs in by_seed.values())
  if len(by_seed) > 1:
    a = across([mean([r[key] for r in rs]) for rs in by_seed.values()])
    known = [rs for rs in by_seed.values() if all(r["lo"] is not None and r["hi"] is not None for r in rs)]
    combine = lambda side: math.sqrt(sum(mean([side(r) for r in rs]) ** 2 for rs in known)) / len(by_seed)
    below, above = combine(lambda r: r[key] - r["lo"]), combine(lambda r: r["hi"] - r[key])  # each side's own
    lo, hi = max(bounds[0], min(a["lo"], a["mean"] - below)), min(bounds[1], max(a["hi"], a["mean"] + above))
    return dict(a, lo=lo, hi=hi, t_lo=a["lo"], t_hi=a["hi"], floor_lo=below, floor_hi=above, over="data seeds",
                spread=spread)
  values = [r[key] for r in next(iter(by_seed.values()))]
  a = across(values)
  return dict(a, lo=None, hi=None, over="FT seeds" if tuned else "runs", spread=spread) if a else None


def _rows(cells: dict[tuple, list[dict]], names: Sequence[str], key: str, tuned, bounds) -> list[dict]:
  return [dict(zip(names, k), runs=reps, across=replicated(reps, key, tuned(k), bounds)) for k, reps in cells.items()]


def _accuracy_rows(runs: Sequence[Run], label: dict) -> list[dict]:
  """Per model, task, variant, rule and condition: each run's accuracy with its Wilson interval (and k for ICL)."""
  cells: dict[tuple, list[dict]] = collections.defaultdict(list)
  for run in runs:
    for row in run.results["table"]:
      for rule in RULES:
        for cond in CONDITIONS:
          c = row[rule].get(cond)
          if c and c.get("acc") is not None:
            cells[(label[run.model], row["task"], row["variant"], rule, cond)].append(_replicate(
                run, acc=c["acc"], lo=c["lo"], hi=c["hi"], n=c["n"], shots=c.get("shots")))
  return _rows(cells, ("model", "task", "variant", "rule", "condition"), "acc", lambda k: k[4] in TUNED, (0.0, 1.0))


def _gap_rows(runs: Sequence[Run], label: dict) -> list[dict]:
  """Per model, task, variant, rule and ICL choice (best k on test / k chosen on dev): ICL minus FT, paired on
  the same items (``cues.icl_minus_ft``), at the run's chosen k."""
  cells: dict[tuple, list[dict]] = collections.defaultdict(list)
  for run in runs:
    gaps = {(g["task"], g["variant"], g["rule"], g["shots"]): g for g in run.results.get("gaps") or []}
    for row in run.results["table"]:
      for rule in RULES:
        for choice in ("icl_best", "icl_dev"):
          cell = row[rule].get(choice)
          g = gaps.get((row["task"], row["variant"], rule, cell["shots"])) if cell else None
          if g:
            cells[(label[run.model], row["task"], row["variant"], rule, choice)].append(_replicate(
                run, diff=g["diff"], lo=g["lo"], hi=g["hi"], n=g["n"], shots=g["shots"], detected=g["detected"]))
  return _rows(cells, ("model", "task", "variant", "rule", "condition"), "diff", lambda k: True, (-1.0, 1.0))


def _circuit_rows(runs: Sequence[Run], label: dict) -> list[dict]:
  """Per model, task, component family and contrast: the cross-fitted TV contrast (the tested number) with its
  interval, or why there is none (a condition without a circuit)."""
  cells: dict[tuple, list[dict]] = collections.defaultdict(list)
  sides: dict[str, tuple[str, str]] = {}
  for run in runs:
    for task, res in (run.results.get("circuits") or {}).items():
      for family in ("heads", "mlps"):
        for key, c in res[family]["contrasts"].items():
          sides[key] = split_contrast(key, res[family]["conditions"])
          tv = c["tv"]
          cf = tv.get("corrected") or {}
          cells[(label[run.model], task, family, key)].append(_replicate(
              run, point=cf.get("point"), lo=cf.get("lo"), hi=cf.get("hi"), excludes_zero=cf.get("excludes_zero"),
              raw=tv.get("point"), reason=tv.get("reason")))
  rows = _rows(cells, ("model", "task", "family", "contrast"), "point",
               lambda k: any(s.startswith("ft") for s in sides[k[3]]), (-1.0, 1.0))
  return [dict(r, a=sides[r["contrast"]][0], b=sides[r["contrast"]][1]) for r in rows]


def aggregate(runs: Sequence[Run], unfinished: Sequence[dict] = (), group_by: Sequence[str] = ()) -> dict:
  """Every number of the grid (grid.json): per group, its models (by size), the accuracy, gap and circuit rows
  with each run's values and the across-seed statistics; the runs that are unfinished or lack a stage."""
  out = []
  for key, members in group(runs, group_by):
    models = _models(members)
    label = {(m["model"], m["dtype"]): m["label"] for m in models}
    out.append(dict(key=key, models=models, runs=[r.path for r in members],
                    tasks=sorted({t for r in members for t in r.tasks}),
                    replicates=[dict(seed=s, ft_seed=f) for s, f in sorted({r.replicate for r in members})],
                    mixtures={t: "+".join(r.mixture) for r in members for t in r.tasks},
                    settings=_settings(members[0]),
                    accuracy=_accuracy_rows(members, label), gaps=_gap_rows(members, label),
                    circuits=_circuit_rows(members, label),
                    without_circuits=[r.path for r in members if not r.results.get("circuits")],
                    without_gaps=[r.path for r in members if "gaps" not in r.results]))
  return dict(groups=out, unfinished=list(unfinished))
