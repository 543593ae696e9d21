"""The study pipeline behind ``python -m icl_ft.main``: plans, then runs the selected stages into a work
directory that never loses a result.

A stage is skipped when its ``DONE.json`` carries the fingerprint of its current inputs (its config
section and the fingerprints of the stages it reads) and its outputs still match their recorded checksums.
Nothing is written before every check has passed (``Study.plan``); a finished stage of another config is
refused (or, with ``overwrite``, moved aside to ``<stage>.replaced-<time>/``), never deleted; damaged outputs
are moved aside and recomputed; one run holds the work directory at a time (``workdir.Lock``); a killed stage
resumes from its last completed unit (a batch of queries, a checkpoint, a condition's sweeps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable

from etils import epath

from icl_ft.io import files, loading, records
from icl_ft.io.units import Units
from icl_ft.model import sharding
from icl_ft.study import stages, workdir
from icl_ft.study.config import STAGES, ConfigError, StudyConfig


class MissingInputError(RuntimeError):
  """A selected stage needs outputs of a stage that has not completed under the current config."""


class UnreadableRecordError(RuntimeError):
  """A stage's DONE.json or STARTED.json exists but cannot be read."""


@dataclasses.dataclass(frozen=True)
class Step:
  """What ``Study.run`` will do with one stage: skip, run, resume (a killed run of this config), restart (an
  unfinished run of another config is cleared), redo (damaged outputs are moved aside) or replace (finished
  results of another config are moved aside: needs ``overwrite``)."""
  stage: str
  action: str
  reason: str = ""


