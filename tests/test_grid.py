"""The grid: aggregation of hand-made results.json files (table, order, refusal, unfinished runs, seeds), the
grid's cells, its dry run, and the grid command end to end on a tiny model (resume after a kill, GRID.md equal
to the runs' results.json)."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from configs import grid as paper_grid
from configs import grid_cpu
from icl_ft import aggregate
from icl_ft.io import files, records
from icl_ft.report import aggregation
from icl_ft.study import ConfigError, grid, sizing

ROOT = Path(__file__).resolve().parents[1]


def _cell(acc, n=100, shots=None):
  lo, hi = max(0.0, acc - 0.1), min(1.0, acc + 0.1)
  return dict(acc=acc, lo=lo, hi=hi, n=n, n_skipped=0, **({"shots": shots} if shots is not None else {}))


def _results(model="m-small", dtype="float32", params=int(5e8), seed=1, ft_seed=42, accs=(0.5, 0.9, 0.6),
             icl_n=50, task="parity", contrast=-0.2, dev=None):
  """A results.json: ICL's best k is 4; ``dev`` = (accuracy, k) adds the dev-chosen cell and its gaps."""
  base, ft, icl = accs
  dev_cell = lambda: _cell(dev[0], 32, shots=dev[1]) if dev else None
  table = [dict(task=task, variant=v, **{rule: dict(base_0shot=_cell(base), ft_0shot=_cell(ft),
                                                     icl_best=_cell(icl, 32, shots=4), icl_dev=dev_cell(), controls={})
                                         for rule in ("lenient", "strict")}) for v in ("correct", "misleading")]
  gaps = [dict(task=task, format="paper", method="icl", step=None, shots=k, variant=v, rule=rule, n=32,
               diff=a - ft, lo=a - ft - 0.15, hi=a - ft + 0.15, detected=abs(a - ft) > 0.15)
          for a, k in ((icl, 4), *([dev] if dev else [])) for v in ("correct", "misleading") for rule in ("lenient", "strict")]
  tv = dict(point=contrast / 2, corrected=dict(point=contrast, lo=contrast - 0.05, hi=contrast + 0.05,
                                                 excludes_zero=abs(contrast) > 0.05))
  family = dict(conditions={"base": {}, "icl4": {}, "icl4-shuffled": {}, "ft": {}},
                contrasts={"icl4-ft": {"tv": tv}, "icl4-icl4-shuffled": {"tv": {"point": None, "reason": "no circuit in icl4-shuffled"}}})
  config = dict(name="x", model=model, dtype=dtype, seed=seed, tasks=task, workdir="w", note="",
                icl=dict(n=icl_n, shots="0,4", batch_size=8), ft=dict(seed=ft_seed, lr=3e-4, grad_accum=1),
                mesh=dict(data=1, fsdp=-1, tensor=1))
  return dict(config=config, table=table, gaps=gaps, circuits={task: dict(heads=family, mlps=family)},
              model=dict(name=model, dtype=dtype, arch="llama", params=params), schema=2, kind="results")


def _record(fingerprint, upstream=None, finished="2026-11-29T10:00:00"):
  return dict(fingerprint=fingerprint, inputs={"data_version": 3}, upstream=upstream or {}, seconds=1.0,
              finished=finished, outputs={}, files={f"{fingerprint}.json": {"size": 1}}, warnings=[], schema=2)


def _write_run(root: Path, results: dict | None, stages=("data", "icl", "finetune", "ft_eval", "circuits", "report"),
               started=()) -> Path:
  """A run directory: DONE.json of each stage (the report's upstream naming the others' fingerprints and files, as
  the pipeline records them), STARTED.json of the interrupted ones, and results.json."""
  read = [s for s in ("icl", "finetune", "ft_eval", "circuits") if s in stages]  # what the report reads
  for s in stages:
    (root / s).mkdir(parents=True, exist_ok=True)
    upstream = {u: {"fingerprint": u, "files": records.files_digest(_record(u)["files"])} for u in read}
    (root / s / "DONE.json").write_text(json.dumps(_record(s, upstream if s == "report" else None)))
  for s in started:
    (root / s).mkdir(parents=True, exist_ok=True)
    (root / s / "STARTED.json").write_text("{}")
  if results is not None:
    (root / "results.json").write_text(json.dumps(results))
  return root


