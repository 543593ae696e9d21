"""Linear equations with a dependent row (the system has no unique solution).

No aligned prompt pairs exist for this task, so the circuit stage is off.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "algebra"
  c.tasks = "algebra"
  c.workdir = "work/algebra"
  c.circuits.enabled = False
  return c
