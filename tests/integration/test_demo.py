"""`millstream demo` as a newcomer runs it: bundled broker, embedded ClickHouse, a real worker."""

from __future__ import annotations

import json

import pytest

from app.tools.broker import mosquitto_binary
from tests.support.fixtures import in_ci
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
    assert summary["aggregates"] > 0 and summary["aggregate_devices"] == 15 + 1  # and the overheating press
    assert "rows per metric:" in result.stdout
    assert "demo: all" in result.stderr  # progress was shown
    spike = [(a["state"], a["window_start"][-13:]) for a in summary["alerts"] if a["device_id"] == "press-spike"]
    assert [state for state, _ in spike] == ["raised", "cleared"], summary["alerts"]
    assert "the lookup API: GET http" in result.stdout and "count 4  max 72.5" in result.stdout


@pytest.mark.mqtt
def test_demo_over_mqtt_reports_nothing_lost() -> None:
    """devices -> Mosquitto -> millstream bridge -> Kafka -> worker -> ClickHouse, as a user runs it."""
    pytest.importorskip("chdb")
    if mosquitto_binary() is None:
        if in_ci():
            pytest.fail("required server missing in CI: mosquitto")
        pytest.skip("mosquitto not installed here")
    result = run_cli("demo", "--mqtt", "--duration", "6", "--devices", "15", "--json", timeout=220)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0 and summary["clickhouse_rows"] == summary["expected_rows"] > 0
    assert summary["dlq"] == summary["malformed_sent"]
    assert "over MQTT" in result.stderr and "millstream bridge" in result.stderr