class Study:
  """Runs the selected stages of a ``StudyConfig``: plans first (every check, no writes), then runs under the
  work directory's lock, loading the model only when a stage needs it."""

  def __init__(self, cfg: StudyConfig, log: Callable[[str], None] = print):
    self.cfg, self.log = cfg, log
    self.root = cfg.workdir
    self.lock = workdir.Lock(self.root, log)
    self._model = None
    self._mesh = None
    self._ran: set[str] = set()  # stages executed by this run

  # -- reading the work directory (never writes) ------------------------------------------------------------
  def dir(self, stage: str) -> epath.Path:
    return self.root / stage

  def _read(self, stage: str, name: str, parse: Callable[[epath.Path], Any]) -> Any:
    """``parse(<stage>/<name>)``; None if the file is absent. An unreadable file raises
    ``UnreadableRecordError``: it is never taken for an absent one (that would let a finished stage be cleared)."""
    path = self.dir(stage) / name
    if not path.exists():
      return None
    try:
      return parse(path)
    except (OSError, ValueError, TypeError) as e:
      raise UnreadableRecordError(f"{path} cannot be read ({e}); inspect it, then move it away "
                                  "(or use another --config.workdir)") from None

  def record(self, stage: str) -> records.StageRecord | None:
    """The stage's DONE record under any fingerprint (None if absent)."""
    return self._read(stage, "DONE.json", records.read_stage)

  def done(self, stage: str) -> dict | None:
    """The stage's DONE record if it completed under the current fingerprint."""
    rec = self.record(stage)
    return rec if rec and rec.get("fingerprint") == self.cfg.fingerprint(stage) else None

  def output(self, stage: str, *keys: str) -> Any:
    """A completed stage's output entry by name (``output("circuits", task, "json")``): a path relative to
    the work directory, a mapping of them, or None (a figure that failed to draw)."""
    value = self.done(stage)["outputs"]
    for k in keys:
      value = value[k]
    return value

  def path(self, stage: str, *keys: str) -> epath.Path:
    """The path of a completed stage's output, by name."""
    return self.root / self.output(stage, *keys)

  def _upstream(self, stage: str) -> dict[str, dict]:
    """What a stage's outputs were computed from: each needed stage's fingerprint and a digest of its files."""
    out = {}
    for s in self.cfg.needs(stage):
      rec = self.done(s) or {}
      out[s] = {"fingerprint": self.cfg.fingerprint(s), "files": records.files_digest(rec.get("files", {}))}
    return out

  def _step(self, stage: str) -> Step:
    """What to do with a selected stage; a ``Step`` with action "error" explains a refusal."""
    cfg, fp, rec = self.cfg, self.cfg.fingerprint(stage), self.record(stage)
    if rec is not None and rec.get("fingerprint") == fp:
      bad = workdir.damaged(self.root, rec.get("files", {}))
      if bad:
        return Step(stage, "redo", f"outputs damaged since it finished: {', '.join(bad[:5])}")
      if rec.get("upstream") != self._upstream(stage):
        return Step(stage, "redo", "the outputs it was computed from have been recomputed since")
      return Step(stage, "skip", f"up to date (fingerprint {fp})")
    if rec is not None:
      if cfg.overwrite:
        return Step(stage, "replace", f"finished under another config ({self._why(stage, rec)}); --config.overwrite")
      return Step(stage, "error", f"stage {stage!r} finished under another config in {self.dir(stage)}: "
                                  f"{self._why(stage, rec)}")
    started = self._read(stage, "STARTED.json", files.read_json)
    if started is not None and started.get("fingerprint") == fp:
      return Step(stage, "resume", "resuming an interrupted run")
    if started is not None:
      return Step(stage, "restart", f"clearing an unfinished run of another config in {self.dir(stage)}")
    if self.dir(stage).exists():  # no record at all: not ours to delete
      return Step(stage, "redo", f"{self.dir(stage)} holds files of no recorded run")
    return Step(stage, "run")

  def _why(self, stage: str, rec: dict) -> str:
    if not rec["inputs"]:
      return "recorded by an older version of icl_ft"
    diff = workdir.config_diff(rec["inputs"], self.cfg.inputs(stage))
    fingerprint = lambda up: up.get("fingerprint") if isinstance(up, dict) else up  # (older records: a string)
    changed = [s for s, up in rec.get("upstream", {}).items() if fingerprint(up) != self.cfg.fingerprint(s)]
    return "; ".join(diff + ([f"upstream stage(s) {', '.join(changed)} changed"] if changed else [])) or "?"

  def plan(self) -> list[Step]:
    """Every check before any write: the work directory, its lock, the mesh (it fits the devices), each
    selected stage's state (finished results of another config are refused unless ``overwrite``), the inputs of
    every selected stage (present and undamaged) and, if a stage will load the model, the model (it resolves,
    its weights exist, its architecture is supported), that the mesh divides it and that the training batch
    divides over the data-parallel devices. Raises on the first kind of problem (naming every refused stage);
    returns the steps otherwise."""
    cfg = self.cfg
    try:
      workdir.check_writable(self.root)
    except workdir.WorkdirError as e:
      raise ConfigError(str(e)) from None
    if files.is_writer():  # only process 0 takes the lock (run() makes the others stop with it)
      self.lock.check()
    loading.check_name(cfg.model)  # a typo in the name is caught here, before anything else
    mesh = sharding.make_mesh(cfg.mesh)
    absent = [s for s in cfg.stages if not cfg.enabled(s)]
    if absent and cfg.raw["stages"] != "all":
      raise ConfigError(f"stage(s) {absent} selected but this study has none: no task of {cfg.tasks} has prompt "
                        "pairs for circuit analysis (circuits.tasks lists the tasks to analyse)")
    selected = [s for s in STAGES if s in cfg.stages and cfg.enabled(s)]
    steps = [self._step(s) for s in selected]
    problems = [s.reason for s in steps if s.action == "error"]
    for stage in selected:
      for need in cfg.needs(stage):
        if need in selected:
          continue
        rec = self.done(need)
        bad = workdir.damaged(self.root, rec.get("files", {})) if rec else []
        if rec is None or bad:
          why = "has not completed under this config" if rec is None else f"has damaged outputs ({', '.join(bad[:3])})"
          raise MissingInputError(
              f"stage {stage!r} needs the outputs of stage {need!r}, which {why} in {self.dir(need)}; run it too "
              f"(--config.stages={need},{stage}, or all)")
    if problems:
      raise ConfigError("\n".join(problems) + "\nNothing was changed. Keep those results and use a new "
                        "--config.workdir=DIR, or pass --config.overwrite=true to move them aside (to "
                        "<stage>.replaced-<time>/) and rerun.")
    running = [stages.ALL[s.stage] for s in steps if s.action != "skip"]
    if any(stage.uses_model for stage in running):
      sharding.check_divisible(loading.check(cfg.model), mesh)
    for stage in running:
      stage.check(cfg, mesh)
    return steps

  @property
  def ran(self) -> frozenset[str]:
    """The stages this run executed (the others were skipped as up to date)."""
    return frozenset(self._ran)

  # -- running -------------------------------------------------------------------------------------------------
  def run(self) -> dict[str, dict]:
    """Plans, then runs (or skips) each selected stage in order under the lock; returns every completed
    stage's DONE record."""
    try:
      steps, refusal = self.plan(), None
    except Exception as e:  # every process stops if any (in particular process 0, which checks the lock) refuses
      steps, refusal = None, e
    if not sharding.all_agree(refusal is None):
      raise refusal or RuntimeError("another process refused to run this study; see process 0's log")
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    with self.lock if files.is_writer() else contextlib.nullcontext():
      for step in steps:
        if step.action == "skip" and set(self.cfg.needs(step.stage)) & self._ran:
          step = self._step(step.stage)  # an input was recomputed in this run: still the same?
        if step.action == "skip":
          self.log(f"[{step.stage}] {step.reason}, skipped")
        else:
          self._execute(step, stamp)
    return {s: self.done(s) for s in STAGES if self.done(s)}

  def _execute(self, step: Step, stamp: str) -> None:
    stage, d, fp = step.stage, self.dir(step.stage), self.cfg.fingerprint(step.stage)
    if files.is_writer():
      if step.action in ("replace", "redo"):
        for s in [stage] + (self._downstream(stage) if step.action == "replace" else []):
          self._move_aside(s, stamp)
      elif step.action == "restart":
        self.log(f"[{stage}] {step.reason}")
        d.rmtree()
      root_files = stages.ALL[stage].root_files
      if any((self.root / n).exists() for n in root_files) and not d.exists():
        self._move_aside(stage, stamp, root_only=True)  # files of a run with no record
      d.mkdir(parents=True, exist_ok=True)
      if step.action != "resume":
        files.write_json(d / "STARTED.json", {"fingerprint": fp, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    sharding.barrier(f"icl_ft start {stage}")
    self.log(f"[{stage}] running" + (f" ({step.reason})" if step.action in ("resume", "redo", "replace") else ""))
    t0 = time.time()
    self._warnings: list[str] = []
    units = Units(d / "partial")
    outputs = stages.ALL[stage].run(self, d, units)
    stages.ALL[stage].check_outputs(outputs)
    if units.reused:
      self.log(f"[{stage}] reused {units.reused} of {units.reused + units.computed} saved units of the interrupted run")
    rec = records.StageRecord(
        fingerprint=fp, inputs=json.loads(json.dumps(self.cfg.inputs(stage), default=str)),
        upstream=self._upstream(stage), seconds=round(time.time() - t0, 1),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"), outputs=outputs, files=workdir.digests(self.root, outputs),
        warnings=self._warnings)
    records.write_stage(d / "DONE.json", rec)
    if files.is_writer() and (d / "partial").exists():
      (d / "partial").rmtree()  # scratch of completed units; the stage's results are in its outputs
    sharding.barrier(f"icl_ft done {stage}")
    self._ran.add(stage)
    self.log(f"[{stage}] done in {rec['seconds']:.0f}s")

  def _move_aside(self, stage: str, stamp: str, root_only: bool = False) -> None:
    """Moves a stage's directory (and the files it writes in the work directory itself) to
    ``<stage>.replaced-<stamp>/``."""
    d = self.dir(stage)
    if root_only:
      target = d.parent / f"{d.name}.replaced-{stamp}"
      target.mkdir(parents=True)
    elif d.exists():
      target = workdir.move_aside(d, stamp)
    else:
      return
    for name in stages.ALL[stage].root_files:
      if (self.root / name).exists():
        (self.root / name).rename(target / name)
    self.log(f"[{stage}] previous results moved to {target}")

  def _downstream(self, stage: str) -> list[str]:
    """Stages that read ``stage``'s outputs, directly or through others."""
    out = [s for s in STAGES if stage in self.cfg.needs(s)]
    return out + [t for s in out for t in self._downstream(s) if t not in out]

  def rel(self, path: files.PathLike) -> str:
    return files.relative(path, self.root)

  def figure(self, name: str, draw: Callable[[], Any]) -> Any:
    """The study's figure guard: a failure to draw is a warning (logged, recorded in DONE.json, shown in the
    report), never a lost stage. Returns the figure's path, or None."""
    try:
      return draw()
    except OSError:
      raise  # a full disk or a missing permission is not a figure problem: stop and name the path
    except Exception as e:  # a figure must never cost the numbers already written
      message = f"figure {name!r} could not be drawn: {type(e).__name__}: {e}"
      self.log(f"warning: {message}")
      self._warnings.append(message)
      return None

  @property
  def mesh(self):
    if self._mesh is None:
      self._mesh = sharding.make_mesh(self.cfg.mesh)
    return self._mesh

  @property
  def model(self):
    if self._model is None:
      t0 = time.time()
      self._model = loading.load(self.cfg.model, dtype=self.cfg.dtype, mesh=self.mesh)
      c = self._model.config
      self.log(f"loaded {self.cfg.model} ({c.arch}, {c.num_params() / 1e6:.1f}M parameters) in {time.time() - t0:.1f}s")
    return self._model
