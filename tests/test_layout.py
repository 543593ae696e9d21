"""The package layout: imports flow one way, the study layer stays small, long functions say why, and adding a
task is one module plus one registry line (a toy task runs through the ICL stage and the report)."""

import ast
import pathlib
import random

import pytest

from icl_ft import study, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1] / "icl_ft"
# Lower layers never import higher ones: model -> io/tasks/stats -> evaluation/training -> interp -> report -> study.
LAYERS = {"faults": 0, "model": 0, "io": 1, "tasks": 1, "stats": 1, "evaluation": 2, "training": 2, "interp": 3,
          "report": 4, "study": 5, "main": 6, "bench": 6, "icl": 6, "grid": 6, "aggregate": 6, "__init__": 6}


def _modules():
  for path in sorted(ROOT.rglob("*.py")):
    rel = path.relative_to(ROOT)
    yield path, rel.parts[0].removesuffix(".py"), ast.parse(path.read_text())


def _imported_units(tree):
  """The top-level icl_ft units (packages or modules) a module imports, anywhere in it."""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "icl_ft":
      parts = node.module.split(".")
      yield from ([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    elif isinstance(node, ast.Import):
      yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("icl_ft."))


def test_imports_flow_one_way():
  wrong = [f"{path.relative_to(ROOT)} ({unit}, layer {LAYERS[unit]}) imports {target} (layer {LAYERS[target]})"
           for path, unit, tree in _modules() for target in _imported_units(tree) if LAYERS[target] > LAYERS[unit]]
  assert not wrong, wrong
  # and units of one layer never import each other both ways
  edges = {(unit, target) for _, unit, tree in _modules() for target in _imported_units(tree) if target != unit}
  assert not [(a, b) for a, b in edges if (b, a) in edges]


def test_study_modules_are_small_and_long_functions_say_why():
  assert all(len(p.read_text().splitlines()) <= 300 for p in (ROOT / "study").glob("*.py"))
  long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
          for path, _, tree in _modules() for node in ast.walk(tree)
          if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 50
          and "Long:" not in (ast.get_docstring(node) or "")]
  assert not long, long


def test_no_task_names_outside_tasks():
  names = [f'{q}{t}{q}' for t in tasks.TASKS for q in ('"', "'")]
  entry_points = ("tasks", "bench", "icl")  # (command-line defaults may name a task)
  leaks = [f"{path.relative_to(ROOT)}: {name}" for path, unit, _ in _modules() if unit not in entry_points
           for name in names if name in path.read_text()]
  assert not leaks, leaks


def _toy_sampler(variant, rng, fmt, ft):
  del fmt, ft
  a, b = rng.randint(0, 9), rng.randint(0, 9)
  answer = str(a + b) if variant == "correct" else str(a + b + 1)
  return tasks.Example("toy", variant, f"{a} plus {b} (plus one)" if variant != "correct" else f"{a} plus {b}",
                       answer, None, {})


def _toy_task():
  from icl_ft.tasks.formats import EXAMPLES, Template, question, solved
  template = Template(header="Add the numbers. " + EXAMPLES, demo=solved(lambda ex: question(ex) + " = ", "\n"),
                      query=lambda ex: question(ex) + " = ", ft=solved(lambda ex: question(ex) + " = "),
                      generation_len=2)
  cue = lambda ex: str(sum(int(w) for w in ex.question.split() if w.isdigit()))
  return tasks.Task(name="toy", release_name="toy", answer_kind="number", sampler=_toy_sampler,
                    templates={"paper": template, "fixed": template}, cues={"sum": cue})


def test_a_toy_task_runs_through_the_icl_stage_and_the_report(tiny_lm, tmp_path, monkeypatch):
  from configs import smoke
  monkeypatch.setitem(tasks.TASKS, "toy", _toy_task())  # the one registry line
  assert tasks.make_queries("toy", "misleading", 3, 0, "fixed")[0].question.endswith("(plus one)")
  c = smoke.get_config()
  c.model, c.workdir, c.tasks, c.stages = str(tiny_lm[0]), str(tmp_path), "toy", "data,icl,finetune,ft_eval,report"
  c.circuits.tasks = ""  # the study's tasks that have pairs: none
  cfg = study.StudyConfig.from_dict(c)
  assert cfg.circuits == ()  # no corruptor: no circuit analysis
  done = study.Study(cfg, log=lambda line: None).run()
  assert set(done) == {"data", "icl", "finetune", "ft_eval", "report"}
  text = (tmp_path / "REPORT.md").read_text()
  assert "| toy | correct | strict |" in text and "| toy | misleading | strict |" in text
  assert "1.00 (sum)" in text  # the misleading set breaks its cue on every item


def test_results_comparison_names_every_difference(tmp_path):
  from icl_ft.report import compare
  a = {"table": [{"acc": 0.5, "n": 50}], "timings_s": {"icl": 3}, "config": {"workdir": "a", "seed": 1}}
  b = {"table": [{"acc": 0.5 + 1e-12, "n": 51}], "timings_s": {"icl": 9}, "config": {"workdir": "b", "seed": 1},
       "extra": True}
  assert list(compare.differences(a, b, tol=1e-9)) == ["extra: only in b", "table.0.n: 50 -> 51"]
  assert list(compare.differences(a, b)) == ["extra: only in b", f"table.0.acc: 0.5 -> {0.5 + 1e-12!r}",
                                             "table.0.n: 50 -> 51"]
  assert list(compare.differences(a, a)) == []
