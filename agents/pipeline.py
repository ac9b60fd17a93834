"""Batches of source messages, from bytes to durable rows, in one order. Independent of faust.

:meth:`Pipeline.submit` is what the worker runs for every batch; the order of a flush is
written down there, beside the code that performs it. The caller's ``then`` (the commit and
the acks) runs only when every row, aggregate and changelog record derived from the batch is
durable. If anything fails, nothing of that batch or any later one is acked: the worker
crashes and the batches are replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from agents.alerts import AlertPolicy, AlertRow
from agents.batching import InOrderWrites
from agents.windows import COUNT, LAST, LAST_MS, MAX, MIN, OFFSET, SUM, ApplyResult, DeviceState, WindowPolicy
from app import metrics
from models.decode import Decoder
from models.records import Rejection, RejectReason, SourceMessage
from models.rows import AggregateBatch, LatestRow, RawBatch, RawRow, WindowRow
from sinks.base import RetryPolicy, Sink

MAX_FACTORY_LABELS = 200
ACK_WAIT_LOG_S = 30.0  # a batch waiting this long for its changelog acknowledgements is logged
INTERNAL_ERROR_DETAIL = 500  # characters of an isolated exception kept in the DLQ detail header


Then = Callable[["BatchOutcome"], Awaitable[None]]


class PipelineHalted(Exception):
    """The pipeline refuses to go on (e.g. the DLQ guard tripped); the worker must crash."""


class StateStore(Protocol):
    """Per-device window state; in the worker a changelog-backed faust table.

    ``source`` is a message whose partition owns the key: a partitioned store (RocksDB keeps
    one database per partition) reads and writes that partition's database.
    """

    def get(self, device_key: bytes, source: SourceMessage) -> bytes | None: ...

    def put(self, device_key: bytes, value: bytes, source: SourceMessage) -> None: ...


class Schemas(Protocol):
    """Where framed payloads' schemas come from (app/registry.py)."""

    async def ensure(self, values: Iterable[bytes | None]) -> None: ...

    async def close(self) -> None: ...


def _progress_key(message: SourceMessage) -> bytes:
    return f"{message.topic}:{message.partition}".encode()


def _progress_of(progress: StateStore, message: SourceMessage) -> int:
    raw = progress.get(_progress_key(message), message)
    return int(raw) if raw is not None else -1


class Acknowledgements(Protocol):
    """Changelog records sent while a batch was prepared, to wait for before it is committed."""

    def take(self) -> list[Awaitable[object]]:
        """Every record sent since the last call (the futures of their broker acknowledgements)."""


class StateTooLarge(Exception):
    """Applying a message would grow its device's state past ``limits.max_state_bytes``."""


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
    duplicates: int = 0
    raw_rows: int = 0
    aggregates: int = 0


@dataclass(slots=True)
class PreparedBatch:
    """A decoded and applied batch whose rows are ready to write."""

    outcome: BatchOutcome
    valid: list[SourceMessage]
    raw: RawBatch
    aggregates: AggregateBatch
    changelog: list[Awaitable[object]] = field(default_factory=list)


