"""cassandra-driver against the project's CQL protocol server, over TCP.

The server stands in for ScyllaDB; these tests pin the behaviour millstream's Scylla sink relies
on: prepared upserts keyed by primary key, batches, server-side type validation, and each
injected fault surfacing as the exception a real cluster would produce in the driver.
"""

from __future__ import annotations

import datetime as dt
import struct
import time
from collections.abc import Iterator

import pytest
from cassandra import InvalidRequest, OperationTimedOut, WriteTimeout
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.connection import ConnectionShutdown
from cassandra.policies import RoundRobinPolicy
from cassandra.protocol import OverloadedErrorMessage
from cassandra.query import BatchStatement

from tests.support.cql import CqlServer

pytestmark = [pytest.mark.cql, pytest.mark.timeout(60)]

T0 = dt.datetime(2024, 1, 15, 10, 30)


@pytest.fixture
def session(cql_faults: CqlServer) -> Iterator[Session]:
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    cluster = Cluster(
        ["127.0.0.1"], port=cql_faults.port, protocol_version=4,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=5,
    )  # fmt: skip
    session = cluster.connect()
    session.execute(
        "CREATE KEYSPACE IF NOT EXISTS smoke WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    session.execute(
        "CREATE TABLE IF NOT EXISTS smoke.windows (device_id text, metric text, size_s int, "
        "window_start timestamp, count bigint, total double, PRIMARY KEY ((device_id, metric, size_s), window_start))"
        " WITH CLUSTERING ORDER BY (window_start DESC)"
    )
    session.execute("TRUNCATE smoke.windows")
    yield session
    cluster.shutdown()


INSERT = "INSERT INTO smoke.windows (device_id, metric, size_s, window_start, count, total) VALUES (?, ?, ?, ?, ?, ?)"


def test_prepared_upsert_select_and_batch(session: Session) -> None:
    insert = session.prepare(INSERT)
    for minute in range(3):
        session.execute(insert, ("d1", "temperature", 60, T0 + dt.timedelta(minutes=minute), minute + 1, 2.0))
    # Same primary key again: an upsert replaces, it does not add a row.
    session.execute(insert, ("d1", "temperature", 60, T0, 10, 99.5))
    update = session.prepare(
        "UPDATE smoke.windows SET count = ? WHERE device_id = ? AND metric = ? AND size_s = ? AND window_start = ?"
    )
    session.execute(update, (11, "d1", "temperature", 60, T0))

    batch = BatchStatement()
    batch.add(insert, ("d2", "humidity", 60, T0, 1, 50.0))
    batch.add(insert, ("d2", "humidity", 60, T0 + dt.timedelta(minutes=1), 2, 51.0))
    session.execute(batch)

    rows = list(session.execute("SELECT window_start, count, total FROM smoke.windows "
                                "WHERE device_id = 'd1' AND metric = 'temperature' AND size_s = 60"))  # fmt: skip
    # Clustered newest first, as the table declares.
    assert [(r.window_start, r.count, r.total) for r in rows] == [
        (T0 + dt.timedelta(minutes=2), 3, 2.0),
        (T0 + dt.timedelta(minutes=1), 2, 2.0),
        (T0, 11, 99.5),
    ]
    assert session.execute("SELECT count(*) FROM smoke.windows").one().count == 5
    select = session.prepare("SELECT count FROM smoke.windows WHERE device_id = ? AND metric = ? AND size_s = ?")
    assert [r.count for r in session.execute(select, ("d2", "humidity", 60))] == [2, 1]


def test_clustering_slices_with_a_bound_limit(session: Session) -> None:
    """What the lookup API asks (sinks/scylla.py SELECT_WINDOWS), and what a server refuses."""
    insert = session.prepare(INSERT)
    for minute in range(10):
        session.execute(insert, ("d1", "t", 60, T0 + dt.timedelta(minutes=minute), minute, 1.0))
    select = session.prepare(
        "SELECT count FROM smoke.windows WHERE device_id = ? AND metric = ? AND size_s = ? "
        "AND window_start >= ? AND window_start < ? LIMIT ?"
    )
    rows = session.execute(select, ("d1", "t", 60, T0 + dt.timedelta(minutes=2), T0 + dt.timedelta(minutes=8), 4))
    assert [r.count for r in rows] == [7, 6, 5, 4]  # the slice [2, 8), newest first, four of them
    with pytest.raises(InvalidRequest, match="Only clustering key columns can be restricted with a slice"):
        session.execute("SELECT count FROM smoke.windows WHERE device_id = 'd1' AND metric = 't' AND size_s > 5")
    with pytest.raises(InvalidRequest, match="restrict the partition key"):
        session.execute("SELECT count FROM smoke.windows WHERE window_start > '2024-01-15 10:30:00'")
    with pytest.raises(InvalidRequest, match="LIMIT must be strictly positive"):
        session.execute(select, ("d1", "t", 60, T0, T0 + dt.timedelta(minutes=8), 0))


