"""ClickHouse 18.16 over asynch, and the same DDL on modern ClickHouse through chdb."""

from __future__ import annotations

import uuid

import pytest
from asynch import Connection

from tests.support.servers import ClickHouseServer

# The table shape millstream relies on: a replayed row (same sorting key) collapses under FINAL.
DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    device_id String,
    metric String,
    value Float64,
    event_time DateTime,
    kafka_partition UInt16,
    kafka_offset UInt64
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (device_id, metric, event_time, kafka_partition, kafka_offset)
"""
ROWS = [
    ("sensor-001", "temperature", 25.5, 1_705_314_600, 0, 10),
    ("sensor-001", "humidity", 60.0, 1_705_314_600, 0, 10),
    ("sensor-002", "temperature", 19.0, 1_705_314_660, 1, 3),
]


@pytest.mark.clickhouse
@pytest.mark.timeout(60)
async def test_replacing_merge_tree_collapses_replays(clickhouse_server: ClickHouseServer) -> None:
    table = f"smoke_{uuid.uuid4().hex[:8]}"
    conn = Connection(host="127.0.0.1", port=clickhouse_server.tcp_port, database="default")
    await conn.connect()
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(DDL.format(table=table))
            await cursor.execute(DDL.format(table=table))  # idempotent
            insert = f"INSERT INTO {table} (device_id, metric, value, event_time, kafka_partition, kafka_offset) VALUES"
            assert await cursor.execute(insert, ROWS) == 3
            assert await cursor.execute(insert, ROWS[:2]) == 2  # a replay of the first two rows
            await cursor.execute(f"SELECT count() FROM {table}")
            assert await cursor.fetchall() == [(5,)]
            await cursor.execute(f"SELECT device_id, metric, value FROM {table} FINAL ORDER BY device_id, metric")
            assert await cursor.fetchall() == [
                ("sensor-001", "humidity", 60.0),
                ("sensor-001", "temperature", 25.5),
                ("sensor-002", "temperature", 19.0),
            ]
    finally:
        await conn.close()
    # The server answers other clients too: check through its HTTP interface, not the driver.
    assert clickhouse_server.query(f"SELECT count() FROM {table} FINAL").strip() == "3"


@pytest.mark.chdb
def test_same_ddl_on_modern_clickhouse(tmp_path: object) -> None:
    chdb_session = pytest.importorskip("chdb.session")
    session = chdb_session.Session(str(tmp_path))
    try:
        session.query(DDL.format(table="default.smoke"))
        values = ", ".join(f"('{d}', '{m}', {v}, toDateTime({t}), {p}, {o})" for d, m, v, t, p, o in ROWS)
        session.query(f"INSERT INTO default.smoke VALUES {values}")
        session.query(f"INSERT INTO default.smoke VALUES {values}")
        assert session.query("SELECT count() FROM default.smoke", "CSV").bytes().strip() == b"6"
        assert session.query("SELECT count() FROM default.smoke FINAL", "CSV").bytes().strip() == b"3"
    finally:
        session.close()


@pytest.mark.chdb
def test_production_ddl_on_modern_clickhouse(tmp_path: object) -> None:
    """millstream's telemetry_raw DDL also parses and deduplicates on current ClickHouse."""
    from sinks.clickhouse import COLUMNS, DDL_DATABASE, DDL_TABLE

    chdb_session = pytest.importorskip("chdb.session")
    session = chdb_session.Session(str(tmp_path))
    try:
        session.query(DDL_DATABASE.format(database="millstream"))
        session.query(DDL_TABLE.format(database="millstream", table="telemetry_raw"))
        session.query(DDL_TABLE.format(database="millstream", table="telemetry_raw"))  # idempotent
        row = "('d1', 'f', 'l', 'loc', 'temperature', 21.5, 1705314600, 1705314600123, 1705314601, 3, 42, 0)"
        columns = ", ".join(COLUMNS)
        for _ in range(2):  # a replay of the same reading
            session.query(f"INSERT INTO millstream.telemetry_raw ({columns}) VALUES {row}")
        count = session.query("SELECT count() FROM millstream.telemetry_raw FINAL", "CSV").bytes().strip()
        assert count == b"1"
    finally:
        session.close()
