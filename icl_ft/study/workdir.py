"""Work-directory bookkeeping that never loses a result: one run at a time (a lock), digests of every stage
output (so damage is noticed), and results moved aside rather than deleted."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any, Callable

from etils import epath

from icl_ft.io import files

LOCK = ".lock"
HASH_LIMIT = 64 << 20  # files larger than this (checkpoint shards) are recorded by size only


class LockedError(RuntimeError):
  """Another run holds the work directory."""


class WorkdirError(ValueError):
  """The work directory cannot be written."""


def _start_time(pid: int) -> str | None:
  """The kernel's start time of process ``pid`` (None where /proc is unavailable or it does not exist)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _alive(holder: dict) -> bool:
  """Whether the process a lock record names still runs (on another host: assumed alive)."""
  if holder.get("host") != socket.gethostname():
    return True
  pid = holder.get("pid")
  if not isinstance(pid, int) or not _pid_exists(pid):
    return False
  started, recorded = _start_time(pid), holder.get("proc_start")
  return started is None or recorded is None or started == recorded  # a reused pid has another start time


def _me() -> dict:
  pid = os.getpid()
  return dict(host=socket.gethostname(), pid=pid, proc_start=_start_time(pid))


class Lock:
  """``root/.lock`` naming the running process (host, pid, start time); a second run stops with a message
  naming the holder, a lock left by a dead process on this host is taken over. Local locks are created
  exclusively (O_EXCL), so two runs starting together cannot both hold it; on an object store the lock is
  best effort (written, then read back)."""

  def __init__(self, root: epath.Path, log: Callable[[str], None] = print):
    self.path, self.log = root / LOCK, log
    self.held = False

  def _record(self) -> dict | None:
    try:
      value = json.loads(self.path.read_text())
      return value if isinstance(value, dict) else {}
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: no live holder can be named

  def holder(self) -> dict | None:
    """The current holder's record, or None if the lock is free or stale (its process is dead)."""
    rec = self._record()
    return rec if rec is not None and _alive(rec) else None

  def check(self) -> None:
    """Raises ``LockedError`` if a live process holds the lock (writes nothing)."""
    holder = self.holder()
    if holder is not None:
      raise LockedError(
          f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} (started "
          f"{holder.get('started')}); wait for it to finish, or use another --config.workdir. If that process is "
          f"gone, delete {self.path}.")

  def __enter__(self) -> "Lock":
    self.check()
    stale = self._record()
    if stale is not None and not _alive(stale):
      self.log(f"taking over the lock of a process that is no longer running ({json.dumps(stale)})")
      if self._record() == stale:  # still the dead holder's (not a lock another run just took)
        self.path.unlink()
    mine = dict(_me(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    text = json.dumps(mine)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if files.has_scheme(self.path):
      self.path.write_text(text)
      if self._record() != mine:
        raise LockedError(f"another run took {self.path} at the same moment: {self._record()}")
    else:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        raise LockedError(f"another run took {self.path} at the same moment: {self._record()}") from None
      with os.fdopen(fd, "w") as f:
        f.write(text)
    self.held = True
    return self

  def __exit__(self, *exc) -> None:
    rec = self._record() if self.held else None
    if rec is not None and all(rec.get(k) == v for k, v in _me().items()):  # only ever our own lock
      self.path.unlink()
    self.held = False


def check_writable(path: epath.Path) -> None:
  """Raises a ``ConfigError`` that says what to do unless ``path`` could be created and written; writes
  nothing (local paths: permission of the nearest existing ancestor; object stores: the backend is installed)."""
  try:
    files.check_store(path)
  except OSError as e:
    raise WorkdirError(str(e)) from None
  if files.has_scheme(path):
    return
  probe = path
  while not probe.exists() and probe != probe.parent:
    probe = probe.parent
  problem = (None if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK) else
             f"{probe} is not a directory" if not probe.is_dir() else f"{probe} is not writable")
  if problem:
    raise WorkdirError(f"work directory {str(path)!r} cannot be written ({problem}); "
                      f"choose another with --config.workdir=DIR")


def config_diff(old: dict, new: dict) -> list[str]:
  """``key: old -> new`` for every (dotted) key whose value differs."""
  a, b = files.flat(json.loads(json.dumps(old, default=str))), files.flat(json.loads(json.dumps(new, default=str)))
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


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
