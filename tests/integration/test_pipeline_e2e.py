"""End to end over the wire: tansu, ClickHouse 18.16, the CQL server, and `millstream worker`
processes. Every test counts exactly what was stored against what the simulator sent:
raw rows under FINAL, DLQ records, and every Scylla aggregate recomputed independently."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.tools.simulator import SimulationLog
from tests.support.audit import (
    audit,
    committed,
    produce_in_background,
    simulate,
    stored_rows,
    table_exists,
    wait_until_complete,
)
from tests.support.world import World, committed_total, produce

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(420)]


def assert_exact(world: World, log: SimulationLog, sent: int, *, crashed: bool = False) -> None:
    assert log.valid_readings >= 20_000 and log.malformed > 100
    result = audit(world, log, sent, scenario="e2e", recovery_s=0)
    assert result.ok, result.as_dict()
    # Every row names a distinct reading (FINAL collapsed nothing it should have kept).
    distinct = world.clickhouse.query(
        f"SELECT count() FROM (SELECT DISTINCT device_id, event_ms, metric FROM {world.database}.telemetry_raw)"
    )
    assert int(distinct) == log.expected_rows
    if not crashed:
        # After a kill -9 a DLQ record may repeat if the kill fell between the DLQ write and
        # the changelog write of the DLQ progress; its headers name the origin for deduplication.
        assert result.dlq_records == log.malformed
    assert result.aggregates_checked > 1000 and result.latest_checked > 400


def test_two_workers_store_exactly_what_was_sent(world: World) -> None:
    traffic, log = simulate(9000, seed=11)
    first, second = world.start_worker(), world.start_worker()
    first.wait_ready()
    second.wait_ready()
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, traffic))
    wait_until_complete(world, log, sent)
    assert_exact(world, log, sent)


@pytest.mark.parametrize("store", ["rocksdb", "memory"])
def test_a_backlog_in_full_batches_is_stored_exactly(world: World, store: str) -> None:
    """A worker catching up on a backlog, as after any restart: batches fill to the default
    5000 messages, mix all partitions, and meet the same devices again and again.

    Regression: a full batch is handed over from the read loop, so its task inherited the
    last event read, and the RocksDB state was read from *that* event's partition: most
    devices' states were not found and their aggregates restarted from empty (the timer's
    batches, and the memory store, were right). memory is the other supported store: its
    state is rebuilt from the changelog at every start.
    """
    traffic, log = simulate(16000, seed=11)
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, traffic))
    worker = world.start_worker(MILLSTREAM_STORE=store)
    worker.wait_ready()
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
    worker = world.start_worker(supervised=False, MILLSTREAM_CLICKHOUSE__URL=bad_url)
    assert worker.proc is not None
    code = worker.proc.wait(90)
    assert code != 0
    assert "UNKNOWN_USER" in worker.tail(200)
    assert asyncio.run(committed_total(world.broker.bootstrap, f"{world.name}-group", world.topic)) == 0
    assert not table_exists(world)  # the DDL was refused too: not a row went anywhere


def test_records_without_a_value_go_to_the_dlq_and_the_rest_is_stored(world: World) -> None:
    """Regression: a tombstone (a record whose value is null) made the worker raise when it
    dead-lettered it (len(None)), before its offset was committed, so every worker that took
    the partition crashed on the same record. Now it is rejected as undecodable and kept in
    the DLQ as it came, between ordinary messages."""
    from tests.support.world import read_topic

    now = int(time.time() * 1000)
    ok = [orjson_doc("press-1", now - 2000 + i, 20.0 + i) for i in range(2)]
    # (aiokafka refuses a record with neither key nor value; Kafka would take it)
    messages = [(b"press-1", ok[0]), (b"press-1", None), (b"press-2", None), (b"press-1", ok[1])]
    worker = world.start_worker()
    worker.wait_ready()
    asyncio.run(produce(world.broker.bootstrap, world.topic, messages))  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while committed(world) < len(messages):
        assert time.monotonic() < deadline, f"not committed; worker log:\n{worker.tail()}"
        time.sleep(0.2)
    assert worker.proc.poll() is None and worker.starts == 1  # never crashed
    dead = asyncio.run(read_topic(world.broker.bootstrap, world.dlq_topic, 2, wait_s=20))
    assert sorted((r.key, r.value) for r in dead) == [(b"press-1", None), (b"press-2", None)]
    assert {dict(r.headers)["millstream.reason"] for r in dead} == {b"undecodable"}
    assert all(b"tombstone" in dict(r.headers)["millstream.detail"] for r in dead)
    rows = world.clickhouse.query(f"SELECT count() FROM {world.database}.telemetry_raw FINAL")
    assert int(rows) == 2


def orjson_doc(device: str, at_ms: int, value: float) -> bytes:
    import orjson

    return orjson.dumps({"device_id": device, "ts": at_ms, "metrics": {"temperature": value}})
