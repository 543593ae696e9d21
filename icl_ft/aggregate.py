"""Aggregates finished study runs into the paper's grid: GRID.md, grid.json and figures.

  python -m icl_ft.aggregate --runs='work/paper/*' --out=work/grid
  python -m icl_ft.aggregate --runs=work/a,work/b,work/c --out=work/grid --group_by=ft.lr

``--runs`` takes run directories and globs (quote them; a grid's runs are three levels down:
``'work/paper-grid/*/*/*'``). Runs may differ in model, dtype, tasks and seeds; any
other differing config key is refused by name (nothing is written) unless ``--group_by`` splits the runs by it.
Unfinished runs are listed in GRID.md, not silently skipped. See ``icl_ft.report.aggregation``.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

_RUNS = flags.DEFINE_list("runs", None, "Run directories or globs (comma-separated).")
_OUT = flags.DEFINE_string("out", None, "Directory for GRID.md, grid.json and the figures.")
_GROUP_BY = flags.DEFINE_list("group_by", [], "Config keys (e.g. ft.lr,icl.n) whose values split the runs into "
                              "groups, each aggregated on its own.")


def write(patterns: Sequence[str], out: str, group_by: Sequence[str] = (), log=print) -> int:
  """Reads the runs, aggregates them and writes ``out``/GRID.md, grid.json and the figures; returns the exit
  code (2 with a message when the runs cannot be aggregated; nothing is written then)."""
  from icl_ft.io import files, records
  from icl_ft.report import aggregation, grid_render, plots
  try:
    found = [aggregation.read_run(p) for p in aggregation.expand(patterns)]
    runs = [r for r in found if isinstance(r, aggregation.Run)]
    unfinished = [r for r in found if not isinstance(r, aggregation.Run)]
    grid = aggregation.aggregate(runs, unfinished, group_by)
  except aggregation.GridError as e:
    log(f"error: {e}")
    return 2
  planned = {f"{prefix}{title}": (group, f"{prefix}{name}", draw) for i, group in enumerate(grid["groups"])
             for prefix in [f"group{i + 1}-" if len(grid["groups"]) > 1 else ""]
             for title, (name, draw) in plots.GRID_FIGURES.items()}
  grid_render.render(grid, {t: p for t, (_, p, _) in planned.items()})  # a rendering error before any write
  root = files.as_path(out)
  root.mkdir(parents=True, exist_ok=True)
  records.write_document(root / "grid.json", "grid", grid)  # the numbers before the figures
  figures = {}
  for title, (group, name, draw) in planned.items():
    try:
      draw(group, root / name)
      figures[title] = name
    except Exception as e:  # a figure must never cost the numbers already written
      log(f"warning: figure {title!r} could not be drawn: {type(e).__name__}: {e}")
  files.atomic_write_text(root / "GRID.md", grid_render.render(grid, figures))
  n = sum(len(g["runs"]) for g in grid["groups"])
  log(f"aggregated {n} finished run(s) into {root / 'GRID.md'} and grid.json")
  for u in unfinished:
    log(f"left out {u['run']}: {u['reason']}")
  return 0


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _RUNS.value or not _OUT.value:
    raise app.UsageError("--runs and --out are required, e.g. --runs='work/paper/*' --out=work/grid")
  return write(_RUNS.value, _OUT.value, _GROUP_BY.value)


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
