"""What the decoder accepts, every sink stores.

hypothesis generates messages of every shape with extreme but valid content (values from
subnormal to ±1e100, timestamps across 2000..now in every notation and time zone, unicode
device ids and labels, many metrics); the pipeline decodes them and writes them through the
real writers: ClickHouse 18.16 over the native protocol, modern ClickHouse embedded (chdb) and
the CQL server (which validates every bound value like a server). No write may be refused
(the retry budget is zero: one refusal fails the example), and what ClickHouse then holds is
read back and compared row by row.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.pipeline import Pipeline
from agents.windows import WindowPolicy
from app.settings import ClickHouseSettings, ScyllaSettings
from models.decode import MAX_ABS_VALUE, METADATA_FIELDS, METRIC_NAME, MIN_EVENT_MS, Decoder
from models.records import SourceMessage
from models.rows import RawBatch
from sinks.base import RetryPolicy
from sinks.clickhouse import ClickHouseRawWriter, EmbeddedRawWriter
from sinks.scylla import ScyllaAggregateWriter
from tests.support.cql import CqlServer
from tests.support.servers import ClickHouseServer

pytestmark = [pytest.mark.clickhouse, pytest.mark.chdb, pytest.mark.cql, pytest.mark.timeout(900)]

NOW_MS = int(time.time() * 1000)


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, device_key: bytes, source: SourceMessage) -> bytes | None:
        return self.data.get(device_key)

    def put(self, device_key: bytes, value: bytes, source: SourceMessage) -> None:
        self.data[device_key] = value


class NoDLQ:
    async def send(self, messages: list[SourceMessage]) -> None:
        return None


class BothClickHouses:
    """The raw rows to the server and to the embedded engine, as one sink."""

    name = "clickhouse"

    def __init__(self, server: ClickHouseRawWriter, embedded: EmbeddedRawWriter) -> None:
        self.server, self.embedded = server, embedded

    async def start(self) -> None:
        await self.server.start()
        await self.embedded.start()

    async def write(self, batch: RawBatch) -> None:
        await self.server.write(batch)
        await self.embedded.write(batch)

    async def close(self) -> None:
        await self.server.close()
        await self.embedded.close()


@dataclass
class Sinks:
    loop: asyncio.AbstractEventLoop
    raw: BothClickHouses
    scylla: ScyllaAggregateWriter

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def _server(self, sql: str) -> list[tuple[Any, ...]]:
        conn = await self.raw.server._connect()
        async with conn.cursor() as cursor:
            await cursor.execute(sql)
            return list(await cursor.fetchall())

    def truncate(self) -> None:
        self.run(self._server(f"TRUNCATE TABLE {self.raw.server.database}.telemetry_raw"))
        self.run(self.raw.embedded._run(f"TRUNCATE TABLE {self.raw.embedded.database}.telemetry_raw"))

    def stored(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """(device, metric, event_ms, value) under FINAL, from the server and from chdb."""
        sql = "SELECT device_id, metric, event_ms, value FROM {}.telemetry_raw FINAL"
        server = [tuple(row) for row in self.run(self._server(sql.format(self.raw.server.database)))]
        query = sql.format(self.raw.embedded.database)
        query += " FORMAT JSONCompactEachRow SETTINGS output_format_json_quote_64bit_integers = 0"
        text = self.run(self.raw.embedded._run(query)).bytes().decode()
        # ClickHouse prints a large Float64 without an exponent (6.5e16 as 65436517026643790):
        # the digits of the shortest repr, which read back as a float are the same number.
        embedded = [(d, m, t, float(v)) for d, m, t, v in (orjson.loads(line) for line in text.splitlines() if line)]
        return server, embedded


@pytest.fixture(scope="module")
def sinks(
    clickhouse_server: ClickHouseServer, cql_server: CqlServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sinks]:
    name = f"p{uuid.uuid4().hex[:8]}"
    loop = asyncio.new_event_loop()
    raw = BothClickHouses(
        ClickHouseRawWriter(ClickHouseSettings(url=clickhouse_server.url(name))),
        EmbeddedRawWriter(ClickHouseSettings(url=f"chdb://{tmp_path_factory.mktemp('chdb')}")),
    )
    scylla = ScyllaAggregateWriter(
        ScyllaSettings(
            contact_points=["127.0.0.1"],
            port=cql_server.port,
            keyspace=name,
            replication_class="SimpleStrategy",
            replication_factor=1,
            consistency="ONE",
        ),
        topic="telemetry",
    )
    loop.run_until_complete(raw.start())
    loop.run_until_complete(scylla.start())
    yield Sinks(loop, raw, scylla)
    loop.run_until_complete(raw.close())
    loop.run_until_complete(scylla.close())
    loop.close()


# ---- what a device may send

device_ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=128)
labels = st.text(max_size=160)  # anything, control characters too: labels are stored as they come
metric_names = st.from_regex(METRIC_NAME, fullmatch=True).filter(lambda name: name not in METADATA_FIELDS)
values = st.one_of(
    st.floats(min_value=-MAX_ABS_VALUE, max_value=MAX_ABS_VALUE, allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, MAX_ABS_VALUE, -MAX_ABS_VALUE]),
)
metric_sets = st.dictionaries(metric_names, values, min_size=1, max_size=40)
stamps_ms = st.integers(min_value=MIN_EVENT_MS, max_value=NOW_MS)
zones = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=12)),
                         timezone(timedelta(hours=5, minutes=45)), timezone(timedelta(seconds=1))])  # fmt: skip


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[object, int]:
    """A timestamp in one of the accepted notations, and the milliseconds it means."""
    millis = draw(stamps_ms)
    kind = draw(st.sampled_from(["ms", "s", "iso", "iso_z"]))
    if kind == "ms":
        return millis, millis
    if kind == "s":
        return millis / 1000, round(millis / 1000 * 1000)
    moment = datetime.fromtimestamp(millis / 1000, UTC).replace(microsecond=(millis % 1000) * 1000)
    if kind == "iso_z":
        return moment.isoformat().replace("+00:00", "Z"), millis
    return moment.astimezone(draw(zones)).isoformat(), millis


@st.composite
def messages(draw: st.DrawFn) -> dict[str, object]:
    device = draw(device_ids)
    doc: dict[str, object] = {"device_id": device}
    for label in ("factory", "line", "location"):
        if draw(st.booleans()):
            doc[label] = draw(labels)
    shape = draw(st.sampled_from(["flat", "nested", "batched"]))
    if shape == "batched":
        readings = []
        for _ in range(draw(st.integers(1, 40))):  # 8 such messages can span far more than 100 months
            stamp, _millis = draw(timestamps())
            readings.append({"ts": stamp, "metrics": draw(metric_sets)})
        doc["readings"] = readings
        return doc
    stamp, _millis = draw(timestamps())
    doc["ts"] = stamp
    if shape == "nested":
        doc["metrics"] = draw(metric_sets)
    else:
        doc.update(draw(metric_sets))
    return doc


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(messages(), min_size=1, max_size=8))
def test_every_sink_stores_whatever_the_decoder_accepts(sinks: Sinks, batch: list[dict[str, object]]) -> None:
    decoder = Decoder()
    pipeline = Pipeline(
        decoder=decoder, windows=WindowPolicy([60, 3600], 60, 3, 300), state=MemoryStore(), raw_sink=sinks.raw,
        aggregate_sink=sinks.scylla, dead_letters=NoDLQ(), retry=RetryPolicy(budget_s=0), dlq_max_consecutive=10**9,
        clock=lambda: NOW_MS / 1000,
    )  # fmt: skip
    source = []
    for offset, doc in enumerate(batch):
        value = orjson.dumps(doc)
        device = doc["device_id"]
        assert isinstance(device, str)
        source.append(SourceMessage("telemetry", 0, offset, device.encode(), value, NOW_MS))
    sinks.truncate()
    sinks.run(pipeline.process(source))  # raises if a sink refused anything
    accepted = [m for m in source if m.rejection is None]
    sent: dict[tuple[str, str, int], set[float]] = {}
    for message in accepted:
        for reading in message.readings:
            for metric, number in reading.metrics.items():
                sent.setdefault((reading.device_id, metric, reading.event_ms), set()).add(number)
    for stored, name in zip(sinks.stored(), ("ClickHouse 18.16", "chdb"), strict=True):
        assert len(stored) == len(sent), name  # one row per reading and metric under FINAL
        for device, metric, event_ms, value in stored:
            assert value in sent[(device, metric, event_ms)], (name, device, metric, event_ms, value)


def test_a_batch_spanning_centuries_of_months_is_stored(sinks: Sinks) -> None:
    """Regression: current ClickHouse refuses an insert touching more than 100 monthly
    partitions (TOO_MANY_PARTS, retried until the worker crashed, then replayed by the next)."""
    sinks.truncate()
    rows = []
    for month in range(26 * 12):  # every month from 2000 to 2026
        at = MIN_EVENT_MS // 1000 + month * 2_629_746
        rows.append(("clock-reset", "", "", "", "m", float(month), at, at * 1000, at, 0, month, 0))
    sinks.run(sinks.raw.write(RawBatch(rows, "telemetry/0:0-311")))
    server, embedded = sinks.stored()
    assert len(server) == len(embedded) == len(rows)
