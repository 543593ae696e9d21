"""The batched ICL evaluation engine: prompts -> length buckets -> one jitted prefill/score/decode -> scores.

Prompts are grouped by task and format, sorted by token length and cut into fixed-size batches padded (on the
left) to a multiple of ``length_multiple``, so the number of compiled shapes stays small and padding waste stays
low. The token prefix a group's prompts share (the instruction header) is run once and its keys and values
start every batch of the group. With ``pack_shots`` (nested demos), an item's prompts at every shot count are
one packed row (``decoding.pack``), so the demos they share run once. Each batch runs one prefill shared by
greedy decoding and teacher-forced scoring of the gold and foil answers. Scores: the release's lenient rule (gold substring of the decoded text after the prompt,
within the task's token budget) and the strict rule (first answer-typed span of the new tokens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from icl_ft import faults, tasks
from icl_ft.evaluation import scoring
from icl_ft.model import sharding
from icl_ft.io.units import Units
from icl_ft.evaluation.decoding import common_prefix, generate_and_score, pack, packed_width, prefix_kv, right_pad
from icl_ft.io.loading import LoadedModel, pad_id
from icl_ft.io.records import QueryCell, QueryRecord, SkippedQuery


class PromptTooLongError(ValueError):
  """A prompt does not fit the model's context window."""


ON_TOO_LONG = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  batch_size: int = 8
  length_multiple: int = 16  # bucket granularity of padded prompt lengths
  on_too_long: str = "error"  # "error" or "skip" (skipped queries are counted)
  progress: bool = True
  share_prefix: bool = True  # the token prefix all prompts of a (task, format) share (the header) runs once
  pack_shots: bool = False  # an item's prompts at every shot count run as one packed row (for nested demos)


@dataclasses.dataclass(frozen=True)
class Query:
  """One prompt to evaluate, with what scoring needs to know about it."""
  prompt: str
  gold: str
  foil: str | None
  task: str
  lenient_tokens: int  # the release's generation_len
  strict_tokens: int  # the strict scorer's budget (the task's; it stops at a newline)
  cell: QueryCell  # its cell and item (typed: the record keeps it)
  lead: str = ""  # what the continuation has before the answer (" " where the format moved it out of the prompt)


def icl_queries(task: str, variant: str, fmt: str, shots: int, n: int, seed: int, split: str = "test",
                exclude: Collection[str] = (), control: str | None = None,
                measure: Callable[[str], int] = len, nested: bool = False) -> list[Query]:
  """The fixed query set of (task, variant, seed, split) with ``shots`` correct-variant demos each (``nested``:
  see ``tasks.make_demos``; replaced as ``control`` says, lengths by ``measure``: ``tasks.build_prompt``); every
  query's cell carries what the item's shortcut cues predict (``tasks.shortcut_record``)."""
  if n < 1:
    raise ValueError(f"the number of queries must be at least 1, got {n}")
  out = []
  for i, ex in enumerate(tasks.make_queries(task, variant, n, seed, fmt, split, exclude)):
    demos = tasks.make_demos(task, shots, seed, i, fmt, split, nested)
    out.append(Query(tasks.build_prompt(task, fmt, demos, ex, control, (seed, split, i), measure), ex.answer,
                     ex.foil, task, tasks.generation_len(task, fmt), tasks.strict_len(task, fmt),
                     QueryCell(task=task, variant=variant, format=fmt, shots=shots, seed=seed, split=split, index=i,
                               question=ex.question, control=control, **tasks.shortcut_record(ex, fmt)),
                     tasks.template(task, fmt).lead(ex)))
  return out


