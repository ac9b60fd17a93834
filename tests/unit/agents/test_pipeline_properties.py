"""The pipeline over days of unruly factory traffic, with crashes, against an independent model.

hypothesis writes a program: devices that send in every shape, add and drop metrics, fall
silent for hours, send late and out of order, re-send, have broken clocks (year 1, epoch 0,
far future, Kafka record timestamps 0 and -1); batches cut anywhere; and crashes at any point.
A crash loses any unacknowledged tail of the changelog, and the state comes back either from
the pod's own RocksDB (everything it wrote, possibly ahead of the changelog) or, on another
pod or with the memory store, from the changelog as it survived; everything uncommitted is
replayed by a new pipeline.

Invariants: ``process`` never raises; nothing is isolated as an internal error; every window
aggregate and latest value in the ScyllaDB double (last write by write timestamp) equals the
recomputation in :mod:`tests.support.oracle`; every message is stored (its rows present) or
dead-lettered with a reason, never both and never neither; the deliberately bad ones are
dead-lettered.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agents.pipeline import Pipeline
from agents.windows import WindowPolicy
from models.decode import Decoder
from models.records import RejectReason, SourceMessage
from models.rows import AggregateBatch, RawBatch
from sinks.base import RetryPolicy
from tests.support.oracle import WindowRules, expected

NOW_MS = 1_800_000_000_000
HOUR = 3_600_000
METRICS = ("t", "h", "p", "rpm", "vib", "kw")
DEVICES = ("press-01", "robot-7", "Förderband-Ω", "oven 3")
RULES = WindowRules()  # millstream's defaults: 1 min and 1 h windows, 60 s grace, 300 s dedup


class Store:
    """A table: the local store, and every put also on the shared changelog."""

    def __init__(self, name: str, changelog: list[tuple[str, bytes, bytes]], data: dict[bytes, bytes]) -> None:
        self.name, self.changelog, self.data = name, changelog, dict(data)

    def get(self, device_key: bytes, source: SourceMessage) -> bytes | None:
        return self.data.get(device_key)

    def put(self, device_key: bytes, value: bytes, source: SourceMessage) -> None:
        self.data[device_key] = value
        self.changelog.append((self.name, device_key, value))

    def recovered(self, local: bool) -> Store:
        """After a crash: this pod's own store as it was, or the table rebuilt from the changelog."""
        if local:
            return Store(self.name, self.changelog, self.data)
        data = {key: value for name, key, value in self.changelog if name == self.name}
        return Store(self.name, self.changelog, data)


@dataclass
class Sinks:
    raw: list[RawBatch] = field(default_factory=list)
    aggregates: list[AggregateBatch] = field(default_factory=list)
    dead: list[SourceMessage] = field(default_factory=list)


class RawSink:
    name = "clickhouse"

    def __init__(self, sinks: Sinks) -> None:
        self.sinks = sinks

    async def start(self) -> None: ...

    async def write(self, batch: RawBatch) -> None:
        self.sinks.raw.append(batch)

    async def close(self) -> None: ...


class AggregateSink(RawSink):
    name = "scylla"

    async def write(self, batch: AggregateBatch) -> None:  # type: ignore[override]
        self.sinks.aggregates.append(batch)


class DeadLetters:
    def __init__(self, sinks: Sinks) -> None:
        self.sinks = sinks

    async def send(self, messages: list[SourceMessage]) -> None:
        self.sinks.dead.extend(messages)


# ---- the program


@dataclass(frozen=True)
class Send:
    device: int
    gap_ms: int  # how far the device's clock moves first (hours: it was silent)
    metrics: tuple[str, ...]
    shape: str  # flat | nested | batched
    readings: int  # of a batched message
    spacing_ms: int  # between its readings
    behind_ms: int  # 0, a little (out of order) or hours (late)
    clock: str  # ok | year_1 | epoch_0 | far_future | record_ts_0 | record_ts_minus_1 | no_ts
    resend: int | None  # re-send the device's n-th latest message instead (a bridge retry)
    seed: int


@dataclass(frozen=True)
class Cut:
    """The batch so far is processed and committed."""


@dataclass(frozen=True)
class Crash:
    """The worker dies; ``prepared`` uncommitted messages were prepared (state stored) first.
    Of the changelog records sent since the last commit, the first ``acknowledged`` share
    survives; the state comes back from the pod's own RocksDB (``local``) or the changelog."""

    prepared: int
    acknowledged: float
    local: bool


