"""Per-unit partial results: a stage saves each completed unit (a batch of queries, a checkpoint's evaluation,
a condition's sweeps) as it finishes, so a killed stage resumes from its last completed unit."""

from __future__ import annotations

import io
import json
from typing import Callable

import numpy as np
from etils import epath

from icl_ft.io import files


class Units:
  """Completed units of a stage (a batch of queries, a checkpoint's evaluation, a condition's sweeps), each
  saved atomically under ``directory/<key>`` as it completes, so a rerun after a kill skips them. A unit
  returns the same value whether computed or reloaded (records pass through strict JSON both ways)."""

  def __init__(self, directory: epath.Path, counts: list[int] | None = None):
    self.dir = directory
    self._counts = counts if counts is not None else [0, 0]  # [reused, computed], shared with sub-units

  @property
  def reused(self) -> int:
    return self._counts[0]

  @property
  def computed(self) -> int:
    return self._counts[1]

  def sub(self, name: str) -> "Units":
    return Units(self.dir / name, self._counts)

  def records(self, key: str, compute: Callable[[], list[dict]]) -> list[dict]:
    """JSON records of unit ``key``: loaded if saved, else computed and saved."""
    path = self.dir / f"{key}.json"
    if path.exists():
      self._counts[0] += 1
      return files.read_json(path)
    value = json.loads(json.dumps(files.json_safe(compute())))
    files.write_json(path, value)
    self._counts[1] += 1
    return value

  def arrays(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Named arrays of unit ``key`` (saved exactly, as .npy inside an .npz)."""
    path = self.dir / f"{key}.npz"
    if path.exists():
      self._counts[0] += 1
      with path.open("rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}
    value = {k: np.asarray(v) for k, v in compute().items()}
    buf = io.BytesIO()
    np.savez(buf, **value)
    files.atomic_write_bytes(path, buf.getvalue())
    self._counts[1] += 1
    return value
