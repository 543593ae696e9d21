"""Result files: paths that understand object stores, atomic writers (JSON, JSONL, CSV, figures), readers.

Every path goes through ``etils.epath`` (``as_path``), so a work directory such as ``gs://bucket/run`` keeps its
scheme for every read and write. A write goes to a temporary sibling that is then moved over the target, so a
reader never sees half a file and a failed write leaves the old file in place. On multi-host runs only
process 0 writes (``is_writer``); every process computes the same results.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from etils import epath

PathLike = str | os.PathLike
# figure(name, draw) -> the drawn figure's path, or None where a guard swallowed a failure.
FigureGuard = Callable[[str, Callable[[], Any]], Any]


def is_writer() -> bool:
  """Whether this process writes result files: only process 0 of a multi-host run (all compute the same)."""
  import jax
  return jax.process_index() == 0


def as_path(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path`` (``~`` expanded); ``gs://``, ``s3://`` etc. keep their scheme."""
  p = epath.Path(path)
  return p if has_scheme(p) else p.expanduser()


def has_scheme(path: PathLike) -> bool:
  """Whether ``path`` is a URI of an object store (``gs://…``) rather than a local path."""
  return "://" in os.fspath(path)


def check_store(path: PathLike) -> None:
  """Raises an OSError saying what to install if ``path`` is on an object store this machine cannot reach
  (``gs://`` needs gcsfs: ``pip install -r requirements-cloud.txt``)."""
  scheme = os.fspath(path).split("://", 1)[0] if has_scheme(path) else None
  package = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}.get(scheme)
  if scheme and package is None:
    raise OSError(f"unsupported object store {scheme}:// in {path}; use gs://, s3://, az:// or a local path")
  if package and importlib.util.find_spec(package) is None:
    raise OSError(f"{path}: {scheme}:// work directories need the {package} package "
                  f"(pip install -r requirements-cloud.txt)")


def absolute(path: PathLike) -> epath.Path:
  """An absolute form of ``path`` (local paths made absolute, symlinks kept; URIs unchanged), as Orbax wants."""
  p = as_path(path)
  return p if has_scheme(p) else epath.Path(os.path.abspath(p))


def relative(path: PathLike, root: PathLike) -> str:
  """``path`` relative to ``root`` (for links inside a report), for local paths and URIs alike."""
  path, root = os.fspath(absolute(path)), os.fspath(absolute(root)).rstrip("/")
  if not path.startswith(root + "/"):
    raise ValueError(f"{path} is not inside {root}")
  return path[len(root) + 1:]


def _write_bytes(path: epath.Path, data: bytes) -> None:
  path.write_bytes(data)


def atomic_write_bytes(path: PathLike, data: bytes) -> epath.Path:
  """Writes ``data`` to ``path`` through a temporary sibling moved into place (process 0 only). A failure
  (disk full, no permission) leaves any previous file untouched and raises an OSError naming ``path``."""
  path = as_path(path)
  if not is_writer():
    return path
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes(tmp, data)
    tmp.replace(path)
  except BaseException as e:
    if tmp.exists():
      tmp.unlink()
    if isinstance(e, OSError):
      raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
    raise
  return path


def atomic_write_text(path: PathLike, text: str) -> epath.Path:
  """``atomic_write_bytes`` of UTF-8 text."""
  return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
  """Nested containers with numpy scalars/arrays converted and NaN/inf replaced by None (strict JSON)."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return json_safe(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(path: PathLike, obj: Any) -> epath.Path:
  return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")


def read_json(path: PathLike) -> Any:
  return json.loads(as_path(path).read_text())


def write_jsonl(path: PathLike, rows: Iterable[dict]) -> epath.Path:
  """One strict-JSON object per line (NaN/inf written as null, as ``write_json`` does)."""
  return atomic_write_text(path, "".join(json.dumps(json_safe(r), default=str, ensure_ascii=False, allow_nan=False)
                                         + "\n" for r in rows))


def read_jsonl(path: PathLike) -> list[dict]:
  return [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]


def write_csv(path: PathLike, rows: Sequence[dict]) -> epath.Path:
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
  return atomic_write_text(path, buf.getvalue())


def draw(name: str, fn: Callable[[], Any]) -> Any:
  """The plain figure guard: draws, and lets a failure raise."""
  del name
  return fn()


def save_figure(fig, path: PathLike, dpi: int = 120) -> epath.Path:
  """Saves and closes a matplotlib figure atomically as PNG (process 0 only on multi-host runs)."""
  import matplotlib.pyplot as plt
  try:
    if is_writer():
      buf = io.BytesIO()
      fig.tight_layout()
      fig.savefig(buf, format="png", dpi=dpi)
      return atomic_write_bytes(path, buf.getvalue())
    return as_path(path)
  finally:
    plt.close(fig)


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts as ``{"a.b": value}``."""
  if not isinstance(d, dict) or not d:
    return {prefix: d}
  return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}.{key}" if prefix else str(key)).items()}
