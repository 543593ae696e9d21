"""A grid that runs on a laptop CPU: the two embedded real models (SmolLM2-135M-Instruct and the base Gemma 3
270M) in float32, parity and expression, two data seeds (4 cells of 10-25 minutes each on 2 cores).

  python -m icl_ft.grid --config=configs/grid_cpu.py

Add --config.dtypes=float32,bfloat16 for the dtype axis. Each cell is a small study (24 queries
per cell (12 at k=2), shots 0, 2 and 4 with the controls at 4, 20 fine-tuning steps at the default study's recipe, 12 prompt pairs per
circuit condition): wide intervals, meant to show the grid and its across-seed statistics, not to settle a claim.
"""

import ml_collections

from configs import base


def get_config():
  g = ml_collections.ConfigDict()
  g.name = "cpu-grid"
  g.workdir = "work/cpu-grid"
  s = base.get_config()
  s.note = ("A cell of the CPU grid (configs/grid_cpu.py): a small study meant to show the grid and its "
            "across-seed statistics, not to settle a claim; intervals are wide.")
  s.tasks = "parity,expression"
  s.progress = False
  s.icl.shots = "0,2,4"
  s.icl.n = 24
  s.icl.n_by_shots = "2:12"
  s.icl.n_dev = 12
  s.ft.lr = 3e-4  # the default study's recipe (configs/parity.py)
  s.ft.with_header = True
  s.ft.steps = 20
  s.ft.save_every = 10
  s.ft.fewshot_steps = 10
  s.ft_eval.steps = "20"
  s.circuits.tasks = "parity"
  s.circuits.n_pairs = 12
  s.circuits.verify = 4
  s.circuits.n_boot = 100
  s.circuits.n_splits = 20
  s.circuits.n_perm = 100
  g.study = s
  g.models = "smollm2-135m,gemma3-270m"
  g.dtypes = "float32"
  g.tasks = ""
  g.split_tasks = False
  g.seeds = "1,2"
  g.ft_seeds = ""  # empty: the study's (42)
  return g
