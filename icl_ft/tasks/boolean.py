"""Boolean expressions with an absorbing clause ("bool" in the release; docs/tasks.md).

Pattern mode appends ``and False`` (wrapping the rest in parentheses) or ``or True``: the suffix decides the
label. Misleading items append an identity clause instead (``or False`` / ``and True``): it looks like the
shortcut but the label is the inner value. The release's test and FT data use "randoms" mode (no suffix, so
no shortcut) for correct items; ``fixed`` uses pattern mode for them so the shortcut exists.
"""

from __future__ import annotations

import random
import re

from icl_ft.tasks.base import (ANSWER_UNCHANGED, NO_PATTERN, Corruption, Example, Task, binary_foil, restricted_eval,
                               shortcut_foil)
from icl_ft.tasks.formats import EXAMPLES, Template, budget, solved

_INSTRUCTION = " The result is: "

LABELS = ("1", "0")
NUM_GROUPS = 3
MAX_TERMS = 4


def _or_of_ands(values: list[bool], ops: list[str]) -> bool:
  """Value of ``v0 op0 v1 op1 ...`` with ``and`` binding tighter than ``or``."""
  runs, current = [], [values[0]]
  for op, value in zip(ops, values[1:]):
    if op == "and":
      current.append(value)
    else:
      runs.append(current)
      current = [value]
  runs.append(current)
  return any(all(run) for run in runs)


def _chain(rng: random.Random, num_terms: int) -> tuple[str, bool]:
  """The release's ``generate_boolean_expression``: ``True and False or True`` and its value."""
  values = [rng.choice(["True", "False"])]
  ops = []
  for _ in range(num_terms - 1):
    ops.append(rng.choice(["and", "or"]))
    values.append(rng.choice(["True", "False"]))
  text = " ".join([values[0]] + [tok for pair in zip(ops, values[1:]) for tok in pair])
  return text, _or_of_ands([v == "True" for v in values], ops)


def _expression(rng: random.Random, pattern: bool, misleading: bool, breaking: bool = False
                ) -> tuple[str, bool, dict]:
  """The release's ``generate_bool_expression`` (same draw order) with a hand-written evaluator.

  ``breaking`` (fixed format): the misleading identity clause is the one whose literal disagrees with the
  inner value (``or False`` after a True expression, ``and True`` after a False one), so the final-literal
  shortcut is wrong on every misleading item; the release draws the clause independently (wrong on half).
  """
  absorbing = rng.choice(["False", "True"]) if pattern else None
  groups, values, joiners = [], [], []
  bound = MAX_TERMS
  for _ in range(NUM_GROUPS):
    bound = rng.randint(2, bound)  # the release overwrites its bound with each draw: groups only shrink
    text, value = _chain(rng, bound)
    if groups:
      joiners.append(rng.choice(["and", "or"]))
    groups.append(f"({text})")
    values.append(value)
  expr = " ".join([groups[0]] + [tok for pair in zip(joiners, groups[1:]) for tok in pair])
  groups_value = value = _or_of_ands(values, joiners)
  suffix = None
  if absorbing == "False":
    expr, value, suffix = f"({expr}) and False", False, "and False"
  elif absorbing == "True":
    expr, value, suffix = f"{expr} or True", True, "or True"
  if misleading:  # an identity clause: the value stays the inner one
    pick = ("False" if value else "True") if breaking else rng.choice(["False", "True"])
    suffix = "or False" if pick == "False" else "and True"
    expr = f"({expr}) {suffix}"
  meta = dict(groups=groups, joiners=joiners, groups_value=groups_value, pattern_mode=pattern, suffix=suffix)
  return expr, value, meta


def suffix_shortcut(suffix: str | None) -> str | None:
  """The suffix rule: the label is the final literal (exact in pattern mode); None without a suffix."""
  return None if suffix is None else ("1" if suffix.endswith("True") else "0")


_SUFFIXES = ("and False", "or True", "or False", "and True")


