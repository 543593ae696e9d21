"""What every task's prompt templates share: the ``Template`` record, the header ending, budgets, helpers.

Each task module holds its own templates for both formats (``TEMPLATES``): ``paper`` reproduces the
release's strings byte for byte, quirks included; ``fixed`` corrects them (docs/tasks.md lists each quirk
and its correction).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from icl_ft.tasks.base import Example

EXAMPLES = "Here are some examples: \n"  # every header ends so, also at 0 shots (the release's)
STRICT_BUDGET = 8  # the strict scorer's new-token budget
LONG_BUDGET = 3 * STRICT_BUDGET  # code's printed floats: at most 20 characters, so this fits any tokenizer


@dataclasses.dataclass(frozen=True)
class Template:
  """How one task is laid out in one format."""

  header: str
  demo: Callable[[Example], str]  # a solved demo, separator included
  query: Callable[[Example], str]  # the unsolved query, ending where the answer starts
  ft: Callable[[Example], str]  # question + answer, as in the release's FT data (no header)
  generation_len: int  # new-token budget of the lenient rule (paper: the release's)
  strict_len: int = STRICT_BUDGET  # new-token budget of the strict rule
  # The query's trailing space belongs to the answer ("... is" + " True"), so the prompt ends where the demos' and
  # the fine-tuning texts' answer token (" True") starts; off in ``paper``, whose prompts end in a bare space.
  answer_space: bool = False

  def prompt_query(self, ex: Example) -> str:
    """The query as a prompt ends: without its trailing space when ``answer_space``."""
    q = self.query(ex)
    return q[:-len(self.lead(ex))] if self.lead(ex) else q

  def lead(self, ex: Example) -> str:
    """What precedes the answer in the continuation of ``prompt_query``: " " when ``answer_space`` moves it there."""
    return " " if self.answer_space and self.query(ex).endswith(" ") else ""


def solved(query: Callable[[Example], str], end: str = "") -> Callable[[Example], str]:
  """query + answer + ``end``."""
  return lambda ex: f"{query(ex)}{ex.answer}{end}"


def question(ex: Example) -> str:
  return ex.question


def budget(release: int, fmt: str) -> int:
  """The lenient budget: the release's in ``paper``, the strict scorer's in ``fixed``."""
  return release if fmt == "paper" else STRICT_BUDGET
