"""Shared types and helpers of the task generators: examples, task records, name checks, seeded streams."""

from __future__ import annotations

import array
import dataclasses
import hashlib
import random
from typing import Any, Callable, Mapping, Sequence

import numpy as np

VARIANTS = ("correct", "misleading")
LABEL_VALUE = {"True": "1", "False": "0", "1": "1", "0": "0"}  # label answers: True is 1, False is 0
FORMATS = ("paper", "fixed")
ANSWER_KINDS = ("number", "label")


@dataclasses.dataclass(frozen=True)
class Example:
  """One task item. ``question`` is the bare question text; the task's templates add everything else."""

  task: str
  variant: str
  question: str
  answer: str  # gold answer text, exactly as scored
  foil: str | None  # what the shortcut answers when it is wrong (misleading), the other label (binary correct)
  meta: dict[str, Any]  # JSON-serialisable values defining the item's pattern


# (variant, rng, fmt, ft) -> Example; ``ft`` selects the release's fine-tuning generator where it differed.
Sampler = Callable[[str, random.Random, str, bool], Example]
# A cue: what a shortcut predicts for an item, a pure function of its question text (None: no prediction).
Cue = Callable[[Example], "str | None"]


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: its sampler, answer type and the variants it offers."""

  name: str
  release_name: str  # the name the release's test.py uses
  answer_kind: str  # "number" | "label"
  sampler: Sampler
  templates: Mapping[str, Any]  # format -> formats.Template
  variants: tuple[str, ...] = VARIANTS
  description: str = ""
  # Named shortcut cues; the first is the task's shortcut (the implicit pattern the study names).
  cues: Mapping[str, Cue] = dataclasses.field(default_factory=dict)
  # The release's lenient rule also accepts 1/0 for True/False (its relation task did).
  lenient_digits: bool = False
  # Variant, or (variant, format), -> the cue it tests (default: the first cue); None: the set has no shortcut.
  targets: Mapping[str | tuple[str, str], str | None] = dataclasses.field(default_factory=dict)
  # (correct example, rng) -> a Corruption (the pattern broken at equal surface length) or a drop reason; None:
  # the task has no clean/corrupt prompt pairs (no circuit analysis).
  corrupt: Callable[[Example, random.Random], "Corruption | str"] | None = None
  pair_formats: tuple[str, ...] = FORMATS  # the formats whose correct items carry a pattern to corrupt
  irrelevant_from: str | None = None  # the task whose demos fill the irrelevant-demo ICL control (whole demos:
  # pick one whose demos are short and varied enough to match this task's k demos within 5% of tokens)

  def target_cue(self, variant: str, fmt: str) -> str | None:
    """The cue whose shortcut ``variant`` tests in format ``fmt``: ``targets`` by (variant, format), then by
    variant, else the first cue; None if the set has no shortcut to test."""
    default = self.targets.get(variant, next(iter(self.cues), None))
    return self.targets.get((variant, fmt), default)

  def cue_predictions(self, ex: Example) -> dict[str, str | None]:
    """Every cue's prediction for ``ex``."""
    return {name: cue(ex) for name, cue in self.cues.items()}

  def check(self, variant: str, fmt: str) -> None:
    """ValueError (listing the valid names) unless ``variant`` and ``fmt`` are valid for this task."""
    check_name("variant", variant, self.variants, f" for task {self.name!r}")
    check_name("format", fmt, FORMATS)

  def sample(self, variant: str, rng: random.Random, fmt: str, *, ft: bool = False) -> Example:
    """One example drawn from ``rng`` (validated ``variant`` and ``fmt``)."""
    self.check(variant, fmt)
    if ft and variant != "correct":
      raise ValueError(f"fine-tuning data is correct-variant only, got variant {variant!r}")
    return self.sampler(variant, rng, fmt, ft)


@dataclasses.dataclass(frozen=True)
class Corruption:
  """A clean item's pattern broken by a small edit (circuit analysis pairs): the corrupted question and both
  answers, each recomputed from its own question."""

  question: str
  clean_answer: str
  corrupt_answer: str
  meta: dict[str, Any]


# Why a candidate pair was dropped (keys of PairSet.dropped); the corruptors return the first three.
NO_PATTERN = "no_pattern"  # the item has no zero factor / absorbing clause / Z line to corrupt
LABEL_FALSE = "clean_label_false"  # parity: only True items have a last Z line to corrupt
ANSWER_UNCHANGED = "answer_unchanged"  # the corruption did not change the answer (e.g. cpl = 0, no label flip)


def restricted_eval(expr: str, allowed: "re.Pattern", kind: type):
  """Python's value of ``expr`` if it consists only of ``allowed`` tokens and is a ``kind``; else ValueError."""
  if not allowed.fullmatch(expr):
    raise ValueError(f"not a plain {kind.__name__} expression: {expr!r}")
  value = eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - validated above
  if type(value) is not kind:
    raise ValueError(f"{expr!r} evaluates to {value!r}, not a {kind.__name__}")
  return value


def same_answer(a: str | None, b: str | None, kind: str) -> bool:
  """Whether two answers are equal after normalisation: numeric equality for ``number`` answers (``8.0`` ==
  ``8``), ``1`` == ``True`` for ``label`` answers; None equals nothing."""
  if a is None or b is None:
    return False
  if kind == "number":
    return float(a) == float(b)
  return LABEL_VALUE.get(a, a) == LABEL_VALUE.get(b, b)


def check_name(kind: str, value: str, valid: Sequence[str], where: str = "") -> str:
  """Returns ``value`` if it is one of ``valid``; otherwise a ValueError listing the valid names."""
  if value not in valid:
    raise ValueError(f"unknown {kind} {value!r}{where}; valid {kind}s: {', '.join(valid)}")
  return value


def keyed_rng(*key: object) -> random.Random:
  """A stdlib stream determined by ``key`` (string seeding hashes with SHA-512: stable across processes)."""
  return random.Random("icl_ft.tasks|" + "|".join(map(str, key)))


def numpy_rng_from(rng: random.Random) -> np.random.Generator:
  """A NumPy Generator derived from ``rng``'s current state, without drawing from ``rng``.

  The release drew NumPy numbers from the unseeded global NumPy state, so they never consumed Python
  ``random`` draws; deriving from the state (not from a draw) keeps the Python stream in the release's order.
  """
  digest = hashlib.blake2b(array.array("Q", rng.getstate()[1]).tobytes(), digest_size=16).digest()
  return np.random.default_rng(int.from_bytes(digest, "little"))


def binary_foil(answer: str, labels: tuple[str, str]) -> str:
  """The other label of a binary task."""
  return labels[1] if answer == labels[0] else labels[0]


def shortcut_foil(answer: str, shortcut: str) -> str | None:
  """The shortcut's answer if it is wrong, else None."""
  return None if shortcut == answer else shortcut
