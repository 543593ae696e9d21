"""Boolean expressions with an absorbing clause (study §2.3, "bool" in the release).

Pattern mode appends ``and False`` (wrapping the rest in parentheses) or ``or True``: the suffix decides the
label. Misleading items append an identity clause instead (``or False`` / ``and True``): it looks like the
shortcut but the label is the inner value. The release's test and FT data use "randoms" mode (no suffix, so
no shortcut) for correct items; ``fixed`` uses pattern mode for them so the shortcut exists.
"""

from __future__ import annotations

import random

from icl_ft.tasks.base import Example, Task, binary_foil, shortcut_foil

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


TASK = Task(name="boolean", release_name="bool", answer_kind="label", sampler=_sample,
            description="3 parenthesised and/or chains; an absorbing suffix decides the label",
            cues={"final_literal": final_literal_cue})
