"""/healthz and /readyz of a real worker process."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.support.audit import simulate, wait_until_complete
from tests.support.servers import free_port
from tests.support.world import World, produce

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(180)]


def probe(port: int, path: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(port: int, path: str, status: int, timeout: float = 60) -> dict[str, object]:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            code, body = probe(port, path)
            if code == status:
                return body
            last = (code, body)
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{path} never answered {status}; last: {last}")


def test_ready_once_sinks_are_connected(world: World) -> None:
    worker = world.start_worker()
    body = wait_for(worker.web_port, "/readyz", 200)
    assert body == {"status": "ready"}
    assert probe(worker.web_port, "/healthz") == (200, {"status": "ok"})


def test_not_ready_while_clickhouse_is_unreachable(world: World) -> None:
    nowhere = f"clickhouse://default@127.0.0.1:{free_port()}/{world.database}"
    worker = world.start_worker(MILLSTREAM_CLICKHOUSE__URL=nowhere, MILLSTREAM_PIPELINE__UNREADY_AFTER_S="2")
    wait_for(worker.web_port, "/healthz", 200)  # alive, just not ready
    body = wait_for(worker.web_port, "/readyz", 503)
    problems = body["problems"]
    assert isinstance(problems, list) and "clickhouse not connected yet" in problems
    time.sleep(3)
    code, body = probe(worker.web_port, "/readyz")
    assert code == 503 and any("clickhouse failing for" in p for p in body["problems"])  # type: ignore[union-attr]


def test_not_ready_while_tables_recover_then_ready(world: World) -> None:
    # Many devices and small batches: a changelog long enough that recovering it takes a while.
    traffic, log = simulate(6000, seed=31, devices=3000)
    first = world.start_worker(MILLSTREAM_PIPELINE__BATCH_MESSAGES="20")
    first.wait_ready()
    asyncio.run(produce(world.broker.bootstrap, world.topic, traffic))
    wait_until_complete(world, log, len(traffic))
    first.stop()
    # A new worker with an empty data directory rebuilds every device's state from the changelog.
    second = world.start_worker()
    seen: list[tuple[int, dict[str, object]]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            code, body = probe(second.web_port, "/readyz")
        except OSError:
            time.sleep(0.05)
            continue
        seen.append((code, body))
        if code == 200:
            break
        time.sleep(0.05)
    assert seen and seen[-1][0] == 200, seen[-3:]
    recovering = [body for code, body in seen if code == 503 and "table recovery not finished" in body["problems"]]  # type: ignore[operator]
    assert recovering, f"never saw recovery in progress; first answers: {seen[:3]}"
    aggregates = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{second.web_port}/aggregates").read())
    assert aggregates["devices"] == len({r.device_id for r in log.readings})  # the state came back in full


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (Linux /proc/net/tcp, IPv4)."""
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_the_web_server_listens_where_its_setting_says_and_serves_no_table_contents(world: World) -> None:
    """Regression: MILLSTREAM_WEB_HOST set only faust's advertised address (it listened on
    0.0.0.0 whatever it said), and faust's /router and /table pages served table contents."""
    traffic, log = simulate(600, seed=33, devices=40)
    asyncio.run(produce(world.broker.bootstrap, world.topic, traffic))
    worker = world.start_worker(MILLSTREAM_WEB_HOST="127.0.0.1")
    wait_for(worker.web_port, "/readyz", 200)
    assert listening_addresses(worker.web_port) == {"127.0.0.1"}
    for path in ("/router/", "/table/", "/table/device-windows/"):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}{path}", timeout=3)
            raise AssertionError(f"{path} answered")
        except urllib.error.HTTPError as error:
            assert error.code == 404, path
    wait_until_complete(world, log, len(traffic))
    code, counts = probe(worker.web_port, "/aggregates")
    assert code == 200 and counts["devices"] == len({r.device_id for r in log.readings})
    assert isinstance(counts["window_aggregates"], int) and counts["window_aggregates"] > counts["devices"]
