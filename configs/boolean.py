"""Boolean expressions with an absorbing ``and False`` / ``or True`` clause, in the fixed format: the paper
format's fine-tuning data has no absorbing clause (the release's ``randoms=True``) and its correct items none to
corrupt, so only ``fixed`` lets fine-tuning, ICL and circuits see the same pattern."""

from configs import base


def get_config():
  c = base.for_task("boolean")
  c.format = "fixed"
  return c
