"""The six stages of a study, each declared once: what it reads (``needs``), whether it loads the model, the
outputs it names, and the function that runs it. A stage function takes the running ``Study`` (config, model,
work directory, figure guard), its directory and its ``Units`` (per-unit partial results, so a killed stage
resumes) and returns its outputs by name, as paths relative to the work directory; the report reads them by
those names."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from etils import epath

from icl_ft import faults, tasks
from icl_ft.evaluation import engine
from icl_ft.interp import circuits
from icl_ft.io import files
from icl_ft.io import loading
from icl_ft.io.loading import LoadedModel
from icl_ft.io.records import read_document, read_queries, without_later_defaults, write_document, write_queries
from icl_ft.io.units import Units
from icl_ft.model.decoder import Params
from icl_ft.report import cues, outputs, plots, render, tables
from icl_ft.tasks import export
from icl_ft.training import dataset, trainer

if TYPE_CHECKING:
  from icl_ft.study.pipeline import Study

REPORT_FILES = ("REPORT.md", "results.json")  # the report stage's outputs in the work directory itself
FEWSHOT = "fewshot"  # the few-shot FT control's run, inside the finetune stage's directory


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage, declared once."""
  name: str
  needs: tuple[str, ...]  # stages whose outputs it reads
  uses_model: bool
  outputs: tuple[str, ...]  # the names of its outputs ("prefix_*": any number of them; "*": one entry per task)
  run: Callable[["Study", epath.Path, Units], dict[str, Any]]
  inputs: Callable[[Any], dict]  # (StudyConfig) -> the config values its outputs depend on (its fingerprint)
  per_task: tuple[str, ...] = ()  # with outputs ("*",): the names each task's entry holds
  enabled: Callable[[Any], bool] = lambda cfg: True  # whether the study has this stage at all
  root_files: tuple[str, ...] = ()  # outputs written in the work directory itself (moved aside with the stage)
  check: Callable[[Any, Any], None] = lambda cfg, mesh: None  # (StudyConfig, mesh): ConfigError before any write

  def check_outputs(self, outputs: dict[str, Any]) -> None:
    """RuntimeError unless ``outputs`` has exactly the declared names."""
    if self.outputs == ("*",):
      wrong = {t: sorted(v) for t, v in outputs.items() if set(v) != set(self.per_task)}
    else:
      fixed = {o for o in self.outputs if not o.endswith("*")}
      patterns = [o[:-1] for o in self.outputs if o.endswith("*")]
      extra = [k for k in outputs if k not in fixed and not any(k.startswith(p) for p in patterns)]
      wrong = {"unexpected": extra, "missing": sorted(fixed - set(outputs))} if extra or fixed - set(outputs) else {}
    if wrong:
      raise RuntimeError(f"stage {self.name!r} returned outputs {outputs}, declared {self.outputs} {self.per_task}: "
                         f"{wrong}")


def _later(name: str, section: dict) -> dict:
  """Config section ``name`` without the settings added after runs existed that are at their default
  (``records.LATER_DEFAULTS``), so those runs' fingerprints (and finished stages) stay valid."""
  kept = without_later_defaults({f"{name}.{k}": v for k, v in section.items()})
  return {k.split(".", 1)[1]: v for k, v in kept.items()}


def _nested(cfg, uses_demos: bool) -> dict:
  """``nested_demos`` as an input of a stage that builds prompts with demos, when it is on."""
  return {"nested_demos": True} if cfg.nested_demos and uses_demos else {}


def _common(cfg) -> dict:
  """What every stage's data depends on beyond its own section: the generators' version and the model a name
  resolves to."""
  r = cfg.raw
  common = {k: r[k] for k in ("dtype", "tasks", "variants", "format", "seed")}
  return dict(common, model=loading.REGISTRY.get(r["model"], r["model"]), data_version=tasks.DATA_VERSION)


