"""`millstream demo` as a newcomer runs it: bundled broker, embedded ClickHouse, a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.chdb, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[2]


def test_demo_reports_nothing_lost() -> None:
    pytest.importorskip("chdb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--duration", "6", "--devices", "15", "--json"],
        capture_output=True, text=True, timeout=220, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0
    assert summary["clickhouse_rows"] == summary["expected_rows"] > 0
    assert summary["dlq"] == summary["malformed_sent"]
    assert summary["processed"] == summary["produced"] - summary["malformed_sent"]
    assert summary["aggregates"] > 0 and summary["aggregate_devices"] == 15
    assert "rows per metric:" in result.stdout
    assert "demo: all" in result.stderr  # progress was shown
