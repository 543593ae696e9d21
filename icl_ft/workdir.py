"""Work-directory bookkeeping that never loses a result: one run at a time (a lock), digests of every stage
output (so damage is noticed), results moved aside rather than deleted, and per-unit partial results
(so a killed stage resumes from its last completed batch, checkpoint or condition).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any, Callable

import numpy as np
from etils import epath

from icl_ft import files

LOCK = ".lock"
HASH_LIMIT = 64 << 20  # files larger than this (checkpoint shards) are recorded by size only


class LockedError(RuntimeError):
  """Another run holds the work directory."""


def _start_time(pid: int) -> str | None:
  """The kernel's start time of process ``pid`` (None if it does not exist), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except OSError:
    return None


def _alive(holder: dict) -> bool:
  if holder.get("host") != socket.gethostname():
    return True  # another machine's process: we cannot tell, so assume it is alive
  started = _start_time(holder["pid"])
  return started is not None and started == holder.get("proc_start", started)


class Lock:
  """``root/.lock`` naming the running process (host, pid, start time); a second run stops with a message
  naming the holder, a lock left by a dead process on this host is taken over."""

  def __init__(self, root: epath.Path, log: Callable[[str], None] = print):
    self.path, self.log = root / LOCK, log
    self.held = False

  def holder(self) -> dict | None:
    """The current holder's record, or None if the lock is free (or stale, i.e. its process is dead)."""
    if not self.path.exists():
      return None
    try:
      holder = json.loads(self.path.read_text())
    except (OSError, json.JSONDecodeError):
      return None
    return holder if _alive(holder) else None

  def check(self) -> None:
    """Raises ``LockedError`` if a live process holds the lock (writes nothing)."""
    holder = self.holder()
    if holder is not None:
      raise LockedError(
          f"{self.path.parent} is in use by pid {holder['pid']} on {holder['host']} (started {holder['started']}); "
          f"wait for it to finish, or use another --config.workdir. If that process is gone, delete {self.path}.")

  def __enter__(self) -> "Lock":
    self.check()
    if self.path.exists():
      self.log(f"taking over the lock of a process that is no longer running ({self.path.read_text().strip()})")
    pid = os.getpid()
    files.atomic_write_text(self.path, json.dumps(dict(
        host=socket.gethostname(), pid=pid, proc_start=_start_time(pid), started=time.strftime("%Y-%m-%dT%H:%M:%S"))))
    self.held = True
    return self

  def __exit__(self, *exc) -> None:
    if self.held and self.path.exists():
      self.path.unlink()
    self.held = False


# -- digests ------------------------------------------------------------------------------------------------

def _file_digest(path: epath.Path) -> dict[str, Any]:
  size = path.stat().length
  if size > HASH_LIMIT:
    return {"size": size}
  return {"size": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def digests(root: epath.Path, outputs: Any) -> dict[str, dict]:
  """Size and SHA-256 (size only above ``HASH_LIMIT``) of every file an output names, by path relative to
  ``root``; a directory output covers every file below it."""
  out: dict[str, dict] = {}
  for rel in output_paths(outputs):
    path = root / rel
    if path.is_dir():
      for sub, _, names in path.walk():
        for name in names:
          f = epath.Path(sub) / name
          out[files.relative(f, root)] = _file_digest(f)
    elif path.exists():
      out[rel] = _file_digest(path)
  return out


def damaged(root: epath.Path, recorded: dict[str, dict]) -> list[str]:
  """The recorded files that are missing or whose size or checksum changed."""
  bad = []
  for rel, want in recorded.items():
    path = root / rel
    if not path.exists():
      bad.append(f"{rel} (missing)")
    elif _file_digest(path) != want:
      bad.append(f"{rel} (changed)")
  return bad


def output_paths(outputs: Any) -> list[str]:
  """Every path string in a (nested) outputs mapping."""
  if isinstance(outputs, dict):
    return [p for v in outputs.values() for p in output_paths(v)]
  return [outputs] if isinstance(outputs, str) else []


def move_aside(path: epath.Path, stamp: str) -> epath.Path:
  """Renames ``path`` to ``<path>.replaced-<stamp>`` (never deletes); returns the new path."""
  target = path.parent / f"{path.name}.replaced-{stamp}"
  path.rename(target)
  return target


# -- partial results ----------------------------------------------------------------------------------------

class Units:
  """Completed units of a stage (a batch of queries, a checkpoint's evaluation, a condition's sweeps), each
  saved atomically under ``directory/<key>`` as it completes, so a rerun after a kill skips them."""

  def __init__(self, directory: epath.Path):
    self.dir = directory

  def sub(self, name: str) -> "Units":
    return Units(self.dir / name)

  def records(self, key: str, compute: Callable[[], list[dict]]) -> list[dict]:
    """JSON records of unit ``key``: loaded if saved, else computed and saved."""
    path = self.dir / f"{key}.json"
    if path.exists():
      return files.read_json(path)
    value = compute()
    files.write_json(path, value)
    return value

  def arrays(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Named float arrays of unit ``key`` (saved exactly, as .npy inside an .npz)."""
    path = self.dir / f"{key}.npz"
    if path.exists():
      with path.open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}
    value = {k: np.asarray(v) for k, v in compute().items()}
    buf = __import__("io").BytesIO()
    np.savez(buf, **value)
    files.atomic_write_bytes(path, buf.getvalue())
    return value
