"""Linear equations with a dependent row (the system has no unique solution).

No aligned prompt pairs exist for this task, so the circuit stage is off.
"""

from configs import base


def get_config():
  c = base.for_task("algebra")
  c.circuits.enabled = False
  return c