@dataclass(slots=True)
class _DeviceResult:
    """One device's share of a batch, computed before anything is stored."""

    rows: list[RawRow] = field(default_factory=list)
    windows: list[WindowRow] = field(default_factory=list)
    latest: list[LatestRow] = field(default_factory=list)
    state: bytes | None = None  # the new state to store, None to leave it
    replayed: int = 0
    late: dict[int, int] = field(default_factory=dict)
    duplicates: int = 0
    alerts: list[AlertRow] = field(default_factory=list)


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
        changelog: Acknowledgements | None = None,
        max_state_bytes: int = 512 * 1024,
        clock: Callable[[], float] = time.time,
        schemas: Schemas | None = None,
        alerts: AlertPolicy | None = None,
        alert_sink: Sink[list[AlertRow]] | None = None,
    ) -> None:
        self.decoder = decoder
        self.alerts = alerts  # threshold rules on closed windows (agents/alerts.py); None: no rules
        self.alert_sink = alert_sink  # the alerts topic
        self.schemas = schemas  # fetches the schemas of framed payloads before they are decoded
        self.windows = windows
        self.state = state
        self.raw_sink = raw_sink
        self.aggregate_sink = aggregate_sink
        self.dead_letters = dead_letters
        self.retry = retry
        self.dlq_max_consecutive = dlq_max_consecutive
        self.max_state_bytes = max_state_bytes
        self.clock = clock
        self.consecutive_rejects = 0
        self.dlq_progress = dlq_progress
        self.changelog = changelog
        # (topic, partition) -> highest offset whose rows both sinks have: windows changed by
        # later offsets are not evicted from the state yet (see agents/windows.py).
        self.written: dict[tuple[str, int], int] = {}
        self._writes = InOrderWrites(on_error=_nothing)
        self._factories: set[str] = set()
        self._ignored_fields = 0  # of decoder.ignored_fields, already counted in the metric

    async def submit(self, batch: list[SourceMessage], then: Then) -> None:
        """One batch through the order of a flush, as the worker runs it (the only place the
        order is written down). Returns once steps 1-4 are done; steps 5-7 run after the
        previous batch's, and ``then`` (8) right after them. Raises the failure of an earlier
        batch's writes: nothing after a failed batch is written or acked."""
        # 1. decode every message (a bad one gets a rejection with a reason);
        # 2. apply each device's readings to its window state, in memory, skipping offsets the
        #    state already holds; a message that raises, or would grow its device's state past
        #    the limit, is isolated: rejected as internal_error / state_too_large, its device's
        #    state as it was before it;
        # 3. rejected messages go to the DLQ, awaited until the broker has them (before any
        #    state is stored: a crash here replays the batch with the state untouched);
        # 4. store each changed device state (a changelog record each). A replayed device's
        #    state is stored again too: a local RocksDB state can hold what the changelog does
        #    not, and the offset is about to be committed;
        prepared = await self.prepare(batch)
        # (the next batch is prepared while this one's writes are in flight; one batch's
        # writes at a time, strictly in order)
        # 5. write raw rows to ClickHouse and 6. upsert every aggregate the batch touched to
        #    ScyllaDB, concurrently, each retrying the same rows on retriable errors, then
        # 7. wait until the broker has acknowledged the batch's changelog records (faust's own
        #    flush before a commit gives up after 0.1 s without progress);
        # 8. ``then``: the caller lets the gate commit the batch's offsets and acks it
        #    (agents/ingest.py, agents/offsets.py).
        # A fatal error, or retries running out, raises before 8: nothing of the batch is acked.
        await self._writes.submit(lambda: self.write(prepared), lambda: then(prepared.outcome))

    def on_failure(self, report: Callable[[BaseException], Awaitable[None]]) -> None:
        """Who hears of a failed write at once (the worker crashes); drain() raises it too."""
        self._writes.on_error = report

    async def drain(self) -> None:
        """Until every submitted batch is written and its ``then`` ran; raises a failure."""
        await self._writes.wait()

    async def cancel(self) -> None:
        """Abandon the writes in flight (on stop): not acked, so replayed by the next owner."""
        await self._writes.cancel()

    async def process(self, batch: list[SourceMessage]) -> BatchOutcome:
        """One batch all the way, the worker's path: :meth:`submit`, then :meth:`drain`."""
        done: list[BatchOutcome] = []

        async def then(outcome: BatchOutcome) -> None:
            done.append(outcome)

        await self.submit(batch, then)
        await self.drain()
        return done[0]

    async def prepare(self, batch: list[SourceMessage]) -> PreparedBatch:
        """Steps 1-4: decode, apply, dead-letter, store the state; the rows to write. Called
        through :meth:`submit`."""
        outcome = BatchOutcome(messages=len(batch))
        if self.schemas is not None:
            await self.schemas.ensure(m.value for m in batch)  # waits while the registry is down
        now = self.clock()
        self._decode(batch, now)
        devices = self._apply([m for m in batch if m.rejection is None], int(now))
        rejected = self._guard(batch)
        if rejected:
            outcome.rejected = len(rejected)
            await self._dead_letter(rejected)
        valid = [m for m in batch if m.rejection is None]
        raw: list[RawRow] = []
        aggregates = AggregateBatch()
        late: dict[int, int] = {}
        for device_key, (result, source) in devices.items():
            if result.state is not None:
                self.state.put(device_key, result.state, source)
            raw += result.rows
            aggregates.windows += result.windows
            aggregates.latest += result.latest
            aggregates.alerts += result.alerts
            outcome.replayed += result.replayed
            outcome.duplicates += result.duplicates
            for size, count in result.late.items():
                late[size] = late.get(size, 0) + count
        for size, count in late.items():
            metrics.LATE_READINGS.labels(window_size_s=str(size)).inc(count)
        if outcome.duplicates:
            metrics.DUPLICATE_READINGS.inc(outcome.duplicates)
        outcome.readings = sum(len(m.readings) for m in valid)
        outcome.raw_rows, outcome.aggregates = len(raw), len(aggregates)
        changelog = self.changelog.take() if self.changelog is not None else []
        return PreparedBatch(outcome, valid, RawBatch(raw, _token(valid)), aggregates, changelog)

    async def write(self, prepared: PreparedBatch) -> BatchOutcome:
        """Steps 5-7: both sinks, concurrently, retried, and the batch's changelog records
        acknowledged; returns once all of it is durable. Called through :meth:`submit`."""
        outcome, valid, raw, aggregates = prepared.outcome, prepared.valid, prepared.raw, prepared.aggregates
        await self._write_both(raw, aggregates)
        if prepared.changelog:
            await self._acknowledged(prepared.changelog)
        written = self.written
        for message in valid:
            where = (message.topic, message.partition)
            if message.offset > written.get(where, -1):
                written[where] = message.offset
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

    async def _acknowledged(self, records: list[Awaitable[object]]) -> None:
        """Until the broker has every changelog record of the batch; a failed one raises, and
        nothing is committed. Says so every ACK_WAIT_LOG_S while it waits: a silent stall
        would look like a healthy, idle worker."""
        waiting = asyncio.ensure_future(asyncio.gather(*records))
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait([waiting], timeout=ACK_WAIT_LOG_S)
            if done:
                waiting.result()
                return
            pending = [r for r in records if not (isinstance(r, asyncio.Future) and r.done())]
            where = sorted({str(getattr(getattr(r, "message", None), "channel", "?")) for r in pending})[:5]
            log.warning("waited %.0fs for %d of %d changelog acknowledgements (%s); nothing is committed meanwhile",
                        time.monotonic() - started, len(pending), len(records), ", ".join(where))  # fmt: skip

    async def _write_both(self, raw: RawBatch, aggregates: AggregateBatch) -> None:
        """Both sinks (and the alerts topic) at once; the first failure cancels the other writes
        and is raised as it is (not wrapped in an ExceptionGroup), so the sink signals keep
        their meaning."""
        writes = [asyncio.ensure_future(self.retry.run(self.raw_sink.name, lambda: self.raw_sink.write(raw)))]
        if self.aggregate_sink is not None:
            sink = self.aggregate_sink
            writes.append(asyncio.ensure_future(self.retry.run(sink.name, lambda: sink.write(aggregates))))
        if self.alert_sink is not None and aggregates.alerts:
            topic, alerts = self.alert_sink, aggregates.alerts
            writes.append(asyncio.ensure_future(self.retry.run(topic.name, lambda: topic.write(alerts))))
        try:
            done, _ = await asyncio.wait(writes, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # raises the first failure
        finally:
            for task in writes:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*writes, return_exceptions=True)

    def _factory_label(self, factory: str) -> str:
        """Factory names come from devices: bound the label set so bad input cannot explode it."""
        label = factory or "unknown"
        if label in self._factories:
            return label
        if len(self._factories) < MAX_FACTORY_LABELS:
            self._factories.add(label)
            return label
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

    def _decode(self, batch: list[SourceMessage], now: float) -> None:
        """Step 1: readings or a rejection on every message. Raises for nothing a message holds."""
        now_ms = int(now * 1000)
        decode = self.decoder.decode
        for message in batch:
            try:
                result = decode(message.value, timestamp_ms=message.timestamp_ms, now_ms=now_ms)
            except Exception as exc:  # a decoder bug must not stop the partition
                message.rejection = _internal_error(exc, "decode")
                continue
            if isinstance(result, Rejection):
                message.rejection = result
                continue
            device = result[0].device_id.encode()
            if message.key != device:
                # All of a device's messages must share a partition for offsets to order them.
                shown = message.key.decode(errors="replace")[:60] if message.key is not None else None
                message.rejection = Rejection(
                    RejectReason.KEY_MISMATCH, f"message key {shown!r} is not the device_id {result[0].device_id!r}"
                )
            else:
                message.readings = result
        ignored = self.decoder.ignored_fields - self._ignored_fields
        if ignored:
            self._ignored_fields += ignored
            metrics.IGNORED_FIELDS.inc(ignored)

    def _guard(self, batch: list[SourceMessage]) -> list[SourceMessage]:
        """The rejected messages of the batch, counted; stops the worker on a flood of them."""
        rejected: list[SourceMessage] = []
        for message in batch:
            if message.rejection is None:
                self.consecutive_rejects = 0
                continue
            rejected.append(message)
            self.consecutive_rejects += 1
            if self.consecutive_rejects >= self.dlq_max_consecutive:
                raise PipelineHalted(
                    f"{self.consecutive_rejects} consecutive messages rejected (last: "
                    f"{message.rejection.reason.value}: {message.rejection.detail}); refusing to flood the DLQ "
                    "- check the producers (MILLSTREAM_LIMITS__DLQ_MAX_CONSECUTIVE)"
                )
        for message in rejected:
            assert message.rejection is not None
            metrics.REJECTS.labels(reason=message.rejection.reason.value).inc()
        metrics.MESSAGES.labels(outcome="rejected").inc(len(rejected))
        return rejected

    def _apply(self, valid: list[SourceMessage], ingest: int) -> dict[bytes, tuple[_DeviceResult, SourceMessage]]:
        """Step 2, per device: its rows, its aggregates to upsert, its new state (not stored yet)."""
        by_device: dict[bytes, list[SourceMessage]] = {}
        for message in valid:
            assert message.key is not None  # checked in _decode
            by_device.setdefault(message.key, []).append(message)
        devices: dict[bytes, tuple[_DeviceResult, SourceMessage]] = {}
        for device_key, messages in by_device.items():
            stored = self.state.get(device_key, messages[0])
            try:
                result = self._apply_device(device_key, messages, stored, ingest)
            except Exception as exc:
                # Something about one of these messages (or the stored state) raised: find which,
                # one message at a time from the stored state; the rest go on as usual.
                log.warning("device %r: applying %d messages raised %r; isolating them one by one",
                            device_key[:80], len(messages), exc)  # fmt: skip
                result = self._isolate(device_key, messages, stored, ingest)
            devices[device_key] = (result, messages[-1])
        return devices

    def _apply_device(
        self, device_key: bytes, messages: list[SourceMessage], stored: bytes | None, ingest: int
    ) -> _DeviceResult:
        state = DeviceState.loads(stored)
        result = _DeviceResult()
        applied = ApplyResult()
        changed = replayed = False
        isolated, alerts = state.isolated, self.alerts
        for message in messages:
            if isolated and message.offset <= state.offset and message.offset in isolated:
                message.rejection = _isolated_again(message)
                continue
            applied.applied = True
            self.windows.apply(state, message.readings, message.offset, applied)
            if applied.applied:
                changed = True
            else:
                replayed = True
                result.replayed += 1
                if alerts is not None:
                    where = (message.topic, message.partition)
                    result.alerts += alerts.replayed(state, message.offset, self.written.get(where, -1))
            _add_rows(result.rows, message, ingest)
        device = device_key.decode()
        self._collect(device, state, applied, result)
        if changed and alerts is not None:
            result.alerts += self._evaluate(device, state, messages)
        if changed or replayed:
            where = (messages[0].topic, messages[0].partition)
            written = self.written.get(where, -1)
            self.windows.evict(state, written)
            if alerts is not None:
                alerts.written(state, written)
            result.state = self._dump(state)
        return result

    def _evaluate(self, device: str, state: DeviceState, messages: list[SourceMessage]) -> list[AlertRow]:
        """The alert rules on the windows this batch closed; the device's labels kept for their filters."""
        assert self.alerts is not None
        last = next((m.readings[-1] for m in reversed(messages) if m.readings and m.rejection is None), None)
        if last is not None and state.labels != [last.factory, last.line]:
            state.labels = [last.factory, last.line]
        return self.alerts.evaluate(device, state, state.offset)

    def _isolate(
        self, device_key: bytes, messages: list[SourceMessage], stored: bytes | None, ingest: int
    ) -> _DeviceResult:
        """One message at a time; a message that raises is rejected and its changes undone."""
        result = _DeviceResult()
        try:
            state = DeviceState.loads(stored)
        except Exception as exc:
            # The stored state itself is unreadable: every message of the device is kept in the
            # DLQ (replayable after a fix) rather than applied to an empty state.
            for message in messages:
                message.rejection = _internal_error(exc, "loading the device state")
                metrics.ISOLATED.labels(reason=message.rejection.reason.value).inc()
            return result
        applied = ApplyResult()
        written = self.written.get((messages[0].topic, messages[0].partition), -1)
        before = self._dump(state, limit=False)
        changed = False
        for message in messages:
            if message.offset <= state.offset and message.offset in state.isolated:
                message.rejection = _isolated_again(message)
                continue
            one = ApplyResult()
            rows: list[RawRow] = []
            try:
                alerts, after = self._apply_one(device_key, state, message, one, rows, ingest, written)
            except Exception as exc:
                state = DeviceState.loads(before)
                if isinstance(exc, StateTooLarge):
                    message.rejection = Rejection(RejectReason.STATE_TOO_LARGE, str(exc))
                else:
                    message.rejection = _internal_error(exc, "applying the readings")
                    log.error("message %s/%s@%s isolated to the DLQ: %r", message.topic, message.partition,
                              message.offset, exc, exc_info=exc)  # fmt: skip
                metrics.ISOLATED.labels(reason=message.rejection.reason.value).inc()
                self.windows.isolate(state, message.offset)
                before, changed = self._dump(state, limit=False), True
                continue
            before, changed = after, True
            result.alerts += alerts
            if not one.applied:
                result.replayed += 1
                if self.alerts is not None:
                    result.alerts += self.alerts.replayed(state, message.offset, written)
            result.rows += rows
            applied.touched |= one.touched
            applied.latest_touched |= one.latest_touched
            applied.duplicates += one.duplicates
            for size, count in one.late.items():
                applied.late[size] = applied.late.get(size, 0) + count
        self._collect(device_key.decode(errors="replace"), state, applied, result)
        if changed:
            result.state = before
        return result

    def _apply_one(
        self, device_key: bytes, state: DeviceState, message: SourceMessage, one: ApplyResult, rows: list[RawRow],
        ingest: int, written: int,
    ) -> tuple[list[AlertRow], bytes]:  # fmt: skip
        """One message of an isolating batch: applied, its alerts judged (before eviction can drop
        a window that just closed), evicted; its alerts and the state dumped. May raise."""
        alerts: list[AlertRow] = []
        self.windows.apply(state, message.readings, message.offset, one)
        _add_rows(rows, message, ingest)
        if self.alerts is not None and one.applied:
            alerts = self._evaluate(device_key.decode(errors="replace"), state, [message])
        self.windows.evict(state, written)
        if self.alerts is not None:
            self.alerts.written(state, written)
        return alerts, self._dump(state)

    def _dump(self, state: DeviceState, limit: bool = True) -> bytes:
        dumped = state.dumps()
        if limit and len(dumped) > self.max_state_bytes:
            raise StateTooLarge(
                f"device state would be {len(dumped)} bytes > {self.max_state_bytes} "
                f"({len(state.latest)} metrics, {len(state.windows)} windows; MILLSTREAM_LIMITS__MAX_STATE_BYTES)"
            )
        return dumped

    @staticmethod
    def _collect(device: str, state: DeviceState, applied: ApplyResult, result: _DeviceResult) -> None:
        """The aggregates to upsert: every window and latest value the messages touched."""
        windows, latest = state.windows, state.latest
        for key in applied.touched:
            agg = windows.get(key)  # type: ignore[call-overload]  # a plain tuple finds its WindowKey
            if agg is None:
                continue  # touched by a message that was isolated afterwards
            metric, size_s, start_ms = key
            result.windows.append(
                (device, metric, size_s, start_ms, start_ms + size_s * 1000, agg[COUNT],
                 agg[SUM], agg[MIN], agg[MAX], agg[LAST], agg[LAST_MS], agg[OFFSET])
            )  # fmt: skip
        for metric in applied.latest_touched:
            last = latest.get(metric)
            if last is not None:
                value, event_ms, offset = last
                result.latest.append((device, metric, value, event_ms, offset))
        result.late, result.duplicates = applied.late, applied.duplicates


