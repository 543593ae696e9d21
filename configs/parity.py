"""Relation reasoning whose answer is fixed by the parity of the number of lines."""

from configs import base


def get_config():
  c = base.get_config()
  c.task = "parity"
  return c
