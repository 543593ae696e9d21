"""A minutes-long run of every stage with tiny sizes, for tests and for checking an installation.

Pass a small model: ``--config.model=DIR`` (the tests use a tiny random model they build themselves).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "smoke"
  c.tasks = "parity,expression"
  c.workdir = "work/smoke"
  c.note = "Smoke test: tiny sizes; the numbers mean nothing."
  c.progress = False
  c.icl.shots = "0,1,2"
  c.icl.n = 4
  c.icl.n_by_shots = "1:3"
  c.icl.n_dev = 2
  c.icl.batch_size = 4
  c.ft.n_per_task = 8
  c.ft.n_heldout = 4
  c.ft.steps = 4
  c.ft.batch_size = 4
  c.ft.warmup_steps = 1
  c.ft.save_every = 2
  c.ft.fewshot_k = 2
  c.ft.fewshot_steps = 2
  c.icl.control_shots = 2
  c.circuits.tasks = "expression"
  c.circuits.n_pairs = 4
  c.circuits.icl_shots = "2"
  c.circuits.verify = 3
  c.circuits.n_boot = 20
  c.circuits.n_splits = 10
  c.circuits.n_perm = 20
  c.circuits.top_k = 3
  return c
