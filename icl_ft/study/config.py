"""The study's typed config: ``StudyConfig.from_dict`` turns an ``ml_collections`` config (configs/*.py) into
typed sections, naming the key and the valid values on any bad input, and says what each stage's outputs
depend on (its fingerprint)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

from etils import epath

from icl_ft import tasks
from icl_ft.evaluation import engine
from icl_ft.interp import circuits
from icl_ft.io import files
from icl_ft.model import lora
from icl_ft.tasks import controls
from icl_ft.training import dataset, trainer

from icl_ft.study import stages

STAGES = tuple(stages.ALL)  # in the order they run
DTYPES = ("float32", "bfloat16")  # parameter and compute dtypes


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the valid values."""


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


def _optional_names(key: str, spec: Any, valid: Sequence[str]) -> tuple[str, ...]:
  """``_names``, where an empty list means none."""
  empty = not (spec if isinstance(spec, (list, tuple)) else str(spec).strip())
  return () if empty else _names(key, spec, valid)


def _sizes(spec: str, shots: Sequence[int], control_shots: int) -> dict[int, int]:
  """``icl.n_by_shots``: "k:n,k:n" -> {k: n} for shot counts of the sweep (or the controls')."""
  out = {}
  for item in (s.strip() for s in str(spec).split(",") if s.strip()):
    k, _, n = item.partition(":")
    try:
      k, n = int(k), int(n)
    except ValueError:
      raise ConfigError(f"icl.n_by_shots must look like '8:40,16:20' (shots:queries), got {spec!r}") from None
    if k not in (*shots, control_shots) or n < 1 or k in out:
      raise ConfigError(f"icl.n_by_shots: {item!r} must name a shot count of icl.shots {tuple(shots)} or "
                        f"icl.control_shots once, with at least 1 query")
    out[k] = n
  return out


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
  icl_engine: engine.EngineConfig
  n_queries: int
  n_by_shots: dict[int, int]  # cells whose size differs from n_queries: shots -> queries (the first of the set)
  n_dev: int  # dev-split queries per ICL cell (k > 0) for choosing k without the test set; 0: none
  nested_demos: bool  # a query's k-shot demos are the first k of one list (tasks.make_demos), else drawn per k
  icl_controls: tuple[str, ...]  # ICL control columns (tasks.controls), at control_shots demos
  control_shots: int
  ft_data: dataset.FTDataConfig
  train: trainer.TrainConfig
  fewshot: trainer.TrainConfig | None  # the few-shot FT control on fewshot_k demos per task; None: off
  fewshot_k: int
  ft_eval_shots: tuple[int, ...]
  ft_eval_steps: tuple[int, ...]  # checkpoints to evaluate (the report step included); empty: every kept one
  ft_report_step: int  # the checkpoint step of the table's fine-tuned column
  circuits: tuple[circuits.CircuitConfig, ...]  # one per analysed task

  @classmethod
  def from_dict(cls, c: Any) -> "StudyConfig":
    """Validates every value (a ``ConfigError`` names the key and the valid values) and builds the sections."""
    raw = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    task_names = _names("tasks", raw["tasks"], tuple(tasks.TASKS))
    fmt = _choice("format", raw["format"], tasks.FORMATS)
    train, data = _ft_section(raw["ft"], task_names, fmt)
    fewshot_k = _ints("ft.fewshot_k", [raw["ft"]["fewshot_k"]])[0]
    fewshot = _fewshot_section(raw["ft"], train, fewshot_k * len(task_names)) if fewshot_k else None
    eval_shots, eval_steps, report_step = _ft_eval_section(raw["ft_eval"], train)
    icl = raw["icl"]
    icl_controls = _optional_names("icl.controls", icl["controls"], controls.CONTROLS)
    control_shots = _ints("icl.control_shots", [icl["control_shots"]])[0]
    if icl_controls and control_shots < 2:
      raise ConfigError(f"icl.control_shots must be >= 2 (the controls replace demos), got {control_shots}")
    return cls(
        raw=raw, name=str(raw["name"]), model=str(raw["model"]),
        dtype=_choice("dtype", raw["dtype"], DTYPES), workdir=files.as_path(raw["workdir"]),
        tasks=task_names, variants=_variants(raw["variants"], task_names), format=fmt, seed=int(raw["seed"]),
        stages=STAGES if raw["stages"] == "all" else _names("stages", raw["stages"], STAGES),
        mesh=dict(raw["mesh"]), progress=bool(raw["progress"]), overwrite=bool(raw.get("overwrite", False)),
        shots=_ints("icl.shots", icl["shots"]), icl_engine=_engine_section(icl, bool(raw["progress"])),
        n_queries=_positive("icl.n", icl["n"]), n_dev=_ints("icl.n_dev", [icl["n_dev"]])[0],
        nested_demos=bool(icl.get("nested_demos", False)),
        n_by_shots=_sizes(icl.get("n_by_shots", ""), _ints("icl.shots", icl["shots"]), control_shots),
        icl_controls=icl_controls, control_shots=control_shots,
        ft_data=data, train=train, fewshot=fewshot, fewshot_k=fewshot_k, ft_eval_shots=eval_shots, ft_eval_steps=eval_steps, ft_report_step=report_step,
        circuits=_circuit_section(raw["circuits"], task_names, int(raw["seed"]), fmt))

  def inputs(self, stage: str) -> dict:
    """The config values a stage's outputs depend on (its fingerprint, with its upstream stages')."""
    return stages.ALL[stage].inputs(self)

  def enabled(self, stage: str) -> bool:
    """Whether this study has ``stage`` at all (no circuit stage without a task that has prompt pairs)."""
    return stages.ALL[stage].enabled(self)

  def needs(self, stage: str) -> tuple[str, ...]:
    return tuple(s for s in stages.ALL[stage].needs if self.enabled(s))

  def fingerprint(self, stage: str) -> str:
    payload = dict(stage=stage, inputs=self.inputs(stage), upstream=[self.fingerprint(s) for s in self.needs(stage)])
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _engine_section(icl: dict, progress: bool) -> engine.EngineConfig:
  return engine.EngineConfig(batch_size=_positive("icl.batch_size", icl["batch_size"]),
                             on_too_long=_choice("icl.on_too_long", icl["on_too_long"], engine.ON_TOO_LONG),
                             progress=progress, share_prefix=bool(icl.get("share_prefix", True)))


