"""Every prompt template, in one place: headers, demo/query layouts, FT text and token budgets per format.

``paper`` reproduces the release's strings byte for byte, quirks included (study §2): the bool demo
precedence bug, the code query's stray ``"The input is: "``, "Here are some examples: \\n" at 0 shots.
``fixed`` applies the corrections of study §6.

How misleading each misleading set is (``tasks.shortcut_record``: the share of items where the variant's
target cue disagrees with the gold, measured on 2,000 items per set by ``tests/test_tasks.py``):

* expression (cue: the zero factor, answer = ``simple``): the release's "non-zero" factor sums to 0 in 7% of
  items; ``fixed`` redraws those, so the cue is wrong on every misleading item.
* parity (cues: line-count parity, the study's named shortcut, and "Z is mentioned"): ``misleading`` (8 lines,
  no Z) breaks parity on every item but keeps the Z cue right, by design: it is the set that tells the two cues
  apart. ``misleading-z`` (10 lines, Z hanging off a component without A) breaks both; it is the Z cue's set.
* boolean (cue: the final literal): the release draws the identity clause (``or False`` / ``and True``)
  independently of the inner value, so the cue is right on half of its misleading items; ``fixed`` appends the
  clause whose literal disagrees with the inner value. The release's correct items (randoms mode) have no
  clause at all: ``fixed`` uses pattern mode.
* code (cue: ``function1`` is irrelevant, output = input <op> d): misleading programs add ``a % m`` (non-zero)
  in both formats. ``paper`` keeps the release's integer-maths gold (``8`` where the program prints ``8.0``);
  ``fixed`` scores the printed value with a 24-token budget that fits every such value.
* algebra (cue: b = the last row's constant / its b coefficient): the release hands the model a, so every row
  gives b and its 4-independent-row misleading set breaks nothing. ``fixed`` makes the dependent row the
  pattern: correct items' dependent row eliminates a (``0a + 3b = 12``), misleading items' dependent row is a
  positive combination whose a term does not vanish, so the cue is wrong on every misleading item.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from icl_ft.tasks.base import FORMATS, Example, check_name

_EXAMPLES = "Here are some examples: \n"
_RELATION_INSTRUCTION = " So 'the city A and Z is connected' is "
_BOOL_INSTRUCTION = " The result is: "
_CODE_HINT = "The code is: \n"
_CODE_INPUT = "The input is: "
_CODE_OUTPUT = ", so the output is: "
_CODE_NEXT = "Here is next example:\n"
_ALGEBRA_INSTRUCTION = " The solutions are: "
_STRICT_BUDGET = 8  # the strict scorer's new-token budget (study §3); code's float answers get 3x
_CODE_STRICT_BUDGET = 3 * _STRICT_BUDGET  # fits every printed value (at most 20 characters) in any tokenizer


@dataclasses.dataclass(frozen=True)
class Template:
  """How one task is laid out in one format."""

  header: str
  demo: Callable[[Example], str]  # a solved demo, separator included
  query: Callable[[Example], str]  # the unsolved query, ending where the answer starts
  ft: Callable[[Example], str]  # question + answer, as in the release's FT data (no header)
  generation_len: int  # new-token budget of the lenient rule (paper: the release's)
  strict_len: int = _STRICT_BUDGET  # new-token budget of the strict rule


def _relation_query(ex: Example) -> str:
  return f"{ex.question}\n{_RELATION_INSTRUCTION}"


def _bool_query(ex: Example) -> str:
  return f"{ex.question}\n{_BOOL_INSTRUCTION}"


def _bool_demo_paper(ex: Example) -> str:
  # test.py: ``text += question + "\n" + instruction + '1' if answer else '0' + "\n"`` parses as
  # (question + "\n" + instruction + "1") if answer else ("0" + "\n").
  return f"{_bool_query(ex)}1" if ex.answer == "1" else "0\n"


def _code_query(ex: Example) -> str:
  return f"{_CODE_HINT}{ex.question}{_CODE_INPUT}{ex.meta['input']}{_CODE_OUTPUT}"


def _algebra_query(ex: Example) -> str:
  return f"{ex.question}\n{_ALGEBRA_INSTRUCTION}a = {ex.meta['a']}, b = "


def _solved(query: Callable[[Example], str], end: str = "") -> Callable[[Example], str]:
  """query + answer + ``end``."""
  return lambda ex: f"{query(ex)}{ex.answer}{end}"


def _question(ex: Example) -> str:
  return ex.question


def _make_templates(paper: bool) -> dict[str, Template]:
  """The five tasks' templates in the paper (release) or fixed format."""
  def budget(release: int) -> int:
    return release if paper else _STRICT_BUDGET

  return {
      "expression": Template(
          header="Now you need to calculate the answer of some mathematic equations. " + _EXAMPLES,
          demo=_solved(_question, " \n " if paper else "\n"), query=_question, ft=_solved(_question),
          generation_len=budget(3)),
      "parity": Template(
          header=("Here are some cities expressed as A, B, C, etc. I will show some connection relations, and you "
                  "need to tell me if city A and city Z are connected (Answer True or False). " + _EXAMPLES),
          demo=_solved(_relation_query, "\n"), query=_relation_query, ft=_solved(_relation_query),
          generation_len=budget(2)),
      "boolean": Template(
          # paper: the header at the release's HEAD (its gold is still 1/0); fixed: the header before cee7e00.
          header=("Here are some boolean expressions, you need to directly tell me the result. If it is true, print "
                  + ("True, else print False. " if paper else "1, else print 0. ") + _EXAMPLES),
          demo=_bool_demo_paper if paper else _solved(_bool_query, "\n"), query=_bool_query,
          ft=_solved(_bool_query), generation_len=budget(1)),
      "code": Template(
          header="Now you need to give me the printed result after running this python code . " + _EXAMPLES,
          demo=_solved(_code_query, "\n" + _CODE_NEXT),
          query=(lambda ex: _CODE_INPUT + _code_query(ex)) if paper else _code_query,  # paper: stray prefix
          ft=_solved(_code_query), generation_len=2 if paper else _CODE_STRICT_BUDGET,
          strict_len=_CODE_STRICT_BUDGET),
      "algebra": Template(
          header="Here are some equations, you need to find all solutions of given variables. " + _EXAMPLES,
          demo=_solved(_algebra_query, "\n"), query=_algebra_query, ft=_solved(_algebra_query),
          generation_len=budget(1)),
  }


