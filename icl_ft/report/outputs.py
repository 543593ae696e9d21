"""Result files of an evaluation: per-query records, per-cell summaries (JSON and CSV, with the release's best of
shots and the dev-chosen k) and the accuracy-vs-shots plot."""

from __future__ import annotations

from typing import Any, Sequence

from icl_ft.io import files
from icl_ft.io import records as records_io
from icl_ft.report import plots, tables


def write_icl_results(outdir, records: Sequence[records_io.QueryRecord], skipped: Sequence[records_io.SkippedQuery] = (),
                      title: str = "", figure: files.FigureGuard = files.draw) -> dict[str, Any]:
  """Per-query JSONL and the summary JSON/CSV (per cell; with best-of-shots and dev-chosen k), then the
  accuracy-vs-shots plot of the test split through ``figure(name, draw)``. Returns the paths by name."""
  out = files.as_path(outdir)
  summary = tables.summarize(records, skipped)
  paths = {
      "records": records_io.write_queries(out / "records.jsonl", records),
      "summary": records_io.write_document(out / "summary.json", "summary", dict(
          cells=summary, best_of_shots={rule: tables.best_of_shots(summary, rule) for rule in tables.RULES},
          dev_chosen={rule: tables.dev_chosen_shots(summary, rule) for rule in tables.RULES},
          skipped_too_long=len(skipped))),
      "summary_csv": files.write_csv(out / "summary.csv", summary),
  }
  test = [row for row in summary if row.get("split", "test") == "test"]
  paths["plot"] = figure(plots.TITLES["shots"], lambda: plots.plot_accuracy(test, out / "accuracy_vs_shots.png",
                                                                               title=title))
  return paths
