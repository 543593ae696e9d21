"""Boolean expressions with an absorbing ``and False`` / ``or True`` clause."""

from configs import base


def get_config():
  return base.for_task("boolean")
