"""Data export: ``python -m icl_ft.tasks.export --task=parity --variant=correct --format=paper --n=100 --out=x.jsonl``.

Writes JSON lines: full example records by default, or ``{"text": ...}`` fine-tuning lines with ``--ft`` (the
release's ``ft_data_4k.json`` layout: correct variant, bare question + answer, tasks one after another).
``--task`` takes a name, a comma-separated list, or ``all``. Files are written atomically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import app, flags

from icl_ft import tasks
from icl_ft.io import files

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI flags (only when run as a program, so importing this module defines none)."""
  flags.DEFINE_string("task", None, "Task name, comma-separated names, or 'all'.", required=True)
  flags.DEFINE_string("variant", "correct", "Variant: correct, misleading (parity also: misleading-z).")
  flags.DEFINE_enum("format", "paper", list(tasks.FORMATS), "Prompt/data format.")
  flags.DEFINE_integer("n", 100, "Examples per task.", lower_bound=0)
  flags.DEFINE_integer("seed", 0, "Seed of the query set (or of the FT stream with --ft).")
  flags.DEFINE_string("out", None, "Output .jsonl path.", required=True)
  flags.DEFINE_bool("ft", False, "Write {'text': ...} fine-tuning lines instead of example records.")
  flags.DEFINE_bool("with_header", False, "With --ft: put the task header before each text.")


def parse_tasks(spec: str) -> list[str]:
  """``all`` -> every task; otherwise comma-separated names, each validated."""
  names = list(tasks.TASKS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
  if not names:
    raise ValueError(f"no task given; valid tasks: {', '.join(tasks.TASKS)} (or 'all')")
  return [tasks.get_task(name).name for name in names]


def example_records(task_names: Sequence[str], variant: str, n: int, seed: int, fmt: str) -> list[dict[str, Any]]:
  """Full records of the fixed query set of each task that has ``variant``, with what its shortcut cues say."""
  return [dict(dataclasses.asdict(ex), format=fmt, seed=seed, index=i, **tasks.shortcut_record(ex, fmt))
          for name in task_names if variant in tasks.get_task(name).variants
          for i, ex in enumerate(tasks.make_queries(name, variant, n, seed, fmt))]


def ft_records(task_names: Sequence[str], n: int, seed: int, fmt: str, with_header: bool = False) -> list[dict]:
  """``{"text": ...}`` fine-tuning records, ``n`` per task."""
  return [{"text": tasks.ft_text(ex, fmt, with_header)}
          for name in task_names for ex in tasks.make_ft_examples(name, n, seed, fmt)]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    names = parse_tasks(FLAGS.task)
    if FLAGS.ft:
      if FLAGS.variant != "correct":
        raise ValueError("fine-tuning data is correct-variant only (drop --variant or set it to 'correct')")
      records = ft_records(names, FLAGS.n, FLAGS.seed, FLAGS.format, FLAGS.with_header)
    else:
      records = example_records(names, FLAGS.variant, FLAGS.n, FLAGS.seed, FLAGS.format)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  files.write_jsonl(FLAGS.out, records)
  print(f"wrote {len(records)} records to {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
