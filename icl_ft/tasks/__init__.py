"""The study's implicit-pattern tasks (docs/tasks.md): the registry, fixed query sets, demos and prompts.

Each task has a ``correct`` variant (the implicit shortcut gives the right answer) and misleading ones (same
surface, shortcut wrong); prompts come in the release's ``paper`` format or the ``fixed`` one. All randomness
comes from explicit ``random.Random`` objects; query sets are keyed by (task, variant, seed, format, split)
and demo streams by (task, query index, shots, seed, format, split), so every model and method sees the same
items. A task is one module (its generator, templates, cues and, optionally, its corruptor for prompt pairs)
plus one line in ``TASKS``.
"""

from __future__ import annotations

import random
from typing import Callable, Collection, Iterator, Sequence

from icl_ft.tasks import algebra, boolean, code, controls, expression, parity
from icl_ft.tasks.base import (ANSWER_KINDS, FORMATS, VARIANTS, Example, Task, check_name, keyed_rng,
                               same_answer)
from icl_ft.tasks.formats import Template

__all__ = [
    "ANSWER_KINDS", "DATA_VERSION", "FORMATS", "SPLITS", "TASKS", "VARIANTS", "Example", "Task", "answer_kind",
    "build_prompt", "controls_of", "ft_text", "generation_len", "get_task", "make_demos", "make_ft_examples", "make_queries",
    "query_stream", "release_stream_prompt", "same_answer", "sample", "shortcut_record", "strict_len", "template"]

# Bumped whenever a generator or template changes what it produces: part of every stage fingerprint, so a work
# directory never reuses data, checkpoints or scores made by an older generator.
DATA_VERSION = 4
RELEASE_FT_MIXTURE = ("expression", "parity", "boolean", "algebra")  # the release's ft_data_4k.json

TASKS: dict[str, Task] = {t.name: t for t in (expression.TASK, parity.TASK, boolean.TASK, code.TASK, algebra.TASK)}


def get_task(name: str | Task) -> Task:
  """The task called ``name`` (a Task passes through); unknown names raise a ValueError listing the valid ones."""
  if isinstance(name, Task):
    return name
  return TASKS[check_name("task", name, tuple(TASKS))]


def sample(task: str | Task, variant: str, rng: random.Random, fmt: str, *, ft: bool = False) -> Example:
  """One example of ``task`` drawn from ``rng``; ``ft`` selects the release's FT generator where it differed."""
  return get_task(task).sample(variant, rng, fmt, ft=ft)


def _count(name: str, value: int) -> int:
  if not isinstance(value, int) or value < 0:
    raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
  return value


SPLITS = ("test", "dev")


def _split_key(split: str) -> tuple[str, ...]:
  """Stream-key suffix of a split (none for ``test``, so test streams are those of earlier versions)."""
  return () if check_name("split", split, SPLITS) == "test" else (split,)


def query_stream(task: str | Task, variant: str, fmt: str, seed: int, split: str = "test") -> Iterator[Example]:
  """The endless item stream behind ``make_queries`` (item i of the stream is query i); names are checked now."""
  t = get_task(task)
  t.check(variant, fmt)
  rng = keyed_rng("queries", t.name, variant, fmt, seed, *_split_key(split))
  return (t.sample(variant, rng, fmt) for _ in iter(int, 1))


def make_queries(task: str | Task, variant: str, n: int, seed: int, fmt: str, split: str = "test",
                 exclude: Collection[str] = ()) -> list[Example]:
  """The fixed query set of (task, variant, seed, fmt, split): the same for every model and method.

  ``split="dev"`` draws from a separate stream (for choosing settings such as the shot count without
  touching the test set); questions in ``exclude`` (e.g. the test set's) are skipped.
  """
  n = _count("n", n)
  stream = query_stream(task, variant, fmt, seed, split)
  out: list[Example] = []
  while len(out) < n:
    ex = next(stream)
    if ex.question not in exclude:
      out.append(ex)
  return out


def make_demos(task: str | Task, k: int, seed: int, query_index: int, fmt: str, split: str = "test",
               nested: bool = False) -> list[Example]:
  """``k`` correct-variant demos for query ``query_index`` of ``split``, from a stream keyed by (task, index, k,
  seed, fmt, split): independent draws per k (the release's). ``nested``: the first k of one stream per query
  (keyed without k), so a query's k-shot demos are the start of its k'-shot demos for every k < k'."""
  t = get_task(task)
  t.check("correct", fmt)
  per_k = "nested" if nested else _count("k", k)
  rng = keyed_rng("demos", t.name, _count("query_index", query_index), per_k, seed, fmt, *_split_key(split))
  return [t.sample("correct", rng, fmt) for _ in range(k)]


