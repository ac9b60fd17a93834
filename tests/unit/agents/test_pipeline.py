"""The pipeline with test sinks for each failure mode: failing, backpressured, fatal, blocking."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from agents.pipeline import Pipeline, PipelineHalted
from agents.windows import ApplyResult, DeviceState, WindowKey, WindowPolicy
from models.decode import Decoder
from models.records import Reading, RejectReason, SourceMessage
from models.rows import AggregateBatch, RawBatch
from sinks.base import FatalSinkError, RetriableSinkError, RetryPolicy

NOW = 1_705_314_600.0
T0 = int(NOW * 1000) - 30_000


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.puts: list[tuple[bytes, int]] = []

    def get(self, device_key: bytes, source: SourceMessage) -> bytes | None:
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
        message(4, {"device_id": "d1", "readings": [{"ts": T0 + 2000 + i, "metrics": {"t": 5.0}} for i in range(2)]}),
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
    raw, agg = RecordingSink("clickhouse", [FatalSinkError("UNKNOWN_TABLE")]), RecordingSink("scylla")
    pipeline = make(raw, agg)
    committed: list[object] = []

    async def commit(outcome: object) -> None:
        committed.append(outcome)

    await pipeline.submit([good(0)], commit)
    with pytest.raises(FatalSinkError, match="UNKNOWN_TABLE"):  # itself, not wrapped in an ExceptionGroup
        await pipeline.drain()
    assert committed == [] and raw.writes == []  # the commit never ran; ClickHouse has nothing
    assert pipeline.written == {}  # nor does the pipeline count the batch as written
    with pytest.raises(FatalSinkError):  # and nothing after it is written either
        await pipeline.submit([good(1, T0 + 1000)], commit)
    assert committed == []


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
        with pytest.raises(FatalSinkError, match="still failing"):
            await pipeline.process([good(0)])
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


class Exploding(WindowPolicy):
    """Raises on a message carrying the metric ``boom``, as a bug in the window code would."""

    def apply(self, state: DeviceState, readings: list[Reading], offset: int, result: ApplyResult) -> None:
        if any("boom" in reading.metrics for reading in readings):
            raise ZeroDivisionError("boom")
        super().apply(state, readings, offset, result)


def window(store: MemoryStore, device: bytes, metric: str = "t") -> list[object]:
    state = DeviceState.loads(store.data[device])
    return state.windows[WindowKey(metric, 60, T0 - T0 % 60_000)]


async def test_a_message_that_raises_is_isolated_and_the_rest_of_the_batch_goes_on() -> None:
    """Regression for the whole class: an exception tied to one record used to fail the batch,
    and every replacement worker replayed it and failed too (the group crash-looped)."""
    raw, dlq, store, progress = RecordingSink("clickhouse"), RecordingDLQ(), MemoryStore(), MemoryStore()
    pipeline = make(raw, dead_letters=dlq, state=store, dlq_progress=progress, windows=Exploding([60, 3600], 60, 3))
    batch = [good(0, T0, t=1.0), good(1, T0 + 1000, t=5.0, boom=1.0), good(2, T0 + 2000, t=2.0),
             good(3, T0, device="d2", t=7.0)]  # fmt: skip
    outcome = await pipeline.process(batch)
    ((offset, rejection),) = [(m.offset, m.rejection) for m in dlq.sent]
    assert offset == 1 and rejection is not None and rejection.reason is RejectReason.INTERNAL_ERROR
    assert "ZeroDivisionError" in rejection.detail and dlq.sent[0].value == batch[1].value  # original bytes kept
    assert outcome.rejected == 1
    (rows,) = raw.writes
    assert isinstance(rows, RawBatch)
    assert sorted({(r[0], r[10]) for r in rows.rows}) == [("d1", 0), ("d1", 2), ("d2", 3)]
    assert window(store, b"d1")[:2] == [2, 3.0]  # its device's state as it was before it
    assert window(store, b"d2")[:2] == [1, 7.0]
    # The whole batch again (a crash before the commit): rejected again, DLQ'd once, nothing doubled.
    again = [good(0, T0, t=1.0), good(1, T0 + 1000, t=5.0, boom=1.0), good(2, T0 + 2000, t=2.0),
             good(3, T0, device="d2", t=7.0)]  # fmt: skip
    replay = await pipeline.process(again)
    assert replay.rejected == 1 and len(dlq.sent) == 1 and again[1].rejection is not None
    assert window(store, b"d1")[:2] == [2, 3.0]


async def test_a_message_that_raises_last_is_isolated_on_replay_too() -> None:
    dlq, store, progress = RecordingDLQ(), MemoryStore(), MemoryStore()
    pipeline = make(dead_letters=dlq, state=store, dlq_progress=progress, windows=Exploding([60, 3600], 60, 3))
    await pipeline.process([good(0, T0, t=1.0), good(1, T0 + 1000, boom=1.0)])
    await pipeline.process([good(1, T0 + 1000, boom=1.0), good(2, T0 + 2000, t=2.0)])
    assert [m.offset for m in dlq.sent] == [1]
    assert window(store, b"d1")[:2] == [2, 3.0]


async def test_an_unreadable_stored_state_dead_letters_its_device_only() -> None:
    dlq, store = RecordingDLQ(), MemoryStore()
    store.data[b"d1"] = b'{"o": 3, "w": "not a number"'
    pipeline = make(dead_letters=dlq, state=store)
    await pipeline.process([good(4, T0, t=1.0), good(5, T0, device="d2", t=2.0)])
    assert [(m.offset, m.rejection.reason) for m in dlq.sent if m.rejection] == [(4, RejectReason.INTERNAL_ERROR)]
    assert window(store, b"d2")[:2] == [1, 2.0]


async def test_a_message_that_would_grow_the_state_past_the_limit_is_rejected() -> None:
    dlq, store = RecordingDLQ(), MemoryStore()
    pipeline = make(dead_letters=dlq, state=store, max_state_bytes=4096)
    many = {f"metric_{i:03d}": float(i) for i in range(60)}
    await pipeline.process([good(0, T0, t=1.0), good(1, T0 + 1000, **many), good(2, T0 + 2000, t=2.0)])
    ((rejected,),) = [[m for m in dlq.sent if m.rejection]]
    assert rejected.offset == 1 and rejected.rejection is not None
    assert rejected.rejection.reason is RejectReason.STATE_TOO_LARGE
    assert "MILLSTREAM_LIMITS__MAX_STATE_BYTES" in rejected.rejection.detail
    assert window(store, b"d1")[:2] == [2, 3.0] and len(store.data[b"d1"]) <= 4096


async def test_a_replayed_device_state_is_stored_again() -> None:
    """A local RocksDB state can be ahead of the changelog after kill -9: a batch of pure
    replays must still put the state, so the changelog has it before the offsets commit."""
    store = MemoryStore()
    pipeline = make(state=store)
    await pipeline.process([good(0, T0, t=1.0)])
    store.puts.clear()
    outcome = await pipeline.process([good(0, T0, t=1.0)])
    assert outcome.replayed == 1 and store.puts == [(b"d1", 0)]


async def test_rejects_reach_the_dlq_before_any_state_is_stored() -> None:
    class DownDLQ(RecordingDLQ):
        async def send(self, messages: list[SourceMessage]) -> None:
            raise ConnectionError("broker down")

    store = MemoryStore()
    pipeline = make(state=store, dead_letters=DownDLQ())
    with pytest.raises(ConnectionError):
        await pipeline.process([good(0, T0, t=1.0), message(1, b"bad")])
    assert store.puts == []  # the replay starts from the state as it was


async def test_a_window_in_flight_is_not_evicted_by_the_next_batch() -> None:
    """Regression: the next batch (prepared while this one is written) evicted a window this
    one changed; a crash before the write left it out of ScyllaDB for good."""
    agg, store = RecordingSink("scylla"), MemoryStore()
    pipeline = make(agg=agg, state=store)
    first = await pipeline.prepare([good(0, T0, t=1.0)])
    await pipeline.prepare([good(1, T0 + 2 * 3_600_000, t=2.0)])  # hours later: the first window is stale
    assert WindowKey("t", 60, T0 - T0 % 60_000) in DeviceState.loads(store.data[b"d1"]).windows
    # The crash: the first write never happened. The replay still upserts its window.
    restarted = make(agg=agg, state=store)
    await restarted.process([good(0, T0, t=1.0), good(1, T0 + 2 * 3_600_000, t=2.0)])
    assert any(w[3] == T0 - T0 % 60_000 and w[2] == 60 for w in agg.writes[-1].windows)  # type: ignore[attr-defined]
    assert first.aggregates.windows


def test_an_empty_factory_is_always_labelled_unknown() -> None:
    pipeline = make()
    assert [pipeline._factory_label("") for _ in range(3)] == ["unknown"] * 3


class Acks:
    """Changelog acknowledgements the test resolves by hand."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[object]] = []

    def take(self) -> list[asyncio.Future[object]]:
        loop = asyncio.get_running_loop()
        self.futures = [loop.create_future(), loop.create_future()]
        return list(self.futures)