def _ft_section(ft: dict, task_names: Sequence[str], fmt: str) -> tuple[trainer.TrainConfig, dataset.FTDataConfig]:
  method = _choice("ft.method", ft["method"], ("full", "lora"))
  targets = _names("ft.lora_targets", ft["lora_targets"], tuple(lora.TARGETS))
  data = dataset.FTDataConfig(
      tasks=_names("ft.tasks", ft["tasks"], tuple(tasks.TASKS), default=task_names),
      n_per_task=_positive("ft.n_per_task", ft["n_per_task"]), format=fmt, with_header=bool(ft["with_header"]),
      loss_on=_choice("ft.loss_on", ft["loss_on"], dataset.LOSS_ON), seed=ft["seed"],
      n_heldout=_ints("ft.n_heldout", [ft.get("n_heldout", 0)])[0])
  train = trainer.TrainConfig(
      steps=_positive("ft.steps", ft["steps"]), batch_size=_positive("ft.batch_size", ft["batch_size"]),
      grad_accum=_positive("ft.grad_accum", ft["grad_accum"]), lr=float(ft["lr"]), warmup_steps=ft["warmup_steps"],
      schedule=_choice("ft.schedule", ft["schedule"], trainer.SCHEDULES), weight_decay=float(ft["weight_decay"]),
      clip_norm=float(ft["clip_norm"]),
      compute_dtype=_choice("ft.compute_dtype", ft["compute_dtype"], DTYPES),
      remat=bool(ft["remat"]), unroll_layers=bool(ft["unroll_layers"]),
      save_every=_positive("ft.save_every", ft["save_every"]), keep=_positive("ft.keep", ft["keep"]), seed=ft["seed"],
      lora=lora.LoRAConfig(ft["lora_rank"], float(ft["lora_alpha"]), targets) if method == "lora" else None)
  return train, data


