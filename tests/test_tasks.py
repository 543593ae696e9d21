"""Task generators: golden release strings, independent answer checks, shortcut behaviour, determinism, API errors."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from icl_ft import tasks
from icl_ft.io import files
from icl_ft.tasks import controls, export, formats

N = 2000  # samples per (task, variant, format) for the cheap tasks
N_CODE = 1000

GOLDEN_EXPRESSION = ("Now you need to calculate the answer of some mathematic equations. Here are some examples: \n"
                     "(0)+(-14+14)*(6-6+4-6)=0 \n (5)+(-5+2)*(4-5+5-1)=")
GOLDEN_RELATION = ("A is connected with C\nJ is connected with B\nB is connected with F\nF is connected with D\n"
                   "D is connected with H\nH is connected with I\nI is connected with G\nG is connected with C\n"
                   "C is connected with E\nC is connected with Z\n")
GOLDEN_BOOL = ("Here are some boolean expressions, you need to directly tell me the result. If it is true, print True, "
               "else print False. Here are some examples: \n0\n0\n0\n(False and False or False and True) and "
               "(True and True or False or True) or (True and True or True)\n The result is: ")


def _queries(task, variant, fmt, n=N, seed=0):
  return tasks.make_queries(task, variant, n, seed, fmt)


# ---------------------------------------------------------------------------------------------- goldens


def test_golden_expression_misleading_one_shot():
  prompt, query = tasks.release_stream_prompt("expression", "misleading", 1, random.Random(114514))
  assert prompt == GOLDEN_EXPRESSION
  assert query.answer == "-4" and query.foil == "5"


def test_golden_relation_first_problem():
  prompt, query = tasks.release_stream_prompt("parity", "correct", 0, random.Random(114514))
  assert query.question == GOLDEN_RELATION and query.answer == "True"
  assert prompt.endswith("Here are some examples: \n" + GOLDEN_RELATION + "\n So 'the city A and Z is connected' is ")


def test_golden_bool_three_shot():
  prompt, query = tasks.release_stream_prompt("boolean", "correct", 3, random.Random(114514))
  assert prompt == GOLDEN_BOOL
  assert query.answer == "1"


# ----------------------------------------------------------------------------- independent answer checks


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("variant", tasks.VARIANTS)
def test_expression_answers_by_eval(variant, fmt):
  items = _queries("expression", variant, fmt)
  simple_right = 0
  for ex in items:
    assert ex.question.endswith("=") and not ex.question.endswith("+=")
    assert eval(ex.question[:-1]) == int(ex.answer)  # noqa: S307 - generated arithmetic
    simple, factor, cpl = ex.meta["simple"], ex.meta["factor"], ex.meta["cpl"]
    assert ex.question == f"({simple})+({factor})*({cpl})="
    if variant == "correct" or fmt == "fixed":  # the release's non-zero factor may sum to 0
      assert (eval(factor) == 0) == (variant == "correct")
    assert 0 <= eval(simple) <= 10 and cpl.count("+") + cpl.count("-") in (3, 4)
    simple_right += str(eval(simple)) == ex.answer
    if variant == "misleading":
      assert ex.foil == (None if str(eval(simple)) == ex.answer else str(eval(simple)))
    else:
      assert ex.foil is None and 0 <= int(ex.answer) <= 10
  if variant == "correct":
    assert simple_right == len(items)
  elif fmt == "paper":  # the study measured 7.3% of misleading answers still equal to `simple`
    assert 0.04 < simple_right / len(items) < 0.11
  else:  # fixed redraws zero products
    assert simple_right == 0


def test_expression_release_ft_generator():
  items = tasks.make_ft_examples("expression", 500, 0, "paper")
  assert all(ex.question.endswith("+=") and ex.variant == "correct" for ex in items)
  assert all(eval(ex.question[:-2]) == int(ex.answer) for ex in items)  # noqa: S307
  assert any(ex.meta["factor"] == "0" for ex in items)  # 1-term zero factors occur (docs/tasks.md)
  assert tasks.ft_text(items[0], "paper") == items[0].question + items[0].answer
  fixed = tasks.make_ft_examples("expression", 50, 0, "fixed")
  assert all(ex.question.endswith(")=") for ex in fixed)


def _reaches_z(question: str) -> tuple[bool, int]:
  graph = collections.defaultdict(set)
  lines = question.split("\n")
  assert lines[-1] == ""
  for line in lines[:-1]:
    u, v = line.split(" is connected with ")
    graph[u].add(v)
    graph[v].add(u)
  seen, todo = {"A"}, collections.deque(["A"])
  while todo:
    for w in graph[todo.popleft()] - seen:
      seen.add(w)
      todo.append(w)
  return "Z" in seen, len(lines) - 1


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("variant", tasks.TASKS["parity"].variants)
def test_parity_answers_by_bfs(variant, fmt):
  items = _queries("parity", variant, fmt)
  rule_right = 0
  for ex in items:
    reach, n_lines = _reaches_z(ex.question)
    assert ex.answer == str(reach)
    rule_right += ex.answer == ("True" if n_lines % 2 == 0 else "False")
    if variant == "correct":
      assert n_lines == (10 if reach else 9) and ex.foil == str(not reach)
    elif variant == "misleading":
      assert n_lines == 8 and "Z" not in ex.question and ex.answer == "False" and ex.foil == "True"
    else:
      assert n_lines == 10 and ex.question.count("Z") == 1 and ex.answer == "False" and ex.foil == "True"
  assert rule_right == (len(items) if variant == "correct" else 0)
  if variant == "correct":
    assert 0.45 < sum(ex.answer == "True" for ex in items) / len(items) < 0.55


def _final_literal_rule(question: str) -> str | None:
  for suffix in ("and False", "or True", "or False", "and True"):
    if question.endswith(") " + suffix) or question.endswith(" " + suffix):
      return "1" if suffix.endswith("True") else "0"
  return None


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("variant", tasks.VARIANTS)
def test_boolean_answers_by_eval(variant, fmt):
  items = _queries("boolean", variant, fmt)
  rule_wrong = 0
  for ex in items:
    assert ex.answer == ("1" if eval(ex.question) else "0")  # noqa: S307 - generated boolean expression
    rule = _final_literal_rule(ex.question)
    assert rule == ex.meta["shortcut"]
    if variant == "correct":
      assert ex.foil == ("0" if ex.answer == "1" else "1")
      if fmt == "paper":  # the release's randoms mode: no absorbing suffix, no shortcut
        assert rule is None and not ex.question.endswith(("and False", "or True"))
      else:  # pattern mode: the suffix decides the label
        assert rule == ex.answer
    else:
      assert ex.question.endswith((") or False", ") and True"))
      rule_wrong += rule != ex.answer
      assert ex.foil == (rule if rule != ex.answer else None)
  if variant == "misleading":
    assert rule_wrong / len(items) > 0.3
  elif fmt == "paper":  # study: 60% True in randoms mode
    assert 0.55 < sum(ex.answer == "1" for ex in items) / len(items) < 0.65


_RUNNER = r"""
import contextlib, io, json, sys
jobs = json.load(sys.stdin)
out = []
for code, inputs in jobs:
  compiled = compile(code, "<program>", "exec")
  results = []
  for v in inputs:
    sys.stdin = io.StringIO(f"{v}\n")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      exec(compiled, {"__name__": "__main__"})
    results.append(buf.getvalue())
  out.append(results)
