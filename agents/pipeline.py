"""One batch of source messages, from bytes to durable rows. Independent of faust.

:meth:`Pipeline.process` returns only when every row and aggregate derived from the batch is
durably written; the caller (the faust agent) then acks the batch in offset order. If it
raises, nothing of the batch may be acked: the worker crashes and the batch is replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agents.windows import COUNT, LAST, LAST_MS, MAX, MIN, OFFSET, SUM, ApplyResult, DeviceState, WindowPolicy
from app import metrics
from models.decode import Decoder
from models.records import Rejection, RejectReason, SourceMessage
from sinks.base import RetryPolicy, Sink
from sinks.clickhouse import RawBatch, RawRow
from sinks.scylla import AggregateBatch

MAX_FACTORY_LABELS = 200


class PipelineHalted(Exception):
    """The pipeline refuses to go on (e.g. the DLQ guard tripped); the worker must crash."""


class StateStore(Protocol):
    """Per-device window state; in the worker a changelog-backed faust table."""

    def get(self, device_key: bytes) -> bytes | None: ...

    def put(self, device_key: bytes, value: bytes, source: SourceMessage) -> None:
        """Store ``value``; ``source`` is the message whose partition owns the key."""


def _progress_key(message: SourceMessage) -> bytes:
    return f"{message.topic}:{message.partition}".encode()


def _progress_of(progress: StateStore, message: SourceMessage) -> int:
    raw = progress.get(_progress_key(message))
    return int(raw) if raw is not None else -1


class DeadLetters(Protocol):
    async def send(self, messages: list[SourceMessage]) -> None:
        """Produce rejected messages to the DLQ; returns when the broker has them."""


log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchOutcome:
    """What one batch did (for logs, metrics and tests)."""

    messages: int = 0
    rejected: int = 0
    replayed: int = 0
    readings: int = 0
    raw_rows: int = 0
    aggregates: int = 0


@dataclass(slots=True)
class PreparedBatch:
    """A decoded and applied batch whose rows are ready to write."""

    outcome: BatchOutcome
    valid: list[SourceMessage]
    raw: RawBatch
    aggregates: AggregateBatch


class Pipeline:
    def __init__(
        self,
        *,
        decoder: Decoder,
        windows: WindowPolicy,
        state: StateStore,
        raw_sink: Sink[RawBatch],
        aggregate_sink: Sink[AggregateBatch] | None,
        dead_letters: DeadLetters,
        retry: RetryPolicy,
        dlq_max_consecutive: int,
        dlq_progress: StateStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.decoder = decoder
        self.windows = windows
        self.state = state
        self.raw_sink = raw_sink
        self.aggregate_sink = aggregate_sink
        self.dead_letters = dead_letters
        self.retry = retry
        self.dlq_max_consecutive = dlq_max_consecutive
        self.clock = clock
        self.consecutive_rejects = 0
        self.dlq_progress = dlq_progress
        self._factories: set[str] = set()

    async def process(self, batch: list[SourceMessage]) -> BatchOutcome:
        """Process one batch; see the numbered order below. Raises instead of losing data."""
        # The order of a flush (the only place it is written down):
        # 1. decode every message; rejections go to the DLQ, awaited until the broker has them;
        # 2. apply the readings to each device's window state, skipping offsets already applied,
        #    and store the state (faust flushes the changelog before it commits any offset);
        #    (1-2 are prepare(): the worker prepares the next batch while this one's writes
        #    are in flight, one batch's writes at a time)
        # 3. write raw rows to ClickHouse and 4. upsert every aggregate the batch touched to
        #    ScyllaDB, concurrently, each retrying the same rows on retriable errors (write());
        # 5. the caller lets the gate commit the batch's offsets and acks it, batches strictly
        #    in order (agents/ingest.py, agents/offsets.py).
        # A fatal error, or retries running out, raises before 5: nothing of the batch is acked.
        return await self.write(await self.prepare(batch))

    async def prepare(self, batch: list[SourceMessage]) -> PreparedBatch:
        """Steps 1-2: decode, dead-letter, apply to the window state; the rows to write."""
        outcome = BatchOutcome(messages=len(batch))
        now = self.clock()
        rejected = self._decode(batch, now)
        if rejected:
            outcome.rejected = len(rejected)
            await self._dead_letter(rejected)
        valid = [m for m in batch if m.rejection is None]
        raw = self._raw_rows(valid, now)
        aggregates = self._apply(valid, outcome)
        outcome.readings = sum(len(m.readings) for m in valid)
        outcome.raw_rows, outcome.aggregates = len(raw.rows), len(aggregates)
        return PreparedBatch(outcome, valid, raw, aggregates)

    async def write(self, prepared: PreparedBatch) -> BatchOutcome:
        """Steps 3-4: both sinks, concurrently, retried; returns once both have everything."""
        outcome, valid, raw, aggregates = prepared.outcome, prepared.valid, prepared.raw, prepared.aggregates
        async with asyncio.TaskGroup() as writes:
            writes.create_task(self.retry.run(self.raw_sink.name, lambda: self.raw_sink.write(raw)))
            if self.aggregate_sink is not None:
                sink = self.aggregate_sink
                writes.create_task(self.retry.run(sink.name, lambda: sink.write(aggregates)))
        metrics.MESSAGES.labels(outcome="processed").inc(len(valid) - outcome.replayed)
        metrics.MESSAGES.labels(outcome="replayed").inc(outcome.replayed)
        metrics.READINGS.inc(outcome.readings)
        if raw.rows:
            newest: dict[str, int] = {}
            for message in valid:
                event_ms = max(reading.event_ms for reading in message.readings)
                factory = message.readings[0].factory
                if event_ms > newest.get(factory, 0):
                    newest[factory] = event_ms
            for factory, event_ms in newest.items():
                metrics.FACTORY_NEWEST_EVENT.labels(factory=self._factory_label(factory)).set(event_ms / 1000)
            metrics.NEWEST_EVENT.set(max(newest.values()) / 1000)
        return outcome

    def _factory_label(self, factory: str) -> str:
        """Factory names come from devices: bound the label set so bad input cannot explode it."""
        if factory in self._factories:
            return factory
        if len(self._factories) < MAX_FACTORY_LABELS:
            self._factories.add(factory)
            return factory or "unknown"
        return "other"

    async def _dead_letter(self, rejected: list[SourceMessage]) -> None:
        """Send rejects to the DLQ once: a replay skips offsets already dead-lettered.

        The progress (highest offset dead-lettered per source partition) is recorded after the
        DLQ has the messages; only a crash between the two repeats a DLQ record, which carries
        its source partition and offset in headers for consumers that must deduplicate.
        """
        progress = self.dlq_progress
        fresh = rejected
        if progress is not None:
            done = {m.partition: _progress_of(progress, m) for m in rejected}
            fresh = [m for m in rejected if m.offset > done[m.partition]]
        if fresh:
            await self.dead_letters.send(fresh)
            metrics.DLQ_MESSAGES.inc(len(fresh))
        if progress is not None:
            last: dict[int, SourceMessage] = {}
            for message in fresh:
                last[message.partition] = message
            for message in last.values():
                progress.put(_progress_key(message), str(message.offset).encode(), message)

    def _decode(self, batch: list[SourceMessage], now: float) -> list[SourceMessage]:
        now_ms = int(now * 1000)
        rejected: list[SourceMessage] = []
        for message in batch:
            result = self.decoder.decode(message.value, timestamp_ms=message.timestamp_ms, now_ms=now_ms)
            if isinstance(result, Rejection):
                message.rejection = result
            else:
                device = result[0].device_id.encode()
                if message.key != device:
                    # All of a device's messages must share a partition for offsets to order them.
                    shown = message.key.decode(errors="replace")[:60] if message.key is not None else None
                    message.rejection = Rejection(
                        RejectReason.KEY_MISMATCH, f"message key {shown!r} is not the device_id {result[0].device_id!r}"
                    )
                else:
                    message.readings = result
            if message.rejection is not None:
                rejected.append(message)
                metrics.REJECTS.labels(reason=message.rejection.reason.value).inc()
                self.consecutive_rejects += 1
                if self.consecutive_rejects >= self.dlq_max_consecutive:
                    raise PipelineHalted(
                        f"{self.consecutive_rejects} consecutive messages rejected (last: "
                        f"{message.rejection.reason.value}: {message.rejection.detail}); refusing to flood the DLQ "
                        "- check the producers (MILLSTREAM_LIMITS__DLQ_MAX_CONSECUTIVE)"
                    )
            else:
                self.consecutive_rejects = 0
        metrics.MESSAGES.labels(outcome="rejected").inc(len(rejected))
        return rejected

    @staticmethod
    def _raw_rows(valid: list[SourceMessage], now: float) -> RawBatch:
        ingest = int(now)
        rows: list[RawRow] = []
        add = rows.append
        spans: dict[tuple[str, int], list[int]] = {}
        for message in valid:
            partition, offset = message.partition, message.offset
            span = spans.setdefault((message.topic, partition), [offset, offset])
            span[1] = offset
            for reading in message.readings:
                device, factory, line, location = reading.device_id, reading.factory, reading.line, reading.location
                event_ms, index = reading.event_ms, reading.index
                event_s = event_ms // 1000
                for metric, value in reading.metrics.items():
                    add(
                        (
                            device,
                            factory,
                            line,
                            location,
                            metric,
                            value,
                            event_s,
                            event_ms,
                            ingest,
                            partition,
                            offset,
                            index,
                        )
                    )
        token = ",".join(f"{topic}/{part}:{first}-{last}" for (topic, part), (first, last) in sorted(spans.items()))
        return RawBatch(rows, token)

    def _apply(self, valid: list[SourceMessage], outcome: BatchOutcome) -> AggregateBatch:
        by_device: dict[bytes, list[SourceMessage]] = {}
        for message in valid:
            assert message.key is not None  # checked in _decode
            by_device.setdefault(message.key, []).append(message)
        batch = AggregateBatch()
        late: dict[int, int] = {}
        duplicates = 0
        for device_key, messages in by_device.items():
            state = DeviceState.loads(self.state.get(device_key))
            result = ApplyResult()
            changed = False
            for message in messages:
                result.applied = True
                self.windows.apply(state, message.readings, message.offset, result)
                if result.applied:
                    changed = True
                else:
                    outcome.replayed += 1
            for size, count in result.late.items():
                late[size] = late.get(size, 0) + count
            duplicates += result.duplicates
            device = device_key.decode()
            windows = state.windows
            for key in result.touched:
                agg = windows[key]  # type: ignore[index]  # a plain tuple finds its WindowKey
                metric, size_s, start_ms = key
                batch.windows.append(
                    (device, metric, size_s, start_ms, start_ms + size_s * 1000, agg[COUNT],
                     agg[SUM], agg[MIN], agg[MAX], agg[LAST], agg[LAST_MS], agg[OFFSET])
                )  # fmt: skip
            for metric in result.latest_touched:
                value, event_ms, offset = state.latest[metric]
                batch.latest.append((device, metric, value, event_ms, offset))
            if changed:  # a batch of pure replays leaves the state (and its changelog) alone
                self.windows.evict(state)  # after the rows above: evicted windows were final already
                self.state.put(device_key, state.dumps(), messages[-1])
        for size, count in late.items():
            metrics.LATE_READINGS.labels(window_size_s=str(size)).inc(count)
        if duplicates:
            metrics.DUPLICATE_READINGS.inc(duplicates)
        return batch
