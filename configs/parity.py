"""Relation reasoning whose answer is fixed by the parity of the number of lines (the default study).

``python -m icl_ft.main --config=configs/parity.py`` runs it end to end on the embedded SmolLM2-135M in
about 20 minutes on a 2-core CPU.
"""

from configs import base


def get_config():
  return base.for_task("parity")
