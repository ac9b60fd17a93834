"""`millstream bench --json` end to end, on a small load: every figure the issue asks for."""

from __future__ import annotations

import json
import math

import pytest

from tests.support.helpers import run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.chdb, pytest.mark.timeout(400)]
FIGURES = (
    "consume_ceiling_msgs_per_s", "bare_agent_msgs_per_s", "pipeline_msgs_per_s", "pipeline_vs_bare_ratio",
    "batched_readings_per_s", "latency_p50_s", "latency_p99_s", "rows_per_insert", "rss_peak_mb", "rss_growth_ratio",
    "bare_tuned_msgs_per_s", "pipeline_cpu_msgs_per_s", "pipeline_cpu_readings_per_s",
    "bare_agent_process_cpu_us_per_msg", "pipeline_process_cpu_us_per_msg", "pipeline_vs_bare_cpu_ratio",
    "batched_process_cpu_us_per_reading",
)  # fmt: skip


def test_bench_prints_every_figure() -> None:
    result = run_cli(
        "bench", "--messages", "6000", "--batched-messages", "300", "--batch-size", "20", "--latency-seconds", "3",
        "--json", timeout=380,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in FIGURES:
        value = figures[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)
    assert figures["pipeline_vs_bare_ratio"] == pytest.approx(
        figures["pipeline_msgs_per_s"] / figures["bare_agent_msgs_per_s"], rel=0.01
    )
    assert figures["batched_readings"] == 300 * 20
    assert figures["latency_p50_s"] <= figures["latency_p99_s"]
    # Inserts hold whole batches of rows, not a row or a message at a time.
    assert figures["rows_per_insert"] > 100
    assert "pipeline_vs_bare_ratio" in result.stdout and ">= 0.8" in result.stdout  # the table, with goals
    for phase in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"bench: {phase}" in result.stderr  # progress was shown
