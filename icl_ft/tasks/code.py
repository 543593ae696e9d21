"""Code reading with an irrelevant function (docs/tasks.md; the release's
``data/code.json`` is unavailable).

Programs are generated procedurally: ``function1(x)`` is a random, deterministic composition of snippets
(loops, arithmetic, lists, strings, ``math``, conditionals, comprehensions, ...); ``function2(z, a)``
returns ``z <op> d`` and ignores ``a``, so the output is ``input <op> d`` (the shortcut). Misleading items
return ``z <op> d + a % m`` instead, with ``a % m != 0``, so ignoring ``function1`` fails.
The gold is what the program prints (``8.0`` for ``float(input())``, Python float text for ``/``) in
``fixed``; ``paper`` keeps the release's integer-maths gold (``8``; ``meta["printed"]`` has the printed value).
"""

from __future__ import annotations

import operator
import random
import re
from typing import Callable

from icl_ft.tasks.base import Example, Task, shortcut_foil
from icl_ft.tasks.formats import EXAMPLES, LONG_BUDGET, Template, solved

OPERATORS: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
INPUT_RANGE = 10  # input values are randint(0, 10), as in the release
FLOAT_INPUT_RATE = 0.5  # the release's code.json: 335 float(input()), 197 int(input())
MISLEADING_MODULI = (2, 3, 4, 5)
INDENT = "    "

_RESULT_NAMES = ("total", "count", "acc", "score", "result", "level", "weight", "offset", "steps", "width",
                 "depth", "tally", "mark", "span", "bonus", "amount", "product", "factor", "extra", "ratio")
_INPUT_NAMES = ("n", "num", "value", "base", "number")
_LOOP_NAMES = ("i", "j", "k", "idx", "step")
_WORDS = ("apple", "river", "stone", "python", "matrix", "orange", "silver", "planet", "garden", "window",
          "copper", "lantern", "meadow", "rocket", "violet", "harbor")

# A snippet: (rng, input variable, result variable) -> (body lines, int-valued expression, uses math).
Snippet = Callable[[random.Random, str, str], tuple[list[str], str, bool]]


def _for_sum(r: random.Random, n: str, out: str):
  i, op = r.choice(_LOOP_NAMES), r.choice("+*-")
  return [f"{out} = {r.randint(0, 5)}", f"for {i} in range({n} + {r.randint(1, 6)}):",
          f"{INDENT}{out} += {i} {op} {r.randint(1, 9)}"], out, False


def _while_halve(r: random.Random, n: str, out: str):
  return [f"{out} = 0", f"t = {n} * {r.randint(1, 9)} + {r.randint(1, 20)}", "while t > 0:",
          f"{INDENT}t //= {r.randint(2, 4)}", f"{INDENT}{out} += 1"], out, False


def _list_comp(r: random.Random, n: str, out: str):
  i = r.choice(_LOOP_NAMES)
  reduce = r.choice(["sum({})", "len({})", "max({}, default=0)", "min({}, default=0)", "{}.count(0)"])
  return [f"{out} = [{i} * {r.randint(1, 9)} % {r.randint(2, 7)} for {i} in range({n} % {r.randint(2, 6)} + "
          f"{r.randint(1, 4)})]"], reduce.format(out), False


def _string_repeat(r: random.Random, n: str, out: str):
  value = r.choice(["len({})", f"{{}}.count('{r.randint(0, 9)}')", "int({}[:3])"])
  return [f"{out} = str({n}) * {r.randint(1, 4)}"], value.format(out), False


def _string_method(r: random.Random, n: str, out: str):
  method = r.choice(["upper", "lower", "title", "capitalize", "swapcase", "strip"])
  word = r.choice(_WORDS)
  value = r.choice(["len({})", f"{{}}.find('{r.choice(word)}')", "{}.count('a') + {}.count('e')"])
  return [f"{out} = '{word}'.{method}() + str({n})"], value.format(out, out), False


