"""Code reading where ``function1`` is irrelevant to the printed value.

Code prompts are long (a program per demo), so the shot sweep stops at 4 on the CPU default. No
aligned prompt pairs exist for this task, so the circuit stage is off.
"""

from configs import base


def get_config():
  c = base.for_task("code")
  c.icl.shots = "0,1,2,4"
  c.circuits.enabled = False
  return c
