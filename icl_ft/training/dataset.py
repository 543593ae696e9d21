"""Fine-tuning data: task examples -> tokenized sequences with loss masks -> deterministic padded batches.

The release's recipe (docs/study.md): bare question + answer (no header), correct variant only, loss on every
token, no EOS appended, examples truncated to 512 tokens, shuffled with a seed. Options: per-task sets,
the test header, loss on the answer tokens only, any size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Collection, Iterator, Sequence

import numpy as np

from icl_ft import tasks
from icl_ft.io.loading import pad_id


LOSS_ON = ("all", "answer")  # every token (the release's), or the answer's only


@dataclasses.dataclass(frozen=True)
class FTDataConfig:
  tasks: tuple[str, ...] = tasks.RELEASE_FT_MIXTURE
  n_per_task: int = 1000
  format: str = "paper"
  with_header: bool = False
  loss_on: str = "all"  # "all" (the release) or "answer"
  max_len: int = 512
  length_multiple: int = 32  # batches are padded to a multiple of this (the release pads to max_len)
  seed: int = 42
  n_heldout: int = 0  # per task: held-out examples (same generator, another stream) for the held-out loss


@dataclasses.dataclass
class FTDataset:
  """Token sequences and their loss masks (mask[t] says whether token t is predicted and scored)."""
  ids: list[list[int]]
  loss_mask: list[list[bool]]
  texts: list[str]
  pad_id: int

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def num_tokens(self) -> int:
    return sum(len(s) for s in self.ids)


def build(cfg: FTDataConfig, tokenizer) -> FTDataset:
  """Generates ``n_per_task`` correct-variant examples per task and tokenizes them."""
  if cfg.n_per_task < 1:
    raise ValueError(f"n_per_task must be at least 1, got {cfg.n_per_task}")
  return from_examples([ex for name in cfg.tasks for ex in tasks.make_ft_examples(name, cfg.n_per_task, cfg.seed,
                                                                                  cfg.format)], cfg, tokenizer)


def heldout(cfg: FTDataConfig, tokenizer, exclude: Collection[str] = ()) -> dict[str, FTDataset]:
  """``n_heldout`` examples per task from a separate stream, none of whose questions is in the training data or
  ``exclude``, scored as training scores them (``loss``) and on the answer alone (``answer_loss``); empty when
  ``n_heldout`` is 0."""
  if not cfg.n_heldout:
    return {}
  examples = []
  for name in cfg.tasks:
    seen = {ex.question for ex in tasks.make_ft_examples(name, cfg.n_per_task, cfg.seed, cfg.format)}
    examples += tasks.make_ft_examples(name, cfg.n_heldout, cfg.seed, cfg.format, heldout=True,
                                       exclude=seen | set(exclude))
  return {"loss": from_examples(examples, cfg, tokenizer),
          "answer_loss": from_examples(examples, dataclasses.replace(cfg, loss_on="answer"), tokenizer)}


def fewshot_examples(task_names: Sequence[str], k: int, seed: int, fmt: str,
                     nested: bool = False) -> list[tasks.Example]:
  """The few-shot FT control's data (Mosbach et al., 2023): per task, exactly the ``k`` demos of the first test
  query's ICL prompt at ``seed`` (``tasks.make_demos``, ``nested`` as the ICL cells draw them), shared by all
  queries."""
  return [ex for name in task_names for ex in tasks.make_demos(name, k, seed, 0, fmt, nested=nested)]


def from_examples(examples: Sequence[tasks.Example], cfg: FTDataConfig, tokenizer) -> FTDataset:
  """``examples`` as ``cfg`` renders (format, header) and masks (loss on every token or the answer's) them."""
  if cfg.loss_on not in LOSS_ON:
    raise ValueError(f"loss_on must be one of {LOSS_ON}, got {cfg.loss_on!r}")
  ids, masks, texts = [], [], []
  for ex in examples:
    text = tasks.ft_text(ex, cfg.format, cfg.with_header)
    seq, mask = tokenize_with_answer_mask(tokenizer, text, len(ex.answer), cfg.max_len)
    if cfg.loss_on == "all":
      mask = [True] * len(seq)
    mask[0] = False  # the first token has no prediction
    if not any(mask):
      raise ValueError(f"fine-tuning example {len(ids)} ({ex.task}) has no token to score: {text[-80:]!r} "
                       f"({len(seq)} tokens, max_len {cfg.max_len})")
    ids.append(seq)
    masks.append(mask)
    texts.append(text)
  return FTDataset(ids, masks, texts, pad_id(tokenizer))


def tokenize_with_answer_mask(tokenizer, text: str, answer_chars: int, max_len: int) -> tuple[list[int], list[bool]]:
  """Token ids of ``text`` (truncated to ``max_len``) and, per token, whether it covers any of the last
  ``answer_chars`` characters (the answer), from the tokenizer's character offsets of the full text: a token
  that merges the answer with the space before it (``" True"``) counts as an answer token."""
  enc = tokenizer(text, return_offsets_mapping=True)
  start = len(text) - answer_chars
  ids = list(enc.input_ids)[:max_len]
  mask = [end > start and end > s for s, end in enc.offset_mapping][:max_len]  # special tokens span (0, 0)
  return ids, mask


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
  """The example order of one epoch: a permutation fixed by (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_at(ds: FTDataset, step: int, batch_size: int, seed: int, length_multiple: int,
             rows: slice = slice(None)) -> dict[str, np.ndarray]:
  """The global batch of training step ``step`` (deterministic), right-padded to a length bucket.

  ``rows`` selects this host's share of the batch on multi-host runs. Returns ``_padded``'s arrays.
  """
  per_epoch = len(ds) // batch_size
  if per_epoch == 0:
    raise ValueError(f"batch size {batch_size} exceeds the dataset size {len(ds)}")
  epoch, k = divmod(step, per_epoch)
  index = epoch_order(len(ds), epoch, seed)[k * batch_size:(k + 1) * batch_size]
  return _padded(ds, index, length_multiple, rows)


def _padded(ds: FTDataset, index: Sequence[int], length_multiple: int, rows: slice = slice(None),
            scored: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """Rows ``index`` right-padded to the length bucket of the longest; rows with ``scored`` False keep no loss.

  Returns ``ids`` and ``valid`` [B, T], and the scored predictions: ``loss_at`` [B, N] (position p predicts
  token p + 1) with ``loss_mask`` [B, N]. N is the most scored tokens of a row rounded up to 8, so the LM head
  runs only there (the answer, for ``loss_on="answer"``); when that is over half the sequence, N = T - 1 and
  ``loss_at`` is every position. Shapes depend on all rows of the global batch, never on ``rows``.
  """
  length = length_multiple * math.ceil(max(len(ds.ids[i]) for i in index) / length_multiple)
  scored = [True] * len(index) if scored is None else scored
  targets = [np.flatnonzero(np.asarray(ds.loss_mask[i][1:]) & keep) for i, keep in zip(index, scored)]
  n = 8 * math.ceil(max(len(t) for t in targets) / 8)
  every = 2 * n > length - 1
  n = length - 1 if every else n
  index, targets = list(index)[rows], targets[rows]
  ids = np.full((len(index), length), ds.pad_id, np.int32)
  valid = np.zeros((len(index), length), bool)
  loss_at = np.broadcast_to(np.arange(n, dtype=np.int32), (len(index), n)).copy() if every else (
      np.zeros((len(index), n), np.int32))
  loss = np.zeros((len(index), n), bool)
  for r, (i, t) in enumerate(zip(index, targets)):
    ids[r, :len(ds.ids[i])], valid[r, :len(ds.ids[i])] = ds.ids[i], True
    if every:
      loss[r, t] = True
    else:
      loss_at[r, :len(t)], loss[r, :len(t)] = t, True
  return {"ids": ids, "valid": valid, "loss_at": loss_at, "loss_mask": loss}


def eval_batches(ds: FTDataset, batch_size: int, length_multiple: int,
                 rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
  """Every example of ``ds`` once, in order, in batches of ``batch_size`` (the last one filled with repeats of
  its first row that carry no loss, so one compiled shape serves)."""
  for start in range(0, len(ds), batch_size):
    index = list(range(start, min(start + batch_size, len(ds))))
    scored = [True] * len(index) + [False] * (batch_size - len(index))
    yield _padded(ds, index + [start] * (batch_size - len(index)), length_multiple, rows, scored)


def steps_per_epoch(ds: FTDataset, batch_size: int) -> int:
  return len(ds) // batch_size


def split_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This host's rows of a global batch."""
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} is not divisible by {process_count} hosts")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)

