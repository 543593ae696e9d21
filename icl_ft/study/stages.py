"""The six stages of a study, each declared once: what it reads (``needs``), whether it loads the model, the
outputs it names, and the function that runs it. A stage function takes the running ``Study`` (config, model,
work directory, figure guard), its directory and its ``Units`` (per-unit partial results, so a killed stage
resumes) and returns its outputs by name, as paths relative to the work directory; the report reads them by
those names."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from etils import epath

from icl_ft import faults
from icl_ft.evaluation import engine
from icl_ft.interp import circuits
from icl_ft.io import files
from icl_ft.io.loading import LoadedModel
from icl_ft.io.records import write_queries
from icl_ft.io.units import Units
from icl_ft.report import outputs, plots, render, tables
from icl_ft.tasks import export
from icl_ft.training import dataset, trainer

if TYPE_CHECKING:
  from icl_ft.study.pipeline import Study

REPORT_FILES = ("REPORT.md", "results.json")  # the report stage's outputs in the work directory itself


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  needs: tuple[str, ...]  # stages whose outputs it reads
  uses_model: bool
  outputs: tuple[str, ...]  # the names of its outputs ("*": one entry per task, each a mapping)
  run: Callable[["Study", epath.Path, Units], dict[str, Any]]

  def check_outputs(self, outputs: dict[str, Any]) -> None:
    """RuntimeError unless ``outputs`` has exactly the declared names (``prefix_*``: any number of them)."""
    fixed = {o for o in self.outputs if not o.endswith("*")}
    patterns = [o[:-1] for o in self.outputs if o.endswith("*")]
    extra = [k for k in outputs if k not in fixed and not any(k.startswith(p) for p in patterns)]
    if extra or fixed - set(outputs):
      raise RuntimeError(f"stage {self.name!r} returned outputs {sorted(outputs)}, declared {self.outputs}")


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
                                  cfg.seed, cfg.icl_engine, cfg.model, cfg.n_dev, units)
  paths = outputs.write_icl_results(d, records, skipped, f"{cfg.model}: accuracy vs shots", study.figure)
  return {k: study.rel(v) if v else None for k, v in paths.items()}


def _finetune(study: Study, d: epath.Path, units: Units) -> dict:
  del units  # Orbax checkpoints are its resume points
  cfg = study.cfg
  data = dataset.build(cfg.ft_data, study.model.tokenizer)
  study.log(f"[finetune] {len(data)} examples ({data.num_tokens} tokens) from {', '.join(cfg.ft_data.tasks)}; "
            f"{cfg.train.steps} steps of {cfg.train.batch_size}")
  trainer.train(study.model.config, study.model.params, data, cfg.train, d, mesh=study.mesh, progress=cfg.progress)
  return dict(checkpoints=study.rel(d / "checkpoints"), metrics=study.rel(d / "metrics.jsonl"))


def evaluate_checkpoints(study: Study, units: Units | None = None) -> tuple[list[dict], list[dict]]:
  """The fine-tuned model at each evaluated checkpoint through the ICL engine, records tagged
  ``method="ft"``, ``step`` and ``samples`` (training examples seen). Returns (records, skipped)."""
  cfg, m = study.cfg, study.model
  records, skipped = [], []
  steps = cfg.ft_eval_steps or None
  for step, params in trainer.checkpoint_params(m.config, m.params, cfg.train, study.dir("finetune"), steps, study.mesh):
    recs, skip = engine.sweep(LoadedModel(m.config, params, m.tokenizer, m.source), cfg.tasks, cfg.variants,
                              [cfg.format], cfg.ft_eval_shots, cfg.n_queries, cfg.seed, cfg.icl_engine, cfg.model,
                              units=units.sub(f"step{step}") if units else None)
    tag = lambda r, step=step: r.tagged(method="ft", step=step, samples=step * cfg.train.batch_size)
    records += [tag(r) for r in recs]
    skipped += [tag(r) for r in skip]
  return records, skipped


def _ft_eval(study: Study, d: epath.Path, units: Units) -> dict:
  cfg = study.cfg
  records, skipped = evaluate_checkpoints(study, units)
  summary = tables.summarize(records, skipped)
  out = dict(records=study.rel(write_queries(d / "records.jsonl", records)),
             summary=study.rel(files.write_json(d / "summary.json", summary)))
  plot = study.figure("accuracy vs training samples", lambda: plots.plot_accuracy(
      summary, d / "accuracy_vs_samples.png", x="samples", title=f"{cfg.model}: fine-tuned accuracy vs training samples"))
  return dict(out, plot=study.rel(plot) if plot else None)


def _circuits(study: Study, d: epath.Path, units: Units) -> dict:
  cfg, m = study.cfg, study.model
  step, tuned = next(trainer.checkpoint_params(m.config, m.params, cfg.train, study.dir("finetune"),
                                               [cfg.ft_report_step], study.mesh))
  out = {}
  for ccfg in cfg.circuits:
    study.log(f"[circuits] {ccfg.task}: {ccfg.n_pairs} pairs, conditions base, "
              f"{', '.join(f'icl{k}' for k in ccfg.icl_shots)}, ft@{step}")
    found = circuits.analyze(m.config, m.params, m.tokenizer, ccfg, tuned={"ft": tuned}, units=units.sub(ccfg.task))
    task_dir = d / ccfg.task
    out[ccfg.task] = {"json": study.rel(files.write_json(task_dir / "circuits.json", found.numbers))}  # numbers first
    for name, draw in plots.CIRCUIT_FIGURES.items():
      path = study.figure(f"{ccfg.task}: {name}", lambda: draw(task_dir, found.numbers, found.effects))
      out[ccfg.task][name] = study.rel(path) if path else None
  return out


def _figures(study: Study) -> tuple[dict[str, str], dict[str, dict[str, str]], list[str]]:
  """The figures the report links (only those that exist): accuracy figures by title, circuit figures by task and
  name; and every warning of the stages (plus one per missing figure)."""
  warnings = [w for s in ALL if study.done(s) for w in study.done(s).get("warnings", [])]
  exists = lambda path: path is not None and (study.root / path).exists()
  accuracy = {"accuracy vs shots": study.output("icl", "plot"),
              "accuracy vs training samples": study.output("ft_eval", "plot")}
  circuit = {t: {name: p[name] for name in plots.CIRCUIT_FIGURES}
             for t, p in (study.output("circuits").items() if study.cfg.circuits else ())}
  titled = dict(accuracy, **{f"{t}: {n}": p for t, figs in circuit.items() for n, p in figs.items()})
  warnings += [f"figure {k!r} is missing" for k, v in titled.items()
               if not exists(v) and not any(k in w for w in warnings)]
  return ({k: v for k, v in accuracy.items() if exists(v)},
          {t: {n: p for n, p in figs.items() if exists(p)} for t, figs in circuit.items()}, warnings)


def _report(study: Study, d: epath.Path, units: Units) -> dict:
  del d, units
  cfg = study.cfg
  circuit = ({t: files.read_json(study.path("circuits", t, "json")) for t in study.output("circuits")}
             if cfg.circuits else {})
  timings = {s: study.done(s)["seconds"] for s in ALL if study.done(s)}
  results = tables.study_results(cfg.raw, files.read_json(study.path("icl", "summary_json")),
                                 files.read_json(study.path("ft_eval", "summary")),
                                 files.read_jsonl(study.path("finetune", "metrics")), circuit, timings,
                                 cfg.ft_report_step)
  figures, circuit_figures, results["warnings"] = _figures(study)
  files.write_json(study.root / "results.json", results)
  faults.point("report.write")
  files.atomic_write_text(study.root / "REPORT.md", render.render_study(results, figures, circuit_figures))
  return dict(report="REPORT.md", results="results.json")


ALL: dict[str, Stage] = {s.name: s for s in (
    Stage("data", (), False, ("queries_*", "ft_train"), _data),
    Stage("icl", (), True, ("records", "summary_json", "summary_csv", "plot"), _icl),
    Stage("finetune", (), True, ("checkpoints", "metrics"), _finetune),
    Stage("ft_eval", ("finetune",), True, ("records", "summary", "plot"), _ft_eval),
    Stage("circuits", ("finetune",), True, ("*",), _circuits),
    Stage("report", ("icl", "finetune", "ft_eval", "circuits"), False, ("report", "results"), _report),
)}
