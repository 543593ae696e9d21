"""Clean/corrupted prompt pairs for activation patching ("symmetric token replacement", docs/circuits.md).

Each pair is a correct-variant query x whose pattern holds and a copy x~ in which a small edit breaks it at
equal length; each task says how (``Task.corrupt`` in its module), and both answers are recomputed from the
strings, never taken from the edit.

With ``shots`` > 0 the same k correct demos (``tasks.make_demos(task, k, seed, i, fmt)``, i = the candidate's
query index) precede both queries; with a ``control`` (``tasks.controls``) they are replaced the same way in
both (labels shuffled among them, or another task's demos of the same length). Candidate i is item i of ``tasks.make_queries(task, "correct", ., seed,
fmt)``. A pair is kept only if both prompts have the same token count, their ids differ in 1..``max_changed``
positions, the first answer tokens differ and (by default) each answer is one token; everything else is counted
in ``PairSet.dropped`` by reason.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator

import numpy as np

from icl_ft import tasks
from icl_ft.evaluation.engine import continuation_ids
from icl_ft.io.loading import pad_id
from icl_ft.tasks.base import check_name, keyed_rng

TRIES_PER_PAIR = 20

# Drop reasons (keys of PairSet.dropped) beyond the tasks' own (tasks.base: no_pattern, clean_label_false,
# answer_unchanged).
LENGTH_MISMATCH = "length_mismatch"  # the two prompts tokenise to different lengths
TOO_MANY_CHANGES = "too_many_changes"  # more than max_changed positions differ
IDENTICAL_IDS = "identical_ids"  # the tokenizer maps both prompts to the same ids (e.g. <unk>)
SAME_FIRST_TOKEN = "same_first_answer_token"  # one answer's tokens are a prefix of the other's
EMPTY_ANSWER = "empty_answer_tokens"
MULTI_TOKEN_ANSWER = "multi_token_answer"  # after the tokens both answers share, an answer spans several more: a
# first-token logit difference would not measure it (e.g. "-" against "6" compares signs), so kept pairs' answers
# are one token each after their shared prefix (forced into both prompts)


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
  control: str | None
  clean_ids: np.ndarray  # [N, T] int32
  corrupt_ids: np.ndarray  # [N, T] int32
  valid: np.ndarray  # [N, T] bool (False on left padding; the same for both prompts)
  answer_pos: np.ndarray  # [N] int32, = T-1
  clean_answer: np.ndarray  # [N] int32: the clean answer's first token after the forced shared ones
  corrupt_answer: np.ndarray  # [N] int32: the corrupt answer's
  changed: list[np.ndarray]  # per pair, the padded positions where clean and corrupt ids differ
  roles: dict[str, np.ndarray]  # role -> [N] int32 padded positions
  prompts: list[tuple[str, str]]  # (clean, corrupt)
  answers: list[tuple[str, str]]  # (clean, corrupt) answer texts
  query_index: np.ndarray  # [N] int32: index in the (task, "correct", seed, fmt) query stream (demo key too)
  meta: list[dict[str, Any]]  # per pair: what was replaced; ``forced``: the answers' shared leading token ids,
  # appended to both prompts' ids (not to ``prompts``), so the answer tokens are the first that differ
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
    return dict(task=self.task, fmt=self.fmt, shots=self.shots, seed=self.seed, control=self.control, n_pairs=len(self),
                length=self.length, n_tried=self.n_tried, dropped=dict(self.dropped),
                n_changed=[int(len(c)) for c in self.changed])


def _ids(tokenizer, text: str) -> list[int]:
  return [int(i) for i in tokenizer(text).input_ids]


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def pair_tasks() -> tuple[str, ...]:
  """The tasks that define clean/corrupt pairs (a ``Task.corrupt``)."""
  return tuple(name for name, t in tasks.TASKS.items() if t.corrupt is not None)


def check_pair_task(task: str | tasks.Task) -> tasks.Task:
  """The task if it defines pairs; otherwise a ValueError listing those that do."""
  name = task.name if isinstance(task, tasks.Task) else task
  if name not in pair_tasks():
    raise ValueError(f"no clean/corrupt pairs for task {name!r}; supported tasks: {', '.join(pair_tasks())}")
  return tasks.get_task(name)


def build_pairs(task: str, tokenizer, n: int, seed: int, fmt: str = "fixed", shots: int = 0, *,
                max_changed: int = 3, max_tries: int | None = None, control: str | None = None,
                single_token: bool = True) -> PairSet:
  """Up to ``n`` clean/corrupt pairs of ``task`` from at most ``max_tries`` (default 20*n) candidates. With
  ``single_token`` (the default) both answers must be one token each, so the first-token logit difference is the
  answers' log-probability difference; without it (tokenizers that split every word, as the tests' byte-level
  one) only their first tokens must differ.

  Raises ValueError for tasks without pairs or a format whose correct items have no pattern to break (boolean
  in ``paper``), and when no pair survives (the message gives the drop counts).
  """
  t = check_pair_task(task)
  check_name("format", fmt, tasks.FORMATS)
  if fmt not in t.pair_formats:
    raise ValueError(f"{t.name} pairs need fmt={t.pair_formats[0]!r}: its {fmt}-format correct items have no "
                     "pattern to break")
  for label, value, low in (("n", n, 1), ("shots", shots, 0), ("max_changed", max_changed, 1)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
  if control is not None and shots < 2:
    raise ValueError(f"the {control} control replaces demos: it needs shots >= 2, got {shots}")
  limit = TRIES_PER_PAIR * n if max_tries is None else max_tries
  stream = tasks.query_stream(t.name, "correct", fmt, seed)  # the items of tasks.make_queries, in order
  dropped: collections.Counter[str] = collections.Counter()
  kept: list[dict[str, Any]] = []
  tried = 0
  while len(kept) < n and tried < limit:
    pair = _candidate(t, next(stream), tried, tokenizer, seed, fmt, shots, max_changed, control, single_token)
    tried += 1
    if isinstance(pair, str):
      dropped[pair] += 1
    else:
      kept.append(pair)
  if not kept:
    raise ValueError(f"no usable {t.name} pairs (fmt={fmt}, shots={shots}, control={control}, seed={seed}) in "
                     f"{tried} candidates; dropped: {dict(dropped)}")
  return _assemble(t.name, fmt, shots, seed, control, kept, pad_id(tokenizer), dict(dropped), tried)


def _candidate(t: tasks.Task, ex: tasks.Example, i: int, tokenizer, seed: int, fmt: str, shots: int,
               max_changed: int, control: str | None, single_token: bool) -> dict[str, Any] | str:
  """Candidate ``i`` as a kept pair's fields, or the reason it is dropped."""
  result = t.corrupt(ex, keyed_rng("pairs", t.name, fmt, seed, i))
  if isinstance(result, str):
    return result
  demos = tasks.make_demos(t.name, shots, seed, i, fmt) if shots else []
  corrupt_ex = dataclasses.replace(ex, question=result.question, answer=result.corrupt_answer,
                                   foil=result.clean_answer)
  measure = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)
  clean_prompt = tasks.build_prompt(t.name, fmt, demos, ex, control, (seed, i), measure)
  corrupt_prompt = tasks.build_prompt(t.name, fmt, demos, corrupt_ex, control, (seed, i), measure)
  clean_ids, corrupt_ids = _ids(tokenizer, clean_prompt), _ids(tokenizer, corrupt_prompt)
  if len(clean_ids) != len(corrupt_ids):
    return LENGTH_MISMATCH
  changed = [p for p, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b]
  if not changed:
    return IDENTICAL_IDS
  if len(changed) > max_changed:
    return TOO_MANY_CHANGES
  lead = t.templates[fmt].lead(ex)
  answer_ids = [continuation_ids(tokenizer, prompt, ids, lead + answer) for prompt, ids, answer in
                ((clean_prompt, clean_ids, result.clean_answer), (corrupt_prompt, corrupt_ids, result.corrupt_answer))]
  if not all(answer_ids):
    return EMPTY_ANSWER
  shared = _common_prefix(*answer_ids)  # e.g. a bare " " both answers start with, or the "1" of 12 and 15
  if shared == min(map(len, answer_ids)):
    return SAME_FIRST_TOKEN
  if single_token and any(len(a) > shared + 1 for a in answer_ids):
    return MULTI_TOKEN_ANSWER
  # The shared tokens are forced (appended to both prompts): with one-token rests, the first-token logit
  # difference is exactly the two answers' log-probability difference.
  clean_ids, corrupt_ids = clean_ids + answer_ids[0][:shared], corrupt_ids + answer_ids[0][:shared]
  y_clean, y_corrupt = (int(a[shared]) for a in answer_ids)
  prefix = clean_prompt[:len(clean_prompt) - len(t.templates[fmt].prompt_query(ex))]
  query_first = min(_common_prefix(_ids(tokenizer, prefix), clean_ids), len(clean_ids) - 1) if prefix else 0
  return dict(clean=clean_ids, corrupt=corrupt_ids, changed=changed, y=(y_clean, y_corrupt),
              prompts=(clean_prompt, corrupt_prompt), answers=(result.clean_answer, result.corrupt_answer),
              index=i, meta=dict(result.meta, query_first=query_first, forced=answer_ids[0][:shared]),
              query_first=query_first)


def _assemble(task: str, fmt: str, shots: int, seed: int, control: str | None, kept: list[dict], pad: int,
              dropped: dict[str, int], tried: int) -> PairSet:
  """The kept pairs left-padded to one length."""
  big_t = max(len(k["clean"]) for k in kept)
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
      task=task, fmt=fmt, shots=shots, seed=seed, control=control, clean_ids=clean, corrupt_ids=corrupt, valid=valid,
      answer_pos=np.full(num, big_t - 1, np.int32),
      clean_answer=np.asarray([k["y"][0] for k in kept], np.int32),
      corrupt_answer=np.asarray([k["y"][1] for k in kept], np.int32), changed=changed, roles=roles,
      prompts=[k["prompts"] for k in kept], answers=[k["answers"] for k in kept],
      query_index=np.asarray([k["index"] for k in kept], np.int32), meta=[k["meta"] for k in kept],
      dropped=dropped, n_tried=tried)