def _aggregate(tmp_path, runs, **kw):
  lines = []
  code = aggregate.write([str(r) for r in runs], str(tmp_path / "out"), log=lines.append, **kw)
  return code, "\n".join(lines)


def test_the_table_orders_models_by_size_and_copies_each_runs_numbers(tmp_path):
  big = _write_run(tmp_path / "big", _results("m-big", params=int(7e9), accs=(0.55, 0.8, 0.9), contrast=0.3))
  small = _write_run(tmp_path / "small", _results("m-small", params=int(5e8)))
  code, log = _aggregate(tmp_path, [big, small])
  assert code == 0, log
  md = (tmp_path / "out" / "GRID.md").read_text()
  rows = [line for line in md.splitlines() if line.startswith("| m-")]
  assert [r.split(" | ")[0] for r in rows[:2]] == ["| m-small", "| m-big"]  # smallest first, in each table
  assert rows[0].split(" | ")[1] == "500M" and rows[1].split(" | ")[1] == "7.00B"
  assert "base 0-shot: 0.55 [0.45, 0.65]<br>FT 0-shot: 0.80 [0.70, 0.90]<br>ICL best (k=4): 0.90 [0.80, 1.00]" in rows[1]
  assert "| m-big | ICL best (k=4): +0.10 [-0.05, +0.25] n.d. |" in md  # the interval holds 0: not a difference
  assert "| m-small | **ICL best (k=4): -0.30 [-0.45, -0.15]** |" in md  # detected
  assert "| m-big | parity | heads | icl4 − ft | +0.30 [+0.25, +0.35] | icl4 moves the circuit more |" in md
  assert "| m-small | parity | heads | icl4 − ft | -0.20 [-0.25, -0.15] | ft moves the circuit more |" in md
  assert "no circuit in icl4-shuffled" in md
  g = files.read_json(tmp_path / "out" / "grid.json")
  (group,) = g["groups"]
  row = next(r for r in group["accuracy"] if (r["model"], r["variant"], r["rule"], r["condition"]) == (
      "m-big", "correct", "strict", "ft_0shot"))
  assert row["runs"][0]["acc"] == 0.8 and row["across"] is None
  for name in ("accuracy_vs_size.png", "gap_vs_size.png", "circuit_contrasts.png"):
    assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def test_the_dev_chosen_column_and_its_gap_are_at_the_dev_chosen_k(tmp_path):
  """Best k 4 (0.90) and dev-chosen k 2 (0.30): each column reports its own k's accuracy and paired gap."""
  run = _write_run(tmp_path / "r", _results(accs=(0.5, 0.8, 0.9), dev=(0.3, 2)))
  code, log = _aggregate(tmp_path, [run])
  assert code == 0, log
  md = (tmp_path / "out" / "GRID.md").read_text()
  assert "ICL best (k=4): 0.90 [0.80, 1.00]<br>ICL dev-chosen (k=2): 0.30 [0.20, 0.40]" in md
  assert "ICL best (k=4): +0.10 [-0.05, +0.25] n.d.<br>**ICL dev-chosen (k=2): -0.50 [-0.65, -0.35]**" in md


def test_unfinished_and_stale_runs_are_listed_with_what_they_lack(tmp_path):
  done = _write_run(tmp_path / "done", _results())
  partial = _write_run(tmp_path / "partial", None, stages=("data",), started=("icl",))
  stale = _write_run(tmp_path / "stale", _results(seed=2))
  (stale / "icl" / "DONE.json").write_text(json.dumps(_record("icl-recomputed")))
  code, log = _aggregate(tmp_path, [done, partial, stale, tmp_path / "missing"])
  assert code == 0, log
  md = (tmp_path / "out" / "GRID.md").read_text()
  assert f"| {partial} | no results.json: the report stage has not finished | data | icl |" in md
  assert f"| {stale} | results.json predates the latest results of stage(s) icl" in md
  assert f"| {tmp_path / 'missing'} | no such directory |" in md
  assert "1 finished run(s)" in md


