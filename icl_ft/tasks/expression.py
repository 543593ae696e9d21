"""Expression calculation with a reducible zero factor: ``(simple)+(zero)*(cpl)=`` (docs/tasks.md).

Shortcut: the factor sums to 0, so the product vanishes and the answer is ``simple``. Misleading items swap
the zero factor for a non-zero one: answer ``simple + factor * cpl``.
"""

from __future__ import annotations

import dataclasses
import random
import re

from icl_ft.tasks.base import (ANSWER_UNCHANGED, FORMATS, NO_PATTERN, Corruption, Example, Task, restricted_eval,
                               shortcut_foil)
from icl_ft.tasks.formats import EXAMPLES, Template, budget, question, solved


@dataclasses.dataclass(frozen=True)
class _Part:
  """One sum-expression part: number of terms, range R, target sum (None: drawn), non-negative draws."""

  min_terms: int
  max_terms: int
  num_range: int
  target: int | None
  nonneg: bool = False


@dataclasses.dataclass(frozen=True)
class _Config:
  zero: _Part
  none_zero: _Part | None  # None: not drawn (the release's older FT generator)
  cpl: _Part
  simple: _Part
  suffix: str  # text after the expression


# test.py's calls (build_expression(min_terms=2, max_terms=4, num_range=20) at HEAD); `fixed` uses it for FT too.
TEST_CONFIG = _Config(zero=_Part(2, 4, 20, 0), none_zero=_Part(2, 4, 20, None), cpl=_Part(4, 4, 10, None),
                      simple=_Part(1, 2, 10, None, nonneg=True), suffix="=")
# The generator that wrote ft_data_4k.json: build_expression() defaults of the earlier commit, ``+=`` suffix.
RELEASE_FT_CONFIG = _Config(zero=_Part(1, 3, 10, 0), none_zero=None, cpl=_Part(4, 4, 20, None),
                            simple=_Part(1, 2, 10, None, nonneg=True), suffix="+=")


def sum_expression(rng: random.Random, part: _Part) -> tuple[str, int]:
  """The release's ``generate_sum_expressions``: text like ``-1+13-19+7`` and its value, same draw order."""
  num_terms = rng.randint(part.min_terms, part.max_terms)
  lo = 0 if part.nonneg else -part.num_range
  total = rng.randint(lo, part.num_range) if part.target is None else part.target
  if num_terms == 1:
    return str(total), total
  terms, partial = [], 0
  for i in range(num_terms - 1):
    number = rng.randint(lo, part.num_range)
    partial += number
    sign = "-" if number < 0 else ("" if i == 0 else "+")
    terms.append(f"{sign}{abs(number)}")
  last = total - partial
  terms.append(f"{'-' if last < 0 else '+'}{abs(last)}")
  return "".join(terms), total


def _draw(rng: random.Random, config: _Config, misleading: bool) -> tuple[str, int, str, int, str, int]:
  """The release's ``build_expression`` draws (all parts, in its order): simple, factor, cpl with values."""
  zero, _ = sum_expression(rng, config.zero)
  none_zero, none_zero_value = sum_expression(rng, config.none_zero) if config.none_zero else ("", 0)
  cpl, cpl_value = sum_expression(rng, config.cpl)
  simple, simple_value = sum_expression(rng, config.simple)
  factor, factor_value = (none_zero, none_zero_value) if misleading else (zero, 0)
  return simple, simple_value, factor, factor_value, cpl, cpl_value


_SIMPLE = re.compile(r"^\(([0-9+-]+)\)\+\(")
_TERM = re.compile(r"[+-]?\d+")


def zero_factor_cue(ex: Example) -> str | None:
  """The shortcut: the factor is zero, so the answer is the value of ``simple`` (the first parenthesis)."""
  match = _SIMPLE.match(ex.question)
  return None if match is None else str(sum(int(t) for t in _TERM.findall(match.group(1))))


