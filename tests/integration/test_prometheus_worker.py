"""A real Prometheus scrapes a running worker; its series exist and move."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from app.tools.simulator import Simulator
from tests.support.helpers import promql
from tests.support.servers import PrometheusServer
from tests.support.world import World, produce

pytestmark = [
    pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.prometheus, pytest.mark.timeout(180),
]  # fmt: skip


def value(prometheus: PrometheusServer, expr: str) -> float | None:
    result = promql(prometheus.url, expr)
    return float(result[0]["value"][1]) if result else None


def eventually(prometheus: PrometheusServer, expr: str, check: Callable[[float], bool], timeout: float = 60) -> float:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = value(prometheus, expr)
        if last is not None and check(last):
            return last
        time.sleep(1)
    raise AssertionError(f"{expr} never passed its check; last value {last}")


def test_prometheus_sees_throughput_sinks_dlq_and_lag(
    world: World, prometheus_factory: Callable[[list[str]], PrometheusServer]
) -> None:
    worker = world.start_worker()
    worker.wait_ready()
    prometheus = prometheus_factory([f"127.0.0.1:{worker.web_port}"])
    eventually(prometheus, 'up{job="millstream"}', lambda v: v == 1)
    simulator = Simulator(devices=30, seed=21, malformed_ratio=0.05)
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, list(simulator.messages(2000))))
    eventually(prometheus, "millstream_acked_messages_total", lambda v: v == sent)
    assert eventually(prometheus, "sum(millstream_dlq_messages_total)", lambda v: v > 0) == simulator.log.malformed
    eventually(prometheus, 'millstream_sink_write_seconds_count{sink="clickhouse"}', lambda v: v > 0)
    eventually(prometheus, 'millstream_sink_write_seconds_count{sink="scylla"}', lambda v: v > 0)
    eventually(prometheus, "count(millstream_consumer_lag_messages)", lambda v: v == 4)
    eventually(prometheus, "max(millstream_consumer_lag_messages)", lambda v: v == 0)  # all caught up
    assert value(prometheus, "millstream_readings_total") == simulator.log.valid_readings