def _math_sqrt(r: random.Random, n: str, out: str):
  fn = r.choice(["int(math.sqrt({}))", "math.isqrt({})", "math.floor(math.sqrt({}))"])
  return [f"{out} = " + fn.format(f"{n} * {r.randint(1, 9)} + {r.randint(0, 9)}")], out, True


def _math_gcd(r: random.Random, n: str, out: str):
  return [f"{out} = math.gcd({n} + {r.randint(1, 9)}, {r.randint(2, 30)})"], out, True


def _math_factorial(r: random.Random, n: str, out: str):
  return [f"{out} = math.factorial({n} % {r.randint(3, 7)})"], out, True


def _math_log(r: random.Random, n: str, out: str):
  if r.random() < 0.5:
    return [f"{out} = math.floor(math.log({n} + {r.randint(1, 9)}, {r.randint(2, 5)}))"], out, True
  return [f"{out} = math.ceil({n} / {r.randint(2, 7)})"], out, True


def _conditional(r: random.Random, n: str, out: str):
  k = r.randint(2, 5)
  return [f"if {n} % {k} == {r.randint(0, k - 1)}:", f"{INDENT}{out} = {n} * {r.randint(2, 9)}",
          f"elif {n} > {r.randint(2, 8)}:", f"{INDENT}{out} = {n} - {r.randint(1, 9)}",
          "else:", f"{INDENT}{out} = {r.randint(0, 20)}"], out, False


def _dict_comp(r: random.Random, n: str, out: str):
  i = r.choice(_LOOP_NAMES)
  value = r.choice([f"{{}}.get({n}, {r.randint(0, 9)})", "sum({}.values())", "len({})"])
  return [f"{out} = {{{i}: {i} * {i} + {r.randint(0, 5)} for {i} in range({r.randint(2, 9)})}}"], \
      value.format(out), False


def _fibonacci(r: random.Random, n: str, out: str):
  return ["p, q = 0, 1", f"for _ in range({n} % {r.randint(3, 9)} + {r.randint(1, 5)}):",
          f"{INDENT}p, q = q, p + q", f"{out} = p"], out, False


def _digit_sum(r: random.Random, n: str, out: str):
  return [f"{out} = sum(int(d) for d in str({n} ** {r.randint(1, 4)} + {r.randint(0, 99)}))"], out, False


def _bits(r: random.Random, n: str, out: str):
  expr = r.choice([f"bin({n} + {r.randint(1, 30)}).count('1')", f"({n} ^ {r.randint(1, 31)}) & {r.randint(1, 63)}",
                   f"({n} << {r.randint(1, 3)}) | {r.randint(0, 7)}", f"({n} * {r.randint(3, 9)}) >> 1"])
  return [f"{out} = {expr}"], out, False


def _sorted_list(r: random.Random, n: str, out: str):
  i = r.choice(_LOOP_NAMES)
  items = (f"[({n} * {r.randint(1, 9)} + {i} * {r.randint(1, 9)}) % {r.randint(5, 17)} "
           f"for {i} in range({r.randint(1, 6)})]")
  return [f"{out} = sorted({items}, reverse={r.choice([True, False])})"], f"{out}[{r.choice([0, -1])}]", False


def _try_except(r: random.Random, n: str, out: str):
  return ["try:", f"{INDENT}{out} = {r.randint(10, 99)} // ({n} - {r.randint(0, 10)})",
          "except ZeroDivisionError:", f"{INDENT}{out} = {r.randint(0, 9)}"], out, False


def _lambda(r: random.Random, n: str, out: str):
  fn = r.choice(["scale", "shift", "warp", "bend"])
  return [f"{fn} = lambda t: t * {r.randint(2, 9)} {r.choice('+-')} {r.randint(1, 9)}",
          f"{out} = {fn}({n}) % {r.randint(5, 50)}"], out, False


