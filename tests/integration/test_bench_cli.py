"""`millstream bench --json` end to end, on a small load: every figure the issue asks for."""

from __future__ import annotations

import json
import math

import pytest

from tests.support.helpers import run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.chdb, pytest.mark.cql, pytest.mark.timeout(500)]
FIGURES = (
    "consume_ceiling_msgs_per_s", "bare_agent_msgs_per_s", "pipeline_msgs_per_s", "pipeline_vs_bare_ratio",
    "batched_readings_per_s", "latency_p50_s", "latency_p99_s", "rows_per_insert", "rss_peak_mb", "rss_growth_ratio",
    "bare_tuned_msgs_per_s", "pipeline_cpu_msgs_per_s", "pipeline_cpu_readings_per_s",
    "bare_agent_process_cpu_us_per_msg", "pipeline_process_cpu_us_per_msg", "pipeline_vs_bare_cpu_ratio",
    "batched_process_cpu_us_per_reading", "quix_msgs_per_s", "quix_readings_per_s", "quix_process_cpu_us_per_msg",
    "quix_batched_process_cpu_us_per_reading", "pipeline_vs_quix_ratio", "batched_vs_quix_ratio",
    "pipeline_vs_quix_cpu_ratio", "pipeline_rss_peak_mb", "batched_rss_peak_mb",
)  # fmt: skip


def test_bench_prints_every_figure() -> None:
    result = run_cli(
        "bench", "--messages", "6000", "--batched-messages", "300", "--batch-size", "20", "--latency-seconds", "3",
        "--sweep-devices", "20,400", "--sweep-messages", "800", "--api-seconds", "30", "--json", timeout=480,
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
    # each worker's peak, within the overall one (which covers the latency phase too)
    assert figures["rss_peak_mb"] >= max(figures["pipeline_rss_peak_mb"], figures["batched_rss_peak_mb"])
    assert "pipeline_vs_bare_ratio" in result.stdout and ">= 0.8" in result.stdout  # the table, with goals
    # The peer: the same job in Quix Streams (the bench extra, installed by `.[test]`).
    assert figures["pipeline_vs_quix_ratio"] == pytest.approx(
        figures["pipeline_msgs_per_s"] / figures["quix_msgs_per_s"], rel=0.01
    )
    assert figures["batched_vs_quix_ratio"] == pytest.approx(
        figures["batched_readings_per_s"] / figures["quix_readings_per_s"], rel=0.01
    )
    assert "pipeline_vs_quix_ratio" in result.stdout and ">= 1" in result.stdout
    for phase in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7"):
        assert f"bench: {phase}" in result.stderr  # progress was shown
    # Every worker phase writes aggregates to ScyllaDB (the CQL test server), as production does.
    assert figures["scylla"].startswith("aggregates to ScyllaDB at 127.0.0.1:")
    assert figures["pipeline_aggregate_rows_per_msg"] > 0 and figures["batched_aggregate_rows_per_msg"] > 0
    # The device sweep: with ScyllaDB (the CQL test server) at 20 and 400 devices, and at 400 without.
    few, many, many_off = figures["device_sweep"]
    assert (few["devices"], many["devices"], many_off["devices"]) == (20, 400, 400)
    assert few["scylla"] and many["scylla"] and not many_off["scylla"]
    assert figures["device_scaling_ratio"] == pytest.approx(many["msgs_per_s"] / few["msgs_per_s"], rel=0.01)
    # 800 messages of 20 devices fold into few aggregate rows; of 400 devices into many more ...
    assert many["aggregate_rows_per_msg"] > 3 * few["aggregate_rows_per_msg"] > 0
    # ... which go to ScyllaDB in UNLOGGED BATCHes: far fewer requests than rows.
    assert 0 < many["scylla_requests_per_msg"] < many["aggregate_rows_per_msg"] / 10
    assert many_off["aggregate_rows_per_msg"] == many_off["scylla_requests_per_msg"] == 0
    assert many["changelog_records_per_msg"] > few["changelog_records_per_msg"] > 0
    for key in ("scylla_cpu_us_per_row", "memory_per_device_bytes", "device_scaling_cpu_ratio"):
        assert isinstance(figures[key], int | float) and math.isfinite(figures[key]), key
    assert "| devices | ScyllaDB |" in result.stdout  # the sweep table
    # The 20-device point again, for about 30 s at its rate, under lookup API queries every other
    # phase: the clients were answered at their rate, both phases were seen, the ratios are theirs.
    queried = figures["api_query_point"]
    assert queried["devices"] == 20 and queried["messages"] >= few["msgs_per_s"] * 30 and queried["api_phases"] >= 2
    assert queried["api_queries_answered"] > 0 and queried["api_query_errors"] == 0
    assert 40 <= queried["api_queries_per_s"] <= 55
    assert queried["seconds_with_queries"] > 0 and queried["seconds_without"] > 0
    assert figures["api_load_ratio"] == pytest.approx(
        queried["msgs_per_s_with_queries"] / queried["msgs_per_s_without"], rel=0.01
    )
    assert figures["api_load_cpu_ratio"] == pytest.approx(
        queried["cpu_us_per_msg_without"] / queried["cpu_us_per_msg_with_queries"], rel=0.01
    )
    assert queried["api_cpu_us_per_query"] > 0
    assert figures["api_cpu_share"] == pytest.approx(
        figures["api_cpu_us_per_query"] * 50 / (queried["cpu_us_per_msg_without"] * queried["msgs_per_s_without"]),
        rel=0.05,
    )
    assert "lookup API point (20 devices, one worker):\nwith queries" in result.stdout  # not a dict's repr
    assert "api_load_cpu_ratio" in result.stdout and "api_cpu_share" in result.stdout
