"""End to end over the wire: tansu, ClickHouse 18.16, the CQL server, and `millstream worker`
processes. Every test counts exactly what was stored against what the simulator sent:
raw rows under FINAL, DLQ records, and every Scylla aggregate recomputed independently."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy

from app.simulator import SimulationLog, Simulator
from tests.support.world import (
    World,
    committed_total,
    expected_latest,
    expected_windows,
    produce,
    read_dlq,
)

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(420)]


def simulate(messages: int, seed: int) -> tuple[list[tuple[bytes, bytes]], SimulationLog]:
    sim = Simulator(devices=200, seed=seed, malformed_ratio=0.02, late_ratio=0.01, out_of_order_ratio=0.03)
    traffic = list(sim.messages(messages)) + list(sim.flush())
    return traffic, sim.log


def stored_rows(world: World) -> int:
    text = world.clickhouse.query(f"SELECT count() FROM {world.database}.telemetry_raw FINAL")
    return int(text) if text.strip().isdigit() else -1


def wait_until_complete(world: World, log: SimulationLog, sent: int, timeout: float = 180) -> None:
    """Until every message is committed and every row is in ClickHouse (or time runs out)."""
    deadline = time.monotonic() + timeout
    committed = rows = -1
    while time.monotonic() < deadline:
        for worker in world.workers:
            assert worker.proc is not None and worker.proc.poll() is None, f"worker died:\n{worker.tail()}"
        committed = asyncio.run(committed_total(world.broker.bootstrap, f"{world.name}-group", world.topic))
        rows = stored_rows(world)
        if committed >= sent and rows >= log.expected_rows:
            return
        time.sleep(1)
    raise AssertionError(f"incomplete after {timeout}s: committed {committed}/{sent}, rows {rows}/{log.expected_rows}")


def assert_exact(world: World, log: SimulationLog, sent: int, *, crashed: bool = False) -> None:
    assert log.valid_readings >= 20_000 and log.malformed > 100
    assert asyncio.run(committed_total(world.broker.bootstrap, f"{world.name}-group", world.topic)) == sent

    # 1. ClickHouse: one row per (valid reading, metric), no more, no fewer, after FINAL.
    assert stored_rows(world) == log.expected_rows
    distinct = world.clickhouse.query(
        f"SELECT count() FROM (SELECT DISTINCT device_id, event_ms, metric FROM {world.database}.telemetry_raw)"
    )
    assert int(distinct) == log.expected_rows

    # 2. DLQ: exactly the malformed messages, each with a reason and its origin.
    records = asyncio.run(read_dlq(world.broker.bootstrap, world.dlq_topic, log.malformed))
    if not crashed:
        # After a kill -9 a record may repeat if the kill fell between the DLQ write and the
        # changelog write of the DLQ progress; its headers name the origin for deduplication.
        assert len(records) == log.malformed
    origins = set()
    for record in records:
        headers = dict(record.headers)
        assert headers["millstream.reason"] and headers["millstream.detail"]
        origins.add((headers["millstream.source.partition"], headers["millstream.source.offset"]))
    assert len(origins) == log.malformed  # every malformed message, and nothing else

    # 3. ScyllaDB: every window aggregate equals the one computed from what was sent.
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    cluster = Cluster(
        ["127.0.0.1"], port=world.cql.port, protocol_version=4, execution_profiles={EXEC_PROFILE_DEFAULT: profile}
    )
    session = cluster.connect()
    try:
        windows = {
            (r.device_id, r.metric, r.window_size_s, int(r.window_start.timestamp() * 1000)): r
            for r in session.execute(f"SELECT * FROM {world.name}.window_aggregates")
        }
        latest = {(r.device_id, r.metric): r for r in session.execute(f"SELECT * FROM {world.name}.latest_values")}
    finally:
        cluster.shutdown()
    expected = expected_windows(log)
    assert set(windows) == set(expected)
    wrong = []
    for key, (count, total, low, high, last, _last_ms) in expected.items():
        row = windows[key]
        if (row.count, row.min, row.max, row.last_value) != (count, low, high, last) or not math.isclose(
            row.sum, total, rel_tol=1e-9, abs_tol=1e-9
        ):
            wrong.append((key, (row.count, row.sum, row.min, row.max, row.last_value), (count, total, low, high, last)))
    assert not wrong, f"{len(wrong)} wrong aggregates, e.g. {wrong[:3]}"
    want_latest = expected_latest(log)
    assert {k: (r.value, int(r.event_time.timestamp() * 1000)) for k, r in latest.items()} == want_latest


def produce_in_background(world: World, traffic: list[tuple[bytes, bytes]], rate: float) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: asyncio.run(produce(world.broker.bootstrap, world.topic, traffic, rate=rate)), daemon=True
    )
    thread.start()
    return thread


def test_two_workers_store_exactly_what_was_sent(world: World) -> None:
    traffic, log = simulate(9000, seed=11)
    first, second = world.start_worker(), world.start_worker()
    first.wait_ready()
    second.wait_ready()
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, traffic))
    wait_until_complete(world, log, sent)
    assert_exact(world, log, sent)


def test_kill9_mid_stream_then_restart(world: World) -> None:
    traffic, log = simulate(9000, seed=12)
    worker = world.start_worker()
    worker.wait_ready()
    producer = produce_in_background(world, traffic, rate=1500)
    deadline = time.monotonic() + 60
    while stored_rows(world) < log.expected_rows // 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 0 < stored_rows(world) < log.expected_rows, "the kill must land mid-stream"
    worker.kill9()
    time.sleep(2)
    worker.start()
    producer.join(60)
    wait_until_complete(world, log, len(traffic))
    assert_exact(world, log, len(traffic), crashed=True)


def test_scylla_write_timeouts_for_ten_seconds(world: World) -> None:
    traffic, log = simulate(9000, seed=13)
    worker = world.start_worker()
    worker.wait_ready()
    producer = produce_in_background(world, traffic, rate=1500)
    time.sleep(1.5)
    world.cql.faults.inject("write_timeout", seconds=10)
    producer.join(60)
    injected = world.cql.faults.injected
    wait_until_complete(world, log, len(traffic))
    assert injected > 0, "no write met the injected timeouts"
    assert_exact(world, log, len(traffic))


def test_clickhouse_stopped_for_ten_seconds(world: World) -> None:
    traffic, log = simulate(9000, seed=14)
    worker = world.start_worker()
    worker.wait_ready()
    producer = produce_in_background(world, traffic, rate=1500)
    deadline = time.monotonic() + 60
    while stored_rows(world) <= 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    world.clickhouse.stop()
    time.sleep(10)
    world.clickhouse.start()
    producer.join(60)
    wait_until_complete(world, log, len(traffic))
    assert_exact(world, log, len(traffic))


def test_fatal_sink_error_crashes_the_worker_and_commits_nothing(world: World) -> None:
    traffic, _ = simulate(300, seed=15)
    asyncio.run(produce(world.broker.bootstrap, world.topic, traffic))
    # An unknown ClickHouse user is UNKNOWN_USER (192): retrying cannot help.
    bad_url = world.clickhouse.url(world.database).replace("default@", "nobody@")
    worker = world.start_worker(MILLSTREAM_CLICKHOUSE__URL=bad_url)
    assert worker.proc is not None
    code = worker.proc.wait(90)
    assert code != 0
    assert "UNKNOWN_USER" in worker.tail(200)
    assert asyncio.run(committed_total(world.broker.bootstrap, f"{world.name}-group", world.topic)) == 0
    assert stored_rows(world) <= 0