def test_runs_that_differ_in_a_setting_are_refused_by_name_or_grouped(tmp_path):
  a = _write_run(tmp_path / "a", _results(icl_n=50))
  b = _write_run(tmp_path / "b", _results("m-big", params=int(7e9), icl_n=100))
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "GRID.md").write_text("previous")
  code, log = _aggregate(tmp_path, [a, b])
  assert code == 2 and "icl.n" in log and f"{a} = 50" in log and f"{b} = 100" in log and "--group_by=icl.n" in log
  assert (tmp_path / "out" / "GRID.md").read_text() == "previous" and not (tmp_path / "out" / "grid.json").exists()
  code, log = _aggregate(tmp_path, [a, b], group_by=["icl.n"])
  assert code == 0, log
  md = (tmp_path / "out" / "GRID.md").read_text()
  assert "## Group: icl.n=100" in md and "## Group: icl.n=50" in md
  assert (tmp_path / "out" / "group1-accuracy_vs_size.png").exists()


def test_the_same_cell_twice_is_refused(tmp_path):
  a = _write_run(tmp_path / "a", _results())
  b = _write_run(tmp_path / "b", _results())
  code, log = _aggregate(tmp_path, [a, b])
  assert code == 2 and "both measure m-small (float32) on parity with seed 1 and FT seed 42" in log


def test_seeds_aggregate_to_their_mean_with_a_student_t_interval(tmp_path):
  runs = [_write_run(tmp_path / f"s{s}", _results(seed=s, ft_seed=40 + s, accs=(0.5, base_ft, 0.6), contrast=c))
          for s, base_ft, c in ((1, 0.5, -0.1), (2, 0.6, -0.2), (3, 0.7, -0.3))]
  code, log = _aggregate(tmp_path, runs)
  assert code == 0, log
  (group,) = files.read_json(tmp_path / "out" / "grid.json")["groups"]
  row = next(r for r in group["accuracy"] if (r["variant"], r["rule"], r["condition"]) == ("correct", "strict", "ft_0shot"))
  half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
  assert row["across"]["mean"] == pytest.approx(0.6) and row["across"]["sd"] == pytest.approx(0.1)
  assert (row["across"]["lo"], row["across"]["hi"]) == pytest.approx((0.6 - half, 0.6 + half))
  assert [r["acc"] for r in row["runs"]] == [0.5, 0.6, 0.7] and [r["ft_seed"] for r in row["runs"]] == [41, 42, 43]
  md = (tmp_path / "out" / "GRID.md").read_text()
  assert f"FT 0-shot: 0.60 [{0.6 - half:.2f}, {0.6 + half:.2f}] (3 data seeds; runs ±0.10)" in md
  circuit = next(r for r in group["circuits"] if (r["family"], r["contrast"]) == ("heads", "icl4-ft"))
  assert circuit["across"]["mean"] == pytest.approx(-0.2)
  assert "(1, 41), (2, 42), (3, 43)" in md


def _row(group, kind, **match):
  return next(r for r in group[kind] if all(r[k] == v for k, v in match.items()))


def test_crossed_seeds_count_each_data_seed_once_for_base_and_icl(tmp_path):
  """2 data seeds x 2 FT seeds: base and ICL (the same in runs sharing a data seed) are over the 2 data seeds, not
  4 runs; FT is averaged over FT seeds within each data seed, then over data seeds."""
  ft = {(1, 1): 0.5, (1, 2): 0.7, (2, 1): 0.8, (2, 2): 0.6}
  runs = [_write_run(tmp_path / f"s{s}f{f}", _results(seed=s, ft_seed=f, accs=(0.4 + 0.2 * s, ft[s, f], 0.3 * s)))
          for s, f in ft]
  code, log = _aggregate(tmp_path, runs)
  assert code == 0, log
  (group,) = files.read_json(tmp_path / "out" / "grid.json")["groups"]
  t1 = stats.t.ppf(0.975, 1)
  icl = _row(group, "accuracy", variant="correct", rule="strict", condition="icl_best")["across"]
  assert (icl["n"], icl["over"], icl["mean"]) == (2, "data seeds", pytest.approx(0.45))
  assert icl["sd"] == pytest.approx(0.3 / math.sqrt(2)) and icl["lo"] == 0.0  # t(1) interval, clipped at 0
  tuned = _row(group, "accuracy", variant="correct", rule="strict", condition="ft_0shot")["across"]
  assert (tuned["n"], tuned["over"], tuned["mean"]) == (2, "data seeds", pytest.approx(0.65))
  assert tuned["sd"] == pytest.approx(math.sqrt(((0.6 - 0.65) ** 2 + (0.7 - 0.65) ** 2) / 1))
  assert tuned["lo"] == pytest.approx(0.65 - t1 * tuned["sd"] / math.sqrt(2)) and tuned["hi"] == 1.0  # clipped


