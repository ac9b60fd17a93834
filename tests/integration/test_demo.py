"""`millstream demo` as a newcomer runs it: bundled broker, embedded ClickHouse, a real worker."""

from __future__ import annotations

import json

import pytest

from tests.support.helpers import run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.chdb, pytest.mark.timeout(240)]


def test_demo_reports_nothing_lost() -> None:
    pytest.importorskip("chdb")
    result = run_cli("demo", "--duration", "6", "--devices", "15", "--json", timeout=220)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0
    assert summary["clickhouse_rows"] == summary["expected_rows"] > 0
    assert summary["dlq"] == summary["malformed_sent"]
    assert summary["processed"] == summary["produced"] - summary["malformed_sent"]
    assert summary["aggregates"] > 0 and summary["aggregate_devices"] == 15
    assert "rows per metric:" in result.stdout
    assert "demo: all" in result.stderr  # progress was shown
