"""The lookup API of a real worker, answered from ScyllaDB (the CQL test server) and, with
ScyllaDB off, from the worker's own table; both checked against the independent oracle."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from models.times import MAX_MS, MIN_MS
from tests.support.audit import simulate, wait_until_complete
from tests.support.oracle import expected
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


@pytest.mark.parametrize("source", ["scylla", "table"])
def test_the_api_answers_what_was_aggregated(world: World, source: str) -> None:
    traffic, log = simulate(3000, seed=51, devices=20)
    worker = world.start_worker(**({} if source == "scylla" else {"MILLSTREAM_SCYLLA__ENABLED": "false"}))
    worker.wait_ready()
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, traffic))
    wait_until_complete(world, log, sent)
    want = expected(log.readings)
    devices = sorted({r.device_id for r in log.readings})[:5]
    for device in devices:
        status, latest = get(worker.web_port, f"/devices/{device}/latest")
        assert status == 200 and latest["source"] == source, latest
        wanted = {m: v for (d, m), (v, _ms) in want.latest.items() if d == device}
        assert {m: x["value"] for m, x in latest["metrics"].items()} == wanted
        metric = sorted(wanted)[0]
        for size in (60, 3600):
            windows = all_windows(worker.web_port, device, metric, size)
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
    every = [w["start"] for w in all_windows(worker.web_port, device, metric, 60)]
    path = f"/devices/{device}/windows?metric={metric}&size=60&limit=1000"
    status, body = get(worker.web_port, f"{path}&from={MIN_MS}&to={MAX_MS}")
    assert status == 200 and [w["start"] for w in body["windows"]] == every, body
    for bad in ("from=-9999999999999999", "to=9999999999999999", f"from={MIN_MS - 1}"):
        status, body = get(worker.web_port, f"{path}&{bad}")
        assert status == 400 and bad.split("=")[0] in body["error"] and "years 1-9999" in body["error"], body
    assert get(worker.web_port, "/devices/nobody-at-all/latest")[0] == 404
    assert get(worker.web_port, "/devices/nobody-at-all/windows?metric=t")[0] == 404
    status, body = get(worker.web_port, f"/devices/{devices[0]}/windows?metric=t&limit=0")
    assert status == 400 and "limit" in body["error"]