async def test_a_batch_is_written_only_once_its_changelog_records_are_acknowledged() -> None:
    """Regression (rebalance on RocksDB): faust's flush before a commit may leave changelog
    records in its buffer; a commit then covered state the changelog never got."""
    acks = Acks()
    pipeline = make(changelog=acks)
    task = asyncio.create_task(pipeline.process([good(0, T0, t=1.0)]))
    await asyncio.sleep(0.05)
    assert not task.done()  # sinks written, records not acknowledged: not committable yet
    for future in acks.futures:
        future.set_result(None)
    await asyncio.wait_for(task, 1)


async def test_a_changelog_record_that_fails_fails_the_batch() -> None:
    acks = Acks()
    pipeline = make(changelog=acks)
    task = asyncio.create_task(pipeline.process([good(0, T0, t=1.0)]))
    await asyncio.sleep(0.05)
    acks.futures[0].set_exception(ConnectionError("changelog partition has no leader"))
    acks.futures[1].set_result(None)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(task, 1)


async def test_alerts_come_out_of_an_isolating_batch_and_once_again_on_replay() -> None:
    """A batch with a message that raises goes message by message; the rules are judged after
    each one, before eviction can drop a window that just closed, and a replay of the batch
    sends the same alerts again (the first write may not have happened), never new ones."""
    from agents.alerts import AlertPolicy, parse_rule

    raw, agg = RecordingSink("clickhouse"), RecordingSink("scylla")
    rule = parse_rule("rule 1", {"name": "hot", "metric": "t", "above": 80, "clear": 75}, [60, 3600])
    pipeline = make(raw, agg, windows=Exploding([60, 3600], 60, 3), alerts=AlertPolicy([rule], 60))
    minute = 60_000
    start = T0 - T0 % minute - 20 * minute
    batch = [good(0, start, t=90.0), good(1, start + minute, t=70.0), good(2, start + 2 * minute, t=5.0, boom=1.0),
             good(3, start + 10 * minute, t=70.0)]  # fmt: skip
    await pipeline.process(batch)
    (first,) = [b for b in agg.writes if isinstance(b, AggregateBatch)]
    assert [(a[4], a[7]) for a in first.alerts] == [("raised", start), ("cleared", start + minute)]

    def same() -> list[SourceMessage]:
        return [good(0, start, t=90.0), good(1, start + minute, t=70.0),
                good(2, start + 2 * minute, t=5.0, boom=1.0), good(3, start + 10 * minute, t=70.0)]  # fmt: skip

    # A worker restarted after a crash (its state from the changelog; it knows of no write) sends them again.
    restarted = make(raw, agg, state=pipeline.state, windows=Exploding([60, 3600], 60, 3),
                     alerts=AlertPolicy([rule], 60))  # fmt: skip
    await restarted.process(same())
    assert sorted([b for b in agg.writes if isinstance(b, AggregateBatch)][-1].alerts) == sorted(first.alerts)
    await restarted.process(same())  # the worker that wrote them itself knows: nothing again
    assert [b for b in agg.writes if isinstance(b, AggregateBatch)][-1].alerts == []
