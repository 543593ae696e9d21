"""Clean/corrupted prompt pairs for activation patching (study §8, "symmetric token replacement").

Each pair is a correct-variant query x whose shortcut holds and a copy x~ in which a few characters break the
pattern at equal length; both answers are recomputed from the strings (Python eval / graph search), never
taken from string edits:

* expression: the zero factor's LAST term gets another value with the same number of digits and the same sign,
  so the factor is non-zero; clean answer = simple's value, corrupt answer = eval of the corrupted expression.
* parity: a True item (10 lines, last line ``x is connected with Z``); ``Z`` in that last line becomes an unused
  letter (K..Y), so A no longer reaches Z: answer False.
* boolean (fixed format only: its correct items carry the absorbing clause): ``and False`` <-> ``and True`` or
  ``or True`` <-> ``or False``, keeping only pairs whose label flips.

With ``shots`` > 0 the same k correct demos (``tasks.make_demos(task, k, seed, i, fmt)``, i = the candidate's query
index) precede both queries. Candidate i is item i of ``tasks.make_queries(task, "correct", ., seed, fmt)``.
A pair is kept only if both prompts have the same token count, their ids differ in 1..``max_changed``
positions, and the first answer tokens differ; everything else is counted in ``PairSet.dropped`` by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
from typing import Any, Callable, Iterator

import numpy as np

from icl_ft import tasks
from icl_ft.icl import continuation_ids
from icl_ft.tasks.base import Example, check_name, keyed_rng
from icl_ft.tasks.formats import template

SUPPORTED_TASKS = ("expression", "parity", "boolean")
TRIES_PER_PAIR = 20
UNUSED_CITIES = tuple(chr(c) for c in range(ord("K"), ord("Y") + 1))  # never drawn by the relation generator

# Drop reasons (keys of PairSet.dropped).
LENGTH_MISMATCH = "length_mismatch"  # the two prompts tokenise to different lengths
TOO_MANY_CHANGES = "too_many_changes"  # more than max_changed positions differ
IDENTICAL_IDS = "identical_ids"  # the tokenizer maps both prompts to the same ids (e.g. <unk>)
SAME_FIRST_TOKEN = "same_first_answer_token"  # the answers differ but start with the same token
EMPTY_ANSWER = "empty_answer_tokens"
LABEL_FALSE = "clean_label_false"  # parity: only True items have a last Z line to corrupt
ANSWER_UNCHANGED = "answer_unchanged"  # the corruption did not change the answer (e.g. cpl = 0, no label flip)
NO_PATTERN = "no_pattern"  # the item has no zero factor / absorbing clause to corrupt


@dataclasses.dataclass(frozen=True)
class _Corruption:
  question: str  # the corrupted question
  clean_answer: str  # recomputed from the clean question
  corrupt_answer: str  # recomputed from the corrupted question
  meta: dict[str, Any]


# ---------------------------------------------------------------------------------------------- expression

_LAST_TERM = re.compile(r"([+-])(\d+)$")
_ARITH = re.compile(r"[0-9+\-*() ]+")


def _restricted_eval(expr: str, allowed: re.Pattern, kind: type):
  """Python's value of ``expr`` if it consists only of ``allowed`` tokens and is a ``kind``; else ValueError."""
  if not allowed.fullmatch(expr):
    raise ValueError(f"not a plain {kind.__name__} expression: {expr!r}")
  value = eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - validated above
  if type(value) is not kind:
    raise ValueError(f"{expr!r} evaluates to {value!r}, not a {kind.__name__}")
  return value


def eval_arithmetic(expr: str) -> int:
  """Python's value of an integer expression made of digits, + - * and parentheses (nothing else accepted)."""
  return _restricted_eval(expr, _ARITH, int)


def _corrupt_expression(ex: Example, rng: random.Random) -> _Corruption | str:
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
  return _Corruption(corrupt_q, str(clean_value), str(corrupt_value),
                     dict(term=f"{sign}{digits}", new_term=f"{sign}{new_digits}", factor=factor,
                          new_factor=new_factor, new_factor_value=eval_arithmetic(new_factor)))


# ---------------------------------------------------------------------------------------------- parity

_EDGE = re.compile(r"([A-Z]) is connected with ([A-Z])")


