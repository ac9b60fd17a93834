"""The chaos report as a table: ``python -m tests.chaos.report [report.json]`` prints Markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(".chaos") / "report.json"
COLUMNS = (
    ("scenario", "scenario"), ("store", "store"), ("readings", "readings_produced"), ("valid", "valid_readings"),
    ("DLQ'd", "dlq_origins"), ("rows FINAL", "rows_final"), ("dup before FINAL", "duplicates_before_final"),
    ("dup after FINAL", "duplicates_after_final"), ("aggs checked", "aggregates_checked"),
    ("aggs wrong", "aggregates_wrong"), ("latest wrong", "latest_wrong"), ("alerts", "alerts_expected"),
    ("alerts wrong", "alerts_wrong"), ("lost", "lost"),
    ("restarts", "worker_restarts"), ("recovery s", "recovery_s"), ("ok", "ok"),
)  # fmt: skip


def rows(results: list[dict[str, Any]]) -> list[list[str]]:
    return [[title for title, _ in COLUMNS]] + [[str(r.get(key, "-")) for _, key in COLUMNS] for r in results]


def text_table(results: list[dict[str, Any]]) -> list[str]:
    table = rows(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in
                       enumerate(zip(row, widths, strict=True))) for row in table]  # fmt: skip
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def markdown(results: list[dict[str, Any]]) -> str:
    table = rows(results)
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines) + "\n"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH
    report = json.loads(path.read_text())
    print(f"<!-- {report['generated']}, {report['machine']} -->")
    print(markdown(report["scenarios"]), end="")


if __name__ == "__main__":
    main()
