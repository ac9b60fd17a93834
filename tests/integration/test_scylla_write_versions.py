"""ScyllaDB write versions across a move to a new topic or cluster (docs/migrations.md).

millstream's Scylla sink, through the real cassandra-driver, against the CQL test server, which
keeps a write timestamp per cell and applies last-write-wins as Scylla does. Rows are written
``USING TIMESTAMP generation << 40 | offset``; offsets start again at 0 on a new topic or
cluster, so without a generation bump every write loses against what is already stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cassandra.cluster import Cluster, Session

from app import metrics
from app.settings import MAX_WRITE_GENERATION, ScyllaSettings
from models.rows import AggregateBatch
from sinks.base import FatalSinkError
from sinks.scylla import MAX_OFFSET, ScyllaAggregateWriter, check_generation, generation_of, write_version
from tests.support.cql import CqlServer

pytestmark = [pytest.mark.cql, pytest.mark.timeout(120)]

WINDOW_START = 1_764_000_000_000  # ms


def window(count: int, offset: int) -> tuple[Any, ...]:
    return ("press-7", "temperature", 60, WINDOW_START, WINDOW_START + 60_000, count, 20.0 * count, 20.0, 20.0,
            20.0, WINDOW_START + 1000, offset)  # fmt: skip


def latest(value: float, offset: int) -> tuple[Any, ...]:
    return ("press-7", "temperature", value, WINDOW_START + 1000, offset)


def batch(count: int, offset: int) -> AggregateBatch:
    return AggregateBatch(windows=[window(count, offset)], latest=[latest(float(count), offset)])  # type: ignore[list-item]


class Keyspace:
    """One keyspace on the CQL server, with writers of any generation and topic."""

    def __init__(self, server: CqlServer, name: str) -> None:
        self.server, self.name = server, name
        self.loop = asyncio.new_event_loop()
        self.writers: list[ScyllaAggregateWriter] = []

    def writer(self, generation: int, topic: str = "telemetry", check_every: int = 1) -> ScyllaAggregateWriter:
        settings = ScyllaSettings(
            contact_points=["127.0.0.1"], port=self.server.port, keyspace=self.name,
            replication_class="SimpleStrategy", replication_factor=1, consistency="ONE",
            write_generation=generation, shadow_check_every=check_every,
        )  # fmt: skip
        writer = ScyllaAggregateWriter(settings, topic)
        self.writers.append(writer)
        self.loop.run_until_complete(writer.start())
        return writer

    def write(self, writer: ScyllaAggregateWriter, aggregates: AggregateBatch) -> None:
        self.loop.run_until_complete(writer.write(aggregates))

    def stored(self) -> tuple[int, float]:
        """(window count, latest value) as ScyllaDB now has them."""
        rows = {r["window_size_s"]: r for r in self.server.rows(self.name, "window_aggregates")}
        value = [r["value"] for r in self.server.rows(self.name, "latest_values")]
        return rows[60]["count"], value[0]

    def close(self) -> None:
        for writer in self.writers:
            self.loop.run_until_complete(writer.close())
        self.loop.close()


@pytest.fixture
def keyspace(cql_faults: CqlServer, request: pytest.FixtureRequest) -> Iterator[Keyspace]:
    name = "v_" + request.node.name.split("[")[0][5:40].lower()
    space = Keyspace(cql_faults, name)
    yield space
    space.close()


def test_a_new_topic_on_the_same_generation_freezes_the_rows_as_before_the_fix(keyspace: Keyspace) -> None:
    """The bug the generation fixes, reproduced: offsets from 0 on a new topic lose against the
    rows written from the old one, so ScyllaDB stops changing while everything else moves on.
    (Same generation and a new topic are refused at start now; this writer bypasses the check
    by reusing the topic name, as a deleted and recreated topic would.)"""
    old = keyspace.writer(0)
    keyspace.write(old, batch(count=40, offset=900_000))
    recreated = keyspace.writer(0)  # the topic was deleted and created again: offsets from 0
    keyspace.write(recreated, batch(count=3, offset=17))
    assert keyspace.stored() == (40, 40.0)  # frozen: the new writes lost


def test_a_generation_bump_makes_new_writes_win_and_keeps_stale_writers_out(keyspace: Keyspace) -> None:
    old = keyspace.writer(0)
    keyspace.write(old, batch(count=40, offset=900_000))
    moved = keyspace.writer(1, topic="telemetry-v2")  # the runbook: new topic, generation + 1
    keyspace.write(moved, batch(count=3, offset=17))
    assert keyspace.stored() == (3, 3.0)
    keyspace.write(moved, batch(count=4, offset=18))
    assert keyspace.stored() == (4, 4.0)
    # A worker of the old generation still running (its pod not yet replaced) cannot overwrite,
    # however far its offsets went.
    keyspace.write(old, batch(count=99, offset=MAX_OFFSET))
    assert keyspace.stored() == (4, 4.0)


def test_start_refuses_a_generation_that_would_be_shadowed(keyspace: Keyspace) -> None:
    keyspace.writer(0)
    keyspace.writer(2, topic="telemetry-v2")
    with pytest.raises(FatalSinkError) as below:
        keyspace.writer(1, topic="telemetry-v2")
    message = str(below.value)
    assert "MILLSTREAM_SCYLLA__WRITE_GENERATION=1 is below generation 2" in message and "\n" not in message
    with pytest.raises(FatalSinkError) as reused:
        keyspace.writer(2, topic="telemetry-v3")  # a move without a bump
    assert "already wrote topic 'telemetry-v2'" in str(reused.value) and "set 3" in str(reused.value)
    keyspace.writer(2, topic="telemetry-v2")  # the same generation and topic again: a restart, fine
    keyspace.writer(3, topic="telemetry-v3")


def test_shadowed_writes_are_counted_when_a_row_has_a_wall_clock_timestamp(keyspace: Keyspace) -> None:
    writer = keyspace.writer(0, check_every=1)
    keyspace.write(writer, batch(count=1, offset=5))
    shadowed = {t: metrics.SCYLLA_SHADOWED.labels(table=t)._value.get() for t in ("window_aggregates", "latest_values")}
    keyspace.write(writer, batch(count=2, offset=6))
    assert metrics.SCYLLA_SHADOWED.labels(table="window_aggregates")._value.get() == shadowed["window_aggregates"]
    # Another tool corrects a value without USING TIMESTAMP: the server's clock, microseconds
    # since 1970 (about generation 1600), wins against every later millstream write.
    cluster = Cluster(["127.0.0.1"], port=keyspace.server.port, protocol_version=4)
    session: Session = cluster.connect()
    try:
        session.execute(f"UPDATE {keyspace.name}.latest_values SET value = 0.5 WHERE device_id = 'press-7' "
                        "AND metric = 'temperature'")  # fmt: skip
        session.execute(f"UPDATE {keyspace.name}.window_aggregates SET count = 1000 WHERE device_id = 'press-7' AND "
                        f"metric = 'temperature' AND window_size_s = 60 AND window_start = {WINDOW_START}")  # fmt: skip
    finally:
        cluster.shutdown()
    keyspace.write(writer, batch(count=3, offset=7))
    assert keyspace.stored() == (1000, 0.5)  # the writes lost
    for table in ("window_aggregates", "latest_values"):
        assert metrics.SCYLLA_SHADOWED.labels(table=table)._value.get() == shadowed[table] + 1
    # The way out the runbook gives: a generation above the wall clock's.
    above = generation_of(time.time_ns() // 1000) + 1
    keyspace.write(keyspace.writer(above), batch(count=4, offset=8))
    assert keyspace.stored() == (4, 4.0)


def test_versions_order_by_generation_first_and_stay_a_cql_bigint() -> None:
    assert write_version(0, 900_000) < write_version(1, 0) < write_version(1, 1)
    assert write_version(MAX_WRITE_GENERATION, MAX_OFFSET) < 2**63
    assert generation_of(write_version(7, 12345)) == 7
    with pytest.raises(FatalSinkError):
        write_version(0, MAX_OFFSET + 1)
    assert check_generation(0, "t", {}) is None
    assert check_generation(MAX_WRITE_GENERATION + 1, "t", {}) is not None