BAD_CLOCKS = {"year_1", "epoch_0", "far_future", "record_ts_0", "record_ts_minus_1"}
sends = st.builds(
    Send,
    device=st.integers(0, len(DEVICES) - 1),
    gap_ms=st.one_of(st.integers(200, 90_000), st.integers(HOUR, 9 * HOUR), st.just(0)),
    metrics=st.lists(st.sampled_from(METRICS), min_size=1, max_size=4, unique=True).map(tuple),
    shape=st.sampled_from(["flat", "nested", "batched"]),
    readings=st.integers(1, 6),
    spacing_ms=st.integers(1, 40_000),
    behind_ms=st.one_of(st.just(0), st.just(0), st.integers(1, 120_000), st.integers(HOUR, 30 * HOUR)),
    clock=st.sampled_from(
        ["ok"] * 12 + ["year_1", "epoch_0", "far_future", "record_ts_0", "record_ts_minus_1", "no_ts"]
    ),
    resend=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 3)),
    seed=st.integers(0, 2**31),
)
crashes = st.builds(Crash, prepared=st.integers(0, 30), acknowledged=st.floats(0, 1), local=st.booleans())
# 16 sends to one cut and one crash (equal strategies in one_of would count once).
steps = st.integers(0, 17).flatmap(lambda i: sends if i < 16 else st.just(Cut()) if i == 16 else crashes)


class Factory:
    """Turns Send steps into Kafka messages, remembering what each device sent."""

    def __init__(self) -> None:
        self.clock = {device: NOW_MS - 4 * 24 * HOUR for device in DEVICES}
        self.history: dict[str, list[tuple[bytes, int]]] = {device: [] for device in DEVICES}
        self.offsets: dict[int, int] = {}
        self.bad: set[tuple[int, int]] = set()  # (partition, offset) sent deliberately bad

    def message(self, step: Send) -> SourceMessage:
        device = DEVICES[step.device]
        key = device.encode()
        partition = zlib.crc32(key) % 2
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        past = self.history[device]
        if step.resend is not None and past:
            value, record_ms = past[-1 - min(step.resend, len(past) - 1)]
            return SourceMessage("telemetry", partition, offset, key, value, record_ms)
        clock = self.clock[device] = min(self.clock[device] + step.gap_ms, NOW_MS - 60_000)
        at = max(clock - step.behind_ms, 946_684_800_000 + 10 * 24 * HOUR)
        values = [[round(math.sin(step.seed + i * 7 + j) * 10**(j % 5), 6) for j in range(len(step.metrics))]
                  for i in range(step.readings)]  # fmt: skip
        record_ms = NOW_MS - 1000
        doc: dict[str, object] = {"device_id": device, "factory": "f1" if step.device % 2 else ""}
        if step.shape == "batched":
            times = [at + i * step.spacing_ms for i in range(step.readings)]
            self.clock[device] = max(self.clock[device], min(times[-1], NOW_MS - 60_000))
            doc["readings"] = [{"ts": min(t, NOW_MS - 60_000), "metrics": dict(zip(step.metrics, v, strict=True))}
                               for t, v in zip(times, values, strict=True)]  # fmt: skip
        else:
            metrics = dict(zip(step.metrics, values[0], strict=True))
            doc.update(metrics if step.shape == "flat" else {"metrics": metrics})
            stamp = datetime.fromtimestamp(at / 1000, UTC).isoformat(timespec="milliseconds")
            doc["ts" if step.shape == "nested" else "ingestion_time"] = at if step.shape == "nested" else stamp
        if step.clock != "ok":  # one reading, its time from the broken clock (or none at all)
            doc = {"device_id": device, "metrics": dict(zip(step.metrics, values[0], strict=True))}
            stamps: dict[str, object] = {"year_1": "0001-01-01T00:00:00+01:00", "epoch_0": 0,
                                         "far_future": "9999-12-31T23:59:00-01:00"}  # fmt: skip
            if step.clock in stamps:
                doc["ts"] = stamps[step.clock]
            record_ms = {"record_ts_0": 0, "record_ts_minus_1": -1}.get(step.clock, record_ms)
        value = orjson.dumps(doc)
        if step.clock in BAD_CLOCKS:
            self.bad.add((partition, offset))
        else:
            past.append((value, record_ms))
        return SourceMessage("telemetry", partition, offset, key, value, record_ms)


def pipeline(sinks: Sinks, state: Store, progress: Store) -> Pipeline:  # a worker
    return Pipeline(
        decoder=Decoder(), windows=WindowPolicy(list(RULES.sizes_s), RULES.grace_s, RULES.retention_windows,
                                                 RULES.dedup_s),
        state=state, raw_sink=RawSink(sinks), aggregate_sink=AggregateSink(sinks), dead_letters=DeadLetters(sinks),
        retry=RetryPolicy(budget_s=1), dlq_max_consecutive=10**9, dlq_progress=progress, clock=lambda: NOW_MS / 1000,
    )  # fmt: skip


