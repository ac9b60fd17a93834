"""A real Prometheus scrapes a prometheus-client endpoint and answers its HTTP API."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.support.helpers import promql
from tests.support.servers import PrometheusServer, free_port

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(90)]


def _query(prometheus: PrometheusServer, expr: str) -> list[dict[str, object]]:
    return promql(prometheus.url, expr)


def test_prometheus_scrapes_a_target(prometheus_factory: Callable[[list[str]], PrometheusServer]) -> None:
    registry = CollectorRegistry()
    counter = Counter("millstream_smoke_events_total", "events seen by the smoke test", registry=registry)
    counter.inc(41)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prometheus = prometheus_factory([f"127.0.0.1:{port}"])
        deadline = time.monotonic() + 30
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            result = _query(prometheus, "millstream_smoke_events_total")
            if result:
                break
            time.sleep(0.5)
        assert result, "Prometheus never scraped the target"
        assert float(result[0]["value"][1]) == 41.0  # type: ignore[index]
        assert _query(prometheus, "up")[0]["value"][1] == "1"  # type: ignore[index]
    finally:
        server.shutdown()
        thread.join(5)