def continuation_ids(tokenizer, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
  """Token ids of ``answer`` as the model would continue ``prompt`` (tokenized jointly when it splits cleanly)."""
  joint = tokenizer(prompt + answer).input_ids
  if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
    return joint[len(prompt_ids):]
  return tokenizer(answer, add_special_tokens=False).input_ids


def run(model: LoadedModel, queries: Sequence[Query], engine: EngineConfig = EngineConfig(),
        units: Units | None = None) -> tuple[list[QueryRecord], list[SkippedQuery]]:
  """Evaluates ``queries``; returns (one record per evaluated query, the meta of each query skipped as too
  long). A query is too long when its prompt plus its own budget (new tokens, or its longest candidate answer)
  exceeds the context. Queries with the same budget are batched together. With ``units``, each batch's records
  are saved as it completes and reloaded on a rerun (a killed evaluation resumes)."""
  if not queries:
    raise ValueError("no queries to evaluate")
  if engine.on_too_long not in ON_TOO_LONG:
    raise ValueError(f"on_too_long must be 'error' or 'skip', got {engine.on_too_long!r}")
  tok, cfg = model.tokenizer, model.config
  prompt_ids = tok([q.prompt for q in queries]).input_ids
  answers = [[continuation_ids(tok, q.prompt, ids, q.lead + a) for a in (q.gold, q.foil or q.gold)]
             for q, ids in zip(queries, prompt_ids)]
  budget = [max(q.strict_tokens, q.lenient_tokens) for q in queries]
  keep, skipped = [], []
  for i, ids in enumerate(prompt_ids):
    need = max(budget[i], *map(len, answers[i]))
    if len(ids) + need <= cfg.max_position_embeddings:
      keep.append(i)
    elif engine.on_too_long == "skip":
      skipped.append(SkippedQuery(**queries[i].cell, prompt_tokens=len(ids)))
    else:
      raise PromptTooLongError(
          f"query {i} has {len(ids)} prompt tokens; with {need} answer tokens it exceeds the model's context of "
          f"{cfg.max_position_embeddings}. Use fewer shots, or set on_too_long='skip'.")
  batches = _batches(queries, prompt_ids, answers, budget, keep, engine)
  prefixes: dict[tuple[int, ...], Any] = {}  # each shared prefix's keys and values, computed once
  records: dict[int, dict] = {}
  for b, (n_new, answer_len, shared, batch) in enumerate(tqdm(batches, desc="icl", unit="batch",
                                                              disable=not engine.progress)):
    def compute(n_new=n_new, answer_len=answer_len, shared=shared, batch=batch):
      if shared and shared not in prefixes:
        prefixes[shared] = prefix_kv(model.config, model.params, np.asarray([shared], np.int32))
      return _run_batch(model, queries, prompt_ids, answers, batch, n_new, answer_len, engine, shared,
                        prefixes.get(shared))

    flat = [i for row in batch for i in row]
    if units is None:
      done = compute()
    else:
      digest = hashlib.sha1("\x00".join([str(len(shared))] + [(f"{len(row)}" if len(row) > 1 else "") + "".join(
          queries[i].prompt + queries[i].gold for i in row) for row in batch]).encode()).hexdigest()
      # a batch computed with another prefix split or packing is not reused (unpacked batches keep the names
      # they had before packing existed)
      saved = units.records(f"batch{b:05d}-{digest[:12]}", lambda: [dict(r) for r in compute()])
      done = [QueryRecord.from_dict(r) for r in saved]
    faults.point("icl.batch")
    records.update(zip(flat, done))
  return [records[i] for i in sorted(records)], skipped


def packed_rows(queries, keep: Sequence[int], engine: EngineConfig) -> list[list[int]]:
  """The queries of each packed row: with ``pack_shots``, every query of one item (the same cell and item but
  the shot count) in one row, shots ascending; else one query per row."""
  if not engine.pack_shots:
    return [[i] for i in keep]
  items: dict[tuple, list[int]] = {}
  for i in keep:
    c = queries[i].cell
    items.setdefault((c.task, c.variant, c.format, c.seed, c.split, c.index, c.control), []).append(i)
  return [sorted(row, key=lambda i: queries[i].cell.shots) for row in items.values()]


def _batches(queries, prompt_ids, answers, budget, keep, engine: EngineConfig) -> list[tuple]:
  """(new tokens, candidate length, shared prefix ids, rows of query indices) per batch: rows (``packed_rows``) grouped
  by budget and prompts per row (and, with ``share_prefix``, by task and format, whose prompts share their
  header), sorted by packed length, cut into batches. The shared prefix is the group's longest common token
  prefix, leaving every prompt at least one token, cut to a multiple of ``length_multiple`` (so groups of the same
  budget and prefix bucket share compiled shapes; its few last tokens join the rest); () when shorter than
  that."""
  def key(row):
    i = row[0]
    return (budget[i], len(row), *((queries[i].task, queries[i].cell.format) if engine.share_prefix else ()))
  rows = packed_rows(queries, keep, engine)
  out = []
  for k in sorted({key(r) for r in rows}):
    group = sorted((r for r in rows if key(r) == k), key=lambda r: packed_width([prompt_ids[i] for i in r]))
    answer_len = max(len(a) for r in group for i in r for a in answers[i])
    shared = shared_prefix([prompt_ids[i] for r in group for i in r], engine.length_multiple) \
        if engine.share_prefix else ()
    B = rows_per_batch(engine, k[1])
    out += [(k[0], answer_len, shared, group[s:s + B]) for s in range(0, len(group), B)]
  return out


def rows_per_batch(engine: EngineConfig, prompts_per_row: int) -> int:
  """Rows in a batch: ``batch_size`` prompts, so packed rows of K prompts come batch_size // K to a batch."""
  return max(1, engine.batch_size // prompts_per_row)


def shared_prefix(seqs: Sequence[Sequence[int]], multiple: int = 1) -> tuple[int, ...]:
  """The longest token prefix every sequence starts with, at most each one's length minus 1, cut to a multiple of
  ``multiple``."""
  n = min(min(len(s) - 1, common_prefix(s, seqs[0])) for s in seqs)
  return tuple(seqs[0][:max(0, n) // multiple * multiple])


def _run_batch(model: LoadedModel, queries, prompt_ids, answers, batch: list[list[int]], n_new: int,
               answer_len: int, engine: EngineConfig, shared: tuple[int, ...] = (), prefix=None) -> list[dict]:
  """Records of one batch of rows (their queries in order): each row's prompts (after their ``shared`` prefix,
  whose keys and values ``prefix`` holds) packed (``decoding.pack``) and left-padded to a multiple of
  ``length_multiple`` (rows repeated up to the fixed batch size), gold and foil scored in the prefill, ``n_new``
  greedy tokens."""
  tok, cfg, B = model.tokenizer, model.config, rows_per_batch(engine, len(batch[0]))
  pad = pad_id(tok)
  rows = batch + [batch[0]] * (B - len(batch))  # fixed batch size: pad with repeats, dropped below
  rest = [[prompt_ids[i][len(shared):] for i in row] for row in rows]
  T = engine.length_multiple * math.ceil(max(map(packed_width, rest)) / engine.length_multiple)
  packed = pack(rest, T, pad, 2)
  K = len(rows[0])
  ans, ans_valid = right_pad([a for row in rows for i in row for a in answers[i]], pad, answer_len)
  out = sharding.to_host(generate_and_score(cfg, model.params, packed, ans.reshape(B, K, 2, -1),
                                            ans_valid.reshape(B, K, 2, -1), n_new, prefix))
  new, logprob, first = (out[k] for k in ("tokens", "logprob", "first_logit"))
  return [record(queries[i], prompt_ids[i], [int(t) for t in new[r, k]], logprob[r, k], first[r, k], tok)
          for r, row in enumerate(batch) for k, i in enumerate(row)]


def record(q: Query, prompt_ids: list[int], new_ids: list[int], logprob, first_logit, tok) -> QueryRecord:
  """One query's result: the greedy continuation ``new_ids`` scored by both rules within the query's budgets,
  the gold/foil log-probabilities ``logprob`` [2] and first-token logits ``first_logit`` [2]."""
  eos = tok.eos_token_id
  if eos is not None and eos in new_ids:  # generation stops at EOS, as transformers' generate does
    new_ids = new_ids[:new_ids.index(eos) + 1]
  # Lenient (release): decode prompt + budgeted new tokens, slice the prompt's characters off.
  lenient_text = tok.decode(prompt_ids + new_ids[:q.lenient_tokens], skip_special_tokens=True)[len(q.prompt):]
  completion = tok.decode(new_ids[:q.strict_tokens], skip_special_tokens=True)
  kind = tasks.answer_kind(q.task)
  has_foil = q.foil is not None
  return QueryRecord(
      **q.cell, prompt=q.prompt, prompt_tokens=len(prompt_ids), gold=q.gold, foil=q.foil,
      completion=completion, lenient_text=lenient_text,
      correct_lenient=scoring.lenient_correct(q.gold, lenient_text, tasks.get_task(q.task).lenient_digits),
      correct_strict=scoring.strict_correct(q.gold, completion, kind),
      logprob_gold=float(logprob[0]), logprob_foil=float(logprob[1]) if has_foil else None,
      logit_diff=float(first_logit[0] - first_logit[1]) if has_foil else None)


DEFAULT_SHOTS = (0, 1, 2, 4, 8, 16, 32)


def sweep_queries(task_names: Sequence[str], variants: Sequence[str], formats: Sequence[str], shots: Sequence[int],
                  n: int, seed: int, n_dev: int = 0, controls: Sequence[str] = (), control_shots: int = 0,
                  measure: Callable[[str], int] = len, sizes: Mapping[int, int] | None = None,
                  nested: bool = False) -> list[Query]:
  """Every (task, variant, format, shots) cell's queries, for the variants each task has: the first ``n`` items
  of the fixed query set, or ``sizes[shots]`` where given (so smaller cells hold the same items); with ``n_dev``,
  also ``n_dev`` dev-split queries per cell with shots > 0 (disjoint from the test questions) for choosing k;
  with ``controls``, the same test items at ``control_shots`` demos replaced by each control the task has
  (``tasks.controls_of``; lengths by ``measure``); ``nested``: each query's demos nested across k
  (``tasks.make_demos``)."""
  if controls and control_shots < 2:
    raise ValueError(f"the ICL controls replace demos and need control_shots >= 2, got {control_shots}")
  size = lambda k: (sizes or {}).get(k, n)
  out = []
  for t in task_names:
    for v in [v for v in variants if v in tasks.get_task(t).variants]:
      for f in formats:
        test = {ex.question for ex in tasks.make_queries(t, v, max(n, *map(size, (*shots, control_shots))), seed, f)}
        for k in shots:
          out += icl_queries(t, v, f, k, size(k), seed, nested=nested)
          if n_dev and k:
            out += icl_queries(t, v, f, k, n_dev, seed, "dev", exclude=test, nested=nested)
        for c in tasks.controls_of(t, controls):
          out += icl_queries(t, v, f, control_shots, size(control_shots), seed, control=c, measure=measure,
                             nested=nested)
  return out


def method(cell: QueryCell) -> str:
  """The base model's method of a cell: ``base`` (0 shots), ``icl`` or ``icl-<control>``."""
  return f"icl-{cell.control}" if cell.control else "icl" if cell.shots else "base"


def sweep(model: LoadedModel, task_names: Sequence[str], variants: Sequence[str], formats: Sequence[str],
          shots: Sequence[int] = DEFAULT_SHOTS, n: int = 199, seed: int = 114514,
          engine: EngineConfig = EngineConfig(), model_name: str = "", n_dev: int = 0,
          units: Units | None = None, controls: Sequence[str] = (), control_shots: int = 0,
          sizes: Mapping[int, int] | None = None, nested: bool = False
          ) -> tuple[list[QueryRecord], list[SkippedQuery]]:
  """Every cell of ``sweep_queries`` in one batched run (length buckets shared across cells; controls as long
  as the real demos in the model's tokens; with ``nested`` demos and ``engine.share_prefix``, each item's
  prompts at every shot count packed in one row); returns (records, skipped queries), tagged with ``model`` and
  ``method``."""
  count = lambda text: len(model.tokenizer(text, add_special_tokens=False).input_ids)
  queries = sweep_queries(task_names, variants, formats, shots, n, seed, n_dev, controls, control_shots, count, sizes,
                          nested)
  engine = dataclasses.replace(engine, pack_shots=nested and engine.share_prefix and len(shots) > 1)
  records, skipped = run(model, queries, engine, units)
  tag = lambda r: r.tagged(model=model_name or model.source, method=method(r))
  return [tag(r) for r in records], [tag(r) for r in skipped]
