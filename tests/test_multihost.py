"""The multi-host code path without the hardware: two processes x two simulated CPU devices (gloo collectives)
run the smoke study with the same command line, and every number equals a single-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _study(model_dir, workdir, processes: int, devices: int):
  args = [sys.executable, "-m", "icl_ft.main", "--config=configs/smoke.py", f"--config.model={model_dir}",
          f"--config.workdir={workdir}", "--config.circuits.tol=1e-6",
          "--config.circuits.single_token_answers=False"]  # its byte tokenizer splits every answer
  base = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  port = _free_port()
  procs = []
  for i in range(processes):
    env = dict(base)
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return json.loads((Path(workdir) / "results.json").read_text())


@pytest.mark.slow
def test_two_processes_equal_one(tiny_lm, tmp_path):
  multi = _study(tiny_lm[0], tmp_path / "multi", processes=2, devices=2)
  single = _study(tiny_lm[0], tmp_path / "single", processes=1, devices=4)
  assert multi["table"] == single["table"]
  assert len(multi["ft_eval"]) == len(single["ft_eval"])
  for a, b in zip(multi["ft_eval"], single["ft_eval"]):  # accuracies exactly; logit means up to reduction order
    assert {k: v for k, v in a.items() if not isinstance(v, float) or k.startswith(("acc", "ci"))} == \
        {k: v for k, v in b.items() if not isinstance(v, float) or k.startswith(("acc", "ci"))}
    assert a["mean_logit_diff"] == pytest.approx(b["mean_logit_diff"], abs=1e-5)
  losses = lambda r: [m["loss"] for m in r]
  ma = [json.loads(x) for x in (tmp_path / "multi" / "finetune" / "metrics.jsonl").read_text().splitlines()]
  sa = [json.loads(x) for x in (tmp_path / "single" / "finetune" / "metrics.jsonl").read_text().splitlines()]
  assert losses(ma) == pytest.approx(losses(sa), abs=1e-5)
  ca = multi["circuits"]["expression"]["heads"]["conditions"]["ft"]
  cb = single["circuits"]["expression"]["heads"]["conditions"]["ft"]
  for key in ("mean_target", "mean_source", "separation"):  # raw logit differences
    assert ca[key] == pytest.approx(cb[key], abs=1e-6)
  # Normalised effects divide by the clean-corrupt gap (~4e-4 on a random tiny model, so reduction-order
  # noise of ~4e-7 becomes ~1e-3): compare the raw shifts E[patched] - E[target] = effect * gap.
  raw = lambda c: [e * c["separation"] for e in c["effects"]]
  assert raw(ca) == pytest.approx(raw(cb), abs=1e-6)
