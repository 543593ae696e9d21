"""A grid of studies (``python -m icl_ft.grid``): models x dtypes x task sets x data seeds x FT seeds, each cell a
study of its own in its own work directory, so a finished cell is skipped and a killed one resumes (the stage
fingerprints of ``icl_ft.study``).

A grid config (configs/grid.py) has the per-cell study config as ``study`` and the axes as comma-separated lists;
an empty axis keeps the study's value:

- ``models``, ``dtypes``: one row of the aggregate per (model, dtype);
- ``tasks``: the tasks; ``split_tasks`` runs one cell per task (with its own fine-tuning mixture unless
  ``study.ft.tasks`` names one), otherwise one cell holds them all (one fine-tuning run serves every task, as in
  the paper);
- ``seeds``: data seeds (query sets, demos, prompt pairs); ``ft_seeds``: fine-tuning seeds (data order, few-shot
  demos' training): the replicates the aggregate reports across.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import time
from typing import Any, Callable

import ml_collections
from etils import epath

from icl_ft.io import files
from icl_ft.study.config import ConfigError, StudyConfig

GRID_AXES = ("models", "dtypes", "tasks", "seeds", "ft_seeds")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One study of the grid: its place on the axes and its validated config (``cfg.workdir`` is its own)."""
  index: int
  model: str
  dtype: str
  tasks: tuple[str, ...]
  seed: int
  ft_seed: int
  cfg: StudyConfig

  @property
  def label(self) -> str:
    return f"{self.model} {self.dtype} {'+'.join(self.tasks)} seed {self.seed} ft-seed {self.ft_seed}"


def _slug(model: str) -> str:
  """A path-safe name of a model: a registry name as it is; a path or hub id by its last component (characters
  other than [A-Za-z0-9._-] replaced by '_') and a digest of the whole, so two ``.../final`` never collide."""
  last = re.sub(r"[^A-Za-z0-9._-]", "_", str(model).rstrip("/").rsplit("/", 1)[-1]) or "_"
  return last if last == model else f"{last}-{hashlib.sha256(model.encode()).hexdigest()[:6]}"


def _axis(grid: Any, key: str, default: Any, ints: bool = False) -> list:
  spec = grid[key]
  items = spec if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec).split(",") if s.strip()]
  if not items:
    items = default if isinstance(default, (list, tuple)) else [default]
  try:
    items = [int(v) for v in items] if ints else [str(v) for v in items]
  except ValueError:
    raise ConfigError(f"grid {key} must be comma-separated integers, got {spec!r}") from None
  if len(set(items)) != len(items):
    raise ConfigError(f"grid {key} lists a value twice: {spec!r}")
  return items


def cells(grid: ml_collections.ConfigDict) -> list[Cell]:
  """Every cell of the grid in run order (models as listed, then dtypes, tasks, seeds, FT seeds), each config
  validated; a ``ConfigError`` names the cell of a bad value."""
  study = grid.study
  tasks = _axis(grid, "tasks", [t.strip() for t in str(study.tasks).split(",") if t.strip()])
  task_sets = [(t,) for t in tasks] if grid.split_tasks else [tuple(tasks)]
  axes = (_axis(grid, "models", study.model), _axis(grid, "dtypes", study.dtype), task_sets,
          _axis(grid, "seeds", study.seed, ints=True), _axis(grid, "ft_seeds", study.ft.seed, ints=True))
  root = files.as_path(grid.workdir)
  out = []
  for i, (model, dtype, task_set, seed, ft_seed) in enumerate(itertools.product(*axes)):
    c = ml_collections.ConfigDict(study.to_dict())
    c.model, c.dtype, c.tasks, c.seed, c.ft.seed = model, dtype, ",".join(task_set), seed, ft_seed
    if c.circuits.tasks:  # a cell analyses only its own tasks
      c.circuits.tasks = ",".join(t for t in str(c.circuits.tasks).split(",") if t.strip() in task_set)
      c.circuits.enabled = c.circuits.enabled and bool(c.circuits.tasks)
    c.name = f"{grid.name}/{_slug(model)}/{dtype}/{'+'.join(task_set)}/seed{seed}/ft{ft_seed}"
    c.workdir = str(root / f"{_slug(model)}.{dtype}" / "+".join(task_set) / f"seed{seed}.ft{ft_seed}")
    try:
      cfg = StudyConfig.from_dict(c)
    except ConfigError as e:
      raise ConfigError(f"grid cell {i} ({model}, {dtype}, {'+'.join(task_set)}, seed {seed}, ft seed {ft_seed}): "
                        f"{e}") from None
    out.append(Cell(i, model, dtype, task_set, seed, ft_seed, cfg))
  if not out:
    raise ConfigError("the grid has no cells: every axis needs at least one value")
  return out


def state(cell: Cell) -> str:
  """"finished" (its results.json is there and its report stage is done), "partial" (some stage started) or "new"."""
  root = cell.cfg.workdir
  if (root / "results.json").exists() and (root / "report" / "DONE.json").exists():
    return "finished"
  return "partial" if root.exists() and any(root.iterdir()) else "new"


@dataclasses.dataclass
class Outcome:
  cell: Cell
  status: str  # "finished" (ran now), "up to date" (nothing to run) or "failed: <why>"
  seconds: float


def run(grid_cells: list[Cell], log: Callable[[str], None] = print,
        errors: tuple[type[BaseException], ...] = (Exception,)) -> list[Outcome]:
  """Runs each cell's study in turn (finished stages are skipped, killed ones resume). A cell that fails with one
  of ``errors`` is logged and left for a rerun while the others still run (on one process; several processes stop
  at the first failure). Returns each cell's outcome."""
  from icl_ft.study.pipeline import Study
  import jax
  if jax.process_count() > 1:  # a failure seen by one process only must stop them all, not desynchronise them
    errors = ()
  out = []
  for i, cell in enumerate(grid_cells):
    head = f"[cell {cell.index} ({i + 1}/{len(grid_cells)}): {cell.label}]"  # the index --dry_run and --cell use
    log(f"{head} {cell.cfg.workdir}")
    t0 = time.time()
    try:
      study = Study(cell.cfg, log=lambda line, head=head: log(f"{head} {line}"))
      study.run()
      status = "finished" if study.ran else "up to date"
    except errors as e:
      status = f"failed: {type(e).__name__}: {e}"
      log(f"{head} {status}")
    out.append(Outcome(cell, status, time.time() - t0))
  return out
