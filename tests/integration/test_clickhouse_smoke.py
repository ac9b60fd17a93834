"""The table millstream writes, on ClickHouse 18.16 over asynch and on current ClickHouse
(chdb): the production DDL and writer, and the deduplication everything relies on."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from app.settings import ClickHouseSettings
from models.rows import RawBatch, RawRow
from sinks.clickhouse import ClickHouseRawWriter, EmbeddedRawWriter
from tests.support.servers import ClickHouseServer

T = 1_705_314_600
FIRST: RawRow = ("d1", "f", "l", "loc", "temperature", 21.5, T, T * 1000 + 123, T + 1, 3, 42, 0)
ROWS = [
    FIRST,
    ("d1", "f", "l", "loc", "humidity", 60.0, T, T * 1000 + 123, T + 1, 3, 42, 0),
    ("d2", "f", "l", "loc", "temperature", 19.0, T + 60, (T + 60) * 1000, T + 61, 1, 7, 0),
]
# A replay (same rows again) and a re-send under a new offset: both must collapse under FINAL.
AGAIN = [*ROWS, (*FIRST[:9], 3, 99, 0)]


async def stored(writer: ClickHouseRawWriter | EmbeddedRawWriter, sql: str) -> str:
    if isinstance(writer, EmbeddedRawWriter):
        return str(bytes((await writer._run(sql)).bytes()).decode().strip())
    conn = await writer._connect()
    async with conn.cursor() as cursor:
        await cursor.execute(sql)
        return "\n".join(",".join(str(v) for v in row) for row in await cursor.fetchall())


async def check_the_table_collapses_replays(writer: ClickHouseRawWriter | EmbeddedRawWriter) -> None:
    await writer.start()
    await writer.start()  # the DDL is idempotent: every worker runs it at start
    try:
        await writer.write(RawBatch(list(ROWS), "telemetry/3:42-42"))
        await writer.write(RawBatch(list(AGAIN), "telemetry/3:42-99"))
        table = f"{writer.database}.{writer.table}"
        # Before a merge the replays are still there (7 rows on 18.16; current servers collapse
        # equal keys inside one insert already, optimize_on_insert: 6).
        assert int(await stored(writer, f"SELECT count() FROM {table}")) in (6, 7)
        assert await stored(writer, f"SELECT count() FROM {table} FINAL") == "3"
        text = await stored(writer, f"SELECT device_id, metric, value FROM {table} FINAL ORDER BY device_id, metric")
        rows = [(device, metric, float(value)) for device, metric, value in
                (line.replace('"', "").split(",") for line in text.splitlines())]  # fmt: skip
        assert rows == [("d1", "humidity", 60.0), ("d1", "temperature", 21.5), ("d2", "temperature", 19.0)]
    finally:
        await writer.close()


@pytest.mark.clickhouse
@pytest.mark.timeout(60)
async def test_the_production_table_on_clickhouse_18(clickhouse_server: ClickHouseServer) -> None:
    database = f"smoke_{uuid.uuid4().hex[:8]}"
    writer = ClickHouseRawWriter(ClickHouseSettings(url=clickhouse_server.url(database)))
    await check_the_table_collapses_replays(writer)
    # The server answers other clients too: through its own client, not the driver.
    assert clickhouse_server.query(f"SELECT count() FROM {database}.telemetry_raw FINAL").strip() == "3"


@pytest.mark.chdb
@pytest.mark.timeout(60)
async def test_the_production_table_on_current_clickhouse(tmp_path: Path) -> None:
    await check_the_table_collapses_replays(EmbeddedRawWriter(ClickHouseSettings(url=f"chdb://{tmp_path}")))
