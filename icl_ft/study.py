"""The study pipeline behind ``python -m icl_ft.main``: a typed config and six resumable stages.

Stages (each writes into ``workdir/<stage>/`` and finishes by writing ``DONE.json`` atomically):

  data      the exact query sets and fine-tuning texts, as JSONL for inspection (later stages regenerate
            them from the same seeds, so they are identical)
  icl       base 0-shot and k-shot ICL on the base model (records, summary, accuracy-vs-shots plot)
  finetune  fine-tuning (full or LoRA) with Orbax checkpoints; a killed run resumes from the last one
  ft_eval   the fine-tuned checkpoints through the ICL engine (accuracy vs training samples seen)
  circuits  patching sweeps and the ICL-vs-FT circuit-shift analysis per task
  report    ``REPORT.md`` and ``results.json`` in the work directory

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
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

from etils import epath

from icl_ft import faults, files, report, sharding, tasks, workdir

STAGES = ("data", "icl", "finetune", "ft_eval", "circuits", "report")
NEEDS = {"data": (), "icl": (), "finetune": (), "ft_eval": ("finetune",), "circuits": ("finetune",),
         "report": ("icl", "finetune", "ft_eval", "circuits")}
PAIR_TASKS = ("expression", "parity", "boolean")  # tasks with aligned clean/corrupted prompt pairs
REPORT_FILES = ("REPORT.md", "results.json")  # the report stage's outputs in the work directory itself
MODEL_STAGES = ("icl", "finetune", "ft_eval", "circuits")  # stages that load the model


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the valid values."""


class MissingInputError(RuntimeError):
  """A selected stage needs outputs of a stage that has not completed under the current config."""


class UnreadableRecordError(RuntimeError):
  """A stage's DONE.json or STARTED.json exists but cannot be read."""


def _ints(key: str, spec: Any, lo: int = 0) -> tuple[int, ...]:
  items = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s.strip()]
  try:
    out = tuple(int(s) for s in items)
  except ValueError:
    raise ConfigError(f"{key} must be comma-separated integers, got {spec!r}") from None
  if any(v < lo for v in out):
    raise ConfigError(f"{key} values must be >= {lo}, got {spec!r}")
  if len(set(out)) != len(out):
    raise ConfigError(f"{key} lists a value twice: {spec!r}")
  return out


def _names(key: str, spec: Any, valid: Sequence[str], default: Sequence[str] = ()) -> tuple[str, ...]:
  items = spec if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec).split(",") if s.strip()]
  items = tuple(items) or tuple(default)
  bad = [s for s in items if s not in valid]
  if bad:
    raise ConfigError(f"{key}: unknown value(s) {bad}; valid: {', '.join(valid)}")
  if not items:
    raise ConfigError(f"{key} is empty; valid values: {', '.join(valid)}")
  if len(set(items)) != len(items):
    raise ConfigError(f"{key} lists a value twice: {spec!r}")
  return items


def _choice(key: str, value: Any, valid: Sequence[Any]) -> Any:
  if value not in valid:
    raise ConfigError(f"{key} must be one of {list(valid)}, got {value!r}")
  return value