async def _nothing(exc: BaseException) -> None:
    """No one to tell of a failed write (tests, the bench): :meth:`Pipeline.drain` raises it."""


def _add_rows(rows: list[RawRow], message: SourceMessage, ingest: int) -> None:
    """One ClickHouse row per reading and metric of ``message``."""
    add = rows.append
    partition, offset = message.partition, message.offset
    for reading in message.readings:
        device, factory, line, location = reading.device_id, reading.factory, reading.line, reading.location
        event_ms, index = reading.event_ms, reading.index
        event_s = event_ms // 1000
        for metric, value in reading.metrics.items():
            add((device, factory, line, location, metric, value, event_s, event_ms, ingest, partition, offset, index))


def raw_rows_of(message: SourceMessage, ingest: int) -> list[RawRow]:
    """The ClickHouse rows of one decoded message, as a batch would write them (``millstream replay``)."""
    rows: list[RawRow] = []
    _add_rows(rows, message, ingest)
    return rows


def _token(valid: list[SourceMessage]) -> str:
    """topic/partition:first-last offsets of the batch's stored messages (insert deduplication)."""
    spans: dict[tuple[str, int], list[int]] = {}
    for message in valid:
        span = spans.get((message.topic, message.partition))
        if span is None:
            spans[(message.topic, message.partition)] = [message.offset, message.offset]
        else:
            span[1] = message.offset
    return ",".join(f"{topic}/{part}:{first}-{last}" for (topic, part), (first, last) in sorted(spans.items()))


def _internal_error(exc: BaseException, during: str) -> Rejection:
    detail = f"{type(exc).__name__} while {during}: {exc}"
    return Rejection(RejectReason.INTERNAL_ERROR, detail[:INTERNAL_ERROR_DETAIL])


def _isolated_again(message: SourceMessage) -> Rejection:
    return Rejection(RejectReason.INTERNAL_ERROR, f"offset {message.offset} was isolated to the DLQ before (replayed)")