def test_runs_of_one_data_seed_are_described_not_given_an_interval(tmp_path):
  """Three FT seeds on one data seed share their test items: mean and sd only, and a gap is bold only when every
  run's own interval excludes 0 (here none does, however tight the FT seeds agree)."""
  runs = [_write_run(tmp_path / f"f{f}", _results(seed=1, ft_seed=f, accs=(0.5 + 0.01 * f, 0.5 + 0.1 * f, 0.6)))
          for f in (1, 2, 3)]
  code, log = _aggregate(tmp_path, runs)
  assert code == 0, log
  (group,) = files.read_json(tmp_path / "out" / "grid.json")["groups"]
  base = _row(group, "accuracy", variant="correct", rule="strict", condition="base_0shot")["across"]
  assert (base["mean"], base["lo"], base["over"]) == (pytest.approx(0.52), None, "runs")  # averaged, none dropped
  tuned = _row(group, "accuracy", variant="correct", rule="strict", condition="ft_0shot")["across"]
  assert (tuned["n"], tuned["over"], tuned["mean"], tuned["lo"]) == (3, "FT seeds", pytest.approx(0.7), None)
  md = (tmp_path / "out" / "GRID.md").read_text()
  assert "base 0-shot: 0.52 (mean of 3 runs, sd 0.01; runs ±0.10)" in md
  assert "FT 0-shot: 0.70 (mean of 3 FT seeds, sd 0.10; runs ±0.10)" in md
  assert "ICL best (k=4): -0.10 (mean of 3 FT seeds, sd 0.10; runs ±0.15) n.d." in md  # run 3's gap is -0.2 alone


def test_the_cells_of_a_split_grid_aggregate_as_one_group(tmp_path):
  g = grid_cpu.get_config()
  g.split_tasks = True
  runs = []
  for cell in grid.cells(g):
    (task,) = cell.tasks
    r = _results(cell.model, cell.dtype, seed=cell.seed, ft_seed=cell.ft_seed, task=task)
    r["config"] = cell.cfg.raw
    if not cell.cfg.circuits:
      del r["circuits"]
    runs.append(_write_run(tmp_path / f"c{cell.index}", r))
  assert [c.cfg.circuits[0].task if c.cfg.circuits else None for c in grid.cells(g)] == ["parity", "parity", None, None] * 2
  code, log = _aggregate(tmp_path, runs)
  assert code == 0, log
  (group,) = files.read_json(tmp_path / "out" / "grid.json")["groups"]
  assert group["mixtures"] == {"parity": "parity", "expression": "expression"} and len(group["runs"]) == 8


def test_a_task_fine_tuned_on_different_mixtures_is_refused(tmp_path):
  both = _results(seed=1)
  both["config"]["tasks"] = "parity,expression"
  alone = _write_run(tmp_path / "alone", _results(seed=2))
  code, log = _aggregate(tmp_path, [_write_run(tmp_path / "both", both), alone])
  assert code == 2 and "parity's numbers come from models fine-tuned on different mixtures" in log
  circuits_only = _results(seed=3, task="expression")
  circuits_only["circuits"] = _results()["circuits"]  # parity circuits of a model tuned on expression alone
  code, log = _aggregate(tmp_path, [alone, _write_run(tmp_path / "expr", circuits_only)])
  assert code == 2 and "different mixtures" in log


