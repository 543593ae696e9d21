"""Fault injection for the resume tests: named points in long loops where a test can kill the process.

``ICL_FT_KILL_AT=NAME:COUNT`` makes the COUNT-th call of ``point(NAME)`` in this process send itself SIGKILL
(no cleanup, no flushing: a preempted job). Unset, ``point`` costs one dictionary lookup.
"""

from __future__ import annotations

import collections
import os
import signal

ENV = "ICL_FT_KILL_AT"
_seen: collections.Counter[str] = collections.Counter()


def point(name: str) -> None:
  """A place where ``ICL_FT_KILL_AT`` may kill this process (see the module docstring)."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  target, _, count = spec.rpartition(":")
  if name == target:
    _seen[name] += 1
    if _seen[name] == int(count):
      os.kill(os.getpid(), signal.SIGKILL)