def test_wrongly_typed_values_are_rejected_by_the_server(session: Session) -> None:
    # A literal of the wrong kind (the driver interpolates simple statements client-side).
    with pytest.raises(InvalidRequest, match="Invalid STRING constant"):
        session.execute(
            "INSERT INTO smoke.windows (device_id, metric, size_s, window_start) VALUES (%s, %s, %s, %s)",
            ("d1", "temperature", "sixty", T0),
        )
    # A bound value whose bytes do not fit the column type (8 bytes for an int column).
    bound = session.prepare(INSERT).bind(("d1", "temperature", 60, T0, 1, 1.0))
    bound.values[2] = struct.pack(">q", 60)
    with pytest.raises(InvalidRequest, match="Expected 4 or 0 byte int"):
        session.execute(bound)
    with pytest.raises(InvalidRequest, match="partition key parts are missing"):
        session.execute("INSERT INTO smoke.windows (device_id, metric, window_start) VALUES ('d', 'm', 0)")
    assert session.execute("SELECT count(*) FROM smoke.windows").one().count == 0


def test_injected_write_timeout(session: Session, cql_faults: CqlServer) -> None:
    insert = session.prepare(INSERT)
    cql_faults.faults.inject("write_timeout", count=1)
    with pytest.raises(WriteTimeout):
        session.execute(insert, ("d1", "temperature", 60, T0, 1, 1.0))
    session.execute(insert, ("d1", "temperature", 60, T0, 1, 1.0))  # the fault was for one request
    assert session.execute("SELECT count(*) FROM smoke.windows").one().count == 1


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("unavailable", "Unavailable"), ("overloaded", OverloadedErrorMessage.__name__)],
)
def test_injected_faults_exhaust_the_single_host(
    session: Session, cql_faults: CqlServer, kind: str, expected: str
) -> None:
    """With one node, the driver's retry on the next host ends in NoHostAvailable wrapping the cause."""
    insert = session.prepare(INSERT)
    cql_faults.faults.inject(kind, count=1)
    with pytest.raises(NoHostAvailable) as caught:
        session.execute(insert, ("d1", "temperature", 60, T0, 1, 1.0))
    causes = list(caught.value.errors.values())
    assert [type(c).__name__ for c in causes] == [expected]
    assert session.execute("SELECT count(*) FROM smoke.windows").one().count == 0


def test_dropped_connection_fails_the_request_and_the_driver_reconnects(
    session: Session, cql_faults: CqlServer
) -> None:
    insert = session.prepare(INSERT)
    cql_faults.faults.inject("drop", count=1)
    with pytest.raises((NoHostAvailable, ConnectionShutdown)):
        session.execute(insert, ("d1", "temperature", 60, T0, 1, 1.0))
    assert cql_faults.rows("smoke", "windows") == []  # the server's own view: nothing applied
    deadline = time.monotonic() + 20
    while True:  # the pool comes back by itself once the node answers again
        try:
            session.execute(insert, ("d1", "temperature", 60, T0, 1, 1.0))
            break
        except NoHostAvailable:
            assert time.monotonic() < deadline, "driver did not reconnect to the CQL server"
            time.sleep(0.2)
    assert session.execute("SELECT count(*) FROM smoke.windows").one().count == 1


def test_slow_response_times_out(session: Session, cql_faults: CqlServer) -> None:
    insert = session.prepare(INSERT)
    cql_faults.faults.inject("delay", delay_s=1.5, count=1)
    with pytest.raises(OperationTimedOut):
        session.execute(insert, ("d1", "temperature", 60, T0, 1, 1.0), timeout=0.5)


def test_write_timestamps_decide_which_write_wins(session: Session) -> None:
    """USING TIMESTAMP: an older write that arrives late does not overwrite a newer one."""
    upsert = session.prepare(INSERT + " USING TIMESTAMP ?")
    session.execute(upsert, ("d1", "temperature", 60, T0, 5, 50.0, 200))
    session.execute(upsert, ("d1", "temperature", 60, T0, 3, 30.0, 100))  # a zombie's late write
    row = session.execute("SELECT count, total FROM smoke.windows").one()
    assert (row.count, row.total) == (5, 50.0)
    session.execute(upsert, ("d1", "temperature", 60, T0, 7, 70.0, 300))
    row = session.execute("SELECT count, total FROM smoke.windows").one()
    assert (row.count, row.total) == (7, 70.0)