def test_grid_md_says_what_is_not_computed(tmp_path):
  a = _results(seed=1)
  b = _results(seed=2)
  b["circuits"]["parity"]["heads"]["contrasts"]["icl4-ft"]["tv"]["corrected"].update(lo=None, hi=None)
  c = _results(seed=3)
  c["circuits"]["parity"]["heads"]["contrasts"]["icl4-ft"]["tv"]["corrected"]["point"] = None
  del c["gaps"]
  code, log = _aggregate(tmp_path, [_write_run(tmp_path / n, r) for n, r in (("a", a), ("b", b), ("c", c))])
  assert code == 0, log
  md = (tmp_path / "out" / "GRID.md").read_text()
  assert "| icl4 − ft | — (computed in 2 of 3 runs) | not computed |" in md
  assert "Runs whose results.json predates the ICL − FT gaps" in md and str(tmp_path / "c") in md
  code, log = _aggregate(tmp_path, [_write_run(tmp_path / "b2", b)])
  assert code == 0 and "| icl4 − ft | -0.20 [no interval] |" in (tmp_path / "out" / "GRID.md").read_text()


def test_run_patterns_expand_and_a_pattern_matching_nothing_is_an_error(tmp_path):
  for name in ("paper-a", "paper-b", "other"):
    (tmp_path / name).mkdir()
  assert aggregation.expand([str(tmp_path / "paper-*"), str(tmp_path / "other"), str(tmp_path / "paper-a")]) == [
      str(tmp_path / "paper-a"), str(tmp_path / "paper-b"), str(tmp_path / "other")]
  (tmp_path / "GRID.md").write_text("")
  assert aggregation.expand([str(tmp_path / "*")]) == [str(tmp_path / n) for n in ("other", "paper-a", "paper-b")]
  with pytest.raises(aggregation.GridError, match="matches no directory"):
    aggregation.expand([str(tmp_path / "nope-*")])


def test_grid_cells_cover_the_axes_each_in_its_own_work_directory():
  g = grid_cpu.get_config()
  g.split_tasks = True
  cells = grid.cells(g)
  assert len(cells) == 2 * 2 * 2  # models x tasks x seeds
  assert len({c.cfg.workdir for c in cells}) == len(cells)
  c = cells[-1]
  assert (c.model, c.dtype, c.tasks, c.seed, c.ft_seed) == ("gemma3-270m", "float32", ("expression",), 2, 42)
  assert (c.cfg.model, c.cfg.tasks, c.cfg.seed, c.cfg.train.seed) == ("gemma3-270m", ("expression",), 2, 42)
  assert str(c.cfg.workdir) == "work/cpu-grid/gemma3-270m.float32/expression/seed2.ft42"
  g.dtypes = "float16"
  with pytest.raises(ConfigError, match="grid cell 0 .*dtype must be one of"):
    grid.cells(g)


def test_dry_run_sizes_the_paper_grid_on_a_v4_32():
  text = sizing.dry_run(grid.cells(paper_grid.get_config()), "v4-32", 0.3)
  assert "v4-32: 16 device(s) of 32 GiB" in text
  lines = [line for line in text.splitlines() if line.strip().startswith(("0 ", "2 ")) and "P" in line]
  assert len(lines) == 2 and "(exceeds)" not in text  # 0.5B and 7B both fit 32 GiB when sharded 16 ways
  with pytest.raises(ValueError, match="unknown slice"):
    sizing.parse_slice("v9-1")


def test_sizing_counts_a_local_models_prompts_with_its_own_tokenizer(tiny_lm, smollm2_tokenizer):
  from icl_ft.evaluation import engine
  d, _, byte_tok = tiny_lm
  queries = engine.icl_queries("expression", "correct", "paper", 2, sizing.SAMPLE, 1)
  ours = sizing._prompt_lengths(str(d), "expression", "correct", "paper", 2, 1)
  assert ours == tuple(len(byte_tok(q.prompt).input_ids) for q in queries)  # one token per byte
  hub = sizing._prompt_lengths("qwen1.5-7b", "expression", "correct", "paper", 2, 1)  # not on this machine
  assert hub == tuple(len(smollm2_tokenizer(q.prompt).input_ids) for q in queries) and hub != ours