TEMPLATES: dict[tuple[str, str], Template] = {
    (task, fmt): t for fmt in FORMATS for task, t in _make_templates(fmt == "paper").items()}
_TASK_NAMES = tuple(_make_templates(True))


def template(task: str, fmt: str) -> Template:
  """The template of ``task`` in ``fmt`` (both names validated)."""
  check_name("task", task, _TASK_NAMES)
  check_name("format", fmt, FORMATS)
  return TEMPLATES[task, fmt]


def build_prompt(task: str, fmt: str, demos: Sequence[Example], query: Example) -> str:
  """Header + demos + query."""
  t = template(task, fmt)
  for ex in (*demos, query):
    if ex.task != task:
      raise ValueError(f"a {ex.task!r} example in a {task!r} prompt")
  return t.header + "".join(t.demo(d) for d in demos) + t.query(query)


def ft_text(example: Example, fmt: str, with_header: bool = False) -> str:
  """Question + answer for fine-tuning, as the release's FT data (bare), optionally after the task header."""
  t = template(example.task, fmt)
  return (t.header if with_header else "") + t.ft(example)


def generation_len(task: str, fmt: str) -> int:
  """Lenient new-token budget: the release's (paper) or the strict scorer's (fixed; 24 for code's float text)."""
  return template(task, fmt).generation_len


def strict_len(task: str, fmt: str) -> int:
  """Strict new-token budget: 8, or 24 for code (its float answers run to 20 characters)."""
  return template(task, fmt).strict_len