def make_ft_examples(task: str | Task, n: int, seed: int, fmt: str, heldout: bool = False,
                     exclude: Collection[str] = ()) -> list[Example]:
  """``n`` correct-variant fine-tuning examples (paper: the release's FT generator, e.g. expression's ``+=``);
  ``heldout``: from a separate stream, for a held-out loss; questions in ``exclude`` are skipped."""
  t = get_task(task)
  t.check("correct", fmt)
  rng = keyed_rng("ft", t.name, fmt, seed, *(("heldout",) if heldout else ()))
  out: list[Example] = []
  for _ in range(100 * _count("n", n) + 100):
    ex = t.sample("correct", rng, fmt, ft=True)
    if ex.question not in exclude:
      out.append(ex)
    if len(out) == n:
      return out
  raise ValueError(f"{t.name} ({fmt}): could not draw {n} fine-tuning examples outside the {len(exclude)} excluded "
                   "questions; its question space is too small for this many held-out examples (lower n_heldout)")


def shortcut_record(ex: Example, fmt: str) -> dict:
  """What the item's shortcuts say: every cue's prediction (``cues``), the variant's target cue in ``fmt``
  (``shortcut_cue``), its prediction (``shortcut``) and ``shortcut_right``: whether that prediction equals the
  gold (None when the cue predicts nothing or the set has no shortcut). A well-built misleading set has
  ``shortcut_right`` False on every item; a correct set, True."""
  t = get_task(ex.task)
  cues = t.cue_predictions(ex)
  name = t.target_cue(ex.variant, fmt)
  pred = cues.get(name) if name else None
  return dict(cues=cues, shortcut_cue=name, shortcut=pred,
              shortcut_right=None if pred is None else same_answer(pred, ex.answer, t.answer_kind))


def template(task: str | Task, fmt: str) -> Template:
  """The template of ``task`` in ``fmt`` (both names validated)."""
  t = get_task(task)
  return t.templates[check_name("format", fmt, FORMATS)]


def build_prompt(task: str | Task, fmt: str, demos: Sequence[Example], query: Example, control: str | None = None,
                 key: tuple = (), measure: Callable[[str], int] = len) -> str:
  """Header + demos + query. ``control`` replaces the demos: ``shuffled`` (their answers permuted among them)
  or ``irrelevant`` (the ``irrelevant_from`` task's demos, as long by ``measure`` as the real ones: characters,
  or pass a tokenizer's count); ``key`` seeds it."""
  t = get_task(task)
  tpl = template(t, fmt)
  for ex in (*demos, query):
    if ex.task != t.name:
      raise ValueError(f"a {ex.task!r} example in a {t.name!r} prompt")
  return tpl.header + _demo_text(t, fmt, demos, control, key, measure) + tpl.prompt_query(query)


def _demo_text(t: Task, fmt: str, demos: Sequence[Example], control: str | None, key: tuple,
               measure: Callable[[str], int]) -> str:
  tpl = template(t, fmt)
  if control is None:
    return "".join(tpl.demo(d) for d in demos)
  check_name("control", control, controls.CONTROLS)
  if control == "shuffled":
    rng = keyed_rng("shuffled", t.name, fmt, *key)
    shuffled = controls.shuffled_labels(demos, rng, lambda: t.sample("correct", rng, fmt).answer)
    return "".join(tpl.demo(d) for d in shuffled)
  if t.irrelevant_from is None:
    raise ValueError(f"task {t.name!r} names no task for irrelevant demos (Task.irrelevant_from)")
  other = get_task(t.irrelevant_from)
  rng = keyed_rng("irrelevant", t.name, other.name, fmt, *key)
  return controls.fill(lambda: template(other, fmt).demo(other.sample("correct", rng, fmt)),
                       measure("".join(tpl.demo(d) for d in demos)), measure)


def controls_of(task: str | Task, wanted: Sequence[str]) -> tuple[str, ...]:
  """The controls of ``wanted`` that ``task`` has: ``irrelevant`` needs a ``Task.irrelevant_from``."""
  t = get_task(task)
  return tuple(c for c in wanted if check_name("control", c, controls.CONTROLS) != "irrelevant" or t.irrelevant_from)


def ft_text(example: Example, fmt: str, with_header: bool = False) -> str:
  """Question + answer for fine-tuning, as the release's FT data (bare), optionally after the task header."""
  tpl = template(example.task, fmt)
  return (tpl.header if with_header else "") + tpl.ft(example)


def generation_len(task: str | Task, fmt: str) -> int:
  """Lenient new-token budget: the release's (paper) or the strict scorer's (fixed; 24 for code's floats)."""
  return template(task, fmt).generation_len


def strict_len(task: str | Task, fmt: str) -> int:
  """Strict new-token budget: 8, or 24 for code (its float answers run to 20 characters)."""
  return template(task, fmt).strict_len


def answer_kind(task: str | Task) -> str:
  """``number`` (expression, code, algebra) or ``label`` (parity, boolean), for the strict scorer."""
  return get_task(task).answer_kind


def release_stream_prompt(task: str | Task, variant: str, k: int, rng: random.Random,
                          fmt: str = "paper") -> tuple[str, Example]:
  """One prompt as the release's test loop draws it from one shared stream: k correct demos, then the query.

  With ``random.Random(114514)`` this reproduces the release's first prompt after ``random.seed(114514)``
  (the goldens in tests/test_tasks.py). Returns (prompt, query).
  """
  t = get_task(task)
  t.check(variant, fmt)
  demos = [t.sample("correct", rng, fmt) for _ in range(_count("k", k))]
  query = t.sample(variant, rng, fmt)
  return build_prompt(t.name, fmt, demos, query), query