def relation_connected(question: str, start: str = "A", goal: str = "Z") -> bool:
  """Whether ``start`` reaches ``goal`` in the undirected graph of the question's ``u is connected with v`` lines."""
  graph = collections.defaultdict(set)
  for line in question.splitlines():
    if not line:
      continue
    edge = _EDGE.fullmatch(line)
    if edge is None:
      raise ValueError(f"not a relation line: {line!r}")
    u, v = edge.groups()
    graph[u].add(v)
    graph[v].add(u)
  seen, queue = {start}, collections.deque([start])
  while queue:
    for nxt in graph[queue.popleft()] - seen:
      seen.add(nxt)
      queue.append(nxt)
  return goal in seen


def _corrupt_parity(ex: Example, rng: random.Random) -> _Corruption | str:
  if ex.answer != "True":
    return LABEL_FALSE
  lines = ex.question.splitlines(keepends=True)
  last = lines[-1]
  if not (last.endswith(" is connected with Z\n") and len(lines) == 10):
    raise RuntimeError(f"unexpected True relation item: {ex.question!r}")
  used = set(re.findall(r"[A-Z]", ex.question))
  letter = rng.choice([c for c in UNUSED_CITIES if c not in used])
  corrupt_q = "".join(lines[:-1]) + last[:-2] + letter + "\n"
  clean, corrupt = str(relation_connected(ex.question)), str(relation_connected(corrupt_q))
  if clean != ex.answer:
    raise RuntimeError(f"generator label {ex.answer!r} != graph search {clean!r} for {ex.question!r}")
  if clean == corrupt:
    return ANSWER_UNCHANGED
  return _Corruption(corrupt_q, clean, corrupt, dict(replaced="Z", letter=letter))


# ---------------------------------------------------------------------------------------------- boolean

_BOOL = re.compile(r"(?:True|False|and|or|[() ])+")
_BOOL_SWAPS = {"and False": "and True", "or True": "or False"}  # absorbing clause -> identity clause


def eval_boolean(expr: str) -> bool:
  """Python's value of an expression made of True/False/and/or and parentheses (nothing else accepted)."""
  return _restricted_eval(expr, _BOOL, bool)


def _corrupt_boolean(ex: Example, rng: random.Random) -> _Corruption | str:
  del rng  # deterministic swap
  suffix = ex.meta.get("suffix")
  if suffix not in _BOOL_SWAPS or not ex.meta.get("pattern_mode"):
    return NO_PATTERN
  old, new = " " + suffix, " " + _BOOL_SWAPS[suffix]
  if not ex.question.endswith(old):
    raise RuntimeError(f"{ex.question!r} does not end in its suffix {suffix!r}")
  corrupt_q = ex.question[:-len(old)] + new
  clean, corrupt = ("1" if eval_boolean(ex.question) else "0"), ("1" if eval_boolean(corrupt_q) else "0")
  if clean != ex.answer:
    raise RuntimeError(f"generator label {ex.answer!r} != eval {clean!r} for {ex.question!r}")
  if clean == corrupt:
    return ANSWER_UNCHANGED
  return _Corruption(corrupt_q, clean, corrupt, dict(swap=[old.strip(), new.strip()]))


_CORRUPTORS: dict[str, Callable[[Example, random.Random], _Corruption | str]] = {
    "expression": _corrupt_expression, "parity": _corrupt_parity, "boolean": _corrupt_boolean}


# ---------------------------------------------------------------------------------------------- pair set

