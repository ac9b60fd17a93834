"""The lookup API of a real worker, answered from ScyllaDB (the CQL test server) and, with
ScyllaDB off, from the worker's own table; both checked against the independent oracle."""

from __future__ import annotations

import asyncio
import atexit
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from app.tools.local import WorkerChild, metric_value
from models.times import MAX_MS, MIN_MS
from tests.support.audit import simulate, wait_until_complete
from tests.support.cql import CqlServer
from tests.support.helpers import ROOT, run_cli
from tests.support.oracle import expected
from tests.support.servers import free_port
from tests.support.world import World, produce

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(300)]


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def all_windows(port: int, device: str, metric: str, size: int) -> list[dict[str, Any]]:
    """Every page, following ``next``."""
    path: str | None = f"/devices/{urllib.parse.quote(device)}/windows?metric={metric}&size={size}&limit=7&from=0"
    windows: list[dict[str, Any]] = []
    while path is not None:
        status, page = get(port, path)
        assert status == 200, page
        windows += page["windows"]
        path = page["next"]
    return windows


def start_ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def start_api(workdir: Path, settings: dict[str, str]) -> WorkerChild:
    """``millstream api`` with these settings on a port of its own (what
    deploy/components/lookup-api runs beside the workers), stopped at exit."""
    port = free_port()
    api = WorkerChild(
        name="api", log_path=workdir / "api.log", web_port=port, cwd=ROOT, command="api",
        settings={**settings, "MILLSTREAM_API__WEB_PORT": str(port), "MILLSTREAM_WEB_HOST": "127.0.0.1"},
    )  # fmt: skip
    api.start()
    atexit.register(api.stop, 5)
    return api


@pytest.mark.parametrize("source", ["scylla", "table", "api"])
def test_the_api_answers_what_was_aggregated(world: World, source: str) -> None:
    """``api``: from ScyllaDB through ``millstream api``, a process apart from the worker."""
    traffic, log = simulate(3000, seed=51, devices=20)
    worker = world.start_worker(**({"MILLSTREAM_SCYLLA__ENABLED": "false"} if source == "table" else {}))
    worker.wait_ready()
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, traffic))
    wait_until_complete(world, log, sent)
    port = worker.web_port
    if source == "api":
        worker.stop()  # the answers cannot come from the worker
        api = start_api(world.workdir, world.settings())
        api.wait_ready(30)
        port, source = api.web_port, "scylla"
    want = expected(log.readings)
    devices = sorted({r.device_id for r in log.readings})[:5]
    for device in devices:
        status, latest = get(port, f"/devices/{device}/latest")
        assert status == 200 and latest["source"] == source, latest
        wanted = {m: v for (d, m), (v, _ms) in want.latest.items() if d == device}
        assert {m: x["value"] for m, x in latest["metrics"].items()} == wanted
        metric = sorted(wanted)[0]
        for size in (60, 3600):
            windows = all_windows(port, device, metric, size)
            starts = [start_ms(w["start"]) for w in windows]
            assert starts == sorted(set(starts), reverse=True)  # newest first, each once across pages
            expected_starts = {s for (d, m, z, s) in want.windows if (d, m, z) == (device, metric, size)}
            if source == "scylla":
                assert set(starts) == expected_starts
            else:  # the table keeps the windows a worker still needs; ScyllaDB keeps them all
                assert set(starts) <= expected_starts and starts
            for window, start in zip(windows, starts, strict=True):
                count, total, low, high, last, _ = want.windows[(device, metric, size, start)]
                assert (window["count"], window["min"], window["max"], window["last"]) == (count, low, high, last)
                assert window["sum"] == pytest.approx(total)
    # The widest bounds the API takes, years 1 to 9999; 16-digit epoch milliseconds past them
    # are a 400 naming the parameter (they were a 500: the reads went through datetime).
    device, metric = devices[0], sorted(m for (d, m) in want.latest if d == devices[0])[0]
    every = [w["start"] for w in all_windows(port, device, metric, 60)]
    path = f"/devices/{device}/windows?metric={metric}&size=60&limit=1000"
    status, body = get(port, f"{path}&from={MIN_MS}&to={MAX_MS}")
    assert status == 200 and [w["start"] for w in body["windows"]] == every, body
    for bad in ("from=-9999999999999999", "to=9999999999999999", f"from={MIN_MS - 1}"):
        status, body = get(port, f"{path}&{bad}")
        assert status == 400 and bad.split("=")[0] in body["error"] and "years 1-9999" in body["error"], body
    assert get(port, "/devices/nobody-at-all/latest")[0] == 404
    assert get(port, "/devices/nobody-at-all/windows?metric=t")[0] == 404
    status, body = get(port, f"/devices/{devices[0]}/windows?metric=t&limit=0")
    assert status == 400 and "limit" in body["error"]


def test_millstream_api_needs_scylla_and_says_so_in_one_line() -> None:
    result = run_cli("api", timeout=60, MILLSTREAM_SCYLLA__ENABLED="false")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "millstream: api: MILLSTREAM_SCYLLA__ENABLED is false; millstream api answers from ScyllaDB (without it, "
        "each worker answers for its own partitions on MILLSTREAM_WEB_PORT)"
    ]
    result = run_cli("api", timeout=60, MILLSTREAM_API__WEB_PORT="0")
    assert result.returncode == 2 and "MILLSTREAM_API__WEB_PORT" in result.stderr, result.stderr


@pytest.mark.timeout(120)
def test_millstream_api_is_alive_but_not_ready_until_scylla_answers(tmp_path: Path) -> None:
    scylla_port = free_port()
    api = start_api(tmp_path, {"MILLSTREAM_SCYLLA__CONTACT_POINTS": "127.0.0.1",
                               "MILLSTREAM_SCYLLA__PORT": str(scylla_port),
                               "MILLSTREAM_SCYLLA__KEYSPACE": "nothing_here_yet",
                               "MILLSTREAM_SCYLLA__REQUEST_TIMEOUT_S": "2"})  # fmt: skip
    server = None
    try:
        deadline = time.monotonic() + 30
        while not _answers(api, "/healthz") and time.monotonic() < deadline:
            api.check_alive()
            time.sleep(0.2)
        assert api.get("/healthz")[0] == 200
        status, text = api.get("/readyz")
        assert status == 503 and "ScyllaDB not connected yet" in text, text
        status, text = api.get("/devices/sensor-1/latest")
        assert status == 503 and "ScyllaDB" in json.loads(text)["error"], text
        server = CqlServer(port=scylla_port).start()  # ScyllaDB comes up: the API connects by itself
        api.wait_ready(30)
        status, text = api.get("/devices/sensor-1/windows?metric=t")  # no keyspace yet: no worker has run
        assert status == 503 and "nothing_here_yet" in json.loads(text)["error"], text
        assert api.get("/devices/sensor-1/windows?metric=t&size=7")[0] == 400  # checked before any read
        scrape = api.metrics()
        assert metric_value(scrape, "millstream_api_requests_total", 'endpoint="latest",status="503"') == 1
        assert metric_value(scrape, "millstream_api_requests_total", 'endpoint="windows",status="400"') == 1
    finally:
        assert api.stop() == 0  # SIGTERM: a clean stop
        if server is not None:
            server.stop()


def _answers(api: WorkerChild, path: str) -> bool:
    try:
        return api.get(path)[0] == 200
    except OSError:
        return False