def _check_batch(cfg, mesh) -> None:
  from icl_ft.study.config import ConfigError
  for key, train in (("ft.batch_size / ft.grad_accum", cfg.train),
                     ("ft.fewshot_k x tasks (the few-shot control's batch)", cfg.fewshot)):
    try:
      if train:
        trainer.check_batch(train, mesh)
    except ValueError as e:
      raise ConfigError(f"{key}: {e}") from None


def _circuit_title(task: str, name: str) -> str:
  return f"{task}: {name}"


def _data(study: Study, d: epath.Path, units: Units) -> dict:
  del units  # seconds of work: rerun whole
  cfg, out = study.cfg, {}
  for v in cfg.variants:
    recs = export.example_records(cfg.tasks, v, cfg.n_queries, cfg.seed, cfg.format)
    out[f"queries_{v}"] = study.rel(files.write_jsonl(d / f"queries_{v}.jsonl", recs))
    faults.point("data.write")
  fd = cfg.ft_data
  ft = export.ft_records(fd.tasks, fd.n_per_task, fd.seed, fd.format, fd.with_header)
  out["ft_train"] = study.rel(files.write_jsonl(d / "ft_train.jsonl", ft))
  return out


def _icl(study: Study, d: epath.Path, units: Units) -> dict:
  cfg = study.cfg
  records, skipped = engine.sweep(study.model, cfg.tasks, cfg.variants, [cfg.format], cfg.shots, cfg.n_queries,
                                  cfg.seed, cfg.icl_engine, cfg.model, cfg.n_dev, units, cfg.icl_controls,
                                  cfg.control_shots, cfg.n_by_shots, cfg.nested_demos)
  paths = outputs.write_icl_results(d, records, skipped, f"{cfg.model}: accuracy vs shots", study.figure)
  return {k: study.rel(v) if v else None for k, v in paths.items()}


def _finetune(study: Study, d: epath.Path, units: Units) -> dict:
  del units  # Orbax checkpoints are its resume points
  cfg, m = study.cfg, study.model
  demos = dataset.fewshot_examples(cfg.tasks, cfg.fewshot_k, cfg.seed, cfg.format, cfg.nested_demos) if cfg.fewshot \
      else []
  data = dataset.build(cfg.ft_data, m.tokenizer)
  heldout = dataset.heldout(cfg.ft_data, m.tokenizer, exclude={ex.question for ex in demos})  # unseen by both runs
  study.log(f"[finetune] {len(data)} examples ({data.num_tokens} tokens) from {', '.join(cfg.ft_data.tasks)}; "
            f"{cfg.train.steps} steps of {cfg.train.batch_size}")
  trainer.train(m.config, m.params, data, cfg.train, d, mesh=study.mesh, length_multiple=cfg.ft_data.length_multiple,
                progress=cfg.progress, heldout=heldout)
  out = dict(checkpoints=study.rel(d / "checkpoints"), metrics=study.rel(d / "metrics.jsonl"), fewshot=None)
  if cfg.fewshot:
    study.log(f"[finetune] few-shot control: the {cfg.fewshot_k} ICL demos of the first query per task "
              f"({len(demos)} examples), {cfg.fewshot.steps} full-batch steps")
    trainer.train(m.config, m.params, dataset.from_examples(demos, cfg.ft_data, m.tokenizer), cfg.fewshot,
                  d / FEWSHOT, mesh=study.mesh, length_multiple=cfg.ft_data.length_multiple, progress=cfg.progress,
                  heldout=heldout)
    out["fewshot"] = study.rel(d / FEWSHOT)
  return out


def _tuned(study: Study, steps: Sequence[int] | None) -> Iterator[tuple[str, int, Params]]:
  """(method, step, parameters) of each fine-tuned model to evaluate: ``ft`` at ``steps`` (None: every kept
  checkpoint), then the few-shot control ``ft-fewshot`` at its last step."""
  cfg, m, d = study.cfg, study.model, study.dir("finetune")
  for step, params in trainer.checkpoint_params(m.config, m.params, cfg.train, d, steps, study.mesh):
    yield "ft", step, params
  if cfg.fewshot:
    for step, params in trainer.checkpoint_params(m.config, m.params, cfg.fewshot, d / FEWSHOT, [cfg.fewshot.steps],
                                                  study.mesh):
      yield "ft-fewshot", step, params