@dataclasses.dataclass
class PairSet:
  """N clean/corrupt prompt pairs, left-padded to one length T (position T-1 is every prompt's last token).

  ``roles`` maps a role to [N] padded positions: ``query_final`` (= T-1, where the answer is predicted),
  ``query_first`` (first token containing query text, after header and demos), ``changed_first`` /
  ``changed_last`` (first / last position where the two prompts' ids differ).
  """

  task: str
  fmt: str
  shots: int
  seed: int
  clean_ids: np.ndarray  # [N, T] int32
  corrupt_ids: np.ndarray  # [N, T] int32
  valid: np.ndarray  # [N, T] bool (False on left padding; the same for both prompts)
  answer_pos: np.ndarray  # [N] int32, = T-1
  clean_answer: np.ndarray  # [N] int32: first token of the clean answer
  corrupt_answer: np.ndarray  # [N] int32: first token of the corrupt answer
  changed: list[np.ndarray]  # per pair, the padded positions where clean and corrupt ids differ
  roles: dict[str, np.ndarray]  # role -> [N] int32 padded positions
  prompts: list[tuple[str, str]]  # (clean, corrupt)
  answers: list[tuple[str, str]]  # (clean, corrupt) answer texts
  query_index: np.ndarray  # [N] int32: index in the (task, "correct", seed, fmt) query stream (demo key too)
  meta: list[dict[str, Any]]  # per pair: what was replaced
  dropped: dict[str, int]  # reason -> number of candidates dropped
  n_tried: int  # candidates drawn

  def __len__(self) -> int:
    return int(self.clean_ids.shape[0])

  @property
  def length(self) -> int:
    """T, the padded length."""
    return int(self.clean_ids.shape[1])

  def slice(self, start: int, stop: int) -> PairSet:
    """Pairs [start, stop) (same T, same drop statistics)."""
    return self.take(np.arange(start, min(stop, len(self))))

  def take(self, index) -> PairSet:
    """The pairs at ``index`` (an int array), in that order (same T, same drop statistics)."""
    index = np.asarray(index, dtype=np.int64)
    pick = lambda seq: [seq[i] for i in index]
    return dataclasses.replace(
        self, clean_ids=self.clean_ids[index], corrupt_ids=self.corrupt_ids[index], valid=self.valid[index],
        answer_pos=self.answer_pos[index], clean_answer=self.clean_answer[index],
        corrupt_answer=self.corrupt_answer[index], changed=pick(self.changed),
        roles={k: v[index] for k, v in self.roles.items()}, prompts=pick(self.prompts), answers=pick(self.answers),
        query_index=self.query_index[index], meta=pick(self.meta), dropped=dict(self.dropped))

  def batches(self, size: int) -> Iterator[PairSet]:
    """Consecutive slices of at most ``size`` pairs."""
    if size < 1:
      raise ValueError(f"batch size must be positive, got {size}")
    for start in range(0, len(self), size):
      yield self.slice(start, min(start + size, len(self)))

  def summary(self) -> dict[str, Any]:
    """JSON-serialisable description (no arrays)."""
    return dict(task=self.task, fmt=self.fmt, shots=self.shots, seed=self.seed, n_pairs=len(self),
                length=self.length, n_tried=self.n_tried, dropped=dict(self.dropped),
                n_changed=[int(len(c)) for c in self.changed])


def _ids(tokenizer, text: str) -> list[int]:
  return [int(i) for i in tokenizer(text).input_ids]


def first_answer_token(tokenizer, prompt: str, prompt_ids: list[int], answer: str) -> int | None:
  """First token of ``answer`` as the model would continue ``prompt`` (see ``icl.continuation_ids``)."""
  ids = continuation_ids(tokenizer, prompt, prompt_ids, answer)
  return int(ids[0]) if ids else None


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def check_pair_task(task: str) -> str:
  """``task`` if pairs are defined for it; otherwise a ValueError listing the supported tasks."""
  name = task.name if isinstance(task, tasks.Task) else task
  if name not in SUPPORTED_TASKS:
    raise ValueError(f"no clean/corrupt pairs for task {name!r}; supported tasks: {', '.join(SUPPORTED_TASKS)}")
  return name


