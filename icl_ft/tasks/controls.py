"""Demonstrations for the ICL controls: the same demos with their answers shuffled among them (Min et al., 2022:
does ICL need the right labels, or only the format?) and text of another task's demos taking up the same
number of characters (does any long prompt move the circuit as much as real demos?)."""

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


def fill(next_demo: Callable[[], str], length: int) -> str:
  """Rendered demos from ``next_demo`` until ``length`` characters, the last one cut there."""
  text = ""
  while len(text) < length:
    text += next_demo()
  return text[:length]
