"""ICL sweep from the command line, without the rest of the study:

  python -m icl_ft.icl --model=smollm2-135m --task=expression --shots=0,1,4 --n=20 --out=work/icl

Evaluates every (task, variant, format, shots) cell with the batched engine, writes the records, the
summaries and the accuracy-vs-shots plot into ``--out``, and prints per cell its accuracy, its paired difference
from 0 shots on the same items, and per (task, format, shots) the rule its answers follow (``report.cues``).
"""

from __future__ import annotations

from absl import app, flags

from icl_ft.evaluation import engine
from icl_ft.report import cues, outputs, tables

F = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI flags (only when run as a program, so importing this module defines none)."""
  flags.DEFINE_string("model", "smollm2-135m", "Registry name, local directory, .gguf file or hub id.")
  flags.DEFINE_string("dtype", "float32", "Parameter dtype.")
  flags.DEFINE_list("task", ["expression"], "Tasks.")
  flags.DEFINE_list("variant", ["correct", "misleading"], "Query variants (each task is run on those it has).")
  flags.DEFINE_list("format", ["paper"], "Prompt formats: paper, fixed.")
  flags.DEFINE_list("shots", [str(k) for k in engine.DEFAULT_SHOTS], "Shot counts.")
  flags.DEFINE_integer("n", 199, "Queries per cell.", lower_bound=1)
  flags.DEFINE_integer("seed", 114514, "Seed of the query sets and demo streams.")
  flags.DEFINE_bool("nested_demos", False, "A query's k-shot demos are the first k of one list (paired across k; "
                    "each item's shots then run packed in one row), else drawn per k as the release does.")
  flags.DEFINE_integer("batch_size", 8, "Prompts per batch.")
  flags.DEFINE_enum("on_too_long", "error", list(engine.ON_TOO_LONG), "Prompts longer than the context.")
  flags.DEFINE_string("out", "work/icl", "Output directory.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from icl_ft.io import loading
  m = loading.load(F.model, dtype=F.dtype)
  records, skipped = engine.sweep(m, F.task, F.variant, F.format, [int(s) for s in F.shots], F.n, F.seed,
                                  engine.EngineConfig(batch_size=F.batch_size, on_too_long=F.on_too_long), F.model,
                                  nested=F.nested_demos)
  paths = outputs.write_icl_results(F.out, records, skipped, title=f"{F.model}: ICL accuracy vs shots")
  for row in tables.summarize(records, skipped):
    acc = "all skipped" if row["acc_strict"] is None else (
        f"lenient={row['acc_lenient']:.3f} strict={row['acc_strict']:.3f} "
        f"[{row['ci_strict_lo']:.2f}, {row['ci_strict_hi']:.2f}]")
    print(f"{row['task']:>10} {row['variant']:>12} {row['format']:>5} k={row['shots']:<2} n={row['n']:<4} {acc}")
  for row in cues.differences_from_base([dict(r) for r in records]):
    print(f"{row['task']:>10} {row['variant']:>12} {row['format']:>5} k={row['shots']:<2} minus k=0 on the same "
          f"{row['n']} items (strict, paired): {cues.difference_text(row)}")
  for row in cues.analyse([dict(r) for r in records]):
    print(f"{row['task']:>10} {row['format']:>5} k={row['shots']:<2} answers follow: {cues.verdict_text(row)}")
  print("skipped (too long):", len(skipped))
  for k, v in paths.items():
    print(f"{k}: {v}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
