"""The pipeline with test sinks for each failure mode: failing, backpressured, fatal, blocking."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from agents.pipeline import Pipeline, PipelineHalted
from agents.windows import WindowPolicy
from models.decode import Decoder
from models.records import RejectReason, SourceMessage
from sinks.base import FatalSinkError, RetriableSinkError, RetryPolicy
from sinks.clickhouse import RawBatch
from sinks.scylla import AggregateBatch

NOW = 1_705_314_600.0
T0 = int(NOW * 1000) - 30_000


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.puts: list[tuple[bytes, int]] = []

    def get(self, device_key: bytes) -> bytes | None:
        return self.data.get(device_key)

    def put(self, device_key: bytes, value: bytes, source: SourceMessage) -> None:
        self.data[device_key] = value
        self.puts.append((device_key, source.partition))


class RecordingSink:
    """Records successful writes; fails as scripted first."""

    def __init__(self, name: str, failures: list[Exception] | None = None) -> None:
        self.name = name
        self.failures = list(failures or [])
        self.writes: list[object] = []
        self.attempts = 0

    async def start(self) -> None:
        pass

    async def write(self, batch: object) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.writes.append(batch)

    async def close(self) -> None:
        pass


class BlockingSink(RecordingSink):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = asyncio.Event()

    async def write(self, batch: object) -> None:
        await self.release.wait()
        await super().write(batch)


class RecordingDLQ:
    def __init__(self) -> None:
        self.sent: list[SourceMessage] = []

    async def send(self, messages: list[SourceMessage]) -> None:
        self.sent.extend(messages)


async def no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def make(raw: RecordingSink | None = None, agg: RecordingSink | None = None, **kwargs: object) -> Pipeline:
    defaults: dict[str, object] = {
        "decoder": Decoder(),
        "windows": WindowPolicy([60, 3600], 60, 3),
        "state": MemoryStore(),
        "raw_sink": raw or RecordingSink("clickhouse"),
        "aggregate_sink": agg or RecordingSink("scylla"),
        "dead_letters": RecordingDLQ(),
        "retry": RetryPolicy(budget_s=5, sleep=no_sleep),
        "dlq_max_consecutive": 100,
        "clock": lambda: NOW,
    }
    defaults.update(kwargs)
    return Pipeline(**defaults)  # type: ignore[arg-type]


def message(offset: int, doc: object, key: bytes | None = b"d1", partition: int = 0) -> SourceMessage:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return SourceMessage("telemetry", partition, offset, key, value, T0)


def good(offset: int, at_ms: int = T0, device: str = "d1", partition: int = 0, **metrics: float) -> SourceMessage:
    doc = {"device_id": device, "ts": at_ms, "metrics": metrics or {"t": 1.0}}
    return message(offset, doc, device.encode(), partition)


async def test_rows_aggregates_and_dlq_of_a_mixed_batch() -> None:
    raw, agg, dlq = RecordingSink("clickhouse"), RecordingSink("scylla"), RecordingDLQ()
    pipeline = make(raw, agg, dead_letters=dlq)
    batch = [
        good(0, T0, t=1.0, h=50.0),
        message(1, b"not json"),
        message(2, {"device_id": "d2", "metrics": {"t": 1}}, key=b"d1"),  # key is not the device
        good(3, T0 + 1000, t=3.0, h=52.0),
        message(4, {"device_id": "d1", "readings": [{"ts": T0 + 2000, "metrics": {"t": 5.0}}] * 2}),
    ]
    outcome = await pipeline.process(batch)
    assert (outcome.messages, outcome.rejected, outcome.readings, outcome.raw_rows) == (5, 2, 4, 6)
    assert [(m.offset, m.rejection.reason) for m in dlq.sent if m.rejection] == [
        (1, RejectReason.UNDECODABLE),
        (2, RejectReason.KEY_MISMATCH),
    ]
    (rows,) = raw.writes
    assert isinstance(rows, RawBatch)
    assert sorted((r[4], r[5], r[10], r[11]) for r in rows.rows) == [
        ("h", 50.0, 0, 0), ("h", 52.0, 3, 0), ("t", 1.0, 0, 0), ("t", 3.0, 3, 0), ("t", 5.0, 4, 0), ("t", 5.0, 4, 1),
    ]  # fmt: skip
    assert rows.token == "telemetry/0:0-4"
    (aggregates,) = agg.writes
    assert isinstance(aggregates, AggregateBatch)
    minute = {(w[1], w[2]): w for w in aggregates.windows}
    assert minute[("t", 60)][5:9] == (4, 14.0, 1.0, 5.0)  # count, sum, min, max
    assert minute[("h", 60)][5:7] == (2, 102.0)


async def test_a_replayed_batch_writes_the_same_rows_and_counts_nothing_twice() -> None:
    raw, agg = RecordingSink("clickhouse"), RecordingSink("scylla")
    pipeline = make(raw, agg)
    batch = [good(0, T0, t=1.0), good(1, T0 + 1000, t=2.0)]
    await pipeline.process(batch)
    replay = await pipeline.process([good(0, T0, t=1.0), good(1, T0 + 1000, t=2.0), good(2, T0 + 2000, t=4.0)])
    assert replay.replayed == 2
    first, second = raw.writes
    assert isinstance(first, RawBatch) and isinstance(second, RawBatch)
    assert set(first.rows) <= set(second.rows)  # same rows again: the ReplacingMergeTree key collapses them
    last = agg.writes[-1]
    assert isinstance(last, AggregateBatch)
    minute = next(w for w in last.windows if w[2] == 60)
    assert minute[5:7] == (3, 7.0)


async def test_retriable_errors_retry_the_same_batch_then_succeed() -> None:
    raw = RecordingSink("clickhouse", [RetriableSinkError("too many parts"), RetriableSinkError("timeout")])
    agg = RecordingSink("scylla", [RetriableSinkError("write timeout")])
    pipeline = make(raw, agg)
    await pipeline.process([good(0), good(1, T0 + 1000)])
    assert (raw.attempts, len(raw.writes), agg.attempts, len(agg.writes)) == (3, 1, 2, 1)


async def test_fatal_error_raises_and_nothing_is_reported_written() -> None:
    pipeline = make(raw=RecordingSink("clickhouse", [FatalSinkError("UNKNOWN_TABLE")]))
    with pytest.raises(ExceptionGroup) as caught:
        await pipeline.process([good(0)])
    assert caught.group_contains(FatalSinkError)


async def test_exhausted_retries_become_fatal() -> None:
    clock = [0.0]

    async def advancing_sleep(delay: float) -> None:
        clock[0] += delay + 1

    import sinks.base

    original = sinks.base.time.monotonic
    sinks.base.time.monotonic = lambda: clock[0]  # type: ignore[assignment]
    try:
        failing = RecordingSink("scylla", [RetriableSinkError("unavailable")] * 1000)
        pipeline = make(agg=failing, retry=RetryPolicy(budget_s=30, sleep=advancing_sleep))
        with pytest.raises(ExceptionGroup) as caught:
            await pipeline.process([good(0)])
        assert caught.group_contains(FatalSinkError, match="still failing")
        assert 2 < failing.attempts < 1000
    finally:
        sinks.base.time.monotonic = original  # type: ignore[assignment]


async def test_a_blocked_sink_holds_the_batch() -> None:
    """Backpressure: process() does not return (so nothing is acked) while a sink is stuck."""
    blocking = BlockingSink("scylla")
    pipeline = make(agg=blocking)
    task = asyncio.create_task(pipeline.process([good(0)]))
    await asyncio.sleep(0.05)
    assert not task.done()
    blocking.release.set()
    outcome = await asyncio.wait_for(task, 1)
    assert outcome.raw_rows == 1 and len(blocking.writes) == 1


async def test_dlq_guard_halts_on_consecutive_rejects() -> None:
    dlq = RecordingDLQ()
    pipeline = make(dlq_max_consecutive=5, dead_letters=dlq)
    await pipeline.process([message(i, b"bad") for i in range(4)] + [good(4)])  # reset by a good one
    with pytest.raises(PipelineHalted, match="5 consecutive"):
        await pipeline.process([message(i, b"bad") for i in range(5, 10)])
    assert len(dlq.sent) == 4  # the halted batch was not sent either: it will be seen again


async def test_state_is_stored_with_the_partition_of_its_source() -> None:
    store = MemoryStore()
    pipeline = make(state=store)
    await pipeline.process([good(0, device="a", partition=2), good(0, device="b", partition=1)])
    assert sorted(store.puts) == [(b"a", 2), (b"b", 1)]


async def test_a_replay_does_not_dead_letter_twice() -> None:
    dlq, progress = RecordingDLQ(), MemoryStore()
    pipeline = make(dead_letters=dlq, dlq_progress=progress)
    batch = [message(0, b"bad"), good(1), message(2, b"bad", partition=1)]
    await pipeline.process(batch)
    await pipeline.process([message(0, b"bad"), good(1), message(2, b"bad", partition=1), message(3, b"bad")])
    assert [(m.partition, m.offset) for m in dlq.sent] == [(0, 0), (1, 2), (0, 3)]
    assert progress.data == {b"telemetry:0": b"3", b"telemetry:1": b"2"}