def final_literal_cue(ex: Example) -> str | None:
  """The shortcut: a trailing ``and False`` / ``or True`` / ``or False`` / ``and True`` clause decides the label
  (its literal); None when the expression ends in no such clause."""
  return suffix_shortcut(next((s for s in _SUFFIXES if ex.question.endswith(") " + s)), None))


def _sample(variant: str, rng: random.Random, fmt: str, ft: bool) -> Example:
  del ft  # FT data uses the test generator of each format
  misleading = variant == "misleading"
  pattern = fmt == "fixed" and not misleading
  question, value, meta = _expression(rng, pattern=pattern, misleading=misleading, breaking=fmt == "fixed")
  answer = "1" if value else "0"
  meta["shortcut"] = suffix_shortcut(meta["suffix"])
  foil = shortcut_foil(answer, meta["shortcut"]) if misleading else binary_foil(answer, LABELS)
  return Example("boolean", variant, question, answer, foil, meta)


_BOOL = re.compile(r"(?:True|False|and|or|[() ])+")
_BOOL_SWAPS = {"and False": "and True", "or True": "or False"}  # absorbing clause -> identity clause


def eval_boolean(expr: str) -> bool:
  """Python's value of an expression made of True/False/and/or and parentheses (nothing else accepted)."""
  return restricted_eval(expr, _BOOL, bool)


def corrupt(ex: Example, rng: random.Random) -> Corruption | str:
  """``and False`` <-> ``and True`` or ``or True`` <-> ``or False`` (pattern-mode items only, so ``fixed``);
  only pairs whose label flips are kept; labels recomputed by evaluation."""
  del rng  # deterministic swap
  suffix = ex.meta.get("suffix")
  if suffix not in _BOOL_SWAPS or not ex.meta.get("pattern_mode"):
    return NO_PATTERN
  old, new = " " + suffix, " " + _BOOL_SWAPS[suffix]
  if not ex.question.endswith(old):
    raise RuntimeError(f"{ex.question!r} does not end in its suffix {suffix!r}")
  corrupt_q = ex.question[:-len(old)] + new
  clean, corrupt = ("1" if eval_boolean(ex.question) else "0"), ("1" if eval_boolean(corrupt_q) else "0")
  if clean != ex.answer:
    raise RuntimeError(f"generator label {ex.answer!r} != eval {clean!r} for {ex.question!r}")
  if clean == corrupt:
    return ANSWER_UNCHANGED
  return Corruption(corrupt_q, clean, corrupt, dict(swap=[old.strip(), new.strip()]))


def _query(ex: Example) -> str:
  return f"{ex.question}\n{_INSTRUCTION}"


def _demo_paper(ex: Example) -> str:
  # test.py: ``text += question + "\n" + instruction + '1' if answer else '0' + "\n"`` parses as
  # (question + "\n" + instruction + "1") if answer else ("0" + "\n").
  return f"{_query(ex)}1" if ex.answer == "1" else "0\n"


_HEADER = "Here are some boolean expressions, you need to directly tell me the result. If it is true, print "
TEMPLATES = {
    # paper: the header at the release's HEAD (its gold is still 1/0); fixed: the header before commit cee7e00.
    "paper": Template(header=_HEADER + "True, else print False. " + EXAMPLES, demo=_demo_paper, query=_query,
                      ft=solved(_query), generation_len=budget(1, "paper")),
    "fixed": Template(header=_HEADER + "1, else print 0. " + EXAMPLES, demo=solved(_query, "\n"), query=_query,
                      ft=solved(_query), generation_len=budget(1, "fixed")),
}

TASK = Task(name="boolean", irrelevant_from="expression", release_name="bool", answer_kind="label", sampler=_sample, templates=TEMPLATES,
            corrupt=corrupt, pair_formats=("fixed",),
            description="3 parenthesised and/or chains; an absorbing suffix decides the label",
            cues={"final_literal": final_literal_cue})