def test_launch_scripts_run_a_grid_cell_per_array_task_or_every_cell_on_one_slice(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text("#!/bin/sh\necho srun \"$@\"\n")
  (fake / "srun").chmod(0o755)
  env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", GRID="configs/grid.py", PYTHON="python3",
             SLURM_SUBMIT_DIR=str(ROOT), SLURM_ARRAY_TASK_ID="3")
  r = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch")], env=env, capture_output=True, text=True)
  assert r.returncode == 0 and r.stdout.strip() == "srun python3 -m icl_ft.grid --config=configs/grid.py --cell=3"
  env.pop("SLURM_ARRAY_TASK_ID")
  r = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--only_aggregate"], env=env,
                     capture_output=True, text=True)
  assert r.stdout.strip() == "srun python3 -m icl_ft.grid --config=configs/grid.py --only_aggregate"
  common = ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--name", "x", "--zone", "z", "--type", "v4-32",
            "--repo", "https://example.org/r.git", "--dry-run"]
  r = subprocess.run(common + ["--grid", "configs/grid.py"], capture_output=True, text=True)
  assert r.returncode == 0 and "icl_ft.grid\\ --config=configs/grid.py" in r.stdout
  r = subprocess.run(common + ["--grid", "configs/grid.py", "--config", "configs/parity.py"], capture_output=True,
                     text=True)
  assert r.returncode == 2 and "pass one of --config and --grid" in r.stderr


def _expected(values, lows, highs, signed=False):
  """A GRID.md cell from the runs' own numbers, computed here independently: one run's value and interval, or the
  mean over runs of distinct data seeds with, on each side, the wider of its Student-t interval and the runs'
  intervals combined on that side, and the runs' mean half-width."""
  f = "{:+.2f}" if signed else "{:.2f}"
  bounds = (-1.0, 1.0) if signed else (0.0, 1.0)
  if len(values) == 1:
    return f"{f.format(values[0])} [{f.format(lows[0])}, {f.format(highs[0])}]"
  mean = sum(values) / len(values)
  half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
  below = math.sqrt(sum((v - lo) ** 2 for v, lo in zip(values, lows))) / len(values)
  above = math.sqrt(sum((h - v) ** 2 for v, h in zip(values, highs))) / len(values)
  within = sum(h - lo for h, lo in zip(highs, lows)) / (2 * len(values))
  return (f"{f.format(mean)} [{f.format(max(bounds[0], mean - max(half, below)))}, "
          f"{f.format(min(bounds[1], mean + max(half, above)))}] ({len(values)} data seeds; runs ±{within:.2f})")


def assert_grid_md_equals_the_runs(grid_dir: Path, run_dirs: list[Path], label: str = "") -> int:
  """Every accuracy cell (base, FT, ICL best, ICL dev-chosen) and every ICL - FT cell of GRID.md's row ``label``
  (default: the first) is the runs' results.json numbers (runs of that model, each its own data seed). Returns
  the cells checked."""
  md = (grid_dir / "GRID.md").read_text()
  runs = [files.read_json(d / "results.json") for d in run_dirs]
  checked = 0
  for rows in zip(*(r["table"] for r in runs)):
    assert len({(row["task"], row["variant"]) for row in rows}) == 1
    task, variant = rows[0]["task"], rows[0]["variant"]
    column = sorted({(t["task"], t["variant"]) for t in runs[0]["table"]}).index((task, variant))
    for rule in ("lenient", "strict"):
      for table, kind in ((f"### Accuracy ({rule})", "acc"), (f"### ICL − FT ({rule})", "gap")):
        line = next(x for x in md.split(table)[1].splitlines() if x.startswith(f"| {label}") and
                    not x.startswith("| model"))
        cell = line.split(" | ")[column + (2 if kind == "acc" else 1)]
        for cond, name in aggregation.CONDITIONS.items():
          cells = [row[rule][cond] for row in rows]
          if any(c is None for c in cells) or (kind == "gap" and cond not in ("icl_best", "icl_dev")):
            continue
          ks = sorted({c["shots"] for c in cells if c.get("shots") is not None})
          head = f"{name} (k={','.join(map(str, ks))})" if ks else name
          if kind == "acc":
            text = _expected([c["acc"] for c in cells], [c["lo"] for c in cells], [c["hi"] for c in cells])
          else:
            gaps = [next(g for g in r["gaps"] if (g["task"], g["variant"], g["rule"], g["shots"]) == (
                task, variant, rule, c["shots"])) for r, c in zip(runs, cells)]
            text = _expected([g["diff"] for g in gaps], [g["lo"] for g in gaps], [g["hi"] for g in gaps], signed=True)
          assert f"{head}: {text}" in cell, (task, variant, rule, cond, text, cell)
          checked += 1
  return checked