def evaluate_checkpoints(study: Study, units: Units | None = None) -> tuple[list[dict], list[dict]]:
  """The fine-tuned models (``_tuned``) through the ICL engine, records tagged ``method`` (``ft`` or
  ``ft-fewshot``), ``step`` and ``samples`` (training examples seen). Returns (records, skipped)."""
  cfg, m = study.cfg, study.model
  records, skipped = [], []
  for method, step, params in _tuned(study, cfg.ft_eval_steps or None):
    train = cfg.train if method == "ft" else cfg.fewshot
    shots = cfg.ft_eval_shots if method == "ft" else (0,)
    recs, skip = engine.sweep(LoadedModel(m.config, params, m.tokenizer, m.source), cfg.tasks, cfg.variants,
                              [cfg.format], shots, cfg.n_queries, cfg.seed, cfg.icl_engine, cfg.model,
                              units=units.sub(f"{method}-step{step}") if units else None, nested=cfg.nested_demos)
    tag = lambda r, method=method, step=step, n=step * train.batch_size: r.tagged(method=method, step=step, samples=n)
    records += [tag(r) for r in recs]
    skipped += [tag(r) for r in skip]
  return records, skipped


def _ft_eval(study: Study, d: epath.Path, units: Units) -> dict:
  cfg = study.cfg
  records, skipped = evaluate_checkpoints(study, units)
  summary = tables.summarize(records, skipped)
  out = dict(records=study.rel(write_queries(d / "records.jsonl", records)),
             summary=study.rel(write_document(d / "summary.json", "summary", dict(cells=summary))))
  plot = study.figure(plots.TITLES["samples"], lambda: plots.plot_accuracy(
      [r for r in summary if r["method"] == "ft"], d / "accuracy_vs_samples.png", x="samples", title=f"{cfg.model}: fine-tuned accuracy vs training samples"))
  return dict(out, plot=study.rel(plot) if plot else None)


def _circuits(study: Study, d: epath.Path, units: Units) -> dict:
  cfg = study.cfg
  tuned = {method: params for method, _, params in _tuned(study, [cfg.ft_report_step])}
  out = {}
  for ccfg in cfg.circuits:
    found = circuits.analyze(study.model.config, study.model.params, study.model.tokenizer, ccfg, tuned=tuned,
                             units=units.sub(ccfg.task), log=study.log)
    task_dir = d / ccfg.task
    numbers = write_document(task_dir / "circuits.json", "circuits", found.numbers)  # numbers before figures
    out[ccfg.task] = {"json": study.rel(numbers)}
    for name, draw in plots.CIRCUIT_FIGURES.items():
      path = study.figure(_circuit_title(ccfg.task, name), lambda: draw(task_dir, found.numbers, found.effects))
      out[ccfg.task][name] = study.rel(path) if path else None
  return out


def _figures(study: Study) -> tuple[dict[str, str], dict[str, dict[str, str]], list[str]]:
  """The figures the report links (only those that exist): accuracy figures by title, circuit figures by task and
  name; and every warning: the stages' (a figure that failed to draw) plus one per figure drawn but gone since."""
  warnings = [w for s in ALL if study.done(s) for w in study.done(s).get("warnings", [])]
  exists = lambda path: path is not None and (study.root / path).exists()
  accuracy = {plots.TITLES["shots"]: study.output("icl", "plot"),
              plots.TITLES["samples"]: study.output("ft_eval", "plot")}
  circuit = {t: {name: p[name] for name in plots.CIRCUIT_FIGURES}
             for t, p in (study.output("circuits").items() if study.cfg.circuits else ())}
  titled = dict(accuracy, **{_circuit_title(t, n): p for t, figs in circuit.items() for n, p in figs.items()})
  warnings += [f"figure {k!r} is missing" for k, v in titled.items() if v is not None and not exists(v)]
  return ({k: v for k, v in accuracy.items() if exists(v)},
          {t: {n: p for n, p in figs.items() if exists(p)} for t, figs in circuit.items()}, warnings)


