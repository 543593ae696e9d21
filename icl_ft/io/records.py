"""Typed result records, and the one place they are written and read.

- ``QueryRecord``: one evaluated query (its cell, the item and what its cues say, the prompt, the continuation,
  both scores, gold/foil log-probabilities); ``SkippedQuery``: one query too long for the context.
- ``StageRecord``: a finished stage (``DONE.json``): its fingerprint, what it was computed from, its outputs by
  name, their digests and its warnings.
- Documents (``write_document``/``read_document``): a JSON object of a named kind (``summary``: per-cell
  accuracy tables, ``circuits``: one task's circuit analysis, ``results``: a run's every number).
- Patch runs (``patch_runs_arrays``/``patch_runs_from_arrays``): per-pair patching metrics as named arrays.

Each file carries ``schema`` (``SCHEMA_VERSION``); reading a file of another version raises
``SchemaError`` instead of mis-reading it. Records are frozen dataclasses that also read like mappings
(``record["task"]``), so tables can group them by key name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from icl_ft.io import files
from icl_ft.stats.effects import PatchRuns

SCHEMA_VERSION = 2


# Config settings added after runs existed, with the default those runs behaved as: fingerprints and grid groups
# leave a setting out while it is at this default, so earlier runs stay valid and comparable with new ones.
LATER_DEFAULTS: dict[str, Any] = {"icl.nested_demos": False, "icl.share_prefix": True}


def without_later_defaults(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``flat`` (dotted config keys) without the ``LATER_DEFAULTS`` settings that are at their default."""
  return {k: v for k, v in flat.items() if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


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
  control: str | None  # the ICL control replacing the demos (``tasks.controls``), or None
  cues: dict[str, str | None]  # every cue's prediction for the item
  shortcut_cue: str | None  # the variant's target cue (None: the set has no shortcut)
  shortcut: str | None  # its prediction
  shortcut_right: bool | None  # whether the prediction is the gold (None: no prediction)
  model: str = ""
  method: str = ""  # "base" (0 shots), "icl" (k shots), "icl-<control>", "ft" or "ft-fewshot"
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


DOCUMENT_KINDS = ("summary", "circuits", "results", "grid")


def write_document(path: files.PathLike, kind: str, payload: Mapping[str, Any]) -> files.epath.Path:
  """A JSON object of ``kind`` with the schema version."""
  if kind not in DOCUMENT_KINDS:
    raise ValueError(f"unknown document kind {kind!r}; valid kinds: {', '.join(DOCUMENT_KINDS)}")
  return files.write_json(path, dict(payload, schema=SCHEMA_VERSION, kind=kind))


def read_document(path: files.PathLike, kind: str) -> dict[str, Any]:
  """A document written by ``write_document`` (its schema version and kind checked)."""
  d = dict(_checked(files.read_json(path), path))
  if d.get("kind") != kind:
    raise SchemaError(f"{path} holds a {d.get('kind')!r} document, not {kind!r}")
  return d


_RUN_FIELDS = ("patched", "target", "source")


def patch_runs_arrays(runs: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """PatchRuns by name as flat named arrays (``<name>.patched`` etc.) plus a schema marker."""
  out = {f"{name}.{f}": np.asarray(getattr(r, f)) for name, r in runs.items() for f in _RUN_FIELDS}
  return dict(out, schema=np.asarray(SCHEMA_VERSION))


def patch_runs_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, PatchRuns]:
  """The inverse of ``patch_runs_arrays``."""
  if int(arrays.get("schema", -1)) != SCHEMA_VERSION:
    raise SchemaError(f"patch runs of schema {arrays.get('schema')}, this icl_ft reads {SCHEMA_VERSION}")
  names = dict.fromkeys(k.split(".")[0] for k in arrays if k != "schema")
  return {n: PatchRuns(*(arrays[f"{n}.{f}"] for f in _RUN_FIELDS)) for n in names}


def write_queries(path: files.PathLike, records: Sequence[QueryCell]) -> files.epath.Path:
  """Query records (evaluated or skipped) as JSON lines, each with its schema version."""
  return files.write_jsonl(path, [dict(r, schema=SCHEMA_VERSION) for r in records])


def read_queries(path: files.PathLike) -> list[QueryRecord]:
  return [QueryRecord.from_dict(_checked(d, path)) for d in files.read_jsonl(path)]


def write_stage(path: files.PathLike, record: StageRecord) -> files.epath.Path:
  return files.write_json(path, dict(record, schema=SCHEMA_VERSION))


def files_digest(recorded: Mapping[str, Any]) -> str:
  """A short digest of a stage record's ``files`` (what a downstream stage records it read)."""
  return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:16]


def read_stage(path: files.PathLike) -> StageRecord:
  """A stage record; one written before schema versions (version 0: no ``schema``, maybe no ``inputs``,
  ``upstream``, ``files`` or ``warnings``) is read with those empty, so its stage counts as another config's."""
  d = files.read_json(path)
  if "schema" not in d:
    d = dict(dict(inputs={}, upstream={}, seconds=0.0, finished="", files={}, warnings=[]), **d,
             schema=SCHEMA_VERSION)
  return StageRecord.from_dict(_checked(d, path))