@pytest.mark.slow
def test_grid_command_resumes_after_a_kill_and_grid_md_equals_the_runs(tiny_lm, tmp_path):
  """configs/grid_cpu.py on a tiny random model (two seeds, no circuits): killed in the second cell's report,
  rerun: the first cell is not redone, and GRID.md's cells are the runs' results.json numbers."""
  args = [sys.executable, "-m", "icl_ft.grid", "--config=configs/grid_cpu.py", f"--config.models={tiny_lm[0]}",
          "--config.dtypes=float32", "--config.tasks=parity", f"--config.workdir={tmp_path / 'grid'}",
          "--config.study.icl.n=4", "--config.study.icl.n_by_shots=", "--config.study.icl.n_dev=2",
          "--config.study.icl.shots=0,2", "--config.study.icl.control_shots=2", "--config.study.ft.n_per_task=8",
          "--config.study.ft.steps=2", "--config.study.ft.save_every=2", "--config.study.ft.batch_size=4",
          "--config.study.ft.warmup_steps=1", "--config.study.ft.fewshot_k=2", "--config.study.ft.fewshot_steps=2",
          "--config.study.ft_eval.steps=2", "--config.study.circuits.enabled=False"]
  env = dict(os.environ, ICL_FT_CACHE=str(tmp_path / "cache"), ICL_FT_KILL_AT="report.write:2")
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == -9, r.stderr[-3000:]
  cells = sorted((tmp_path / "grid").glob("*/*/seed*"))
  assert [(c / "report" / "DONE.json").exists() for c in cells] == [True, False]
  first = (cells[0] / "results.json").stat().st_mtime_ns
  env.pop("ICL_FT_KILL_AT")
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "cell 0: up to date" in r.stdout and "cell 1: finished" in r.stdout
  assert "[report] running" in r.stdout and "[icl] running" not in r.stdout  # only the killed stage reran
  assert (cells[0] / "results.json").stat().st_mtime_ns == first
  assert assert_grid_md_equals_the_runs(tmp_path / "grid", cells) == 24  # 2 variants x 2 rules x (4 accuracies + 2 gaps)
  md = (tmp_path / "grid" / "GRID.md").read_text()
  assert "Runs without a circuit stage" in md and "2 finished run(s)" in md


def test_two_data_seeds_that_agree_keep_the_runs_own_noise(tmp_path):
  """Two seeds with the same accuracy: the t interval has width 0, the reported one the runs' intervals combined."""
  runs = [_write_run(tmp_path / f"s{s}", _results(seed=s, ft_seed=42)) for s in (1, 2)]
  code, log = _aggregate(tmp_path, runs)
  assert code == 0, log
  (group,) = files.read_json(tmp_path / "out" / "grid.json")["groups"]
  a = _row(group, "accuracy", variant="correct", rule="strict", condition="base_0shot")["across"]
  assert a["t_lo"] == a["t_hi"] == 0.5 and a["floor_lo"] == a["floor_hi"] == pytest.approx(math.sqrt(2 * 0.1 ** 2) / 2)
  assert (a["lo"], a["hi"]) == (pytest.approx(0.5 - a["floor_lo"]), pytest.approx(0.5 + a["floor_hi"]))
  assert "base 0-shot: 0.50 [0.43, 0.57] (2 data seeds; runs ±0.10)" in (tmp_path / "out" / "GRID.md").read_text()


def test_two_data_seeds_at_zero_keep_the_upper_side_of_their_wilson_intervals(tmp_path):
  """0/24 twice: each run's Wilson interval is [0, 0.138]; the combined interval keeps that upper side (0.098),
  where symmetric half-widths would give 0.049."""
  runs = []
  for s in (1, 2):
    r = _results(seed=s, ft_seed=42)
    for row in r["table"]:
      row["strict"]["base_0shot"].update(acc=0.0, lo=0.0, hi=0.138, n=24)
    runs.append(_write_run(tmp_path / f"s{s}", r))
  code, log = _aggregate(tmp_path, runs)
  assert code == 0, log
  (group,) = files.read_json(tmp_path / "out" / "grid.json")["groups"]
  a = _row(group, "accuracy", variant="correct", rule="strict", condition="base_0shot")["across"]
  assert (a["lo"], a["hi"]) == (0.0, pytest.approx(math.sqrt(2 * 0.138 ** 2) / 2))
