"""Aggregates to ScyllaDB in UNLOGGED BATCHes, their values serialized by millstream's own
encoder (sinks/scylla.py): the same bytes as the driver's ``bind``, the same rows stored, far
fewer requests. The real cassandra-driver against the CQL test server, which validates every
bound value against its column's type."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import metrics
from app.settings import ScyllaSettings
from models.rows import AggregateBatch
from sinks.base import FatalSinkError
from sinks.scylla import ScyllaAggregateWriter, write_version
from tests.support.cql import CqlServer

pytestmark = [pytest.mark.cql, pytest.mark.timeout(180)]

START = 1_764_000_000_000  # ms
INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(min_size=1, max_size=30)  # any Unicode, as device ids and metric names may be
DOUBLE = st.floats(allow_nan=True, allow_infinity=True)


class Writer:
    def __init__(self, server: CqlServer, keyspace: str, **overrides: Any) -> None:
        self.server, self.keyspace = server, keyspace
        self.loop = asyncio.new_event_loop()
        scylla = ScyllaSettings(
            contact_points=["127.0.0.1"], port=server.port, keyspace=keyspace, replication_class="SimpleStrategy",
            replication_factor=1, consistency="ONE", shadow_check_every=0, **overrides,
        )  # fmt: skip
        self.writer = ScyllaAggregateWriter(scylla, "telemetry")
        self.loop.run_until_complete(self.writer.start())

    def write(self, batch: AggregateBatch) -> None:
        self.loop.run_until_complete(self.writer.write(batch))

    def rows(self, table: str) -> list[dict[str, Any]]:
        return self.server.rows(self.keyspace, table)

    def close(self) -> None:
        self.loop.run_until_complete(self.writer.close())
        self.loop.close()


@pytest.fixture
def writer(cql_server: CqlServer, request: pytest.FixtureRequest) -> Iterator[Writer]:
    keyspace = "batches_" + request.node.name.split("[")[0].removeprefix("test_")[:30]
    opened = Writer(cql_server, keyspace)
    yield opened
    opened.close()


def requests_sent() -> float:
    return metrics.SCYLLA_WRITE_REQUESTS._value.get()


def windows(devices: int, metrics_per_device: int, offset: int = 0) -> list[Any]:
    return [
        (f"dev-{d}", f"m{m}", 60, START, START + 60_000, 2, 3.0, 1.0, 2.0, 2.0, START + 1000, offset + d)
        for d in range(devices) for m in range(metrics_per_device)
    ]  # fmt: skip


def latest(devices: int, metrics_per_device: int, offset: int = 0) -> list[Any]:
    return [
        (f"dev-{d}", f"m{m}", float(m), START + 1000, offset + d)
        for d in range(devices) for m in range(metrics_per_device)
    ]  # fmt: skip


def test_many_devices_need_few_requests_and_every_row_is_stored(writer: Writer) -> None:
    batch = AggregateBatch(windows=windows(500, 3), latest=latest(500, 3))
    before = requests_sent()
    writer.write(batch)
    sent = requests_sent() - before
    assert sent == math.ceil(3000 / writer.writer.settings.batch_rows)  # 50 rows a request by default
    stored = {(r["device_id"], r["metric"]): r for r in writer.rows("window_aggregates")}
    assert len(stored) == 1500 and len(writer.rows("latest_values")) == 1500
    assert stored[("dev-499", "m2")]["source_offset"] == 499
    assert stored[("dev-499", "m2")]["window_start"] == START


def test_a_batch_never_crosses_partitions_when_told_not_to(cql_server: CqlServer) -> None:
    opened = Writer(cql_server, "batches_single_partition", batch_across_partitions=False)
    try:
        before = requests_sent()
        opened.write(AggregateBatch(windows=windows(20, 3), latest=latest(20, 3)))
        # 60 window partitions of one row each, 20 latest-value partitions of three rows each
        assert requests_sent() - before == 60 + 20
        assert len(opened.rows("window_aggregates")) == 60 and len(opened.rows("latest_values")) == 60
    finally:
        opened.close()


def test_rows_in_batches_keep_last_write_wins_by_version(writer: Writer) -> None:
    writer.write(AggregateBatch(windows=windows(100, 1, offset=1000), latest=latest(100, 1, offset=1000)))
    stale = [(*row[:5], 1, 1.0, 1.0, 1.0, 1.0, START, row[11] - 500) for row in windows(100, 1, offset=1000)]
    writer.write(AggregateBatch(windows=stale))  # a zombie's older versions, batched the same way
    assert {r["count"] for r in writer.rows("window_aggregates")} == {2}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    device=TEXT, metric=TEXT, size=st.integers(-(2**31), 2**31 - 1), start=INT64, end=INT64, count=INT64,
    values=st.tuples(DOUBLE, DOUBLE, DOUBLE, DOUBLE), last_ms=INT64, offset=st.integers(0, 2**40 - 1),
)  # fmt: skip
def test_the_encoder_gives_the_drivers_bytes(
    writer: Writer, device: str, metric: str, size: int, start: int, end: int, count: int,
    values: tuple[float, float, float, float], last_ms: int, offset: int,
) -> None:  # fmt: skip
    row = (device, metric, size, start, end, count, *values, last_ms, offset, write_version(0, offset))
    w = writer.writer
    assert w._window_encoder.fast
    assert w._window_encoder.bound(row).values == w._upsert_window.bind(row).values
    latest_row = (device, metric, values[0], last_ms, offset, write_version(0, offset))
    assert w._latest_encoder.bound(latest_row).values == w._upsert_latest.bind(latest_row).values


def test_a_value_that_does_not_fit_its_column_is_a_clear_fatal_error(writer: Writer) -> None:
    row = ("dev", "m", 2**31, START, START, 1, 1.0, 1.0, 1.0, 1.0, START, 1, 1)  # window_size_s is a CQL int
    with pytest.raises(FatalSinkError, match="does not fit its columns"):
        writer.writer._window_encoder.bound(row)


def test_a_row_with_a_null_goes_through_the_drivers_bind(writer: Writer) -> None:
    row = ("dev", "m", None, START, 1, 1)
    bound = writer.writer._latest_encoder.bound(row)
    assert bound.values == writer.writer._upsert_latest.bind(row).values


def test_a_batch_built_from_items_is_the_batch_the_driver_builds(writer: Writer) -> None:
    """The writer adds serialized rows to a BatchStatement without building a bound statement
    each (RowEncoder.add_to): the same statements, values and routing as batch.add() of the
    driver's own bound statements, for window rows (a composite partition key) and latest
    values (a single-column one)."""
    from cassandra.query import BatchStatement, BatchType

    w = writer.writer
    cases = [
        (w._window_encoder, w._upsert_window, [(*row, write_version(0, row[11])) for row in windows(3, 2, offset=5)]),
        (w._latest_encoder, w._upsert_latest, [(*row, write_version(0, row[4])) for row in latest(3, 2, offset=5)]),
    ]
    for encoder, prepared, rows in cases:
        ours, theirs = BatchStatement(batch_type=BatchType.UNLOGGED), BatchStatement(batch_type=BatchType.UNLOGGED)
        for row in rows:
            encoder.add_to(ours, encoder.item(row))
            theirs.add(prepared.bind(row))
        assert ours._statements_and_parameters == theirs._statements_and_parameters
        assert ours.routing_key == theirs.routing_key is not None
        assert ours.keyspace == theirs.keyspace == writer.keyspace