def _report(study: Study, d: epath.Path, units: Units) -> dict:
  del d, units
  cfg = study.cfg
  circuit = ({t: read_document(study.path("circuits", t, "json"), "circuits") for t in study.output("circuits")}
             if cfg.circuits else {})
  timings = {s: study.done(s)["seconds"] for s in ALL if study.done(s)}
  answers = [dict(r) for stage in ("icl", "ft_eval") for r in read_queries(study.path(stage, "records"))]
  ft_dir = study.path("finetune", "checkpoints").parent
  results = tables.study_results(cfg.raw, read_document(study.path("icl", "summary"), "summary"),
                                 read_document(study.path("ft_eval", "summary"), "summary")["cells"],
                                 files.read_jsonl(study.path("finetune", "metrics")), circuit, timings,
                                 cfg.ft_report_step, fewshot_metrics=files.read_jsonl(
                                     study.path("finetune", "fewshot") / "metrics.jsonl") if cfg.fewshot else (),
                                 ft_cues=tables.ft_data_cues(cfg.ft_data.tasks, cfg.ft_data.n_per_task,
                                                             cfg.ft_data.seed, cfg.ft_data.format),
                                 cue_analysis=cues.analyse(answers), differences=cues.differences_from_base(answers),
                                 heldout={name: files.read_jsonl(p) for name, p in (
                                     ("ft", ft_dir / trainer.HELDOUT), ("ft-fewshot", ft_dir / FEWSHOT / trainer.HELDOUT))
                                          if p.exists()})
  figures, circuit_figures, warnings = _figures(study)
  results["warnings"] = results["formats"]["warnings"] + warnings
  results.update(model=loading.model_facts(cfg.model, cfg.dtype), gaps=cues.icl_minus_ft(answers, cfg.ft_report_step))
  write_document(study.root / "results.json", "results", results)
  faults.point("report.write")
  files.atomic_write_text(study.root / "REPORT.md", render.render_study(results, figures, circuit_figures))
  return dict(report="REPORT.md", results="results.json")


ALL: dict[str, Stage] = {s.name: s for s in (
    Stage("data", (), False, ("queries_*", "ft_train"), _data,
          inputs=lambda cfg: dict(_common(cfg), n=cfg.raw["icl"]["n"], ft=cfg.raw["ft"])),
    Stage("icl", (), True, ("records", "summary", "summary_csv", "plot"), _icl,
          inputs=lambda cfg: dict(_common(cfg), icl=_later("icl", cfg.raw["icl"]))),
    Stage("finetune", (), True, ("checkpoints", "metrics", "fewshot"), _finetune,
          inputs=lambda cfg: dict(_common(cfg), ft=cfg.raw["ft"], **_nested(cfg, bool(cfg.fewshot))),
          check=_check_batch),
    Stage("ft_eval", ("finetune",), True, ("records", "summary", "plot"), _ft_eval,
          inputs=lambda cfg: dict(_common(cfg), n=cfg.raw["icl"]["n"], batch_size=cfg.raw["icl"]["batch_size"],
                                  ft_eval=dict(shots=cfg.raw["ft_eval"]["shots"],
                                               steps=cfg.ft_eval_steps or "all kept",
                                               on_too_long=cfg.raw["icl"]["on_too_long"]),
                                  **_nested(cfg, any(cfg.ft_eval_shots)))),
    Stage("circuits", ("finetune",), True, ("*",), _circuits, per_task=("json", *plots.CIRCUIT_FIGURES),
          inputs=lambda cfg: dict(_common(cfg), circuits=cfg.raw["circuits"], ft_step=cfg.ft_report_step),
          enabled=lambda cfg: bool(cfg.circuits)),
    Stage("report", ("icl", "finetune", "ft_eval", "circuits"), False, ("report", "results"), _report,
          inputs=lambda cfg: dict(name=cfg.raw["name"], ft_report_step=cfg.ft_report_step),
          root_files=REPORT_FILES),
)}
