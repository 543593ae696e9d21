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
section and the fingerprints of the stages it reads); a stage started under another fingerprint is
cleared and rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

from etils import epath

from icl_ft import files, report, sharding, tasks

STAGES = ("data", "icl", "finetune", "ft_eval", "circuits", "report")
NEEDS = {"data": (), "icl": (), "finetune": (), "ft_eval": ("finetune",), "circuits": ("finetune",),
         "report": ("icl", "finetune", "ft_eval", "circuits")}
PAIR_TASKS = ("expression", "parity", "boolean")  # tasks with aligned clean/corrupted prompt pairs


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the valid values."""


class MissingInputError(RuntimeError):
  """A selected stage needs outputs of a stage that has not completed under the current config."""


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
    ft_eval = dict(shots=r["ft_eval"]["shots"], steps=self.ft_eval_steps or "all kept")
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


def check_workdir(path: epath.Path) -> epath.Path:
  """Creates ``path`` and proves it writable, or raises a ``ConfigError`` that says what to do."""
  try:
    files.check_store(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"work directory {str(path)!r} is not writable ({e.strerror or e}); "
                      f"choose another with --config.workdir=DIR") from None
  return path


class Study:
  """Runs the selected stages of a ``StudyConfig``, loading the model only when a stage needs it."""

  def __init__(self, cfg: StudyConfig, log: Callable[[str], None] = print):
    self.cfg, self.log = cfg, log
    self.root = check_workdir(cfg.workdir)
    self._model = None
    self._mesh = None

  # -- bookkeeping --------------------------------------------------------------------------------------
  def dir(self, stage: str) -> epath.Path:
    return self.root / stage

  def done(self, stage: str) -> dict | None:
    """The stage's DONE record if it completed under the current fingerprint."""
    path = self.dir(stage) / "DONE.json"
    if not path.exists():
      return None
    try:
      rec = json.loads(path.read_text())
    except json.JSONDecodeError:
      return None
    return rec if rec.get("fingerprint") == self.cfg.fingerprint(stage) else None

  def _start(self, stage: str) -> epath.Path:
    """Prepares the stage directory: kept when started under this fingerprint (resume), else cleared."""
    d, fp = self.dir(stage), self.cfg.fingerprint(stage)
    started = d / "STARTED.json"
    if files.is_writer():
      if d.exists() and not (started.exists() and json.loads(started.read_text()).get("fingerprint") == fp):
        self.log(f"[{stage}] outputs from another config in {d}: clearing them")
        d.rmtree()
      d.mkdir(parents=True, exist_ok=True)
      if not started.exists():
        files.write_json(started, {"fingerprint": fp, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
      (d / "DONE.json").unlink(missing_ok=True)
    sharding.barrier(f"icl_ft start {stage}")
    return d

  def run(self) -> dict[str, dict]:
    """Runs (or skips) each selected stage in order; returns every completed stage's DONE record."""
    cfg = self.cfg
    for stage in cfg.stages:
      for need in cfg.needs(stage):
        if need not in cfg.stages and self.done(need) is None:
          raise MissingInputError(
              f"stage {stage!r} needs the outputs of stage {need!r}, which has not completed under this config "
              f"in {self.dir(need)}; run it too (--config.stages={need},{stage}, or all)")
    records = {}
    for stage in STAGES:
      if stage not in cfg.stages or (stage == "circuits" and not cfg.circuits):
        if self.done(stage):
          records[stage] = self.done(stage)
        continue
      rec = self.done(stage)
      if rec is not None:
        self.log(f"[{stage}] up to date (fingerprint {rec['fingerprint']}), skipped")
      else:
        self.log(f"[{stage}] running")
        d = self._start(stage)
        t0 = time.time()
        outputs = getattr(self, f"_{stage}")(d)
        rec = dict(fingerprint=cfg.fingerprint(stage), seconds=round(time.time() - t0, 1),
                   finished=time.strftime("%Y-%m-%dT%H:%M:%S"), outputs=outputs)
        files.write_json(d / "DONE.json", rec)
        self.log(f"[{stage}] done in {rec['seconds']:.0f}s")
        for later in self._downstream(stage):  # their outputs were computed from the previous run of this stage
          if files.is_writer():
            (self.dir(later) / "DONE.json").unlink(missing_ok=True)
        sharding.barrier(f"icl_ft done {stage}")
      records[stage] = rec
    return records

  def _downstream(self, stage: str) -> list[str]:
    """Stages that read ``stage``'s outputs, directly or through others."""
    out = [s for s in STAGES if stage in self.cfg.needs(s)]
    return out + [t for s in out for t in self._downstream(s) if t not in out]

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

  # -- stages -----------------------------------------------------------------------------------------------
  def _data(self, d: epath.Path) -> dict:
    from icl_ft.tasks import export
    cfg, out = self.cfg, {}
    for v in cfg.variants:
      recs = export.example_records(cfg.tasks, v, cfg.n_queries, cfg.seed, cfg.format)
      out[f"queries_{v}"] = str(files.write_jsonl(d / f"queries_{v}.jsonl", recs))
    fd = cfg.ft_data
    ft = export.ft_records(fd.tasks, fd.n_per_task, fd.seed, fd.format, fd.with_header)
    out["ft_train"] = str(files.write_jsonl(d / "ft_train.jsonl", ft))
    return out

  def _icl(self, d: epath.Path) -> dict:
    from icl_ft import icl
    cfg = self.cfg
    records, skipped = icl.sweep(self.model, cfg.tasks, cfg.variants, [cfg.format], cfg.shots, cfg.n_queries,
                                 cfg.seed, cfg.icl_engine, cfg.model, cfg.n_dev)
    return icl.write_results(d, records, skipped, title=f"{cfg.model}: accuracy vs shots")

  def _finetune(self, d: epath.Path) -> dict:
    from icl_ft import ft_data, training
    cfg = self.cfg
    data = ft_data.build(cfg.ft_data, self.model.tokenizer)
    self.log(f"[finetune] {len(data)} examples ({data.num_tokens} tokens) from {', '.join(cfg.ft_data.tasks)}; "
             f"{cfg.train.steps} steps of {cfg.train.batch_size}")
    result = training.train(self.model.config, self.model.params, data, cfg.train, d, mesh=self._mesh,
                             progress=cfg.progress)
    last = result.metrics[-1]
    return dict(checkpoints=result.checkpoint_dir, metrics=str(d / "metrics.jsonl"),
                final_loss=last["loss"], samples=last["samples"])

  def _ft_eval(self, d: epath.Path) -> dict:
    from icl_ft import icl, training
    cfg = self.cfg
    records, skipped = training.evaluate_checkpoints(
        self.model, cfg.train, self.dir("finetune"), cfg.tasks, cfg.variants, cfg.format, cfg.ft_eval_shots,
        cfg.n_queries, cfg.seed, cfg.ft_eval_steps or None, cfg.icl_engine)
    for r in records + skipped:
      r["model"] = cfg.model
    summary = report.summarize(records, skipped)
    return dict(records=str(files.write_jsonl(d / "records.jsonl", records)),
                summary=str(files.write_json(d / "summary.json", summary)),
                plot=str(report.plot_accuracy(summary, d / "accuracy_vs_samples.png", x="samples",
                                              title=f"{cfg.model}: fine-tuned accuracy vs training samples")))

  def _circuits(self, d: epath.Path) -> dict:
    from icl_ft import circuits, training
    cfg = self.cfg
    m = self.model
    step, tuned = list(training.checkpoint_params(m.config, m.params, cfg.train, self.dir("finetune"),
                                                  [cfg.ft_report_step], self._mesh))[0]
    out = {}
    for ccfg in cfg.circuits:
      self.log(f"[circuits] {ccfg.task}: {ccfg.n_pairs} pairs, conditions base, "
               f"{', '.join(f'icl{k}' for k in ccfg.icl_shots)}, ft@{step}")
      results = circuits.analyze(m.config, m.params, m.tokenizer, ccfg, tuned={"ft": tuned})
      out[ccfg.task] = circuits.write(d / ccfg.task, results)
    return out

  def _report(self, d: epath.Path) -> dict:
    del d
    cfg = self.cfg
    read = lambda stage, key: files.read_json(self.done(stage)["outputs"][key])
    icl_summary = read("icl", "summary_json")
    ft_summary = read("ft_eval", "summary")
    metrics = files.read_jsonl(self.done("finetune")["outputs"]["metrics"])
    circuit = {t: files.read_json(p["json"]) for t, p in self.done("circuits")["outputs"].items()} \
        if cfg.circuits else {}
    timings = {s: self.done(s)["seconds"] for s in STAGES if self.done(s)}
    results = report.study_results(cfg.raw, icl_summary, ft_summary, metrics, circuit, timings, cfg.ft_report_step)
    figures = {"accuracy vs shots": self.done("icl")["outputs"]["plot"],
               "accuracy vs training samples": self.done("ft_eval")["outputs"]["plot"]}
    if cfg.circuits:
      for t, p in self.done("circuits")["outputs"].items():
        figures.update({f"{t}: circuit heatmaps": p["heatmaps"], f"{t}: MLP effects": p["mlps"],
                        f"{t}: circuit shift": p["shifts"]})
    figures = {k: files.relative(v, self.root) for k, v in figures.items()}
    files.write_json(self.root / "results.json", results)
    files.atomic_write_text(self.root / "REPORT.md", report.render_study(results, figures))
    return dict(report=str(self.root / "REPORT.md"), results=str(self.root / "results.json"))
