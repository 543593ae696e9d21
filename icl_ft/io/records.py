"""Typed result records, and the one place they are written and read.

- ``QueryRecord``: one evaluated query (its cell, the item and what its cues say, the prompt, the continuation,
  both scores, gold/foil log-probabilities); ``SkippedQuery``: one query too long for the context.
- ``StageRecord``: a finished stage (``DONE.json``): its fingerprint, what it was computed from, its outputs by
  name, their digests and its warnings.

Each file carries ``schema`` (``SCHEMA_VERSION``); reading a file of another version raises
``SchemaError`` instead of mis-reading it. Records are frozen dataclasses that also read like mappings
(``record["task"]``), so tables can group them by key name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

from icl_ft.io import files

SCHEMA_VERSION = 1


class SchemaError(ValueError):
  """A record file was written by another version of icl_ft."""


class _Fields(Mapping):
  """Read access by field name (``record["task"]``, ``record.get("step")``, ``dict(record)``)."""

  def __getitem__(self, key: str) -> Any:
    if key not in self._names():
      raise KeyError(key)
    return getattr(self, key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._names())

  def __len__(self) -> int:
    return len(self._names())

  @classmethod
  def _names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  def tagged(self, **fields: Any):
    """A copy with ``fields`` set (e.g. ``model``, ``method``, ``step``)."""
    return dataclasses.replace(self, **fields)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    unknown = set(d) - set(cls._names()) - {"schema"}
    if unknown:
      raise SchemaError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**{k: v for k, v in d.items() if k != "schema"})


@dataclasses.dataclass(frozen=True)
class QueryCell(_Fields):
  """Which cell a query belongs to and what its item is."""
  task: str
  variant: str
  format: str
  shots: int
  seed: int
  split: str
  index: int
  question: str
  cues: dict[str, str | None]  # every cue's prediction for the item
  shortcut_cue: str | None  # the variant's target cue (None: the set has no shortcut)
  shortcut: str | None  # its prediction
  shortcut_right: bool | None  # whether the prediction is the gold (None: no prediction)
  model: str = ""
  method: str = ""  # "base" (0 shots), "icl" (k shots) or "ft"
  step: int | None = None  # fine-tuned: the checkpoint step
  samples: int | None = None  # fine-tuned: training examples seen


@dataclasses.dataclass(frozen=True)
class SkippedQuery(QueryCell):
  """A query whose prompt plus its answer budget exceeds the model's context."""
  prompt_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class QueryRecord(QueryCell):
  """One evaluated query."""
  prompt: str = ""
  prompt_tokens: int = 0
  gold: str = ""
  foil: str | None = None
  completion: str = ""  # the decoded new tokens within the strict budget
  lenient_text: str = ""  # the release's slice of the decoded prompt + new tokens within its budget
  correct_lenient: bool = False
  correct_strict: bool = False
  logprob_gold: float = 0.0
  logprob_foil: float | None = None
  logit_diff: float | None = None  # first-token logit of gold minus foil


@dataclasses.dataclass(frozen=True)
class StageRecord(_Fields):
  """A finished stage (``DONE.json``)."""
  fingerprint: str
  inputs: dict  # the config values its outputs depend on
  upstream: dict  # per stage it read: that stage's fingerprint and a digest of its files
  seconds: float
  finished: str
  outputs: dict  # name -> path relative to the work directory (or a mapping of them, or None)
  files: dict  # relative path -> {size, sha256}
  warnings: list[str]


def _checked(d: Mapping[str, Any], path: files.PathLike) -> Mapping[str, Any]:
  if d.get("schema") != SCHEMA_VERSION:
    raise SchemaError(f"{path} has schema {d.get('schema')!r}, this icl_ft reads {SCHEMA_VERSION}; rerun the stage "
                      "that wrote it (with --config.overwrite=true) or use the icl_ft version that wrote it")
  return d


def write_queries(path: files.PathLike, records: Sequence[QueryCell]) -> files.epath.Path:
  """Query records (evaluated or skipped) as JSON lines, each with its schema version."""
  return files.write_jsonl(path, [dict(r, schema=SCHEMA_VERSION) for r in records])


def read_queries(path: files.PathLike) -> list[QueryRecord]:
  return [QueryRecord.from_dict(_checked(d, path)) for d in files.read_jsonl(path)]


def write_stage(path: files.PathLike, record: StageRecord) -> files.epath.Path:
  return files.write_json(path, dict(record, schema=SCHEMA_VERSION))


def read_stage(path: files.PathLike) -> StageRecord:
  return StageRecord.from_dict(_checked(files.read_json(path), path))
