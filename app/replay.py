"""``millstream replay``: re-process a range of the telemetry topic, or send dead letters back.

Two jobs, each with a consumer group of its own (never the workers'), reading partitions it
assigns itself up to where they ended when it started, so that it finishes:

- **topic** (default): the raw rows of every message in the range, decoded exactly as a worker
  does, into ClickHouse again. Idempotent: the rows are the same rows (device, metric, event
  time, source partition, offset and reading index), which ``telemetry_raw`` collapses under
  FINAL; counts do not change. Aggregates are not written: a replay starts without the windows'
  state before its range, so it would upsert partial windows under the original write versions
  and ScyllaDB would keep a mix. The workers' own tables hold the exact windows; recomputing
  them all is the back-fill in docs/migrations.md. Rejected messages are counted, not sent to
  the DLQ again (they are there from the first time).
- **dlq** (``--dlq``): dead letters whose reason is in ``--reason`` (default ``internal_error``:
  messages millstream raised on, isolated before their readings were applied) go back to the
  telemetry topic, unchanged and under their key, with a header naming where they were. The
  workers then process them like any message: both stores, windows still open included. A
  truncated dead letter (the original was over the size limit) cannot go back and is counted.
  Running the same range twice sends them twice; the group's committed offsets say how far a
  previous run got, and ``--from-offset`` defaults to them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from app.kafka import kafka_client_options
from app.settings import Settings

PROGRESS_EVERY_S = 2.0
FETCH_MAX_RECORDS = 5000
IDLE_LIMIT_S = 30.0  # nothing fetched this long before a partition's end: stop with an error


@dataclass(frozen=True)
class ReplayRange:
    """[from, to) per partition; None: from the group's committed offset (else the beginning), to
    the end as it was at the start."""

    from_offset: int | None = None
    from_time_ms: int | None = None
    to_offset: int | None = None
    to_time_ms: int | None = None
    partitions: tuple[int, ...] | None = None


@dataclass
class ReplayReport:
    job: str
    topic: str
    group: str
    partitions: dict[int, list[int]] = field(default_factory=dict)  # partition -> [from, to)
    messages: int = 0
    rows: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # topic job: by reason
    sent_back: int = 0  # dlq job
    skipped: dict[str, int] = field(default_factory=dict)  # dlq job: not sent back, by why
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReplayError(RuntimeError):
    """A range that cannot be replayed; the message is one line for the operator."""


async def _bounds(consumer: Any, topic: str, span: ReplayRange) -> dict[Any, tuple[int, int]]:
    from aiokafka import TopicPartition

    await consumer._client.force_metadata_update()
    known = consumer.partitions_for_topic(topic)
    if not known:
        raise ReplayError(f"topic {topic!r} does not exist")
    wanted = sorted(known) if span.partitions is None else list(span.partitions)
    missing = sorted(set(wanted) - known)
    if missing:
        raise ReplayError(f"topic {topic!r} has no partition {missing[0]} (it has {len(known)})")
    tps = [TopicPartition(topic, p) for p in wanted]
    consumer.assign(tps)
    first, last = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
    starts, ends = dict(first), dict(last)
    if span.from_offset is not None:
        starts = {tp: max(span.from_offset, first[tp]) for tp in tps}
    elif span.from_time_ms is not None:
        found = await consumer.offsets_for_times({tp: span.from_time_ms for tp in tps})
        starts = {tp: found[tp].offset if found[tp] is not None else last[tp] for tp in tps}
    else:
        for tp in tps:
            committed = await consumer.committed(tp)
            if committed is not None:
                starts[tp] = max(committed, first[tp])
    if span.to_offset is not None:
        ends = {tp: min(span.to_offset, last[tp]) for tp in tps}
    elif span.to_time_ms is not None:
        found = await consumer.offsets_for_times({tp: span.to_time_ms for tp in tps})
        ends = {tp: found[tp].offset if found[tp] is not None else last[tp] for tp in tps}
    return {tp: (starts[tp], max(starts[tp], ends[tp])) for tp in tps}


async def _read(
    consumer: Any, bounds: dict[Any, tuple[int, int]], handle: Callable[[list[Any]], Any], report: ReplayReport,
    progress: Callable[[str], None],
) -> None:  # fmt: skip
    """Every record in the bounds, in batches to ``handle``; commits after each."""
    from aiokafka import TopicPartition

    total = sum(end - start for start, end in bounds.values())
    open_tps = {tp for tp, (start, end) in bounds.items() if end > start}
    for tp in bounds:
        consumer.seek(tp, bounds[tp][0])
    began = time.monotonic()
    done, shown, idle_since = 0, began, began
    while open_tps:
        fetched = await consumer.getmany(*open_tps, timeout_ms=1000, max_records=FETCH_MAX_RECORDS)
        batch: list[Any] = []
        for tp, records in fetched.items():
            batch += [r for r in records if r.offset < bounds[tp][1]]
            if records and records[-1].offset + 1 >= bounds[tp][1]:
                open_tps.discard(tp)
        if not batch:
            for tp in list(open_tps):  # an end past the last record (a gap: compaction, markers)
                if await consumer.position(tp) >= bounds[tp][1]:
                    open_tps.discard(tp)
            if open_tps and time.monotonic() - idle_since > IDLE_LIMIT_S:
                positions = [(tp.partition, await consumer.position(tp)) for tp in open_tps]
                behind = ", ".join(f"{partition} at {offset}" for partition, offset in sorted(positions))
                raise ReplayError(f"no records for {IDLE_LIMIT_S:.0f}s before the end of partitions {behind}")
            continue
        idle_since = time.monotonic()
        await handle(batch)
        done += len(batch)
        report.messages = done
        last: dict[Any, int] = {}
        for record in batch:
            last[TopicPartition(record.topic, record.partition)] = record.offset + 1
        await consumer.commit(last)
        report.seconds = round(time.monotonic() - began, 3)
        if time.monotonic() - shown >= PROGRESS_EVERY_S or not open_tps:
            shown = time.monotonic()
            progress(f"{done}/{total} messages ({100 * done // max(total, 1)} %)")


class _RawRows:
    """A batch of the topic's records: decoded as a worker does, their raw rows to ClickHouse."""

    def __init__(self, settings: Settings, report: ReplayReport) -> None:
        from app.registry import SchemaRegistry
        from models.decode import Decoder
        from sinks.base import RetryPolicy
        from sinks.clickhouse import raw_writer

        limits = settings.limits
        self.report = report
        self.registry = SchemaRegistry(settings.registry) if settings.registry.url else None
        self.decoder = Decoder.from_limits(limits, self.registry.book if self.registry else None)
        self.writer = raw_writer(settings.clickhouse)
        self.retry = RetryPolicy(budget_s=settings.pipeline.retry_budget_s)

    async def start(self) -> None:
        await self.retry.run(self.writer.name, self.writer.start)

    async def close(self) -> None:
        await self.writer.close()
        if self.registry is not None:
            await self.registry.close()

    async def __call__(self, records: list[Any]) -> None:
        from agents.pipeline import raw_rows_of
        from models.records import Rejection, RejectReason, SourceMessage
        from models.rows import RawBatch

        if self.registry is not None:
            await self.registry.ensure(r.value for r in records)
        now_ms, rows, rejected = int(time.time() * 1000), [], self.report.rejected
        for record in records:
            result = self.decoder.decode(record.value, timestamp_ms=record.timestamp, now_ms=now_ms)
            if not isinstance(result, Rejection) and record.key != result[0].device_id.encode():
                result = Rejection(RejectReason.KEY_MISMATCH, "message key is not the device_id")
            if isinstance(result, Rejection):
                rejected[result.reason.value] = rejected.get(result.reason.value, 0) + 1
                continue
            message = SourceMessage(record.topic, record.partition, record.offset, record.key, b"", record.timestamp)
            message.readings = result
            rows += raw_rows_of(message, now_ms // 1000)
        if rows:
            # No deduplication token: if the first insert is gone (the reason to replay), a token
            # naming the same offsets would make ClickHouse drop this one as a repeat.
            batch = RawBatch(rows, "")
            await self.retry.run(self.writer.name, lambda: self.writer.write(batch))
        self.report.rows += len(rows)


async def replay_topic(
    settings: Settings, span: ReplayRange, group: str, progress: Callable[[str], None]
) -> ReplayReport:
    """Raw rows of the range into ClickHouse again."""
    from aiokafka import AIOKafkaConsumer

    kafka = settings.kafka
    report = ReplayReport("topic", kafka.telemetry_topic, group)
    handle = _RawRows(settings, report)
    consumer = AIOKafkaConsumer(
        group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
        max_partition_fetch_bytes=settings.limits.max_message_bytes + 65536, **kafka_client_options(kafka),
    )  # fmt: skip
    await consumer.start()
    try:
        await handle.start()
        bounds = await _bounds(consumer, kafka.telemetry_topic, span)
        report.partitions = {tp.partition: [start, end] for tp, (start, end) in bounds.items()}
        total = sum(end - start for start, end in bounds.values())
        progress(f"{total} messages in {len(bounds)} partitions of {kafka.telemetry_topic}")
        await _read(consumer, bounds, handle, report, progress)
    finally:
        await consumer.stop()
        await handle.close()
    return report


DLQ_REASON, DLQ_TRUNCATED = "millstream.reason", "millstream.truncated"
REPLAYED_FROM = "millstream.replayed.from"


async def replay_dead_letters(
    settings: Settings, span: ReplayRange, group: str, reasons: frozenset[str], progress: Callable[[str], None]
) -> ReplayReport:
    """Dead letters with one of ``reasons`` back to the telemetry topic, unchanged."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    kafka = settings.kafka
    report = ReplayReport("dlq", kafka.dlq_topic, group)
    options = kafka_client_options(kafka)
    consumer = AIOKafkaConsumer(
        group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
        max_partition_fetch_bytes=settings.limits.max_message_bytes + 65536, **options,
    )  # fmt: skip
    producer = AIOKafkaProducer(
        acks="all", enable_idempotence=False, max_request_size=settings.limits.max_message_bytes + 65536, **options
    )
    await consumer.start()
    await producer.start()
    try:
        bounds = await _bounds(consumer, kafka.dlq_topic, span)
        report.partitions = {tp.partition: [start, end] for tp, (start, end) in bounds.items()}
        progress(
            f"{sum(e - s for s, e in bounds.values())} dead letters in {len(bounds)} partitions of {kafka.dlq_topic}"
        )

        async def handle(records: list[Any]) -> None:
            sends = []
            for record in records:
                headers = dict(record.headers or ())
                reason = headers.get(DLQ_REASON, b"").decode(errors="replace")
                why = None if reason in reasons else f"reason {reason or '(none)'}"
                if why is None and DLQ_TRUNCATED in headers:
                    why = "truncated"
                if why is not None:
                    report.skipped[why] = report.skipped.get(why, 0) + 1
                    continue
                origin = f"{record.topic}/{record.partition}/{record.offset}".encode()
                sends.append(
                    await producer.send(kafka.telemetry_topic, record.value, key=record.key,
                                        headers=[(REPLAYED_FROM, origin)])
                )  # fmt: skip
            for sent in sends:  # every one acknowledged before the DLQ offsets are committed
                await sent
            report.sent_back += len(sends)

        await _read(consumer, bounds, handle, report, progress)
    finally:
        await producer.stop()
        await consumer.stop()
    return report
