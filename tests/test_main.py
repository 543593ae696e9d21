"""The main job end to end on a tiny model with configs/smoke.py: outputs, report, skip, resume, bad input."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import smoke
from icl_ft.io import files
from icl_ft.io import loading
from icl_ft.model import sharding
from icl_ft.report import cues
from icl_ft import study

ROOT = Path(__file__).resolve().parents[1]


def _config(model_dir, workdir, **overrides):
  c = smoke.get_config()
  c.model, c.workdir = str(model_dir), str(workdir)
  c.circuits.tol = 1e-6  # a random tiny model barely separates clean from corrupt prompts
  c.circuits.single_token_answers = False  # its byte tokenizer splits every answer
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    setattr(c[section] if section else c, name, value)
  return study.StudyConfig.from_dict(c)


def _run(cfg):
  lines = []
  done = study.Study(cfg, log=lines.append).run()
  return done, lines


@pytest.fixture(scope="module")
def finished(tiny_lm, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("study")
  cfg = _config(tiny_lm[0], workdir)
  done, lines = _run(cfg)
  return cfg, workdir, done, lines


def test_every_stage_writes_its_outputs(finished):
  cfg, workdir, done, _ = finished
  assert list(done) == list(study.STAGES)
  for stage, rec in done.items():
    assert json.loads((workdir / stage / "DONE.json").read_text())["fingerprint"] == cfg.fingerprint(stage)
    for key, path in rec["outputs"].items():
      for p in (path.values() if isinstance(path, dict) else [path]):
        assert not Path(p).is_absolute() and (workdir / p).exists(), (stage, key, p)  # relative: movable
    assert rec["files"] and all(v["size"] > 0 for v in rec["files"].values()), stage
    assert not (workdir / stage / "partial").exists()  # per-unit scratch is gone once the stage is done
  assert not (workdir / ".lock").exists()
  data = (workdir / "data" / "queries_misleading.jsonl").read_text().splitlines()
  assert len(data) == cfg.n_queries * len(cfg.tasks)
  icl_records = [json.loads(x) for x in (workdir / "icl" / "records.jsonl").read_text().splitlines()]
  test = [r for r in icl_records if r["split"] == "test" and r["control"] is None]
  sizes = [cfg.n_by_shots.get(k, cfg.n_queries) for k in cfg.shots]
  assert cfg.n_by_shots and len(test) == sum(sizes) * len(cfg.tasks) * len(cfg.variants)
  controls = [r for r in icl_records if r["control"]]
  assert len(controls) == cfg.n_queries * len(cfg.tasks) * len(cfg.variants) * len(cfg.icl_controls)
  assert {(r["method"], r["shots"]) for r in controls} == {(f"icl-{c}", cfg.control_shots) for c in cfg.icl_controls}
  dev = [r for r in icl_records if r["split"] == "dev"]
  assert len(dev) == cfg.n_dev * len(cfg.tasks) * len(cfg.variants) * (len(cfg.shots) - 1)
  assert not {r["question"] for r in dev} & {r["question"] for r in test}
  ft = [json.loads(x) for x in (workdir / "ft_eval" / "records.jsonl").read_text().splitlines()]
  assert {(r["method"], r["step"]) for r in ft} == {("ft", 2), ("ft", 4), ("ft-fewshot", cfg.fewshot.steps)}
  fewshot = [r for r in ft if r["method"] == "ft-fewshot"]
  assert {r["shots"] for r in fewshot} == {0} and len(fewshot) == cfg.n_queries * len(cfg.tasks) * len(cfg.variants)
  for png in ("icl/accuracy_vs_shots.png", "ft_eval/accuracy_vs_samples.png", "circuits/expression/circuit_shift.png"):
    assert (workdir / png).read_bytes()[:4] == b"\x89PNG"


def test_report_table_matches_the_records(finished):
  cfg, workdir, _, _ = finished
  results = json.loads((workdir / "results.json").read_text())
  text = (workdir / "REPORT.md").read_text()
  assert {(r["task"], r["variant"]) for r in results["table"]} == {(t, v) for t in cfg.tasks for v in cfg.variants}
  all_records = [r for x in (workdir / "icl" / "records.jsonl").read_text().splitlines()
                 for r in [json.loads(x)] if r["control"] is None]
  icl_records = [r for r in all_records if r["split"] == "test"]
  controls = [json.loads(x) for x in (workdir / "icl" / "records.jsonl").read_text().splitlines()]
  ft_records = [json.loads(x) for x in (workdir / "ft_eval" / "records.jsonl").read_text().splitlines()]

  def acc(split, task, variant, k):
    rs = [r for r in all_records if (r["split"], r["task"], r["variant"], r["shots"]) == (split, task, variant, k)]
    return sum(r["correct_lenient"] for r in rs) / len(rs)

  for row in results["table"]:
    dev = {k: acc("dev", row["task"], row["variant"], k) for k in cfg.shots if k}
    k_dev = min(k for k, a in dev.items() if a == max(dev.values()))
    assert row["lenient"]["icl_dev"]["shots"] == k_dev
    assert row["lenient"]["icl_dev"]["acc"] == pytest.approx(acc("test", row["task"], row["variant"], k_dev))
    base = [r for r in icl_records if (r["task"], r["variant"], r["shots"]) == (row["task"], row["variant"], 0)]
    assert row["strict"]["base_0shot"]["acc"] == pytest.approx(sum(r["correct_strict"] for r in base) / len(base))
    best = max(np.mean([r["correct_lenient"] for r in icl_records
                        if (r["task"], r["variant"], r["shots"]) == (row["task"], row["variant"], k)]) for k in cfg.shots if k)
    assert row["lenient"]["icl_best"]["acc"] == pytest.approx(best)
    assert row["ft_samples"] == cfg.train.steps * cfg.train.batch_size
    for rule in ("lenient", "strict"):
      assert f"| {row['task']} | {row['variant']} | {rule} |" in text
    for method, cell in row["strict"]["controls"].items():
      rs = [r for r in controls if (r["task"], r["variant"], r["method"], r["shots"], r["split"]) ==
            (row["task"], row["variant"], method if method.startswith("icl-") else "icl", cfg.control_shots, "test")]
      assert cell["acc"] == pytest.approx(sum(r["correct_strict"] for r in rs) / len(rs)) and cell["n"] == len(rs)
    rs = [r for r in ft_records if (r["task"], r["variant"], r["method"]) == (row["task"], row["variant"], "ft-fewshot")]
    assert row["strict"]["ft_fewshot"]["acc"] == pytest.approx(sum(r["correct_strict"] for r in rs) / len(rs))
  assert set(results["table"][0]["strict"]["controls"]) == {"icl2", "icl-shuffled", "icl-irrelevant"}
  assert "## Circuit shift" in text and "**Reading.**" in text and "ICL, shuffled labels |" in text
  assert results["config"]["model"] == cfg.model and "jax" in results["versions"]
  assert "![accuracy vs shots](icl/accuracy_vs_shots.png)" in text


def test_the_headline_is_the_cue_analysis_of_every_condition(finished):
  cfg, workdir, _, _ = finished
  results = json.loads((workdir / "results.json").read_text())
  text = (workdir / "REPORT.md").read_text()
  records = [json.loads(x) for stage in ("icl", "ft_eval") for x in (workdir / stage / "records.jsonl").read_text().splitlines()]
  assert results["cues"] == json.loads(json.dumps(files.json_safe(cues.analyse(records))))
  for row in results["cues"]:  # agreement with gold is the strict accuracy, counted independently
    rs = [r for r in records if (r["task"], r["method"], r.get("step"), r["shots"], r["split"]) ==
          (row["task"], row["method"], row["step"], row["shots"], "test")]
    assert row["agreement"]["gold"]["k"] == sum(r["correct_strict"] for r in rs) and row["n"] == len(rs)
  names = {(r["task"], r["condition"]) for r in results["cues"]}
  assert {(t, c) for t in cfg.tasks for c in ("base 0-shot", "ICL k=1", "ICL k=2", "ICL k=2, shuffled", "FT step 2",
                                               "FT step 4", "few-shot FT")} <= names
  headline = text[text.index("## Headline"):text.index("## ICL vs fine-tuning")]
  for r in results["cues"]:
    assert f"| {r['condition']} | {r['n']} | {cues.verdict_text(r)} |" in headline
  assert {(d["condition"], d["variant"]) for d in results["differences"] if d["task"] == "parity"} == {
      (c, v) for c, _ in [(n, 0) for t, n in names if t == "parity" and n != "base 0-shot"] for v in cfg.variants}
  held = results["training"]["heldout"]
  assert [h["step"] for h in held["ft"]] == [0, 2, 4] and [h["step"] for h in held["ft-fewshot"]] == [0, 2]
  assert "Held-out loss" in text


def test_rerun_skips_completed_stages(finished):
  cfg, workdir, _, _ = finished
  stamps = {s: (workdir / s / "DONE.json").stat().st_mtime_ns for s in study.STAGES}
  done, lines = _run(cfg)
  assert all("up to date" in line for line in lines) and len(lines) == len(study.STAGES)
  assert stamps == {s: (workdir / s / "DONE.json").stat().st_mtime_ns for s in study.STAGES}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
  """Every path below ``root`` with its size and modification time (directories included)."""
  return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
          for p in [root, *root.rglob("*")]}


def test_changed_setting_of_a_finished_run_is_refused_then_replaced_never_deleted(tiny_lm, tmp_path):
  kw = {"circuits.enabled": False, "icl.n_dev": 0}
  _run(_config(tiny_lm[0], tmp_path, **kw))
  stamps = {s: (tmp_path / s / "DONE.json").stat().st_mtime_ns for s in ("data", "icl", "finetune", "ft_eval", "report")}
  before = files.read_jsonl(tmp_path / "ft_eval" / "records.jsonl")
  tree = _tree(tmp_path)
  changed = _config(tiny_lm[0], tmp_path, **kw, **{"ft_eval.shots": "0,1"})
  with pytest.raises(study.ConfigError, match=r"(?s)ft_eval.shots: '0' -> '0,1'.*report.*upstream stage\(s\) ft_eval"):
    _run(changed)
  assert _tree(tmp_path) == tree  # refused before touching anything
  _, lines = _run(_config(tiny_lm[0], tmp_path, **kw, **{"ft_eval.shots": "0,1", "overwrite": True}))
  after = {s: (tmp_path / s / "DONE.json").stat().st_mtime_ns for s in stamps}
  assert {s for s in stamps if after[s] != stamps[s]} == {"ft_eval", "report"}, lines
  tuned = lambda rs: [r for r in rs if r["method"] == "ft"]
  records = tuned(files.read_jsonl(tmp_path / "ft_eval" / "records.jsonl"))
  assert {r["shots"] for r in tuned(before)} == {0} and {r["shots"] for r in records} == {0, 1}
  assert len(records) == 2 * len(tuned(before))
  old_eval, = tmp_path.glob("ft_eval.replaced-*")
  old_report, = tmp_path.glob("report.replaced-*")
  assert files.read_jsonl(old_eval / "records.jsonl") == before  # the old results, moved aside intact
  assert (old_report / "REPORT.md").exists() and (old_report / "results.json").exists()


def test_report_names_the_fine_tuning_checkpoint(finished):
  cfg, workdir, _, _ = finished
  results = json.loads((workdir / "results.json").read_text())
  assert results["ft_report_step"] == cfg.ft_report_step == cfg.train.steps
  assert f"fine-tuned 0-shot (step {cfg.train.steps})" in (workdir / "REPORT.md").read_text()
  assert _config(cfg.model, workdir, **{"ft_eval.report_step": 2}).ft_report_step == 2
  with pytest.raises(study.ConfigError, match=r"no checkpoint will exist for step\(s\) \[3\]"):
    _config(cfg.model, workdir, **{"ft_eval.report_step": 3})


def test_every_variant_is_selectable(tiny_lm, tmp_path):
  cfg = _config(tiny_lm[0], tmp_path, variants="correct,misleading,misleading-z", stages="data")
  assert cfg.variants == ("correct", "misleading", "misleading-z")
  _run(cfg)
  rows = files.read_jsonl(tmp_path / "data" / "queries_misleading-z.jsonl")
  assert {r["task"] for r in rows} == {"parity"} and all(r["shortcut_right"] is False for r in rows)
  with pytest.raises(study.ConfigError, match="misleading-z"):
    _config(tiny_lm[0], tmp_path, tasks="expression", variants="misleading-z")


def test_object_store_workdir_keeps_its_scheme(tiny_lm, fake_gcs):
  cfg = _config(tiny_lm[0], "gs://bucket/run", stages="data,icl")
  assert str(cfg.workdir) == "gs://bucket/run"
  _run(cfg)
  run = fake_gcs / "bucket" / "run"
  assert json.loads((run / "icl" / "DONE.json").read_text())["fingerprint"] == cfg.fingerprint("icl")
  assert (run / "data" / "queries_correct.jsonl").exists() and (run / "icl" / "accuracy_vs_shots.png").exists()
  assert not Path("gs:").exists()
  assert files.relative("gs://bucket/run/icl/a.png", "gs://bucket/run") == "icl/a.png"


def test_object_store_without_its_backend_says_what_to_install():
  import importlib.util
  if importlib.util.find_spec("gcsfs") is not None:
    pytest.skip("gcsfs is installed here")
  with pytest.raises(OSError, match="requirements-cloud.txt"):
    files.check_store("gs://bucket/run")


def test_interrupted_run_resumes(tiny_lm, tmp_path):
  cfg = _config(tiny_lm[0], tmp_path, stages="finetune")
  _run(cfg)
  ckpts = tmp_path / "finetune" / "checkpoints"
  first = [json.loads(x) for x in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
  # Simulate a kill after the step-2 checkpoint: the stage never finished and step 4 was never saved.
  (tmp_path / "finetune" / "DONE.json").unlink()
  import shutil
  shutil.rmtree(ckpts / "4")
  done, lines = _run(_config(tiny_lm[0], tmp_path, stages="finetune,ft_eval"))
  assert "[finetune] running (resuming an interrupted run)" in lines and "[ft_eval] running" in lines
  second = [json.loads(x) for x in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in second] == [1, 2, 3, 4]
  assert second[:2] == first[:2]  # steps 1-2 came from the first run, not recomputed
  assert second[3]["loss"] == pytest.approx(first[3]["loss"], abs=1e-5)
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4]


def test_missing_input_and_unwritable_workdir(tiny_lm, tmp_path):
  with pytest.raises(study.MissingInputError, match="needs the outputs of stage 'finetune'"):
    _run(_config(tiny_lm[0], tmp_path, stages="ft_eval"))
  blocker = tmp_path / "file"
  blocker.write_text("x")
  tree = _tree(tmp_path)
  with pytest.raises(study.ConfigError, match="cannot be written"):
    _run(_config(tiny_lm[0], blocker / "work"))
  assert _tree(tmp_path) == tree


@pytest.mark.parametrize("overrides,error,message", [
    ({"model": "nonexistent-model", "stages": "data,icl"}, loading.ModelNotFoundError, "not a registered model"),
    ({"model": "nonexistent-model", "stages": "data,icl", "overwrite": True}, loading.ModelNotFoundError,
     "not a registered model"),
    ({"icl.shots": "0,1"}, study.ConfigError, r"(?s)'icl'.*icl.shots: '0,1,2' -> '0,1'.*report"),
    ({"mesh.fsdp": 3}, sharding.MeshError, "needs 3 devices"),
    ({"ft.lr": 1e-4}, study.ConfigError, r"(?s)finetune.*ft.lr: 1e-05 -> 0.0001.*ft_eval.*upstream"),
    ({"stages": "report", "circuits.n_pairs": 5}, study.MissingInputError, "needs the outputs of stage 'circuits'"),
])
def test_a_failed_command_leaves_a_finished_run_untouched(finished, overrides, error, message):
  cfg, workdir, _, _ = finished
  tree = _tree(workdir)
  with pytest.raises(error, match=message):
    _run(_config(cfg.model, workdir, **overrides))
  assert _tree(workdir) == tree


def test_a_second_run_in_the_same_directory_is_stopped_and_a_stale_lock_is_taken_over(tiny_lm, tmp_path):
  from icl_ft.study import workdir as wd
  cfg = _config(tiny_lm[0], tmp_path, stages="data")
  with wd.Lock(tmp_path):  # held by this (live) process
    tree = _tree(tmp_path)
    with pytest.raises(wd.LockedError, match=f"in use by pid {os.getpid()}"):
      _run(cfg)
    assert _tree(tmp_path) == tree
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  (tmp_path / ".lock").write_text(json.dumps(dict(host=socket.gethostname(), pid=int(dead.stdout), proc_start="1",
                                                  started="2026-01-01T00:00:00")))
  _, lines = _run(cfg)
  assert any("taking over the lock" in line for line in lines) and not (tmp_path / ".lock").exists()


def test_the_lock_is_exclusive_and_only_its_holder_releases_it(tmp_path, monkeypatch):
  from icl_ft.study import workdir as wd
  first = wd.Lock(tmp_path)
  with first:
    monkeypatch.setattr(wd, "_start_time", lambda pid: None)  # no /proc: liveness from the pid alone
    with pytest.raises(wd.LockedError, match="in use"):
      wd.Lock(tmp_path).check()
    monkeypatch.setattr(wd.Lock, "check", lambda self: None)  # two runs that both passed the check
    with pytest.raises(wd.LockedError, match="at the same moment"):
      wd.Lock(tmp_path).__enter__()
    other = json.dumps(dict(host="elsewhere", pid=1, proc_start="1", started="x"))
    (tmp_path / ".lock").write_text(other)
  assert (tmp_path / ".lock").read_text() == other  # not ours: left in place


def test_damaged_outputs_are_reported_and_rerun_and_the_report_never_links_a_missing_file(tiny_lm, tmp_path):
  kw = {"circuits.enabled": False, "icl.n_dev": 0}
  _run(_config(tiny_lm[0], tmp_path, **kw))
  records = (tmp_path / "icl" / "records.jsonl").read_text()
  (tmp_path / "icl" / "records.jsonl").write_text(records[:len(records) // 2])  # truncated
  (tmp_path / "ft_eval" / "accuracy_vs_samples.png").unlink()  # a deleted plot
  _, lines = _run(_config(tiny_lm[0], tmp_path, **kw))
  assert any(line.startswith("[icl] running (outputs damaged") and "icl/records.jsonl (changed)" in line
             for line in lines), lines
  assert any("ft_eval/accuracy_vs_samples.png (missing)" in line for line in lines)
  assert (tmp_path / "icl" / "records.jsonl").read_text() == records  # recomputed identically
  damaged, = tmp_path.glob("icl.replaced-*")  # the damaged copy is kept for inspection
  assert len((damaged / "records.jsonl").read_text()) == len(records) // 2


def test_the_report_never_links_a_missing_figure(tiny_lm, tmp_path, monkeypatch):
  from icl_ft.report import plots
  kw = {"circuits.enabled": False, "icl.n_dev": 0}
  _run(_config(tiny_lm[0], tmp_path, **kw))
  (tmp_path / "ft_eval" / "accuracy_vs_samples.png").unlink()
  real = plots.plot_accuracy
  monkeypatch.setattr(plots, "plot_accuracy", lambda summary, path, **k: real(summary, path, **k)
                      if "samples" not in str(path) else 1 / 0)  # the redraw fails this time
  _, lines = _run(_config(tiny_lm[0], tmp_path, **kw))
  assert any(line.startswith("[report] running") for line in lines)  # its input changed, so it was redone
  text = (tmp_path / "REPORT.md").read_text()
  links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
  assert links and all((tmp_path / link).exists() for link in links) and "accuracy_vs_samples" not in text
  assert "figure 'accuracy vs training samples' could not be drawn: ZeroDivisionError" in text


def test_unreadable_records_are_never_taken_for_absent_ones(tiny_lm, tmp_path):
  kw = {"circuits.enabled": False, "icl.n_dev": 0, "stages": "data,icl"}
  _run(_config(tiny_lm[0], tmp_path, **kw))
  done = (tmp_path / "icl" / "DONE.json").read_text()
  (tmp_path / "icl" / "DONE.json").write_text(done[:40])
  tree = _tree(tmp_path)
  with pytest.raises(study.UnreadableRecordError, match="icl/DONE.json cannot be read"):
    _run(_config(tiny_lm[0], tmp_path, **kw))
  assert _tree(tmp_path) == tree
  (tmp_path / "icl" / "DONE.json").unlink()
  (tmp_path / "icl" / "STARTED.json").unlink()  # a directory with results but no record of them
  _, lines = _run(_config(tiny_lm[0], tmp_path, **kw))
  kept, = tmp_path.glob("icl.replaced-*")
  assert (kept / "records.jsonl").exists() and any("holds files of no recorded run" in line for line in lines)


def test_a_figure_that_fails_to_draw_costs_no_numbers(tiny_lm, tmp_path, monkeypatch):
  from icl_ft.report import plots
  def broken(*a, **k):
    raise ValueError("'yerr' must not contain negative values")
  monkeypatch.setattr(plots, "plot_accuracy", broken)
  done, lines = _run(_config(tiny_lm[0], tmp_path, **{"circuits.enabled": False, "icl.n_dev": 0}))
  assert set(done) == {"data", "icl", "finetune", "ft_eval", "report"}
  assert done["icl"]["outputs"]["plot"] is None and (tmp_path / "icl" / "summary.json").exists()
  assert any("warning: figure 'accuracy vs shots' could not be drawn" in line for line in lines)
  text = (tmp_path / "REPORT.md").read_text()
  assert "could not be drawn" in text and "accuracy_vs_shots.png" not in text


@pytest.mark.parametrize("stage", ["data", "icl", "finetune", "ft_eval", "circuits", "report"])
def test_a_write_failure_names_the_path_and_keeps_earlier_stages(tiny_lm, tmp_path, monkeypatch, stage):
  import errno
  kw = {"icl.n_dev": 0, "circuits.n_boot": 5}
  real = files._write_bytes
  def full_disk(path, data):
    if "STARTED.json" in str(path):  # the bookkeeping succeeds; the stage's own outputs do not
      return real(path, data)
    if f"/{stage}/" in str(path) or (stage == "report" and ("REPORT.md" in str(path) or "results.json" in str(path))):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(path, data)
  monkeypatch.setattr(files, "_write_bytes", full_disk)
  with pytest.raises(OSError, match=f"could not write .*{stage if stage != 'report' else 'results.json'}.*No space"):
    _run(_config(tiny_lm[0], tmp_path, **kw))
  earlier = study.STAGES[:study.STAGES.index(stage)]
  monkeypatch.setattr(files, "_write_bytes", real)
  steps = study.Study(_config(tiny_lm[0], tmp_path, **kw)).plan()
  assert [s.stage for s in steps if s.action == "skip"] == list(earlier)
  assert [s.action for s in steps if s.stage == stage] == ["resume"]


@pytest.mark.parametrize("key,value,message", [
    ("tasks", "parity,chess", "unknown value(s) ['chess']"),
    ("stages", "icl,train", "valid: data, icl, finetune"),
    ("icl.shots", "0,four", "comma-separated integers"),
    ("ft.method", "qlora", "must be one of ['full', 'lora']"),
    ("ft.lora_targets", "q,mlp", "unknown value(s) ['mlp']"),
    ("icl.controls", "shuffled,random", "icl.controls: unknown value(s) ['random']"),
    ("icl.control_shots", 1, "icl.control_shots must be >= 2"),
    ("circuits.controls", "noise", "circuits.controls: unknown value(s) ['noise']"),
    ("circuits.n_pairs", 3, "circuits: n_pairs must be at least 4"),
    ("ft.fewshot_steps", 0, "ft.fewshot_steps must be a positive integer"),
    ("circuits.tasks", "boolean", "boolean has prompt pairs only in format(s) ['fixed'], not 'paper'"),
])
def test_bad_config_values_are_named(tiny_lm, tmp_path, key, value, message):
  with pytest.raises(study.ConfigError, match=re.escape(message)):
    _config(tiny_lm[0], tmp_path, **{key: value})


def _main(*args, cwd=ROOT, env=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", "icl_ft.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


def test_cli_rejects_unknown_keys_models_and_values(tmp_path):
  r = _main("--config=configs/smoke.py", "--config.icl.nn=3", f"--config.workdir={tmp_path}")
  assert r.returncode != 0 and "nn" in r.stderr
  r = _main("--config=configs/smoke.py", "--config.tasks=chess", f"--config.workdir={tmp_path}")
  assert r.returncode != 0 and "unknown value(s) ['chess']" in r.stderr
  r = _main("--config=configs/smoke.py", "--config.model=no-such-model", "--config.stages=icl",
            f"--config.workdir={tmp_path}")
  assert r.returncode == 2 and "Registered models" in r.stderr


def test_launch_scripts_handle_arguments():
  tpu = ROOT / "launch" / "tpu_pod.sh"
  r = subprocess.run(["bash", str(tpu), "--name", "x", "--zone", "z", "--type", "v4-32", "--config",
                      "configs/paper.py:qwen1.5-7b", "--repo", "https://example.org/r.git", "--dry-run", "--",
                      "--config.icl.n=5"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  cmds = r.stdout.splitlines()
  assert cmds[0].startswith("+ gcloud compute tpus tpu-vm create x") and "--accelerator-type v4-32" in cmds[0]
  assert any("--worker=all" in c and "icl_ft.main" in c and "--config.icl.n=5" in c for c in cmds)
  assert cmds[-1].startswith("+ gcloud compute tpus tpu-vm delete x")
  assert any("scp --recurse x:icl_ft/work" in c for c in cmds)  # default work directory: copied back


def test_launch_copy_back_follows_the_work_directory():
  tpu = ROOT / "launch" / "tpu_pod.sh"
  common = ["bash", str(tpu), "--name", "x", "--zone", "z", "--type", "v4-32", "--config", "configs/parity.py",
            "--repo", "https://example.org/r.git", "--dry-run"]
  bucket = subprocess.run(common + ["--workdir", "gs://b/run1"], capture_output=True, text=True)
  assert bucket.returncode == 0 and "--config.workdir=gs://b/run1" in bucket.stdout
  assert "scp" not in bucket.stdout and "gs://b/run1" in bucket.stderr  # already in the bucket: nothing to copy
  local = subprocess.run(common + ["--workdir", "runs/r1"], capture_output=True, text=True)
  assert local.returncode == 0 and "scp --recurse x:icl_ft/runs/r1 ./r1-x" in local.stdout
  absolute = subprocess.run(common + ["--workdir", "/data/r2"], capture_output=True, text=True)
  assert "scp --recurse x:/data/r2 ./r2-x" in absolute.stdout
  r = subprocess.run(["bash", str(tpu), "--name", "x"], capture_output=True, text=True)
  assert r.returncode == 2 and "missing --zone" in r.stderr
  r = subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_every_config_file_validates():
  import importlib
  for path in sorted((ROOT / "configs").glob("*.py")):
    if path.stem in ("__init__",):
      continue
    c = importlib.import_module(f"configs.{path.stem}").get_config()
    if "study" in c:  # a grid config: every cell validates
      from icl_ft.study import grid
      assert all(cell.cfg.stages == study.STAGES for cell in grid.cells(c))
      continue
    cfg = study.StudyConfig.from_dict(c)
    assert cfg.stages == study.STAGES and cfg.tasks


@pytest.mark.slow
def test_killed_anywhere_then_resumed_equals_an_uninterrupted_run(finished, tmp_path):
  """SIGKILL inside every stage in turn (each rerun resumes, then dies in the next stage), then a clean rerun:
  every output equals the uninterrupted run's."""
  import random
  cfg, reference, _, _ = finished
  rng = random.Random(7)
  kills = [("data.write", 1), ("icl.batch", rng.randint(2, 12)), ("finetune.step", rng.randint(1, 3)),
           ("finetune.save", 1), ("icl.batch", rng.randint(2, 6)), ("circuits.sweep", rng.randint(4, 8)),
           ("report.write", 1)]
  args = ["--config=configs/smoke.py", f"--config.model={cfg.model}", f"--config.workdir={tmp_path}",
          "--config.circuits.tol=1e-6", "--config.circuits.single_token_answers=False"]
  stages = ["data", "icl", "finetune", "finetune", "ft_eval", "circuits", "report"]
  saved = {"icl": ("icl/partial", "*.json"), "ft_eval": ("ft_eval/partial", "*/*.json"),
           "circuits": ("circuits/partial", "*/*.npz")}
  previous = None
  for (name, count), stage in zip(kills, stages):
    r = _main(*args, env={"ICL_FT_KILL_AT": f"{name}:{count}"})
    assert r.returncode == -9, (name, count, r.stdout[-2000:], r.stderr[-2000:])  # SIGKILL, as the test asked
    if previous:  # the stage killed last time resumed this time, reusing the units it had saved
      assert f"[{previous}] running (resuming an interrupted run)" in r.stdout, r.stdout[-2000:]
      if previous in saved:
        assert re.search(rf"\[{previous}\] reused {units_saved} of \d+ saved units", r.stdout), r.stdout[-2000:]
    if stage in saved:  # completed units were saved as they finished
      where, pattern = saved[stage]
      units_saved = len(list((tmp_path / where).glob(pattern)))
      assert units_saved == count > 0, stage  # a circuit unit is one step of one condition
    previous = stage
  r = _main(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "taking over the lock" in r.stdout and "[report] running (resuming an interrupted run)" in r.stdout
  for rel in ("icl/records.jsonl", "ft_eval/records.jsonl", "finetune/metrics.jsonl"):
    _assert_close(files.read_jsonl(tmp_path / rel), files.read_jsonl(reference / rel), rel)
  _assert_close(files.read_json(tmp_path / "circuits" / "expression" / "circuits.json"),
                files.read_json(reference / "circuits" / "expression" / "circuits.json"), "circuits")
  ours, theirs = (files.read_json(d / "results.json") for d in (tmp_path, reference))
  for key in ("table", "icl", "ft_eval", "circuits"):
    _assert_close(ours[key], theirs[key], key)


_VOLATILE = {"step_time_s", "tokens_per_s", "mfu", "model", "source", "seconds"}  # timings and paths, not results


def _assert_close(a, b, where):
  if isinstance(a, dict):
    assert set(a) == set(b), where
    for k in a:
      if k not in _VOLATILE:
        _assert_close(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, f"{where}[{i}]")
  elif isinstance(a, float) or isinstance(b, float):
    assert a == pytest.approx(b, abs=1e-6, rel=1e-6), where
  else:
    assert a == b, where


@pytest.mark.slow
def test_smoke_study_on_the_embedded_model_runs_to_the_report(tmp_path):
  r = _main("--config=configs/smoke.py", f"--config.workdir={tmp_path}", env={"ICL_FT_CACHE": str(tmp_path / "cache")})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "warning" not in r.stdout
  for stage in study.STAGES:
    assert files.read_json(tmp_path / stage / "DONE.json")["warnings"] == []
  assert (tmp_path / "circuits" / "expression" / "circuit_shift.png").read_bytes()[:4] == b"\x89PNG"
  assert "## Circuit shift" in (tmp_path / "REPORT.md").read_text()


def test_the_two_reported_typos_leave_a_finished_run_untouched(finished):
  cfg, workdir, _, _ = finished
  tree = _tree(workdir)
  common = ["--config=configs/smoke.py", f"--config.workdir={workdir}", f"--config.model={cfg.model}",
            "--config.circuits.tol=1e-6", "--config.circuits.single_token_answers=False"]
  r = _main(*common, "--config.model=nonexistent-model", "--config.stages=data,icl")
  assert r.returncode == 2 and "'nonexistent-model' is not a registered model" in r.stderr
  r = _main(*common, "--config.mesh.fsdp=3")
  assert r.returncode == 2 and "needs 3 devices, but 1 are available" in r.stderr
  assert "clearing" not in r.stdout + r.stderr
  assert _tree(workdir) == tree


def test_a_stage_record_of_an_older_version_is_refused_by_name_then_replaced(tiny_lm, tmp_path):
  kw = {"circuits.enabled": False, "icl.n_dev": 0, "stages": "data"}
  _run(_config(tiny_lm[0], tmp_path, **kw))
  old = {k: v for k, v in files.read_json(tmp_path / "data" / "DONE.json").items() if k in ("fingerprint", "outputs")}
  (tmp_path / "data" / "DONE.json").write_text(json.dumps(dict(old, fingerprint="0123")))  # no schema, no inputs
  with pytest.raises(study.ConfigError, match="recorded by an older version of icl_ft"):
    _run(_config(tiny_lm[0], tmp_path, **kw))
  _run(_config(tiny_lm[0], tmp_path, **kw, overwrite=True))
  assert len(list(tmp_path.glob("data.replaced-*"))) == 1


def test_summaries_of_icl_records_have_no_fine_tuning_keys(finished):
  _, workdir, _, _ = finished
  cells = files.read_json(workdir / "icl" / "summary.json")["cells"]
  assert cells and all("step" not in c and "samples" not in c for c in cells)
  assert all("step" in c for c in files.read_json(workdir / "ft_eval" / "summary.json")["cells"])


def test_nested_demos_setting_keeps_older_runs_fingerprints_and_the_report_says_which(tiny_lm, tmp_path):
  from icl_ft.report import aggregation, render
  plain = _config(tiny_lm[0], tmp_path, **{"ft_eval.shots": "0,2"})
  old = dict(plain.raw, icl={k: v for k, v in plain.raw["icl"].items() if k not in ("nested_demos", "share_prefix")})
  older = study.StudyConfig.from_dict(old)  # a run from before the setting existed
  stages = ("data", "icl", "finetune", "ft_eval", "circuits")
  assert [plain.fingerprint(s) for s in stages] == [older.fingerprint(s) for s in stages]
  nested = _config(tiny_lm[0], tmp_path, **{"icl.nested_demos": True, "ft_eval.shots": "0,2"})
  changed = [s for s in stages if nested.fingerprint(s) != plain.fingerprint(s)]
  # the few-shot FT control trains on nested demos too, and the circuits read its model
  assert changed == ["icl", "finetune", "ft_eval", "circuits"]
  zero_shot = _config(tiny_lm[0], tmp_path, **{"icl.nested_demos": True, "ft_eval.shots": "0", "ft.fewshot_k": 0})
  assert zero_shot.fingerprint("ft_eval") == _config(tiny_lm[0], tmp_path, **{
      "ft_eval.shots": "0", "ft.fewshot_k": 0}).fingerprint("ft_eval")  # 0-shot evaluation has no demos
  assert "drawn independently for each k" in render._demos(plain.raw["icl"])
  assert "nested" in render._demos(nested.raw["icl"])
  assert plain.icl_engine.share_prefix and not _config(tiny_lm[0], tmp_path, **{
      "icl.share_prefix": False}).icl_engine.share_prefix
  # An older run and a new one at the default aggregate as one group.
  settings = lambda raw: aggregation._settings(aggregation.Run("run", {"config": raw}))
  assert settings(old) == settings(plain.raw) != settings(nested.raw)