def _set_ops(r: random.Random, n: str, out: str):
  lo = r.randint(0, 6)
  op = r.choice("&|-^")
  return [f"{out} = set(range({n})) {op} set(range({lo}, {lo + r.randint(1, 8)}))"], f"len({out})", False


def _enumerate(r: random.Random, n: str, out: str):
  i = r.choice(_LOOP_NAMES)
  return [f"{out} = sum({i} * w for {i}, w in enumerate([{n}, {r.randint(0, 9)}, {r.randint(0, 9)}]))"], out, False


def _collatz(r: random.Random, n: str, out: str):
  return [f"{out} = 0", f"m = {n} + {r.randint(1, 9)}", f"while m != 1 and {out} < {r.randint(5, 40)}:",
          f"{INDENT}m = m // 2 if m % 2 == 0 else 3 * m + 1", f"{INDENT}{out} += 1"], out, False


def _join(r: random.Random, n: str, out: str):
  i = r.choice(_LOOP_NAMES)
  sep = r.choice(["-", ",", ":", "", " "])
  value = r.choice(["len({})", f"{{}}.count('{r.randint(0, 9)}')"])
  return [f"{out} = '{sep}'.join(str({i}) for {i} in range({n} % {r.randint(2, 9)} + 1))"], value.format(out), False


def _extremes(r: random.Random, n: str, out: str):
  fn = r.choice(["max", "min"])
  return [f"{out} = {fn}({n} - {r.randint(0, 9)}, {r.randint(0, 9)} - {n}, {r.randint(-5, 9)})"], \
      f"abs({out})" if r.random() < 0.5 else out, False


def _stack(r: random.Random, n: str, out: str):
  i = r.choice(_LOOP_NAMES)
  return ["stack = []", f"for {i} in range({r.randint(1, 6)}):",
          f"{INDENT}stack.append({i} * {n} % {r.randint(2, 11)})",
          f"{out} = stack.pop() + len(stack)"], out, False


def _nested_loop(r: random.Random, n: str, out: str):
  return [f"{out} = 0", f"for i in range({r.randint(1, 4)}):", f"{INDENT}for j in range({n} % {r.randint(2, 5)} + 1):",
          f"{INDENT * 2}if (i + j) % {r.randint(2, 3)} == 0:",
          f"{INDENT * 3}{out} += i * j + {r.randint(1, 3)}"], out, False


SNIPPETS: tuple[Snippet, ...] = (
    _for_sum, _while_halve, _list_comp, _string_repeat, _string_method, _math_sqrt, _math_gcd, _math_factorial,
    _math_log, _conditional, _dict_comp, _fibonacci, _digit_sum, _bits, _sorted_list, _try_except, _lambda,
    _set_ops, _enumerate, _collatz, _join, _extremes, _stack, _nested_loop)


def function1_source(rng: random.Random) -> tuple[str, bool]:
  """A random ``function1(x)`` returning an int; (source, needs ``import math``)."""
  n = rng.choice(_INPUT_NAMES)
  names = rng.sample(_RESULT_NAMES, rng.randint(2, 4))
  lines, values, uses_math = [f"{n} = int(x)"], [], False
  for out in names:
    body, value, math_used = rng.choice(SNIPPETS)(rng, n, out)
    lines += body
    values.append(value)
    uses_math |= math_used
  ret = values[0] + "".join(f" {rng.choice(['+', '-', '+', '-', '*'])} {v}" for v in values[1:])
  lines.append(f"return {ret}")
  return "def function1(x):\n" + "".join(f"{INDENT}{line}\n" for line in lines), uses_math


def _program(defs: str, uses_math: bool, input_type: str) -> str:
  """The full program text; like most of the release's entries it begins and ends with a newline."""
  header = "\nimport math\n\n" if uses_math else "\n"
  return (f"{header}{defs}\ninput_value = {input_type}(input())\n"
          "print(function2(input_value, function1(input_value)))\n")


