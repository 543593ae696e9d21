"""Results: atomic JSON/JSONL/CSV writers, accuracy summaries with Wilson intervals, and plots."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  """Writes ``text`` to ``path`` through a temporary file and ``os.replace``: readers never see half a file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  return path


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


def write_json(path, obj: Any) -> Path:
  return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")


def write_jsonl(path, rows: Iterable[dict]) -> Path:
  return atomic_write_text(path, "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_csv(path, rows: Sequence[dict]) -> Path:
  buf = io.StringIO()
  if rows:
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return atomic_write_text(path, buf.getvalue())


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion."""
  if n == 0:
    return (math.nan, math.nan)
  p = hits / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (max(0.0, centre - half), min(1.0, centre + half))


GROUP_KEYS = ("model", "method", "samples", "task", "variant", "format", "shots")


def summarize(records: Sequence[dict]) -> list[dict]:
  """Accuracy (lenient and strict) with 95% Wilson intervals per group of ``GROUP_KEYS`` present."""
  keys = [k for k in GROUP_KEYS if records and k in records[0]]
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for r in records:
    groups[tuple(r[k] for k in keys)].append(r)
  rows = []
  for key, rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
    row = dict(zip(keys, key), n=len(rs))
    for rule in ("lenient", "strict"):
      hits = sum(bool(r[f"correct_{rule}"]) for r in rs)
      lo, hi = wilson(hits, len(rs))
      row.update({f"acc_{rule}": hits / len(rs), f"ci_{rule}_lo": lo, f"ci_{rule}_hi": hi})
    diffs = [r["logit_diff"] for r in rs if r.get("logit_diff") is not None]
    row["mean_logit_diff"] = sum(diffs) / len(diffs) if diffs else None
    rows.append(row)
  return rows


def best_of_shots(summary: Sequence[dict], rule: str = "lenient") -> list[dict]:
  """The release's ICL score: max accuracy over shot counts (> 0), per group without ``shots``."""
  best: dict[tuple, dict] = {}
  for row in summary:
    if row.get("shots", 0) == 0:
      continue
    key = tuple((k, row[k]) for k in GROUP_KEYS if k in row and k != "shots")
    if key not in best or row[f"acc_{rule}"] > best[key][f"acc_{rule}"]:
      best[key] = row
  return [dict(k, best_shots=v["shots"], **{c: v[c] for c in v if c.startswith(("acc_", "ci_"))}, n=v["n"])
          for k, v in best.items()]


def plot_accuracy(summary: Sequence[dict], path, x: str = "shots", rule: str = "strict", title: str = "") -> Path:
  """Accuracy vs ``x`` ("shots": demonstrations; "samples": fine-tuning examples seen) with 95% intervals.

  One line per combination of the other grouping keys present.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lines: dict[str, list[dict]] = defaultdict(list)
  for row in summary:
    label = " / ".join(str(row[k]) for k in GROUP_KEYS if k in row and k != x)
    lines[label].append(row)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, rows in sorted(lines.items()):
    rows = sorted(rows, key=lambda r: r[x])
    xs = [r[x] for r in rows]
    y = [r[f"acc_{rule}"] for r in rows]
    err = [[yy - r[f"ci_{rule}_lo"] for yy, r in zip(y, rows)], [r[f"ci_{rule}_hi"] - yy for yy, r in zip(y, rows)]]
    ax.errorbar(xs, y, yerr=err, marker="o", capsize=3, label=label)
  ax.set_xscale("symlog", linthresh=1)
  ax.set_xlabel({"shots": "shots (demonstrations)", "samples": "fine-tuning samples seen"}.get(x, x))
  ax.set_ylabel(f"accuracy ({rule})")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(title or f"accuracy vs {x} ({rule} scoring, 95% Wilson CI)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return path