sys.stdin = sys.__stdin__
print(json.dumps(out))
"""


def _run_programs(jobs: list[tuple[str, list[int]]]) -> list[list[str]]:
  """Runs each program (as a script reading stdin) on each of its inputs, all in one subprocess."""
  proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(jobs), capture_output=True, text=True,
                        timeout=120, check=True)
  return json.loads(proc.stdout)


@pytest.mark.parametrize("variant", tasks.VARIANTS)
def test_code_answers_by_running_programs(variant):
  items = _queries("code", variant, "fixed", N_CODE) + _queries("code", variant, "paper", N_CODE // 4)
  # Every program on its own input; the first 200 also on all inputs 0..10 (function1 must never raise).
  jobs = [(ex.question, [ex.meta["input"]] + (list(range(11)) if i < 200 else [])) for i, ex in enumerate(items)]
  outputs = _run_programs(jobs)
  ops = collections.Counter()
  fixed = set(map(id, items[:N_CODE]))
  for ex, out in zip(items, outputs):
    assert out[0] == ex.meta["printed"] + "\n"
    assert ex.question.startswith("\n")
    assert ex.question.endswith("print(function2(input_value, function1(input_value)))\n")
    v, d, op = ex.meta["input"], ex.meta["number"], ex.meta["op"]
    x = float(v) if ex.meta["input_type"] == "float" and id(ex) in fixed else v  # paper: the release's int maths
    shortcut = str(eval(f"x {op} d"))  # noqa: S307 - ignore function1
    if id(ex) in fixed:
      assert ex.answer == ex.meta["printed"]
    else:  # the release's gold: the same value, in integer maths
      assert float(ex.answer) == float(ex.meta["printed"]) and (op == "/" or "." not in ex.answer)
    ops[op] += 1
    if variant == "correct":
      assert ex.answer == shortcut and ex.foil is None
      assert f"return z {op} {d}\n" in ex.question
    else:
      assert ex.answer != shortcut and ex.foil == shortcut and " + a % " in ex.question
  assert set(ops) == set("+-*/")
  assert any(ex.meta["input_type"] == "float" for ex in items) and any(ex.meta["input_type"] == "int" for ex in items)


def test_code_programs_distinct_and_varied():
  items = tasks.make_queries("code", "correct", 1000, 7, "fixed")
  assert len({ex.question for ex in items}) == 1000
  functions1 = {ex.question.split("def function2")[0] for ex in items}
  assert len(functions1) == 1000
  text = "".join(ex.question for ex in items)
  for construct in ("for ", "while ", "if ", "math.", "lambda", "sorted(", "try:", "join(", " for ", "{"):
    assert construct in text, construct
  assert "random" not in text  # function1 is deterministic


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("variant", tasks.VARIANTS)
def test_algebra_answers_by_linalg(variant, fmt):
  items = _queries("algebra", variant, fmt)
  singular = 0
  for ex in items:
    rows, consts = [], []
    for line in ex.question.split("\n"):
      lhs, rhs = line.split(" = ")
      ca, cb = lhs.split(" + ")
      assert ca.endswith("a") and cb.endswith("b")
      rows.append([int(ca[:-1]), int(cb[:-1])])
      consts.append(int(rhs))
    A, c = np.array(rows, float), np.array(consts, float)
    assert len(rows) == (4 if (variant, fmt) == ("misleading", "paper") else 3)
    if fmt == "fixed":  # the dependent row eliminates a (correct) or is a positive combination (misleading)
      i, j, alpha, beta = ex.meta["combinations"][0]
      np.testing.assert_array_equal(A[2], alpha * A[i] + beta * A[j])
      assert (A[2, 0] == 0 and A[2, 1] > 0) if variant == "correct" else (alpha > 0 and beta > 0)
    a, b = ex.meta["a"], int(ex.answer)
    assert 1 <= a <= 5 and 1 <= b <= 5
    np.testing.assert_allclose(A @ [a, b], c)  # consistent with the gold
    if np.linalg.matrix_rank(A) < 2:
      singular += 1
      assert ex.meta["singular"]
    else:
      assert not ex.meta["singular"]
      np.testing.assert_allclose(np.linalg.lstsq(A, c, rcond=None)[0], [a, b], atol=1e-9)
    if variant == "correct":
      assert np.linalg.matrix_rank(np.column_stack([A, c])) <= 2 and max(max(r) for r in rows[:2]) <= 4
    assert ex.foil is None
  if fmt == "fixed":
    assert singular == 0
  elif variant == "correct":  # study [D]: 12.5% of correct systems are singular
    assert 0.09 < singular / len(items) < 0.16


# ---------------------------------------------------------------------------------- prompts and formats


def test_paper_prompt_quirks():
  rng = random.Random(3)
  demos = [tasks.sample("boolean", "correct", rng, "paper") for _ in range(40)]
  query = tasks.sample("boolean", "correct", rng, "paper")
  prompt = tasks.build_prompt("boolean", "paper", demos, query)
  body = "".join(f"{d.question}\n The result is: 1" if d.answer == "1" else "0\n" for d in demos)
  assert prompt == tasks.template("boolean", "paper").header + body + query.question + "\n The result is: "
  assert "print True, else print False" in prompt
  fixed = tasks.build_prompt("boolean", "fixed", demos, query)
  assert all(f"{d.question}\n The result is: {d.answer}\n" in fixed for d in demos)
  assert "print 1, else print 0" in fixed

  code = tasks.make_queries("code", "correct", 2, 0, "paper")
  zero_shot = tasks.build_prompt("code", "paper", [], code[0])
  header = "Now you need to give me the printed result after running this python code . Here are some examples: \n"
  assert zero_shot == (f"{header}The input is: The code is: \n{code[0].question}The input is: {code[0].meta['input']}"
                       ", so the output is: ")
  one_shot = tasks.build_prompt("code", "fixed", code[:1], code[1])
  assert one_shot == (f"{header}The code is: \n{code[0].question}The input is: {code[0].meta['input']}, so the output "
                      f"is: {code[0].answer}\nHere is next example:\nThe code is: \n{code[1].question}The input is: "
                      f"{code[1].meta['input']}, so the output is:")  # fixed: the space starts the answer

  for task in tasks.TASKS:
    q = tasks.make_queries(task, "correct", 1, 0, "paper")[0]
    assert tasks.build_prompt(task, "paper", [], q).count("Here are some examples: \n") == 1

  alg = tasks.make_queries("algebra", "correct", 2, 0, "paper")
  assert tasks.build_prompt("algebra", "paper", alg[:1], alg[1]).endswith(
      f"{alg[1].question}\n The solutions are: a = {alg[1].meta['a']}, b = ")


def test_ft_text_layouts():
  rel = tasks.make_ft_examples("parity", 1, 0, "paper")[0]
  assert tasks.ft_text(rel, "paper") == f"{rel.question}\n So 'the city A and Z is connected' is {rel.answer}"
  bl = tasks.make_ft_examples("boolean", 1, 0, "paper")[0]
  assert tasks.ft_text(bl, "paper") == f"{bl.question}\n The result is: {bl.answer}"
  alg = tasks.make_ft_examples("algebra", 1, 0, "paper")[0]
  assert tasks.ft_text(alg, "paper").endswith(f"\n The solutions are: a = {alg.meta['a']}, b = {alg.answer}")
  assert tasks.ft_text(alg, "fixed", with_header=True).startswith("Here are some equations")
  assert all(not ex.question.endswith("and False") for ex in tasks.make_ft_examples("boolean", 100, 0, "paper"))


def test_generation_len_and_answer_kind():
  assert {t: tasks.generation_len(t, "paper") for t in tasks.TASKS} == dict(
      expression=3, parity=2, boolean=1, code=2, algebra=1)
  assert all(tasks.generation_len(t, "fixed") >= 8 for t in tasks.TASKS)
  assert {t: tasks.answer_kind(t) for t in tasks.TASKS} == dict(
      expression="number", parity="label", boolean="label", code="number", algebra="number")


# ------------------------------------------------------------------------------ determinism and streams


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_same_seed_same_data_different_seed_different(task):
  for fmt in tasks.FORMATS:
    a = tasks.make_queries(task, "misleading", 30, 1, fmt)
    assert a == tasks.make_queries(task, "misleading", 30, 1, fmt)
    assert a != tasks.make_queries(task, "misleading", 30, 2, fmt)
    assert a != tasks.make_queries(task, "correct", 30, 1, fmt)
    d = tasks.make_demos(task, 4, 1, 5, fmt)
    assert d == tasks.make_demos(task, 4, 1, 5, fmt) and len(d) == 4
    assert all(ex.variant == "correct" for ex in d)
    assert d != tasks.make_demos(task, 4, 1, 6, fmt) and d != tasks.make_demos(task, 4, 2, 5, fmt)
  assert tasks.make_demos(task, 0, 1, 0, "paper") == []


def test_queries_independent_of_global_random_state():
  random.seed(1)
  np.random.seed(1)
  a = [tasks.make_queries(t, "correct", 5, 0, "paper") for t in tasks.TASKS]
  random.seed(2)
  np.random.seed(2)
  assert a == [tasks.make_queries(t, "correct", 5, 0, "paper") for t in tasks.TASKS]


def test_meta_is_json_serialisable():
  for task in tasks.TASKS:
    for variant in tasks.TASKS[task].variants:
      for ex in tasks.make_queries(task, variant, 20, 0, "fixed"):
        json.dumps(ex.meta)


# ------------------------------------------------------------------------------------------ API errors


_PARITY = tasks.make_queries("parity", "correct", 1, 0, "paper")[0]


@pytest.mark.parametrize("call,message", [
    (lambda: tasks.get_task("relation"), "valid tasks: expression, parity, boolean, code, algebra"),
    (lambda: tasks.sample("expression", "wrong", random.Random(0), "paper"), "valid variants: correct, misleading"),
    (lambda: tasks.make_queries("parity", "nope", 0, 0, "paper"), "valid variants: correct, misleading, misleading-z"),
    (lambda: tasks.make_queries("boolean", "misleading-z", 1, 0, "paper"), "misleading-z"),
    (lambda: tasks.make_queries("code", "correct", 1, 0, "faithful"), "valid formats: paper, fixed"),
    (lambda: tasks.generation_len("code", "Paper"), "valid formats: paper, fixed"),
    (lambda: tasks.build_prompt("bool", "paper", [], _PARITY), "valid tasks"),
    (lambda: tasks.make_demos("algebra", 2, 0, 0, "x"), "valid formats"),
    (lambda: tasks.make_queries("algebra", "correct", -1, 0, "paper"), "non-negative"),
    (lambda: tasks.sample("parity", "misleading", random.Random(0), "paper", ft=True), "correct-variant only"),
    (lambda: tasks.build_prompt("boolean", "paper", [], _PARITY), "'parity' example in a 'boolean' prompt"),
    (lambda: tasks.make_queries("parity", "correct", 1, 0, "paper", split="train"), "valid splits: test, dev"),
])
def test_bad_names_raise_with_valid_lists(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# ------------------------------------------------------------------------------------------------ export


def test_export_cli_and_atomic_write(tmp_path):
  out = tmp_path / "sub" / "parity.jsonl"
  cmd = [sys.executable, "-m", "icl_ft.tasks.export", "--task=parity,boolean", "--variant=misleading",
         "--format=fixed", "--n=7", f"--out={out}"]
  subprocess.run(cmd, check=True, capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(records) == 14 and [r["index"] for r in records[:7]] == list(range(7))
  first = tasks.make_queries("parity", "misleading", 7, 0, "fixed")[0]
  assert records[0]["question"] == first.question and records[0]["answer"] == first.answer
  assert os.listdir(out.parent) == ["parity.jsonl"]  # no temporary files left

  ft_path = tmp_path / "ft.jsonl"
  files.write_jsonl(ft_path, export.ft_records(export.parse_tasks("all"), 3, 0, "paper"))
  texts = [json.loads(line)["text"] for line in ft_path.read_text().splitlines()]
  assert len(texts) == 15 and texts[0].endswith(tasks.make_ft_examples("expression", 1, 0, "paper")[0].answer)

  def failing():
    yield {"text": "x"}
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError):
    files.write_jsonl(ft_path, failing())
  assert len(ft_path.read_text().splitlines()) == 15
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  with pytest.raises(ValueError, match="valid tasks"):
    export.parse_tasks("expression,foo")


# ----------------------------------------------------------------- misleading sets break their shortcut


def _breaking_share(task, variant, fmt, n=N):
  items = tasks.make_queries(task, variant, n, 0, fmt)
  return sum(tasks.shortcut_record(ex, fmt)["shortcut_right"] is False for ex in items) / len(items)


def test_boolean_fixed_misleading_clause_breaks_the_final_literal_shortcut():
  items = _queries("boolean", "misleading", "fixed")
  for ex in items:  # the identity clause's literal disagrees with the label on every item
    assert _final_literal_rule(ex.question) != ex.answer
  assert 0.4 < _breaking_share("boolean", "misleading", "paper") < 0.6  # the release's independent draw


@pytest.mark.parametrize("task,variant", [(t, v) for t in tasks.TASKS for v in tasks.TASKS[t].variants
                                          if v != "correct"])
def test_every_fixed_misleading_set_breaks_its_shortcut(task, variant):
  assert _breaking_share(task, variant, "fixed", N_CODE * 2 if task == "code" else N) >= 0.95
  assert _breaking_share(task, "correct", "fixed", 500) == 0.0
  # and on correct items the shortcut gives the gold (the pattern exists)
  assert all(tasks.shortcut_record(ex, "fixed")["shortcut_right"] for ex in _queries(task, "correct", "fixed", 500))


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_no_correct_set_counts_as_breaking_in_either_format(task):
  for fmt in tasks.FORMATS:
    assert _breaking_share(task, "correct", fmt, 300) == 0.0
  records = [tasks.shortcut_record(ex, "paper") for ex in _queries("algebra", "misleading", "paper", 50)]
  assert all(r["shortcut_cue"] is None and r["shortcut_right"] is None for r in records)  # the release's: none


@pytest.mark.parametrize("task,question,meta,expected", [
    ("expression", "(7-3)+(-14+14)*(6-6+4-6)=", {}, {"zero_factor": "4"}),
    ("expression", "(5)+(-5+2)*(4-5+5-1)=", {}, {"zero_factor": "5"}),
    ("parity", "A is connected with B\n" * 9, {}, {"line_parity": "False", "z_present": "False"}),
    ("parity", "A is connected with B\n" * 7 + "B is connected with Z\n", {}, {"line_parity": "True", "z_present": "True"}),
    ("boolean", "(True or False) and False", {}, {"final_literal": "0"}),
    ("boolean", "((False) or True) and True", {}, {"final_literal": "1"}),
    ("boolean", "(True and False)", {}, {"final_literal": None}),
    ("code", "\ndef function1(x):\n    return 3\n\ndef function2(z, a):\n    return z * 4\n"
     "\ninput_value = float(input())\n", {"input": 2}, {"irrelevant_function": "8.0"}),
    ("algebra", "1a + 2b = 5\n2a + 1b = 4\n0a + 3b = 6", {}, {"eliminated_a": "2"}),
    ("algebra", "1a + 2b = 5\n2a + 1b = 4\n3a + 3b = 9", {}, {"eliminated_a": "3"}),
])
def test_cues_on_hand_made_questions(task, question, meta, expected):
  ex = tasks.Example(task, "correct", question, "0", None, meta)
  assert tasks.get_task(task).cue_predictions(ex) == expected


def test_query_records_and_summaries_carry_the_shortcut_share():
  from icl_ft.evaluation import engine as icl
  from icl_ft.report import tables as report
  qs = icl.icl_queries("boolean", "misleading", "paper", 0, 200, seed=0)
  recs = [dict(q.cell, gold=q.gold, correct_lenient=True, correct_strict=q.cell.shortcut_right is False) for q in qs]
  assert all(r["shortcut_cue"] == "final_literal" and r["shortcut"] in ("0", "1") for r in recs)
  row = report.summarize(recs)[0]
  expected = sum(r["shortcut_right"] is False for r in recs) / len(recs)
  assert row["shortcut_breaking"] == expected and 0.35 < expected < 0.65
  assert row["acc_strict_breaking"] == 1.0 and row["n_breaking"] == round(expected * 200)


def test_paper_code_gold_is_the_releases_integer_maths():
  items = _queries("code", "correct", "paper", 300)
  floats = [ex for ex in items if ex.meta["input_type"] == "float" and ex.meta["op"] != "/"]
  assert floats and all(ex.answer == str(eval(f"{ex.meta['input']} {ex.meta['op']} {ex.meta['number']}"))  # noqa: S307
                        and ex.meta["printed"] == ex.answer + ".0" for ex in floats)
  fixed = _queries("code", "correct", "fixed", 300)
  assert any(ex.answer.endswith(".0") for ex in fixed)


def test_fixed_code_golds_fit_the_strict_budget():
  budget = tasks.strict_len("code", "fixed")
  assert tasks.generation_len("code", "fixed") == budget
  for variant in tasks.VARIANTS:  # a BPE token covers at least one character: len(" " + gold) bounds the count
    assert max(len(" " + ex.answer) for ex in _queries("code", variant, "fixed", N_CODE)) <= budget


def test_summaries_give_every_cues_share_of_a_set():
  from icl_ft.evaluation import engine as icl
  from icl_ft.report import tables as report
  qs = icl.icl_queries("parity", "misleading", "fixed", 0, 100, seed=0)
  row = report.summarize([dict(q.cell, gold=q.gold, correct_lenient=False, correct_strict=False) for q in qs])[0]
  # the misleading set breaks line parity on every item and leaves the Z cue right on every item
  assert row["cue_holding"] == {"line_parity": 0.0, "z_present": 1.0} and row["shortcut_breaking"] == 1.0


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_shuffled_labels_always_change_a_label(task):
  rng, n_same = random.Random(0), 0
  other = lambda: tasks.sample(task, "correct", rng, "fixed").answer
  for i in range(40):
    demos = tasks.make_demos(task, 4, 3, i, "fixed")
    shuffled = controls.shuffled_labels(demos, rng, other)
    assert [d.question for d in shuffled] == [d.question for d in demos]
    assert [d.answer for d in shuffled] != [d.answer for d in demos]
    if len({d.answer for d in demos}) > 1:
      assert sorted(d.answer for d in shuffled) == sorted(d.answer for d in demos)  # permuted among the demos
    else:
      n_same += 1
      assert sum(a.answer != b.answer for a, b in zip(shuffled, demos)) == 1  # one label drawn from the task
  same = tasks.make_demos(task, 1, 3, 0, "fixed") * 3
  assert [d.answer for d in controls.shuffled_labels(same, rng, other)] != [d.answer for d in same]


@pytest.mark.parametrize("fmt", tasks.FORMATS)
@pytest.mark.parametrize("task", [t for t in tasks.TASKS if tasks.get_task(t).irrelevant_from])
def test_irrelevant_demos_come_from_another_task_at_the_same_token_length(task, fmt, smollm2_tokenizer):
  count = lambda s: len(smollm2_tokenizer(s, add_special_tokens=False).input_ids)
  tpl = tasks.template(task, fmt)
  other = tasks.get_task(task).irrelevant_from
  rendered = [tasks.template(other, fmt).demo(d) for d in tasks.make_demos(other, 8, 2, 0, fmt)]
  ending = os.path.commonprefix([r[::-1] for r in rendered])[::-1]
  for i, query in enumerate(tasks.make_queries(task, "correct", 5, 1, fmt)):
    demos = tasks.make_demos(task, 4, 1, i, fmt)
    real = tasks.build_prompt(task, fmt, demos, query)
    ctrl = tasks.build_prompt(task, fmt, demos, query, "irrelevant", (1, i), count)
    assert ctrl.startswith(tpl.header) and ctrl.endswith(tpl.prompt_query(query))
    assert not any(d.question in ctrl for d in demos)
    filler = ctrl[len(tpl.header):-len(tpl.prompt_query(query))]
    assert filler.endswith(ending)  # whole demos: never cut mid-demo (paper boolean's demos share no ending)
    assert abs(count(ctrl) - count(real)) <= 0.05 * count(real)
    assert ctrl == tasks.build_prompt(task, fmt, demos, query, "irrelevant", (1, i), count)  # keyed: reproducible


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_fixed_format_answer_tokens_match_between_prompt_demos_and_ft_text(task, smollm2_tokenizer):
  """In ``fixed`` the gold's tokens after the evaluation prompt are the tokens the answer has in the fine-tuning
  text and in the demos: the prompt ends where the answer's first token (" True", " -") starts, so the model is
  never asked for a token it only ever saw merged with a space (the paper format keeps the release's prompt
  ending in a bare space: parity's "is " + "True" against the FT text's " True")."""
  from icl_ft.evaluation.engine import continuation_ids
  tok = smollm2_tokenizer
  tpl = tasks.template(task, "fixed")

  def tokens_from(text: str, start: int, end: int | None = None) -> list[int]:
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return [i for i, (s, e) in zip(enc.input_ids, enc.offset_mapping) if e > start and (end is None or s < end)]

  def ft_answer(ex) -> list[int]:  # the answer's tokens in its FT text, with the space before it
    text = tasks.ft_text(ex, "fixed")
    return tokens_from(text, len(text) - len(ex.answer) - len(tpl.lead(ex)))

  for i, query in enumerate(tasks.make_queries(task, "correct", 6, 2, "fixed")):
    demo = tasks.make_demos(task, 1, 2, i, "fixed")[0]
    prompt = tasks.build_prompt(task, "fixed", [demo], query)
    assert continuation_ids(tok, prompt, tok(prompt).input_ids, tpl.lead(query) + query.answer) == ft_answer(query)
    end = len(tpl.header) + tpl.demo(demo).rindex(demo.answer) + len(demo.answer)
    assert tokens_from(prompt, end - len(demo.answer) - len(tpl.lead(demo)), end) == ft_answer(demo)


@pytest.mark.parametrize("task", ["parity", "expression"])
def test_nested_demos_are_the_start_of_every_larger_k_and_independent_draws_are_not(task):
  q = [tasks.make_demos(task, k, 7, 3, "paper", nested=True) for k in (1, 2, 4, 8)]
  assert all(small == big[:len(small)] for small, big in zip(q, q[1:]))
  assert tasks.make_demos(task, 8, 7, 4, "paper", nested=True) != q[-1]  # another query, another list
  drawn = [tasks.make_demos(task, k, 7, 3, "paper") for k in (2, 8)]
  assert drawn[0] != drawn[1][:2]  # the release's: each k draws its own demos
