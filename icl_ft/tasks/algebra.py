"""Linear equations with a dependent equation ("equation" in the release; docs/tasks.md).

``paper`` (the release): correct items have 2 independent rows with coefficients 1..4 plus one row that is a
random combination of them; misleading items have 4 independent rows. The query hands the model a, so every
row gives b and the misleading set breaks no shortcut; singular systems (12.5% of correct ones) are kept and
flagged in ``meta["singular"]``. ``fixed`` gives the dependent row a pattern: in correct items it is the
combination that eliminates a (b = its constant / its b coefficient), in misleading items a combination whose
a term does not vanish, so that shortcut is wrong on every misleading item (docs/tasks.md). The gold is
b in both formats (``meta["hands_over_a"]`` logs the hand-over).
"""

from __future__ import annotations

import fractions
import math
import random
import re

from icl_ft.tasks.base import FORMATS, Example, Task, numpy_rng_from
from icl_ft.tasks.formats import EXAMPLES, Template, budget, solved

VARIABLES = "ab"
_ROW = re.compile(r"(-?\d+)a \+ (-?\d+)b = (-?\d+)")


def _rank_below_two(rows: list[list[int]]) -> bool:
  """True if every 2x2 minor vanishes (rows all proportional), so b is not determined."""
  return all(r[0] * s[1] - r[1] * s[0] == 0 for i, r in enumerate(rows) for s in rows[i + 1:])


def _system(rng: random.Random, equations: int, dependent: int) -> dict:
  """The release's ``generate_linear_equations`` for two variables, same Python draw order.

  Its NumPy draws (coefficients in 1..4) come from a Generator derived from ``rng``'s state.
  """
  solution = [rng.randint(1, 5) for _ in VARIABLES]
  independent = equations - dependent
  coefficients = numpy_rng_from(rng).integers(1, 5, size=(independent, len(VARIABLES)))
  rows = [[int(c) for c in row] for row in coefficients]
  constants = [sum(c * x for c, x in zip(row, solution)) for row in rows]
  combos = []
  for _ in range(dependent):
    i, j = rng.sample(range(independent), 2)
    alpha, beta = rng.randint(1, 3), rng.randint(1, 3)
    rows.append([alpha * p + beta * q for p, q in zip(rows[i], rows[j])])
    constants.append(alpha * constants[i] + beta * constants[j])
    combos.append([i, j, alpha, beta])
  return dict(a=solution[0], b=solution[1], rows=rows, constants=constants, combinations=combos,
              singular=_rank_below_two(rows))


def _fixed_system(rng: random.Random, eliminate: bool) -> dict:
  """``fixed``: two independent rows (coefficients 1..4) and one dependent row. Correct items: the dependent row
  is the combination that eliminates a (``0a + kb = c``, k > 0), so b = c / k (the implicit pattern); misleading
  items: a combination with positive weights (the release's dependent row), whose a term does not vanish."""
  solution = [rng.randint(1, 5) for _ in VARIABLES]
  rows = [[rng.randint(1, 4) for _ in VARIABLES] for _ in range(2)]
  while _rank_below_two(rows):
    rows = [[rng.randint(1, 4) for _ in VARIABLES] for _ in range(2)]
  if eliminate:
    g = math.gcd(rows[0][0], rows[1][0])
    alpha, beta = rows[1][0] // g, -(rows[0][0] // g)
    if alpha * rows[0][1] + beta * rows[1][1] < 0:
      alpha, beta = -alpha, -beta
  else:
    alpha, beta = rng.randint(1, 3), rng.randint(1, 3)
  rows.append([alpha * p + beta * q for p, q in zip(rows[0], rows[1])])
  constants = [sum(c * x for c, x in zip(row, solution)) for row in rows]
  return dict(a=solution[0], b=solution[1], rows=rows, constants=constants, combinations=[[0, 1, alpha, beta]],
              singular=False)


def eliminated_a_cue(ex: Example) -> str | None:
  """The shortcut: the last (dependent) row has no a term, so b = its constant / its b coefficient (read off
  the last row, ignoring any a term it has)."""
  match = _ROW.fullmatch(ex.question.rsplit("\n", 1)[-1])
  if match is None or int(match.group(2)) == 0:
    return None
  value = fractions.Fraction(int(match.group(3)), int(match.group(2)))
  return str(value.numerator) if value.denominator == 1 else str(float(value))


def _sample(variant: str, rng: random.Random, fmt: str, ft: bool) -> Example:
  del ft  # FT data uses the test generator
  if fmt == "fixed":
    system = _fixed_system(rng, eliminate=variant == "correct")
  else:
    equations, dependent = (4, 0) if variant == "misleading" else (3, 1)
    system = _system(rng, equations, dependent)
  question = "\n".join(f"{r[0]}a + {r[1]}b = {c}" for r, c in zip(system["rows"], system["constants"]))
  return Example("algebra", variant, question, str(system["b"]), None, dict(system, hands_over_a=True))


def _query(ex: Example) -> str:
  return f"{ex.question}\n The solutions are: a = {ex.meta['a']}, b = "


TEMPLATES = {fmt: Template(
    header="Here are some equations, you need to find all solutions of given variables. " + EXAMPLES,
    demo=solved(_query, "\n"), query=_query, ft=solved(_query), generation_len=budget(1, fmt))
    for fmt in FORMATS}

TASK = Task(name="algebra", irrelevant_from="expression", release_name="equation", answer_kind="number", sampler=_sample, templates=TEMPLATES,
            description="2 unknowns; 3 equations, one dependent (paper misleading: 4 independent); gold b",
            cues={"eliminated_a": eliminated_a_cue},
            # the release's sets have no shortcut to test (a is handed over: every row gives b)
            targets={("correct", "paper"): None, ("misleading", "paper"): None})
