"""Linear equations with a dependent equation (study §2.5, "equation" in the release).

Correct items: 2 independent rows with coefficients 1..4 plus one row that is a combination of them;
misleading items: 4 independent rows. The gold is b (the query hands the model a, in both formats, as the
release does; ``meta["hands_over_a"]`` logs it). ``paper`` keeps singular systems (12.5% of correct ones,
flagged in ``meta["singular"]``); ``fixed`` rejects them.
"""

from __future__ import annotations

import random

from icl_ft.tasks.base import Example, Task, numpy_rng_from

VARIABLES = "ab"


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


def _sample(variant: str, rng: random.Random, fmt: str, ft: bool) -> Example:
  del ft  # FT data uses the test generator
  equations, dependent = (4, 0) if variant == "misleading" else (3, 1)
  system = _system(rng, equations, dependent)
  while fmt == "fixed" and system["singular"]:
    system = _system(rng, equations, dependent)
  question = "\n".join(f"{r[0]}a + {r[1]}b = {c}" for r, c in zip(system["rows"], system["constants"]))
  return Example("algebra", variant, question, str(system["b"]), None, dict(system, hands_over_a=True))


TASK = Task(name="algebra", release_name="equation", answer_kind="number", sampler=_sample,
            description="2 unknowns; 3 equations, one dependent (misleading: 4 independent); gold b")
