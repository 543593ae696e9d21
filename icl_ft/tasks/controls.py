"""Demonstrations for the ICL controls: the same demos with their answers shuffled among them (Min et al., 2022:
does ICL need the right labels, or only the format?) and another task's demos taking up the same length, in
tokens when a tokenizer measures it (does any long prompt move the circuit as much as real demos?)."""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from icl_ft.tasks.base import Example

CONTROLS = ("shuffled", "irrelevant")


def shuffled_labels(demos: Sequence[Example], rng: random.Random, other_answer: Callable[[], str]) -> list[Example]:
  """The demos with their answers permuted among them (the same multiset, at least one demo's answer changed,
  the identity permutation redrawn); when all demos share one answer, permuting changes nothing, so one random
  demo gets a different answer from ``other_answer`` (drawn from the task) instead."""
  answers = [d.answer for d in demos]
  if not answers:
    return []
  if len(set(answers)) < 2:
    i, new = rng.randrange(len(answers)), other_answer()
    while new == answers[0]:
      new = other_answer()
    return [dataclasses.replace(d, answer=new if j == i else d.answer) for j, d in enumerate(demos)]
  order = list(range(len(demos)))
  while [answers[i] for i in order] == answers:
    rng.shuffle(order)
  return [dataclasses.replace(d, answer=answers[i]) for d, i in zip(demos, order)]


def fill(next_demo: Callable[[], str], length: int, measure: Callable[[str], int] = len, pool: int = 64) -> str:
  """Whole rendered demos whose total ``measure`` (characters, or a tokenizer's count) is closest to ``length``:
  the subset of ``pool`` demos drawn from ``next_demo`` with the closest sum of lengths (subset sum), in drawn
  order. Demos are never cut, so the prompt keeps its format."""
  demos = [next_demo() for _ in range(pool)]
  sizes = [measure(d) for d in demos]
  best: dict[int, tuple[int, ...]] = {0: ()}  # reachable total -> the first subset found reaching it
  for i, n in enumerate(sizes):
    for total, chosen in list(best.items()):
      if total + n <= 2 * length and total + n not in best:
        best[total + n] = chosen + (i,)
  total = min((t for t in best if t), key=lambda t: (abs(t - length), t), default=0)
  return "".join(demos[i] for i in best[total])