def build_pairs(task: str, tokenizer, n: int, seed: int, fmt: str = "fixed", shots: int = 0, *,
                max_changed: int = 3, max_tries: int | None = None) -> PairSet:
  """Up to ``n`` clean/corrupt pairs of ``task`` from at most ``max_tries`` (default 20*n) candidates.

  Raises ValueError for unsupported tasks, boolean in the paper format (its correct items have no absorbing
  clause), and when no pair survives (the message gives the drop counts).
  """
  name = check_pair_task(task)
  check_name("format", fmt, tasks.FORMATS)
  if name == "boolean" and fmt != "fixed":
    raise ValueError("boolean pairs need fmt='fixed': paper-format correct items have no absorbing clause")
  for label, value, low in (("n", n, 1), ("shots", shots, 0), ("max_changed", max_changed, 1)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
  limit = TRIES_PER_PAIR * n if max_tries is None else max_tries
  t = tasks.get_task(name)
  tpl = template(name, fmt)
  query_rng = keyed_rng("queries", t.name, "correct", fmt, seed)  # the stream of tasks.make_queries
  corrupt_fn = _CORRUPTORS[name]
  dropped: collections.Counter[str] = collections.Counter()
  kept: list[dict[str, Any]] = []
  tried = 0
  while len(kept) < n and tried < limit:
    i = tried
    tried += 1
    ex = t.sample("correct", query_rng, fmt)
    result = corrupt_fn(ex, keyed_rng("pairs", name, fmt, seed, i))
    if isinstance(result, str):
      dropped[result] += 1
      continue
    demos = tasks.make_demos(name, shots, seed, i, fmt) if shots else []
    corrupt_ex = dataclasses.replace(ex, question=result.question, answer=result.corrupt_answer,
                                     foil=result.clean_answer)
    clean_prompt = tasks.build_prompt(name, fmt, demos, ex)
    corrupt_prompt = tasks.build_prompt(name, fmt, demos, corrupt_ex)
    clean_ids, corrupt_ids = _ids(tokenizer, clean_prompt), _ids(tokenizer, corrupt_prompt)
    if len(clean_ids) != len(corrupt_ids):
      dropped[LENGTH_MISMATCH] += 1
      continue
    changed = [p for p, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b]
    if not changed:
      dropped[IDENTICAL_IDS] += 1
      continue
    if len(changed) > max_changed:
      dropped[TOO_MANY_CHANGES] += 1
      continue
    y_clean = first_answer_token(tokenizer, clean_prompt, clean_ids, result.clean_answer)
    y_corrupt = first_answer_token(tokenizer, corrupt_prompt, corrupt_ids, result.corrupt_answer)
    if y_clean is None or y_corrupt is None:
      dropped[EMPTY_ANSWER] += 1
      continue
    if y_clean == y_corrupt:
      dropped[SAME_FIRST_TOKEN] += 1
      continue
    prefix = clean_prompt[:len(clean_prompt) - len(tpl.query(ex))]
    query_first = min(_common_prefix(_ids(tokenizer, prefix), clean_ids), len(clean_ids) - 1) if prefix else 0
    kept.append(dict(clean=clean_ids, corrupt=corrupt_ids, changed=changed, y=(y_clean, y_corrupt),
                     prompts=(clean_prompt, corrupt_prompt), answers=(result.clean_answer, result.corrupt_answer),
                     index=i, meta=dict(result.meta, query_first=query_first), query_first=query_first))
  if not kept:
    raise ValueError(f"no usable {name} pairs (fmt={fmt}, shots={shots}, seed={seed}) in {tried} candidates; "
                     f"dropped: {dict(dropped)}")
  big_t = max(len(k["clean"]) for k in kept)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
  num = len(kept)
  clean = np.full((num, big_t), pad, np.int32)
  corrupt = np.full((num, big_t), pad, np.int32)
  valid = np.zeros((num, big_t), bool)
  changed, roles = [], {r: np.zeros(num, np.int32) for r in ("query_final", "query_first", "changed_first",
                                                             "changed_last")}
  for row, k in enumerate(kept):
    off = big_t - len(k["clean"])
    clean[row, off:], corrupt[row, off:], valid[row, off:] = k["clean"], k["corrupt"], True
    changed.append(np.asarray(k["changed"], np.int32) + off)
    roles["query_final"][row] = big_t - 1
    roles["query_first"][row] = off + k["query_first"]
    roles["changed_first"][row], roles["changed_last"][row] = changed[-1][0], changed[-1][-1]
  return PairSet(
      task=name, fmt=fmt, shots=shots, seed=seed, clean_ids=clean, corrupt_ids=corrupt, valid=valid,
      answer_pos=np.full(num, big_t - 1, np.int32),
      clean_answer=np.asarray([k["y"][0] for k in kept], np.int32),
      corrupt_answer=np.asarray([k["y"][1] for k in kept], np.int32), changed=changed, roles=roles,
      prompts=[k["prompts"] for k in kept], answers=[k["answers"] for k in kept],
      query_index=np.asarray([k["index"] for k in kept], np.int32), meta=[k["meta"] for k in kept],
      dropped=dict(dropped), n_tried=tried)