def _fewshot_section(ft: dict, train: trainer.TrainConfig, n_examples: int) -> trainer.TrainConfig:
  """The few-shot FT control's recipe: the main run's, on its ``n_examples`` demos as one full batch per step
  for ``ft.fewshot_steps`` steps, keeping only the last checkpoint."""
  steps = _positive("ft.fewshot_steps", ft["fewshot_steps"])
  return dataclasses.replace(train, steps=steps, batch_size=n_examples, grad_accum=1, save_every=steps, keep=1,
                             warmup_steps=min(train.warmup_steps, steps // 5))


def _ft_eval_section(ev: dict, train: trainer.TrainConfig) -> tuple[tuple[int, ...], tuple[int, ...], int]:
  """(shots, checkpoint steps to evaluate (empty: every kept one), the report step), each checked against the
  checkpoints training will keep."""
  report_step = _ints("ft_eval.report_step", [ev["report_step"]])[0] or train.steps
  steps = _ints("ft_eval.steps", ev["steps"], lo=1)
  _check_kept(train, steps, report_step)
  shots = _ints("ft_eval.shots", ev["shots"])
  if 0 not in shots:
    raise ConfigError(f"ft_eval.shots must include 0 (the fine-tuned 0-shot column), got {shots}")
  return shots, tuple(sorted(set(steps) | {report_step})) if steps else (), report_step


def _circuit_section(cc: dict, task_names: Sequence[str], seed: int,
                     study_fmt: str) -> tuple[circuits.CircuitConfig, ...]:
  """One ``CircuitConfig`` per analysed task: ``circuits.tasks``, or (empty) those of the study's tasks that
  have prompt pairs in the circuits' format (``circuits.format``, empty: the study's), which may be none."""
  from icl_ft.interp import pairs
  fmt = _choice("circuits.format", cc["format"] or study_fmt, tasks.FORMATS)
  default = [t for t in task_names if t in pairs.pair_tasks() and fmt in tasks.get_task(t).pair_formats]
  if not cc["enabled"] or not (cc["tasks"] or default):
    return ()
  try:
    return _circuit_configs(cc, fmt, pairs.pair_tasks(), default, seed)
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"circuits: {e}") from None


def _circuit_configs(cc: dict, fmt: str, pair_tasks: Sequence[str], default: Sequence[str],
                     seed: int) -> tuple[circuits.CircuitConfig, ...]:
  names = _names("circuits.tasks", cc["tasks"], pair_tasks, default=default)
  for t in names:
    if fmt not in tasks.get_task(t).pair_formats:
      raise ConfigError(f"circuits: {t} has prompt pairs only in format(s) {list(tasks.get_task(t).pair_formats)}, "
                        f"not {fmt!r}; set format (the study's) or circuits.format to one of them")
  return tuple(circuits.CircuitConfig(
      task=t, fmt=fmt,
      n_pairs=_positive("circuits.n_pairs", cc["n_pairs"]), seed=seed,
      icl_shots=_ints("circuits.icl_shots", cc["icl_shots"], lo=1), chunk=_positive("circuits.chunk", cc["chunk"]),
      controls=_optional_names("circuits.controls", cc["controls"], controls.CONTROLS),
      verify=_ints("circuits.verify", [cc["verify"]])[0], n_boot=_positive("circuits.n_boot", cc["n_boot"]),
      n_splits=_positive("circuits.n_splits", cc["n_splits"]), n_perm=_positive("circuits.n_perm", cc["n_perm"]),
      top_k=_positive("circuits.top_k", cc["top_k"]), resid_last=_ints("circuits.resid_last", [cc["resid_last"]])[0],
      tol=float(cc["tol"]), threshold=float(cc["threshold"]),
      single_token_answers=bool(cc["single_token_answers"]))
      for t in names)


def _variants(spec: Any, task_names: Sequence[str]) -> tuple[str, ...]:
  """The variants to evaluate: each must exist in at least one selected task (a task is evaluated on the
  variants it has)."""
  offered = dict.fromkeys(v for t in task_names for v in tasks.get_task(t).variants)
  return _names("variants", spec, tuple(offered))


def saved_steps(train: trainer.TrainConfig) -> list[int]:
  """The checkpoint steps a training run keeps: every ``save_every`` and the last, the newest ``keep`` of them."""
  steps = sorted(set(range(train.save_every, train.steps + 1, train.save_every)) | {train.steps})
  return steps[-train.keep:]


def _check_kept(train: trainer.TrainConfig, eval_steps: Sequence[int], report_step: int) -> None:
  kept = saved_steps(train)
  for key, wanted in (("ft_eval.steps", list(eval_steps)), ("ft_eval.report_step", [report_step])):
    missing = [s for s in wanted if s not in kept]
    if missing:
      raise ConfigError(f"{key}: no checkpoint will exist for step(s) {missing}; with ft.steps={train.steps}, "
                        f"ft.save_every={train.save_every} and ft.keep={train.keep} the kept steps are {kept}")


