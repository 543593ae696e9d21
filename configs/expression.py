"""Expression calculation with a reducible zero factor: ``(simple)+(0)*(complex)=``."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "expression"
  c.tasks = "expression"
  c.workdir = "work/expression"
  return c