def _load(defs: str, uses_math: bool) -> dict:
  """The namespace after executing the generated (trusted, our own) definitions."""
  namespace: dict = {}
  exec(compile(("import math\n" if uses_math else "") + defs, "<generated>", "exec"), namespace)
  return namespace


_FUNCTION2 = re.compile(r"def function2\(z, a\):\n +return z ([-+*/]) (\d+)")


def irrelevant_function_cue(ex: Example) -> str | None:
  """The shortcut: ``function2`` returns ``z <op> d`` and ``function1`` is irrelevant, so the output is
  ``input <op> d`` (computed with the program's input type)."""
  match = _FUNCTION2.search(ex.question)
  if match is None:
    return None
  v = ex.meta["input"]  # shown in the prompt ("The input is: v")
  x = float(v) if "float(input())" in ex.question else v
  return str(OPERATORS[match.group(1)](x, int(match.group(2))))


def _sample(variant: str, rng: random.Random, fmt: str, ft: bool) -> Example:
  """One program. The gold is what it prints (``fixed``) or, as in the release (``paper``), the value in
  integer maths of the input as an int (``8`` where a ``float(input())`` program prints ``8.0``)."""
  del ft  # one generator in both formats
  misleading = variant == "misleading"
  while True:
    f1, uses_math = function1_source(rng)
    op, d = rng.choice(sorted(OPERATORS)), rng.randint(1, 9)
    input_type = "float" if rng.random() < FLOAT_INPUT_RATE else "int"
    v = rng.randint(0, INPUT_RANGE)
    x = float(v) if input_type == "float" else v
    a = _load(f1, uses_math)["function1"](x)
    moduli = [m for m in MISLEADING_MODULI if a % m]
    if not misleading or moduli:  # misleading: some modulus must make function1 matter for this input
      break
  modulus = rng.choice(moduli) if misleading else None
  f2 = f"def function2(z, a):\n{INDENT}return z {op} {d}" + (f" + a % {modulus}" if modulus else "") + "\n"
  defs = f"{f1}\n{f2}"
  function2 = _load(defs, uses_math)["function2"]
  printed = str(function2(x, a))
  answer = printed if fmt == "fixed" else str(function2(v, a))
  shortcut = str(OPERATORS[op](x, d) if fmt == "fixed" else OPERATORS[op](v, d))
  meta = dict(input=v, input_type=input_type, op=op, number=d, modulus=modulus, function1_value=a,
              shortcut=shortcut, printed=printed)
  foil = shortcut_foil(answer, shortcut) if misleading else None
  return Example("code", variant, _program(defs, uses_math, input_type), answer, foil, meta)


_HINT, _INPUT, _OUTPUT = "The code is: \n", "The input is: ", ", so the output is: "


def _query(ex: Example) -> str:
  return f"{_HINT}{ex.question}{_INPUT}{ex.meta['input']}{_OUTPUT}"


_HEADER = "Now you need to give me the printed result after running this python code . " + EXAMPLES
TEMPLATES = {
    "paper": Template(header=_HEADER, demo=solved(_query, "\nHere is next example:\n"),
                      query=lambda ex: _INPUT + _query(ex),  # the release's stray "The input is: "
                      ft=solved(_query), generation_len=2, strict_len=LONG_BUDGET),
    "fixed": Template(header=_HEADER, demo=solved(_query, "\nHere is next example:\n"), query=_query,
                      ft=solved(_query), generation_len=LONG_BUDGET, strict_len=LONG_BUDGET,
                      answer_space=True),  # " -2.0" starts with one token " -" in the demos and FT texts
}

TASK = Task(name="code", irrelevant_from="parity", release_name="code", answer_kind="number", sampler=_sample, templates=TEMPLATES,
            description="print(function2(v, function1(v))); function2 ignores function1's value",
            cues={"irrelevant_function": irrelevant_function_cue})
