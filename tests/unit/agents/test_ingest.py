"""Ingest.handle: what reaches the pipeline, and when, around a rebalance."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from agents.ingest import Ingest
from agents.offsets import OffsetGate
from app import metrics
from app.settings import Settings
from tests.unit.agents.test_offsets import SOURCE, A, FakeConsumer, Msg

Batch = list[Any]


@dataclass
class Message(Msg):
    topic: str = SOURCE
    partition: int = 0
    key: bytes = b"d"
    value: bytes = b"{}"
    timestamp: float = 1.7e9


@dataclass
class Event:
    message: Message


@dataclass
class FakeApp:
    consumer: FakeConsumer
    rebalancing: bool = False


@dataclass
class FakeStream:
    acked: list[int] = field(default_factory=list)

    async def ack(self, event: Event) -> None:
        self.acked.append(event.message.offset)


@dataclass
class FakePipeline:
    """Only what handle() calls: submit() records the batch and runs ``then`` at once."""

    submitted: list[list[int]] = field(default_factory=list)
    raw_sink: Any = None
    aggregate_sink: Any = None

    async def submit(self, batch: Batch, then: Any) -> None:
        self.submitted.append([m.offset for m in batch])
        await then(None)

    def on_failure(self, report: Any) -> None: ...


def _ingest(rebalancing: bool) -> tuple[Ingest, FakeApp, FakePipeline, OffsetGate]:
    consumer = FakeConsumer()
    consumer.commits[A] = 10
    consumer.assignment = lambda: {A}  # type: ignore[attr-defined]
    gate = OffsetGate(SOURCE, probe=None)  # type: ignore[arg-type]  # no gaps in these tests
    gate.install(consumer)
    app = FakeApp(consumer, rebalancing)
    pipeline = FakePipeline()
    settings = Settings()
    assert settings.kafka.telemetry_topic == SOURCE
    return Ingest(app, settings, pipeline, gate), app, pipeline, gate  # type: ignore[arg-type]


def _events(*offsets: int) -> list[Event]:
    return [Event(Message(A, offset)) for offset in offsets]


def test_events_arriving_while_faust_rebalances_are_not_processed_and_are_read_again() -> None:
    """From a revoke until faust has restored its tables, no state may be read or stored: the
    restore could overwrite it with an older one (aggregates short, raw rows complete). The
    events are acked for faust but not admitted, so nothing about them is committed and the
    gate expects them again."""

    async def run() -> None:
        ingest, app, pipeline, gate = _ingest(rebalancing=True)
        stream = FakeStream()
        deferred = metrics.DEFERRED._value.get()
        await ingest.handle(stream, _events(10, 11, 12))
        assert pipeline.submitted == []
        assert stream.acked == [10, 11, 12]  # faust waits for these on the rebalance
        assert gate.committable == {}
        assert metrics.DEFERRED._value.get() == deferred + 3

        app.rebalancing = False  # the worker is ready: the same offsets are read again
        await ingest.handle(stream, _events(10, 11, 12))
        assert pipeline.submitted == [[10, 11, 12]]
        assert gate.committable == {A: 13}

    asyncio.run(run())


def test_events_are_processed_in_offset_order_from_the_committed_offset_when_no_rebalance_runs() -> None:
    async def run() -> None:
        ingest, _, pipeline, gate = _ingest(rebalancing=False)
        stream = FakeStream()
        await ingest.handle(stream, _events(9, 10, 11))  # 9 is below the committed offset
        assert pipeline.submitted == [[10, 11]]
        assert sorted(stream.acked) == [9, 10, 11]
        assert gate.committable == {A: 12}

    asyncio.run(run())


def test_each_batch_after_the_first_reports_the_cpu_since_the_ack_before_it() -> None:
    """millstream_batch_cpu_seconds (what the bench's lookup API point counts per batch) moves
    with the acked counter: the first batch has no ack before it to measure from."""

    def seen() -> tuple[float, float]:
        count = sum(s.value for m in metrics.BATCH_CPU.collect() for s in m.samples if s.name.endswith("_count"))
        total = sum(s.value for m in metrics.BATCH_CPU.collect() for s in m.samples if s.name.endswith("_sum"))
        return count, total

    async def run() -> None:
        ingest, _, _, _ = _ingest(rebalancing=False)
        stream, (count, total) = FakeStream(), seen()
        await ingest.handle(stream, _events(10, 11))
        assert seen() == (count, total)
        sum(i * i for i in range(200_000))  # CPU between the two acks
        await ingest.handle(stream, _events(12))
        after_count, after_total = seen()
        assert after_count == count + 1 and after_total > total

    asyncio.run(run())
