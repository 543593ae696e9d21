"""The main job end to end on a tiny model with configs/smoke.py: outputs, report, skip, resume, bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import smoke
from icl_ft import files, study

ROOT = Path(__file__).resolve().parents[1]


def _config(model_dir, workdir, **overrides):
  c = smoke.get_config()
  c.model, c.workdir = str(model_dir), str(workdir)
  c.circuits.tol = 1e-6  # a random tiny model barely separates clean from corrupt prompts
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
      paths = path.values() if isinstance(path, dict) else [path]
      for p in paths:
        if isinstance(p, str) and ("/" in p):
          assert Path(p).exists() and (Path(p).is_dir() or Path(p).stat().st_size > 0), (stage, key, p)
  data = (workdir / "data" / "queries_misleading.jsonl").read_text().splitlines()
  assert len(data) == cfg.n_queries * len(cfg.tasks)
  icl_records = [json.loads(x) for x in (workdir / "icl" / "records.jsonl").read_text().splitlines()]
  test = [r for r in icl_records if r["split"] == "test"]
  assert len(test) == cfg.n_queries * len(cfg.tasks) * len(cfg.variants) * len(cfg.shots)
  dev = [r for r in icl_records if r["split"] == "dev"]
  assert len(dev) == cfg.n_dev * len(cfg.tasks) * len(cfg.variants) * (len(cfg.shots) - 1)
  assert not {r["question"] for r in dev} & {r["question"] for r in test}
  ft = [json.loads(x) for x in (workdir / "ft_eval" / "records.jsonl").read_text().splitlines()]
  assert {r["step"] for r in ft} == {2, 4} and {r["method"] for r in ft} == {"ft"}
  for png in ("icl/accuracy_vs_shots.png", "ft_eval/accuracy_vs_samples.png", "circuits/expression/circuit_shift.png"):
    assert (workdir / png).read_bytes()[:4] == b"\x89PNG"


def test_report_table_matches_the_records(finished):
  cfg, workdir, _, _ = finished
  results = json.loads((workdir / "results.json").read_text())
  text = (workdir / "REPORT.md").read_text()
  assert {(r["task"], r["variant"]) for r in results["table"]} == {(t, v) for t in cfg.tasks for v in cfg.variants}
  all_records = [json.loads(x) for x in (workdir / "icl" / "records.jsonl").read_text().splitlines()]
  icl_records = [r for r in all_records if r["split"] == "test"]

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
    best = max(sum(r["correct_lenient"] for r in icl_records
                   if (r["task"], r["variant"], r["shots"]) == (row["task"], row["variant"], k)) for k in cfg.shots if k)
    assert row["lenient"]["icl_best"]["acc"] == pytest.approx(best / cfg.n_queries)
    assert row["ft_samples"] == cfg.train.steps * cfg.train.batch_size
    for rule in ("lenient", "strict"):
      assert f"| {row['task']} | {row['variant']} | {rule} |" in text
  assert "## Circuit shift" in text and "base → ft" in text and "base → icl1" in text
  assert results["config"]["model"] == cfg.model and "jax" in results["versions"]
  assert "![accuracy vs shots](icl/accuracy_vs_shots.png)" in text


def test_rerun_skips_completed_stages(finished):
  cfg, workdir, _, _ = finished
  stamps = {s: (workdir / s / "DONE.json").stat().st_mtime_ns for s in study.STAGES}
  done, lines = _run(cfg)
  assert all("up to date" in line for line in lines) and len(lines) == len(study.STAGES)
  assert stamps == {s: (workdir / s / "DONE.json").stat().st_mtime_ns for s in study.STAGES}


def test_changed_setting_reruns_exactly_the_stages_that_depend_on_it(tiny_lm, tmp_path):
  kw = {"circuits.enabled": False, "icl.n_dev": 0}
  _run(_config(tiny_lm[0], tmp_path, **kw))
  stamps = {s: (tmp_path / s / "DONE.json").stat().st_mtime_ns for s in ("data", "icl", "finetune", "ft_eval", "report")}
  before = files.read_jsonl(tmp_path / "ft_eval" / "records.jsonl")
  _, lines = _run(_config(tiny_lm[0], tmp_path, **kw, **{"ft_eval.shots": "0,1"}))
  after = {s: (tmp_path / s / "DONE.json").stat().st_mtime_ns for s in stamps}
  rerun = {s for s in stamps if after[s] != stamps[s]}
  assert rerun == {"ft_eval", "report"}, lines
  records = files.read_jsonl(tmp_path / "ft_eval" / "records.jsonl")
  assert {r["shots"] for r in before} == {0} and {r["shots"] for r in records} == {0, 1}
  assert len(records) == 2 * len(before)


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
  assert "[finetune] running" in lines and "[ft_eval] running" in lines
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
  with pytest.raises(study.ConfigError, match="not writable"):
    study.Study(_config(tiny_lm[0], blocker / "work"))


@pytest.mark.parametrize("key,value,message", [
    ("tasks", "parity,chess", "unknown value(s) ['chess']"),
    ("stages", "icl,train", "valid: data, icl, finetune"),
    ("icl.shots", "0,four", "comma-separated integers"),
    ("ft.method", "qlora", "must be one of ['full', 'lora']"),
    ("ft.lora_targets", "q,mlp", "unknown value(s) ['mlp']"),
])
def test_bad_config_values_are_named(tiny_lm, tmp_path, key, value, message):
  with pytest.raises(study.ConfigError, match=re.escape(message)):
    _config(tiny_lm[0], tmp_path, **{key: value})


def _main(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "icl_ft.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


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
    cfg = study.StudyConfig.from_dict(c)
    assert cfg.stages == study.STAGES and cfg.tasks
