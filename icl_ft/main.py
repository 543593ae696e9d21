"""Entry point: ``python -m icl_ft.main --config=configs/parity.py [--config.KEY=VALUE ...]``.

Runs the study's stages (data, icl, finetune, ft_eval, circuits, report; see ``icl_ft.study``) into
``config.workdir``, skipping stages that are up to date, and prints where everything went. Examples:

  python -m icl_ft.main --config=configs/parity.py
  python -m icl_ft.main --config=configs/expression.py --config.model=qwen1.5-0.5b --config.icl.shots=0,4,16
  python -m icl_ft.main --config=configs/parity.py --config.stages=icl,report
"""

from __future__ import annotations

import sys
import time

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/parity.py", "Study config file (configs/*.py).")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go through --config.KEY=VALUE")
  from absl import logging
  if logging.get_verbosity() == logging.INFO:  # default: keep library INFO chatter (backend probing) off the console
    logging.set_verbosity(logging.WARNING)
  from icl_ft import study
  from icl_ft.io import checkpoints, convert, loading
  from icl_ft.model import config, sharding
  from icl_ft.training import trainer
  from icl_ft.study import workdir
  sharding.maybe_initialize_distributed()
  try:
    cfg = study.StudyConfig.from_dict(_CONFIG.value)
  except study.ConfigError as e:
    raise app.UsageError(str(e)) from None
  runner = study.Study(cfg)
  note = cfg.raw.get("note")
  print(f"icl_ft study {cfg.name!r}: model {cfg.model}, tasks {', '.join(cfg.tasks)}, stages {', '.join(cfg.stages)}, "
        f"work directory {cfg.workdir}")
  if note:
    print(f"note: {note}")
  t0 = time.time()
  try:
    done = runner.run()
  except (study.MissingInputError, study.ConfigError, loading.ModelNotFoundError, convert.CheckpointError,
          config.UnsupportedModelError, sharding.MeshError, trainer.TrainingDivergedError,
          checkpoints.CheckpointMismatchError, workdir.LockedError, study.UnreadableRecordError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"\nfinished in {(time.time() - t0) / 60:.1f} min. Outputs (in {cfg.workdir}):")
  for stage, rec in done.items():
    for key, path in rec["outputs"].items():
      for sub, p in (path.items() if isinstance(path, dict) else [("", path)]):
        if p:
          print(f"  {stage:9} {(key + ' ' + sub).strip():22} {p}")
  warnings = [w for rec in done.values() for w in rec.get("warnings", [])]
  for w in warnings:
    print(f"warning: {w}")
  if "report" in done:
    print(f"\nreport: {cfg.workdir / done['report']['outputs']['report']}")
  return 0


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
