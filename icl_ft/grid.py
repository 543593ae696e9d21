"""Runs a grid of studies, then aggregates it: ``python -m icl_ft.grid --config=configs/grid.py``.

Each cell (model x dtype x task set x seed x FT seed; see ``icl_ft.study.grid``) is a study in its own work
directory: a finished cell is skipped, a killed one resumes where it stopped. When every cell has run, the
aggregate (GRID.md, grid.json, figures; ``icl_ft.aggregate``) is written to the grid's work directory. Examples:

  python -m icl_ft.grid --config=configs/grid_cpu.py
  python -m icl_ft.grid --config=configs/grid.py --dry_run --slice=v4-32     # cells, FLOPs, memory per device
  python -m icl_ft.grid --config=configs/grid.py --cell=3                    # one cell (a SLURM array task)
  python -m icl_ft.grid --config=configs/grid.py --only_aggregate            # aggregate what has finished
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grid_cpu.py", "Grid config file (configs/grid*.py).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the cells, their work directories and states, and an "
                             "estimate of each cell's FLOPs and memory per device; run nothing.")
_CELL = flags.DEFINE_integer("cell", None, "Run only this cell (0-based, as --dry_run numbers them), without the "
                             "aggregation: one SLURM array task.")
_ONLY_AGGREGATE = flags.DEFINE_bool("only_aggregate", False, "Run no cell; aggregate the finished ones.")
_SLICE = flags.DEFINE_string("slice", "", "For --dry_run: the accelerators to size for, e.g. v4-32, v5e-16, "
                             "v5p-8, 8xh100 (empty: this machine's devices).")
_MFU = flags.DEFINE_float("mfu", 0.3, "For --dry_run: the model-FLOPs utilisation assumed for the time estimate.")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go through --config.KEY=VALUE")
  from absl import logging
  if logging.get_verbosity() == logging.INFO:
    logging.set_verbosity(logging.WARNING)
  from icl_ft import aggregate
  from icl_ft.study import ConfigError, grid, sizing
  from icl_ft.model import sharding
  sharding.maybe_initialize_distributed()
  g = _CONFIG.value
  try:
    cells = grid.cells(g)
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  print(f"icl_ft grid {g.name!r}: {len(cells)} cells, work directory {g.workdir}")
  if _DRY_RUN.value:
    print(sizing.dry_run(cells, _SLICE.value, _MFU.value))
    return 0
  if _CELL.value is not None and not 0 <= _CELL.value < len(cells):
    raise app.UsageError(f"--cell={_CELL.value}: the grid has cells 0..{len(cells) - 1}")
  outcomes = [] if _ONLY_AGGREGATE.value else grid.run(
      cells if _CELL.value is None else [cells[_CELL.value]])
  for o in outcomes:
    print(f"  cell {o.cell.index}: {o.status} ({o.seconds / 60:.1f} min)  {o.cell.cfg.workdir}")
  failed = [o for o in outcomes if o.status.startswith("failed")]
  code = aggregate.write([str(c.cfg.workdir) for c in cells], g.workdir) if _CELL.value is None else 0
  if failed:
    print(f"error: {len(failed)} cell(s) failed (see above); rerun the same command to retry them", file=sys.stderr)
  return code or (1 if failed else 0)


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
