"""Answer scoring: the release's lenient substring rule and the strict parse-and-compare rule."""

from __future__ import annotations

import re

from icl_ft.tasks.base import LABEL_VALUE, same_answer

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_LABEL = re.compile(r"\b(?:True|False|1|0)\b")


def lenient_correct(gold: str, continuation: str, accept_binary_digits: bool = False) -> bool:
  """The release's rule: ``str(gold)`` is a substring of the continuation.

  With ``accept_binary_digits`` (relation reasoning), ``1``/``0`` also score for ``True``/``False``.
  """
  if gold in continuation:
    return True
  return accept_binary_digits and gold in ("True", "False") and LABEL_VALUE[gold] in continuation


def strict_answer(continuation: str, kind: str) -> str | None:
  """The first answer-typed span of the continuation's first line (leading whitespace stripped)."""
  line = continuation.lstrip().split("\n", 1)[0]
  match = (_NUMBER if kind == "number" else _LABEL).search(line)
  return None if match is None else match.group(0)


def strict_correct(gold: str, continuation: str, kind: str) -> bool:
  """Exact equality after normalisation (``same_answer``) of the first answer-typed span and the gold."""
  return same_answer(strict_answer(continuation, kind), gold, kind)
