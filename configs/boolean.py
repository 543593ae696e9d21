"""Boolean expressions with an absorbing ``and False`` / ``or True`` clause."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "boolean"
  c.tasks = "boolean"
  c.workdir = "work/boolean"
  return c