def fresh(message: SourceMessage) -> SourceMessage:
    """The same Kafka record as a replacement worker reads it again."""
    return SourceMessage(message.topic, message.partition, message.offset, message.key, message.value,
                         message.timestamp_ms)  # fmt: skip


async def run(program: list[Send | Cut | Crash]) -> tuple[Factory, Sinks, list[SourceMessage]]:
    factory, sinks = Factory(), Sinks()
    changelog: list[tuple[str, bytes, bytes]] = []
    state, progress = Store("state", changelog, {}), Store("progress", changelog, {})
    worker = pipeline(sinks, state, progress)
    sent: list[SourceMessage] = []
    uncommitted: list[SourceMessage] = []
    acknowledged = 0  # changelog records a commit waited for
    for step in [*program, Cut()]:
        if isinstance(step, Send):
            message = factory.message(step)
            sent.append(message)
            uncommitted.append(message)
        elif isinstance(step, Cut):
            if uncommitted:
                await worker.process([fresh(m) for m in uncommitted])
            uncommitted, acknowledged = [], len(changelog)
        else:
            if step.prepared and uncommitted:
                await worker.prepare([fresh(m) for m in uncommitted[: step.prepared]])  # stored, never written
            del changelog[acknowledged + int(step.acknowledged * (len(changelog) - acknowledged)) :]
            state, progress = state.recovered(step.local), progress.recovered(step.local)
            worker = pipeline(sinks, state, progress)  # a new worker: nothing remembered but the stores
    return factory, sinks, sent


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(steps, min_size=40, max_size=220))
def test_days_of_unruly_traffic_with_crashes_end_exact(program: list[Send | Cut | Crash]) -> None:
    factory, sinks, sent = asyncio.run(run(program))
    event(f"messages: {len(sent) // 25 * 25}+")
    event(f"crashes: {sum(isinstance(step, Crash) for step in program)}")

    # Every message is stored or dead-lettered, never both, never neither; the bad are dead.
    stored_offsets = {(row[9], row[10]) for batch in sinks.raw for row in batch.rows}
    dead = {(m.partition, m.offset): m for m in sinks.dead}
    assert all(m.rejection is not None and m.rejection.detail for m in dead.values())
    # Isolation is the safety net for bugs; on this input it must never be needed.
    assert not [m for m in dead.values() if m.rejection and m.rejection.reason is RejectReason.INTERNAL_ERROR]
    for message in sent:
        where = (message.partition, message.offset)
        assert (where in stored_offsets) != (where in dead), (where, message.value[:200])
    assert factory.bad <= set(dead), {w: dead.get(w) for w in factory.bad}

    # The readings that were stored, in offset order per device, are what the model gets.
    decoder = Decoder()
    readings = []
    for message in sent:
        if (message.partition, message.offset) in dead:
            continue
        decoded = decoder.decode(message.value, timestamp_ms=message.timestamp_ms, now_ms=NOW_MS)
        assert isinstance(decoded, list), decoded
        readings.extend(decoded)
    want = expected(readings, RULES)
    rows = {(row[0], row[4], row[7]) for batch in sinks.raw for row in batch.rows}
    assert rows == want.rows

    # ScyllaDB keeps, per key, the write with the highest timestamp (the source offset).
    windows: dict[tuple[str, str, int, int], tuple[object, ...]] = {}
    latest: dict[tuple[str, str], tuple[object, ...]] = {}
    for batch in sinks.aggregates:
        for row in batch.windows:
            key = row[:4]
            if key in windows and windows[key][11] == row[11]:
                assert windows[key] == row, "two writes with one timestamp must be the same value"
            if key not in windows or row[11] >= windows[key][11]:  # type: ignore[operator]
                windows[key] = row
        for cell in batch.latest:
            if cell[:2] not in latest or cell[4] >= latest[cell[:2]][4]:  # type: ignore[operator]
                latest[cell[:2]] = cell
    assert set(windows) == set(want.windows)
    for key, (count, total, low, high, last, last_ms) in want.windows.items():
        row = windows[key]
        assert (row[5], row[7], row[8], row[9], row[10]) == (count, low, high, last, last_ms), key
        assert math.isclose(row[6], total, rel_tol=1e-9, abs_tol=1e-9), key  # type: ignore[arg-type]
    assert {k: (v[2], v[3]) for k, v in latest.items()} == want.latest
    event(f"windows checked: {len(want.windows) // 100 * 100}+")