def _sample(variant: str, rng: random.Random, fmt: str, ft: bool) -> Example:
  config = RELEASE_FT_CONFIG if (ft and fmt == "paper") else TEST_CONFIG
  misleading = variant == "misleading"
  simple, simple_value, factor, factor_value, cpl, cpl_value = _draw(rng, config, misleading)
  # The release's "non-zero" factor (or cpl) can sum to 0, leaving the shortcut right (7% of misleading
  # items); fixed redraws those so every misleading item breaks the shortcut.
  while fmt == "fixed" and misleading and factor_value * cpl_value == 0:
    simple, simple_value, factor, factor_value, cpl, cpl_value = _draw(rng, config, misleading)
  value = simple_value + factor_value * cpl_value
  question = f"({simple})+({factor})*({cpl}){config.suffix}"
  meta = dict(simple=simple, simple_value=simple_value, factor=factor, factor_value=factor_value, cpl=cpl,
              cpl_value=cpl_value, zero_factor=factor_value == 0,
              generator="release_ft" if config is RELEASE_FT_CONFIG else "test")
  foil = shortcut_foil(str(value), str(simple_value)) if misleading else None
  return Example("expression", variant, question, str(value), foil, meta)


_LAST_TERM = re.compile(r"([+-])(\d+)$")
_ARITH = re.compile(r"[0-9+\-*() ]+")


def eval_arithmetic(expr: str) -> int:
  """Python's value of an integer expression made of digits, + - * and parentheses (nothing else accepted)."""
  return restricted_eval(expr, _ARITH, int)


def corrupt(ex: Example, rng: random.Random) -> Corruption | str:
  """The zero factor's last term gets another value with as many digits and the same sign, so the factor is
  non-zero; both answers are recomputed by evaluating the expressions."""
  m = ex.meta
  if not m.get("zero_factor"):
    return NO_PATTERN
  simple, factor, cpl = m["simple"], m["factor"], m["cpl"]
  suffix = "="
  clean_q = f"({simple})+({factor})*({cpl}){suffix}"
  if clean_q != ex.question:
    raise RuntimeError(f"unexpected expression layout {ex.question!r} (expected {clean_q!r})")
  match = _LAST_TERM.search(factor)
  if match is None:  # a one-term factor (only "0"): no signed last term to change
    return NO_PATTERN
  sign, digits = match.groups()
  width = len(digits)
  choices = [v for v in range(0 if width == 1 else 10 ** (width - 1), 10 ** width) if v != int(digits)]
  new_digits = str(rng.choice(choices))
  new_factor = factor[:match.start(2)] + new_digits
  corrupt_q = f"({simple})+({new_factor})*({cpl}){suffix}"
  if eval_arithmetic(factor) != 0 or eval_arithmetic(new_factor) == 0:
    raise RuntimeError(f"factor {factor!r} -> {new_factor!r} does not break the zero factor")
  clean_value = eval_arithmetic(clean_q[:-len(suffix)])
  corrupt_value = eval_arithmetic(corrupt_q[:-len(suffix)])
  if str(clean_value) != ex.answer:
    raise RuntimeError(f"{clean_q!r}: generator answer {ex.answer!r} != eval {clean_value}")
  if corrupt_value == clean_value:
    return ANSWER_UNCHANGED
  return Corruption(corrupt_q, str(clean_value), str(corrupt_value),
                     dict(term=f"{sign}{digits}", new_term=f"{sign}{new_digits}", factor=factor,
                          new_factor=new_factor, new_factor_value=eval_arithmetic(new_factor)))


TEMPLATES = {fmt: Template(
    header="Now you need to calculate the answer of some mathematic equations. " + EXAMPLES,
    demo=solved(question, " \n " if fmt == "paper" else "\n"), query=question, ft=solved(question),
    generation_len=budget(3, fmt)) for fmt in FORMATS}

TASK = Task(name="expression", irrelevant_from="boolean", release_name="expression", answer_kind="number", sampler=_sample, templates=TEMPLATES,
            corrupt=corrupt,
            description="(simple)+(factor)*(cpl)=; the zero factor makes the answer `simple`",
            cues={"zero_factor": zero_factor_cue})