def _positive(key: str, value: int) -> int:
  if not isinstance(value, int) or value < 1:
    raise ConfigError(f"{key} must be a positive integer, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The validated study config (built from an ``ml_collections.ConfigDict`` by ``from_dict``)."""
  raw: dict  # the config as given, for fingerprints and the report
  name: str
  model: str
  dtype: str
  workdir: epath.Path  # local path or object-store URI (gs://...)
  tasks: tuple[str, ...]
  variants: tuple[str, ...]
  format: str
  seed: int
  stages: tuple[str, ...]
  mesh: dict
  progress: bool
  overwrite: bool  # finished results of another config are moved aside (never deleted) instead of refused
  shots: tuple[int, ...]
  icl_engine: Any  # icl.EngineConfig
  n_queries: int
  n_dev: int  # dev-split queries per ICL cell (k > 0) for choosing k without the test set; 0: none
  ft_data: Any  # ft_data.FTDataConfig
  train: Any  # training.TrainConfig
  ft_eval_shots: tuple[int, ...]
  ft_eval_steps: tuple[int, ...]  # checkpoints to evaluate (the report step included); empty: every kept one
  ft_report_step: int  # the checkpoint step of the table's fine-tuned column
  circuits: tuple[Any, ...]  # one circuits.CircuitConfig per analysed task

  @classmethod
  def from_dict(cls, c: Any) -> "StudyConfig":
    from icl_ft import circuits, ft_data, icl, lora, training
    raw = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    get = lambda section, key: raw[section][key]
    task_names = _names("tasks", raw["tasks"], tuple(tasks.TASKS))
    fmt = _choice("format", raw["format"], tasks.FORMATS)
    stages = STAGES if raw["stages"] == "all" else _names("stages", raw["stages"], STAGES)
    engine = icl.EngineConfig(batch_size=_positive("icl.batch_size", get("icl", "batch_size")),
                              on_too_long=_choice("icl.on_too_long", get("icl", "on_too_long"), icl.ON_TOO_LONG),
                              progress=bool(raw["progress"]))
    ft = raw["ft"]
    method = _choice("ft.method", ft["method"], ("full", "lora"))
    targets = _names("ft.lora_targets", ft["lora_targets"], tuple(lora.TARGETS))
    data = ft_data.FTDataConfig(
        tasks=_names("ft.tasks", ft["tasks"], tuple(tasks.TASKS), default=task_names),
        n_per_task=_positive("ft.n_per_task", ft["n_per_task"]), format=fmt, with_header=bool(ft["with_header"]),
        loss_on=_choice("ft.loss_on", ft["loss_on"], ("all", "answer")), seed=ft["seed"])
    train = training.TrainConfig(
        steps=_positive("ft.steps", ft["steps"]), batch_size=_positive("ft.batch_size", ft["batch_size"]),
        grad_accum=_positive("ft.grad_accum", ft["grad_accum"]), lr=float(ft["lr"]),
        warmup_steps=ft["warmup_steps"],
        schedule=_choice("ft.schedule", ft["schedule"], ("constant_with_warmup", "cosine")),
        weight_decay=float(ft["weight_decay"]), clip_norm=float(ft["clip_norm"]),
        compute_dtype=_choice("ft.compute_dtype", ft["compute_dtype"], ("float32", "bfloat16")),
        remat=bool(ft["remat"]), unroll_layers=bool(ft["unroll_layers"]), save_every=_positive("ft.save_every", ft["save_every"]),
        keep=_positive("ft.keep", ft["keep"]), seed=ft["seed"],
        lora=lora.LoRAConfig(ft["lora_rank"], float(ft["lora_alpha"]), targets) if method == "lora" else None)
    cc = raw["circuits"]
    circuit_tasks = ()
    if cc["enabled"]:
      default = [t for t in task_names if t in PAIR_TASKS]
      circuit_tasks = _names("circuits.tasks", cc["tasks"], PAIR_TASKS, default=default)
    ccfgs = tuple(circuits.CircuitConfig(
        task=t, fmt=_choice("circuits.format", cc["format"], tasks.FORMATS),
        n_pairs=_positive("circuits.n_pairs", cc["n_pairs"]), seed=raw["seed"],
        icl_shots=_ints("circuits.icl_shots", cc["icl_shots"], lo=1), chunk=_positive("circuits.chunk", cc["chunk"]),
        n_boot=_positive("circuits.n_boot", cc["n_boot"]), top_k=_positive("circuits.top_k", cc["top_k"]),
        resid_last=_ints("circuits.resid_last", [cc["resid_last"]])[0],
        tol=float(cc["tol"]))
        for t in circuit_tasks)
    report_step = _ints("ft_eval.report_step", [get("ft_eval", "report_step")])[0] or train.steps
    eval_steps = _ints("ft_eval.steps", get("ft_eval", "steps"), lo=1)
    _check_kept(train, eval_steps, report_step)
    eval_steps = tuple(sorted(set(eval_steps) | {report_step})) if eval_steps else ()
    eval_shots = _ints("ft_eval.shots", get("ft_eval", "shots"))
    if 0 not in eval_shots:
      raise ConfigError(f"ft_eval.shots must include 0 (the fine-tuned 0-shot column), got {eval_shots}")
    return cls(
        raw=raw, name=str(raw["name"]), model=str(raw["model"]),
        dtype=_choice("dtype", raw["dtype"], ("float32", "bfloat16")), workdir=files.as_path(raw["workdir"]),
        tasks=task_names, variants=_variants(raw["variants"], task_names), format=fmt,
        seed=int(raw["seed"]), stages=stages, mesh=dict(raw["mesh"]), progress=bool(raw["progress"]),
        overwrite=bool(raw.get("overwrite", False)),
        shots=_ints("icl.shots", get("icl", "shots")), icl_engine=engine,
        n_queries=_positive("icl.n", get("icl", "n")), n_dev=_ints("icl.n_dev", [get("icl", "n_dev")])[0],
        ft_data=data, train=train, ft_eval_shots=eval_shots, ft_eval_steps=eval_steps, ft_report_step=report_step,
        circuits=ccfgs)

  def inputs(self, stage: str) -> dict:
    """The config values a stage's outputs depend on (its fingerprint, with its upstream stages')."""
    from icl_ft import loading
    r = self.raw
    # What the data depends on beyond the config: the generators' version and the model a name resolves to.
    common = {k: r[k] for k in ("dtype", "tasks", "variants", "format", "seed")}
    common.update(model=loading.REGISTRY.get(r["model"], r["model"]), data_version=tasks.DATA_VERSION)
    ft_eval = dict(shots=r["ft_eval"]["shots"], steps=self.ft_eval_steps or "all kept",
                   on_too_long=r["icl"]["on_too_long"])
    return {
        "data": dict(common, n=r["icl"]["n"], ft=r["ft"]),
        "icl": dict(common, icl=r["icl"]),
        "finetune": dict(common, ft=r["ft"]),
        "ft_eval": dict(common, n=r["icl"]["n"], batch_size=r["icl"]["batch_size"], ft_eval=ft_eval),
        "circuits": dict(common, circuits=r["circuits"], ft_step=self.ft_report_step),
        "report": dict(name=r["name"], ft_report_step=self.ft_report_step),
    }[stage]

  def needs(self, stage: str) -> tuple[str, ...]:
    skip = () if self.circuits else ("circuits",)
    return tuple(s for s in NEEDS[stage] if s not in skip)

  def fingerprint(self, stage: str) -> str:
    payload = dict(stage=stage, inputs=self.inputs(stage), upstream=[self.fingerprint(s) for s in self.needs(stage)])
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _variants(spec: Any, task_names: Sequence[str]) -> tuple[str, ...]:
  """The variants to evaluate: each must exist in at least one selected task (a task is evaluated on the
  variants it has)."""
  offered = dict.fromkeys(v for t in task_names for v in tasks.get_task(t).variants)
  return _names("variants", spec, tuple(offered))


def saved_steps(train: Any) -> list[int]:
  """The checkpoint steps a training run keeps: every ``save_every`` and the last, the newest ``keep`` of them."""
  steps = sorted(set(range(train.save_every, train.steps + 1, train.save_every)) | {train.steps})
  return steps[-train.keep:]


def _check_kept(train: Any, eval_steps: Sequence[int], report_step: int) -> None:
  kept = saved_steps(train)
  for key, wanted in (("ft_eval.steps", list(eval_steps)), ("ft_eval.report_step", [report_step])):
    missing = [s for s in wanted if s not in kept]
    if missing:
      raise ConfigError(f"{key}: no checkpoint will exist for step(s) {missing}; with ft.steps={train.steps}, "
                        f"ft.save_every={train.save_every} and ft.keep={train.keep} the kept steps are {kept}")


def check_workdir(path: epath.Path) -> None:
  """Raises a ``ConfigError`` that says what to do unless ``path`` could be created and written; writes
  nothing (local paths: permission of the nearest existing ancestor; object stores: the backend is installed)."""
  try:
    files.check_store(path)
  except OSError as e:
    raise ConfigError(str(e)) from None
  if files.has_scheme(path):
    return
  probe = path
  while not probe.exists() and probe != probe.parent:
    probe = probe.parent
  problem = (None if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK) else
             f"{probe} is not a directory" if not probe.is_dir() else f"{probe} is not writable")
  if problem:
    raise ConfigError(f"work directory {str(path)!r} cannot be written ({problem}); "
                      f"choose another with --config.workdir=DIR")


