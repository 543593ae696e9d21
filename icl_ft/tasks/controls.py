"""Demonstrations for the ICL controls: the same demos with their answers shuffled among them (Min et al., 2022:
does ICL need the right labels, or only the format?) and another task's demos taking up the same length, in
tokens when a tokenizer measures it (does any long prompt move the circuit as much as real demos?)."""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

from icl_ft.tasks.base import Example

CONTROLS = ("shuffled", "irrelevant")


def shuffled_labels(demos: Sequence[Example], rng: random.Random) -> list[Example]:
  """The demos with their answers permuted among them: the same multiset of answers, and at least one demo's
  answer changed whenever the answers are not all equal (the identity permutation is redrawn)."""
  answers = [d.answer for d in demos]
  if len(set(answers)) < 2:
    return list(demos)
  order = list(range(len(demos)))
  while [answers[i] for i in order] == answers:
    rng.shuffle(order)
  return [dataclasses.replace(d, answer=answers[i]) for d, i in zip(demos, order)]


def fill(next_demo: Callable[[], str], length: int, measure: Callable[[str], int] = len) -> str:
  """Rendered demos from ``next_demo`` until ``measure`` (characters, or a tokenizer's count) reaches ``length``,
  cut at the longest prefix that does not exceed it."""
  text = ""
  while measure(text) < length:
    text += next_demo()
  lo, hi = 0, len(text)
  while lo < hi:  # binary search: measure grows with the prefix
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if measure(text[:mid]) <= length else (lo, mid - 1)
  return text[:lo]
