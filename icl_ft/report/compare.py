"""Compare the numbers of two runs' ``results.json``, ignoring what may differ between identical computations
(timings, throughput, package versions, paths):

  python -m icl_ft.report.compare work/a/results.json work/b/results.json [--tol=1e-9]

Prints every differing entry (dotted path: a -> b) and exits 1 if there is one, 0 otherwise.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterator

from absl import app, flags

from icl_ft.io import files

# Keys whose values measure the machine, name places or mark the file format, not results.
VOLATILE = frozenset({"timings_s", "versions", "workdir", "median_tokens_per_s", "median_mfu", "seconds",
                      "step_time_s", "tokens_per_s", "mfu", "model", "source", "schema", "kind"})


def differences(a: Any, b: Any, tol: float = 0.0, path: str = "") -> Iterator[str]:
  """Every dotted path where ``a`` and ``b`` differ (numbers beyond ``tol``, absolute or relative)."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if k in VOLATILE:
        continue
      if k not in a or k not in b:
        yield f"{path}{k}: only in {'b' if k not in a else 'a'}"
      else:
        yield from differences(a[k], b[k], tol, f"{path}{k}.")
  elif isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      yield f"{path.rstrip('.')}: {len(a)} items -> {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
      yield from differences(x, y, tol, f"{path}{i}.")
  elif (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
        and not isinstance(b, bool)):
    if not math.isclose(a, b, rel_tol=tol, abs_tol=tol):
      yield f"{path.rstrip('.')}: {a!r} -> {b!r}"
  elif a != b:
    yield f"{path.rstrip('.')}: {a!r} -> {b!r}"


def main(argv) -> int:
  if len(argv) != 3:
    raise app.UsageError("usage: python -m icl_ft.report.compare A/results.json B/results.json [--tol=0]")
  found = list(differences(files.read_json(argv[1]), files.read_json(argv[2]), flags.FLAGS.tol))
  for line in found:
    print(line)
  print(f"{len(found)} difference(s)" if found else "identical numbers")
  return 1 if found else 0


if __name__ == "__main__":
  flags.DEFINE_float("tol", 0.0, "Absolute and relative tolerance for numbers (0: exact).")
  app.run(lambda argv: sys.exit(main(argv)))