@dataclasses.dataclass(frozen=True)
class Step:
  """What ``Study.run`` will do with one stage: skip, run, resume (a killed run of this config), restart (an
  unfinished run of another config is cleared), redo (damaged outputs are moved aside) or replace (finished
  results of another config are moved aside: needs ``overwrite``)."""
  stage: str
  action: str
  reason: str = ""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts as ``{"a.b": value}``."""
  if not isinstance(d, dict) or not d:
    return {prefix: d}
  return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else str(key)).items()}


def config_diff(old: dict, new: dict) -> list[str]:
  """``key: old -> new`` for every (dotted) key whose value differs."""
  a, b = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


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

  def _read(self, stage: str, name: str) -> dict | None:
    """``<stage>/<name>`` as JSON; None if absent. An unreadable file raises ``UnreadableRecordError``: it is
    never taken for an absent one (that would let a finished stage be cleared)."""
    path = self.dir(stage) / name
    if not path.exists():
      return None
    try:
      value = json.loads(path.read_text())
      if not isinstance(value, dict):
        raise ValueError("not a JSON object")
      return value
    except (OSError, ValueError) as e:
      raise UnreadableRecordError(f"{path} cannot be read ({e}); inspect it, then move it away "
                                  "(or use another --config.workdir)") from None

  def record(self, stage: str) -> dict | None:
    """The stage's DONE record under any fingerprint (None if absent)."""
    return self._read(stage, "DONE.json")

  def done(self, stage: str) -> dict | None:
    """The stage's DONE record if it completed under the current fingerprint."""
    rec = self.record(stage)
    return rec if rec and rec.get("fingerprint") == self.cfg.fingerprint(stage) else None

  def path(self, stage: str, *keys: str) -> epath.Path:
    """An output of a completed stage, by name (``path("circuits", "parity", "json")``)."""
    value = self.done(stage)["outputs"]
    for k in keys:
      value = value[k]
    return self.root / value

  def _upstream(self, stage: str) -> dict[str, dict]:
    """What a stage's outputs were computed from: each needed stage's fingerprint and a digest of its files."""
    out = {}
    for s in self.cfg.needs(stage):
      rec = self.done(s) or {}
      digest = hashlib.sha256(json.dumps(rec.get("files", {}), sort_keys=True).encode()).hexdigest()[:16]
      out[s] = {"fingerprint": self.cfg.fingerprint(s), "files": digest}
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
    started = self._read(stage, "STARTED.json")
    if started is not None and started.get("fingerprint") == fp:
      return Step(stage, "resume", "resuming an interrupted run")
    if started is not None:
      return Step(stage, "restart", f"clearing an unfinished run of another config in {self.dir(stage)}")
    if self.dir(stage).exists():  # no record at all: not ours to delete
      return Step(stage, "redo", f"{self.dir(stage)} holds files of no recorded run")
    return Step(stage, "run")

  def _why(self, stage: str, rec: dict) -> str:
    if "inputs" not in rec:
      return "recorded by an older version of icl_ft"
    diff = config_diff(rec["inputs"], self.cfg.inputs(stage))
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
    check_workdir(self.root)
    if files.is_writer():  # only process 0 takes the lock (run() makes the others stop with it)
      self.lock.check()
    from icl_ft import loading
    loading.check_name(cfg.model)  # a typo in the name is caught here, before anything else
    mesh = sharding.make_mesh(cfg.mesh)
    selected = [s for s in STAGES if s in cfg.stages and not (s == "circuits" and not cfg.circuits)]
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
    if any(s.action != "skip" and s.stage in MODEL_STAGES for s in steps):
      from icl_ft import training
      mcfg = loading.check(cfg.model)
      sharding.check_divisible(mcfg, mesh)
      if any(s.action != "skip" and s.stage == "finetune" for s in steps):
        try:
          training.check_batch(cfg.train, mesh)
        except ValueError as e:
          raise ConfigError(f"ft.batch_size / ft.grad_accum: {e}") from None
    return steps

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
      if stage == "report" and any((self.root / n).exists() for n in REPORT_FILES) and not d.exists():
        self._move_aside(stage, stamp, root_only=True)  # a report with no record of its run
      d.mkdir(parents=True, exist_ok=True)
      if step.action != "resume":
        files.write_json(d / "STARTED.json", {"fingerprint": fp, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    sharding.barrier(f"icl_ft start {stage}")
    self.log(f"[{stage}] running" + (f" ({step.reason})" if step.action in ("resume", "redo", "replace") else ""))
    t0 = time.time()
    self._warnings: list[str] = []
    units = workdir.Units(d / "partial")
    outputs = getattr(self, f"_{stage}")(d, units)
    if units.reused:
      self.log(f"[{stage}] reused {units.reused} of {units.reused + units.computed} saved units of the interrupted run")
    rec = dict(fingerprint=fp, inputs=self.cfg.inputs(stage), upstream=self._upstream(stage),
               seconds=round(time.time() - t0, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%S"), outputs=outputs,
               files=workdir.digests(self.root, outputs), warnings=self._warnings)
    files.write_json(d / "DONE.json", rec)
    if files.is_writer() and (d / "partial").exists():
      (d / "partial").rmtree()  # scratch of completed units; the stage's results are in its outputs
    sharding.barrier(f"icl_ft done {stage}")
    self._ran.add(stage)
    self.log(f"[{stage}] done in {rec['seconds']:.0f}s")

  def _move_aside(self, stage: str, stamp: str, root_only: bool = False) -> None:
    """Moves a stage's directory (and, for the report, ``REPORT.md``/``results.json``) to
    ``<stage>.replaced-<stamp>/``."""
    d = self.dir(stage)
    if root_only:
      target = d.parent / f"{d.name}.replaced-{stamp}"
      target.mkdir(parents=True)
    elif d.exists():
      target = workdir.move_aside(d, stamp)
    else:
      return
    if stage == "report":
      for name in REPORT_FILES:
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
  def model(self):
    if self._model is None:
      from icl_ft import loading
      self._mesh = sharding.make_mesh(self.cfg.mesh)
      t0 = time.time()
      self._model = loading.load(self.cfg.model, dtype=self.cfg.dtype, mesh=self._mesh)
      c = self._model.config
      self.log(f"loaded {self.cfg.model} ({c.arch}, {c.num_params() / 1e6:.1f}M parameters) in {time.time() - t0:.1f}s")
    return self._model

  # -- stages: each returns its outputs by name, as paths relative to the work directory ------------------
  def _data(self, d: epath.Path, units: workdir.Units) -> dict:
    del units  # seconds of work: rerun whole
    from icl_ft.tasks import export
    cfg, out = self.cfg, {}
    for v in cfg.variants:
      recs = export.example_records(cfg.tasks, v, cfg.n_queries, cfg.seed, cfg.format)
      out[f"queries_{v}"] = self.rel(files.write_jsonl(d / f"queries_{v}.jsonl", recs))
      faults.point("data.write")
    fd = cfg.ft_data
    ft = export.ft_records(fd.tasks, fd.n_per_task, fd.seed, fd.format, fd.with_header)
    out["ft_train"] = self.rel(files.write_jsonl(d / "ft_train.jsonl", ft))
    return out

  def _icl(self, d: epath.Path, units: workdir.Units) -> dict:
    from icl_ft import icl
    cfg = self.cfg
    records, skipped = icl.sweep(self.model, cfg.tasks, cfg.variants, [cfg.format], cfg.shots, cfg.n_queries,
                                 cfg.seed, cfg.icl_engine, cfg.model, cfg.n_dev, units)
    paths = icl.write_results(d, records, skipped, f"{cfg.model}: accuracy vs shots", self.figure)
    return {k: self.rel(v) if v else None for k, v in paths.items()}

  def _finetune(self, d: epath.Path, units: workdir.Units) -> dict:
    del units  # Orbax checkpoints are its resume points
    from icl_ft import ft_data, training
    cfg = self.cfg
    data = ft_data.build(cfg.ft_data, self.model.tokenizer)
    self.log(f"[finetune] {len(data)} examples ({data.num_tokens} tokens) from {', '.join(cfg.ft_data.tasks)}; "
             f"{cfg.train.steps} steps of {cfg.train.batch_size}")
    training.train(self.model.config, self.model.params, data, cfg.train, d, mesh=self._mesh, progress=cfg.progress)
    return dict(checkpoints=self.rel(d / "checkpoints"), metrics=self.rel(d / "metrics.jsonl"))

  def _ft_eval(self, d: epath.Path, units: workdir.Units) -> dict:
    from icl_ft import training
    cfg = self.cfg
    records, skipped = training.evaluate_checkpoints(
        self.model, cfg.train, self.dir("finetune"), cfg.tasks, cfg.variants, cfg.format, cfg.ft_eval_shots,
        cfg.n_queries, cfg.seed, cfg.ft_eval_steps or None, cfg.icl_engine, units)
    for r in records + skipped:
      r["model"] = cfg.model
    summary = report.summarize(records, skipped)
    out = dict(records=self.rel(files.write_jsonl(d / "records.jsonl", records)),
               summary=self.rel(files.write_json(d / "summary.json", summary)))
    plot = self.figure("accuracy vs training samples", lambda: report.plot_accuracy(
        summary, d / "accuracy_vs_samples.png", x="samples", title=f"{cfg.model}: fine-tuned accuracy vs training samples"))
    return dict(out, plot=self.rel(plot) if plot else None)

  def _circuits(self, d: epath.Path, units: workdir.Units) -> dict:
    from icl_ft import circuits, training
    cfg = self.cfg
    m = self.model
    step, tuned = list(training.checkpoint_params(m.config, m.params, cfg.train, self.dir("finetune"),
                                                  [cfg.ft_report_step], self._mesh))[0]
    out = {}
    for ccfg in cfg.circuits:
      self.log(f"[circuits] {ccfg.task}: {ccfg.n_pairs} pairs, conditions base, "
               f"{', '.join(f'icl{k}' for k in ccfg.icl_shots)}, ft@{step}")
      results = circuits.analyze(m.config, m.params, m.tokenizer, ccfg, tuned={"ft": tuned},
                                 units=units.sub(ccfg.task))
      guard = lambda name, draw, task=ccfg.task: self.figure(f"{task}: {name}", draw)
      paths = circuits.write(d / ccfg.task, results, guard)
      out[ccfg.task] = {k: self.rel(v) if v else None for k, v in paths.items()}
    return out

  def _report(self, d: epath.Path, units: workdir.Units) -> dict:
    del d, units
    cfg = self.cfg
    icl_summary = files.read_json(self.path("icl", "summary_json"))
    ft_summary = files.read_json(self.path("ft_eval", "summary"))
    metrics = files.read_jsonl(self.path("finetune", "metrics"))
    circuit = {t: files.read_json(self.path("circuits", t, "json")) for t in self.done("circuits")["outputs"]} \
        if cfg.circuits else {}
    timings = {s: self.done(s)["seconds"] for s in STAGES if self.done(s)}
    results = report.study_results(cfg.raw, icl_summary, ft_summary, metrics, circuit, timings, cfg.ft_report_step)
    figures = {"accuracy vs shots": self.done("icl")["outputs"]["plot"],
               "accuracy vs training samples": self.done("ft_eval")["outputs"]["plot"]}
    if cfg.circuits:
      for t, p in self.done("circuits")["outputs"].items():
        figures.update({f"{t}: {name}": p[name] for name in p if name != "json"})
    warnings = [w for s in STAGES if self.done(s) for w in self.done(s).get("warnings", [])]
    missing = [k for k, v in figures.items() if v is None or not (self.root / v).exists()]
    warnings += [f"figure {k!r} is missing" for k in missing if not any(k in w for w in warnings)]
    figures = {k: v for k, v in figures.items() if k not in missing}
    results["warnings"] = warnings
    files.write_json(self.root / "results.json", results)
    faults.point("report.write")
    files.atomic_write_text(self.root / "REPORT.md", report.render_study(results, figures))
    return dict(report="REPORT.md", results="results.json")
