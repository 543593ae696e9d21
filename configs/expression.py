"""Expression calculation with a reducible zero factor: ``(simple)+(0)*(complex)=``."""

from configs import base


def get_config():
  return base.for_task("expression")
