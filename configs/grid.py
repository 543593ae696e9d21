"""The paper's grid: its five models x every task x seeds, each (model, seed) one study of configs/paper.py.

  python -m icl_ft.grid --config=configs/grid.py --dry_run --slice=v4-32   # cells, FLOPs, memory per device
  python -m icl_ft.grid --config=configs/grid.py                          # run every cell, then aggregate
  python -m icl_ft.grid --config=configs/grid.py --config.seeds=1,2,3      # three data-seed replicates

One fine-tuning run per (model, seed) serves every task (the release's 4-task mixture), so the tasks share a
cell (``split_tasks=False``). Cells run one after another into ``workdir/<model>.<dtype>/<tasks>/seed<s>.ft<f>``;
a finished cell is skipped and a killed one resumes. The aggregate (GRID.md, grid.json, figures) is written to
``workdir``. ``launch/slurm.sbatch`` runs one cell per array task, ``launch/tpu_pod.sh --grid`` all on one slice.
"""

import ml_collections

from configs import paper


def get_config():
  g = ml_collections.ConfigDict()
  g.name = "paper-grid"
  g.workdir = "work/paper-grid"
  g.study = paper.get_config()  # every cell's settings but its model, dtype, tasks and seeds
  g.models = ",".join(paper.PAPER_MODELS)
  g.dtypes = ""  # empty: the study's (float32)
  g.tasks = ""  # empty: the study's (all five)
  g.split_tasks = False  # one cell per task (each with its own fine-tuning run) instead of one for all
  g.seeds = "114514"  # data seeds: query sets, demos, prompt pairs
  g.ft_seeds = "42"  # fine-tuning seeds: data order and initialisation of adapters
  return g
