"""Threshold alerts end to end: a spike and a value hovering at a threshold, through real
workers, to the alerts topic and ScyllaDB's alerts_by_device, exactly the alerts worked out by
hand below; and after a kill -9 mid-stream, still exactly those (a repeat in the topic carries
the same alert id)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.audit import committed
from tests.support.world import World, produce, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(300)]

RULES = """
rules:
  - name: overheating
    metric: temperature
    above: 80
    clear: 75
    for_windows: 2
  - name: press-2-hot
    metric: temperature
    above: 80
    clear: 75
    devices: ["press-2"]
"""
# Per minute of event time, every 10 s: press-1 spikes for two minutes, press-2 hovers at 80.
PRESS_1 = [70, 85, 86, 74, 70, 70]
PRESS_2 = [81, 79, 81, 79, 81, 79]


def traffic(start_ms: int) -> list[tuple[bytes, bytes]]:
    messages = []
    for minute in range(len(PRESS_1)):
        for tick in range(6):
            at = start_ms + minute * 60_000 + tick * 10_000
            for device, series in (("press-1", PRESS_1), ("press-2", PRESS_2)):
                doc = {"device_id": device, "ts": at, "factory": "f1", "line": "l1",
                       "metrics": {"temperature": float(series[minute]), "rpm": 900.0 + tick}}  # fmt: skip
                messages.append((device.encode(), orjson.dumps(doc)))
    for device in ("press-1", "press-2"):  # much later: every window above closes
        doc = {"device_id": device, "ts": start_ms + 20 * 60_000, "metrics": {"rpm": 1.0}}
        messages.append((device.encode(), orjson.dumps(doc)))
    return messages


def expected(start_ms: int) -> set[tuple[str, str, str, int]]:
    minute = 60_000
    return {
        ("press-1", "overheating", "raised", start_ms + 2 * minute),  # the second window above 80
        ("press-1", "overheating", "cleared", start_ms + 3 * minute),  # 74: at or under 75
        ("press-2", "press-2-hot", "raised", start_ms),  # 81; 79 never clears (above 75)
        # press-2 under "overheating" too: two windows in a row above 80 never happen
    }


def stored_alerts(world: World) -> list[dict[str, Any]]:
    return world.cql.rows(world.name, "alerts_by_device")


@pytest.mark.parametrize("crash", [False, True])
def test_a_spike_raises_and_clears_exactly_once(world: World, tmp_path: Path, crash: bool) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    now = int(time.time() * 1000)
    start_ms = now - now % 60_000 - 30 * 60_000
    messages = traffic(start_ms)
    worker = world.start_worker(MILLSTREAM_ALERTS__RULES_FILE=str(rules))
    worker.wait_ready()
    if crash:
        half = len(messages) // 2
        asyncio.run(produce(world.broker.bootstrap, world.topic, messages[:half]))
        deadline = time.monotonic() + 60
        while committed(world) < half // 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        worker.kill9()
        worker.start()
        worker.wait_ready()
        asyncio.run(produce(world.broker.bootstrap, world.topic, messages[half:]))
    else:
        asyncio.run(produce(world.broker.bootstrap, world.topic, messages))
    want = expected(start_ms)
    records, docs, got = committed_alerts(world, len(messages), len(want))
    assert got == want, docs
    assert all(dict(r.headers)["millstream.alert.id"].decode() == d["alert_id"]
               for r, d in zip(records, docs, strict=True))  # fmt: skip
    if not crash:
        assert len(docs) == len(want)  # no repeats without a crash
    rows = stored_alerts(world)
    assert {(r["device_id"], r["rule"], r["state"]) for r in rows} == {w[:3] for w in want}
    assert len(rows) == len(want)  # a repeat is the same row (same id), never a second alert
    assert {r["alert_id"] for r in rows} == {d["alert_id"] for d in docs}
    # The lookup API answers them from ScyllaDB, newest first, one page at a time.
    port, pages, path = world.workers[0].web_port, [], "/devices/press-1/alerts?from=0&limit=1"
    while path:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            page = json.loads(response.read())
        pages.append(page)
        path = page["next"]
    listed = [a for page in pages for a in page["alerts"]]
    assert [(a["state"], _ms(a["window_start"])) for a in listed] == [
        ("cleared", start_ms + 180_000),
        ("raised", start_ms + 120_000),
    ]


def committed_alerts(world: World, messages: int, alerts: int) -> tuple[list[Any], list[dict[str, Any]], set[Any]]:
    """Once all ``messages`` are committed: the alerts topic's records, their documents, and
    (device, rule, state, window start ms) of each."""
    deadline = time.monotonic() + 120
    while committed(world) < messages:
        assert time.monotonic() < deadline, "not everything was committed"
        time.sleep(0.5)
    records = asyncio.run(read_topic(world.broker.bootstrap, world.alerts_topic, alerts, wait_s=20))
    docs = [json.loads(r.value) for r in records]
    return records, docs, {(d["device_id"], d["rule"], d["state"], _ms(d["window_start"])) for d in docs}


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def test_rules_reloaded_while_the_worker_runs(world: World, tmp_path: Path) -> None:
    """A worker started with no rules picks the rules up when the file changes, without a
    restart, and raises exactly the alerts the rules give; a bad edit before it changes nothing."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    now = int(time.time() * 1000)
    start_ms = now - now % 60_000 - 30 * 60_000
    messages = traffic(start_ms)
    # A 1 s check instead of the default 10 s, to keep the test short (the interval's default
    # and the reload itself are unit-tested in tests/unit/app/test_rules_reload.py).
    worker = world.start_worker(MILLSTREAM_ALERTS__RULES_FILE=str(rules), MILLSTREAM_ALERTS__RELOAD_INTERVAL_S="1")
    worker.wait_ready()
    for text, said in (("rules: [{name: bad}]\n", "alert rules not reloaded"), (RULES, "alert rules reloaded")):
        fresh = tmp_path / "rules.new"
        fresh.write_text(text)
        fresh.replace(rules)
        deadline = time.monotonic() + 30
        while said not in worker.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"no {said!r} in the worker's log"
            time.sleep(0.2)
    asyncio.run(produce(world.broker.bootstrap, world.topic, messages))
    want = expected(start_ms)
    records, _docs, got = committed_alerts(world, len(messages), len(want))
    assert got == want
    assert len(records) == len(want)
    assert 'millstream_alert_rules_reloads_total{outcome="applied"} 1.0' in worker.metrics()
