"""The faust agent: telemetry topic → :class:`agents.pipeline.Pipeline` → ordered acks.

Why it is shaped like this (DESIGN.md §4): an exception escaping a faust agent acks and
commits the failing message, and ``take()`` acks its buffer even when the body raised. So the
stream is read with acks off (:mod:`agents.batching`), one actor per partition set
(``concurrency=1``, processing stays in offset order), and a batch is acked only after the
pipeline says everything is written; :mod:`agents.offsets` decides what may be committed.
Any failure crashes the worker instead of acking.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
import weakref
from typing import Any

import faust
import orjson
from faust.streams import _current_event

from agents.batching import BatchCollector, InOrderWrites
from agents.offsets import BrokerProbe, OffsetGate
from agents.pipeline import Pipeline
from agents.windows import WindowPolicy
from app import metrics
from app.kafka import kafka_client_options
from app.settings import Settings
from models.decode import Decoder
from models.records import SourceMessage
from sinks.base import RetryPolicy
from sinks.clickhouse import raw_writer
from sinks.dead_letters import KafkaDeadLetters
from sinks.scylla import ScyllaAggregateWriter

log = logging.getLogger(__name__)

STATE_TABLE = "device-windows"
DLQ_PROGRESS_TABLE = "dlq-progress"
CRASH_EXIT_CODE = 70  # EX_SOFTWARE: Kubernetes restarts the pod


class TableStateStore:
    """Window state in a changelog-backed faust table keyed by device id (bytes).

    faust's stores find a key's partition from the *current event*: the RocksDB store reads
    and writes only the database of that event's partition, and the changelog record goes to
    that partition. A batch task inherits whatever event its stream read last, usually of
    another partition, so both reads and writes run with the key's own message as the current
    event. (Reading without it found no state for most devices and restarted their aggregates
    from empty: the RocksDB aggregates were wrong after every large batch.)
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, device_key: bytes, source: SourceMessage) -> bytes | None:
        token = _current_event.set(weakref.ref(source.handle))
        try:
            value = self.table.get(device_key)
        finally:
            _current_event.reset(token)
        return value if value is None else bytes(value)

    def put(self, device_key: bytes, value: bytes, source: SourceMessage) -> None:
        token = _current_event.set(weakref.ref(source.handle))
        try:
            self.table[device_key] = value
        finally:
            _current_event.reset(token)


async def crash_worker(app: faust.App, exc: BaseException) -> None:
    """Stop the worker without acking anything more; the orchestrator restarts it.

    Acked offsets may still be committed on the way down (they are fully written); the
    un-acked batch is replayed by whoever gets its partitions.
    """
    if getattr(app, "_millstream_crashing", False):
        return  # one crash at a time: a failed batch is reported by the collector and the agent
    app._millstream_crashing = True  # type: ignore[attr-defined]
    log.critical("millstream worker crashing: %s", exc, exc_info=exc)
    loop = asyncio.get_running_loop()
    # If the graceful stop hangs (a sink or the broker is the trouble), leave anyway.
    loop.call_later(15.0, os._exit, CRASH_EXIT_CODE)
    await app.crash(exc)


class ChangelogAcks:
    """The changelog records of millstream's tables, as futures of their acknowledgements.

    faust's flush before a commit does not wait for them all: its producer buffer's flush
    returns once no record has left the buffer for 0.1 s (a busy event loop is enough), and
    aiokafka's flush cannot see records still in that buffer. A commit could then go out
    before the state it covers, and a worker killed right after lost that state for good
    (found by the rebalance chaos scenario on RocksDB: one device's windows short by eleven
    messages). So the pipeline waits for a batch's records itself before the batch's offsets
    become committable.
    """

    def __init__(self) -> None:
        self._pending: list[Any] = []

    def track(self, table: Any) -> None:
        send = table.send_changelog

        def send_changelog(*args: Any, **kwargs: Any) -> Any:
            future = send(*args, **kwargs)
            self._pending.append(future)
            return future

        table.send_changelog = send_changelog

    def take(self) -> list[Any]:
        pending, self._pending = self._pending, []
        return pending


class StateCensus:
    """How many devices, window aggregates and latest values a worker's table holds.

    With RocksDB most of the state is on disk and is never read again after a restart (only the
    changelog tail is), so counting it means walking the table. That happens on request, at
    most every ``max_age_s``, in slices of ``slice_devices`` between which the event loop
    serves everything else; a request within ``max_age_s`` of the last count gets that count.
    """

    def __init__(self, table: Any, max_age_s: float = 5.0, slice_devices: int = 500) -> None:
        self.table, self.max_age_s, self.slice_devices = table, max_age_s, slice_devices
        self._counted: dict[str, Any] = {}
        self._at = -math.inf
        self._lock = asyncio.Lock()

    async def counts(self) -> dict[str, Any]:
        async with self._lock:
            if time.monotonic() - self._at > self.max_age_s:
                self._counted = await self._count()
                self._at = time.monotonic()
            return self._counted

    async def _count(self) -> dict[str, Any]:
        started = time.monotonic()
        keys = list(self.table.keys())  # one pass over keys, no values; the slices then look each up
        devices = windows = latest = 0
        for first in range(0, len(keys), self.slice_devices):
            for key in keys[first : first + self.slice_devices]:
                raw = self.table.get(key)
                if raw is None:
                    continue  # gone since (a rebalance)
                doc = orjson.loads(bytes(raw))
                devices, windows, latest = devices + 1, windows + len(doc["a"]), latest + len(doc["l"])
            await asyncio.sleep(0)
        return {"devices": devices, "window_aggregates": windows, "latest_values": latest,
                "counted_in_s": round(time.monotonic() - started, 3)}  # fmt: skip


def bytes_table(app: faust.App, settings: Settings, name: str, help: str) -> Any:
    """A changelog-backed table of bytes to bytes, partitioned like the source topic."""
    options: dict[str, Any] = {}
    if settings.store == "rocksdb":
        from app.main import table_options

        options["options"] = table_options(settings)
    table = app.Table(
        name, default=None, partitions=settings.kafka.partitions, key_type=bytes, value_type=bytes, help=help,
        **options,
    )  # fmt: skip
    # faust tables pick "json" for any non-Record type and pass bytes through unencoded on
    # write, but decode the changelog as JSON on recovery; keep both sides raw (before the
    # changelog topic is first built).
    table.key_serializer = table.value_serializer = "raw"  # type: ignore[attr-defined]
    return table


def register(app: faust.App, settings: Settings) -> Pipeline:
    """Declare topics, the state table and the ingest agent on ``app``."""
    kafka = settings.kafka
    source = app.topic(
        kafka.telemetry_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=kafka.partitions,
    )  # fmt: skip
    dlq = app.topic(
        kafka.dlq_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=kafka.partitions, replicas=kafka.replication_factor,
    )  # fmt: skip
    table = bytes_table(app, settings, STATE_TABLE, "window state per device")
    dlq_table = bytes_table(app, settings, DLQ_PROGRESS_TABLE, "highest source offset dead-lettered per partition")
    changelog = ChangelogAcks()
    changelog.track(table)
    changelog.track(dlq_table)
    limits = settings.limits
    decoder = Decoder(
        max_message_bytes=limits.max_message_bytes,
        max_readings_per_message=limits.max_readings_per_message,
        max_device_id_length=limits.max_device_id_length,
        max_future_skew_s=limits.max_future_skew_s,
        max_metrics_per_reading=limits.max_metrics_per_reading,
    )
    pipeline = Pipeline(
        decoder=decoder,
        windows=WindowPolicy(
            settings.windows.sizes_s,
            settings.windows.grace_s,
            settings.windows.retention_windows,
            settings.windows.dedup_s,
        ),
        state=TableStateStore(table),
        raw_sink=raw_writer(settings.clickhouse),
        aggregate_sink=ScyllaAggregateWriter(settings.scylla) if settings.scylla.enabled else None,
        dead_letters=KafkaDeadLetters(dlq, app.conf.producer_max_request_size),
        retry=RetryPolicy(budget_s=settings.pipeline.retry_budget_s),
        dlq_max_consecutive=limits.dlq_max_consecutive,
        dlq_progress=TableStateStore(dlq_table),
        changelog=changelog,
        max_state_bytes=limits.max_state_bytes,
    )
    sinks = [s for s in (pipeline.raw_sink, pipeline.aggregate_sink) if s is not None]

    gate = OffsetGate(kafka.telemetry_topic, BrokerProbe(kafka_client_options(kafka)))
    new_consumer = app._new_consumer

    def _new_consumer() -> Any:
        # The gate must see the consumer before faust's fetcher starts (see agents/offsets.py).
        consumer = new_consumer()
        gate.install(consumer)
        return consumer

    app._new_consumer = _new_consumer  # type: ignore[method-assign]
    started: set[str] = set()  # sinks whose start() (connect + DDL) succeeded

    def _rebalanced(sender: Any, *args: Any, **kwargs: Any) -> None:
        gate.reset()
        metrics.CONSUMER_LAG.clear()  # partitions this worker no longer owns must not linger

    @app.timer(5.0)  # type: ignore[untyped-decorator]
    async def report_lag() -> None:
        # High-water from the last fetch response (tansu answers ListOffsets wrongly for
        # batched records, fetch responses right), committed from faust's own bookkeeping.
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != kafka.telemetry_topic:
                continue
            committed = consumer._committed_offset.get(tp)  # type: ignore[attr-defined]
            try:
                high = consumer.highwater(tp)
            except Exception:
                continue
            if isinstance(high, int) and isinstance(committed, int):
                metrics.CONSUMER_LAG.labels(partition=str(tp.partition)).set(max(0, high - committed))

    def _assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        metrics.REBALANCES.inc()
        _rebalanced(sender)

    @app.timer(2.0)  # type: ignore[untyped-decorator]
    async def report_state() -> None:
        newest = metrics.NEWEST_EVENT._value.get()
        if newest > 0:
            metrics.FRESHNESS.set(max(0.0, time.time() - newest))
        recovery = app.tables.recovery  # type: ignore[attr-defined]
        metrics.RECOVERY_IN_PROGRESS.set(1 if recovery.in_recovery else 0)

    app.on_partitions_revoked.connect(_rebalanced)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(_assigned)  # type: ignore[arg-type]

    async def handle(stream: Any, events: list[Any]) -> None:
        generation = gate.generation
        assigned = app.consumer.assignment()
        # All assigned source partitions at once: one round trip per rebalance.
        await gate.prepare(tp for tp in assigned if tp.topic == kafka.telemetry_topic)
        # Events of partitions revoked while they waited are not processed: the new owner
        # replays them from the committed offset.
        owned = [e for e in events if e.message.tp in assigned]
        live, skipped = await gate.admit(owned, generation)
        # Acked only so that faust knows this stream is done with them (it waits for every
        # event it handed out on a rebalance or a stop); the gate, not acks, decides commits.
        for event in skipped:
            await stream.ack(event)
        for event in events:
            if event.message.tp not in assigned:
                await stream.ack(event)
        if not live:
            return
        # One batch: the collector already cut it at MILLSTREAM_PIPELINE__BATCH_BYTES.
        batch = [
            SourceMessage(
                e.message.topic,
                e.message.partition,
                e.message.offset,
                e.message.key,
                e.message.value,
                int(e.message.timestamp * 1000),
                handle=e,
            )
            for e in live
        ]
        prepared = await pipeline.prepare(batch)
        # Its writes start once the previous batch's are done; meanwhile the next batch is
        # prepared (and read). Order of commits and acks: strictly batch after batch.
        await writes.submit(
            functools.partial(pipeline.write, prepared), functools.partial(written, stream, live, generation)
        )

    async def written(stream: Any, chunk: list[Any], generation: int) -> None:
        # Everything derived from these offsets is written: now they may be committed.
        gate.advance(chunk, generation)
        for event in chunk:
            await stream.ack(event)
        metrics.ACKED.inc(len(chunk))
        acked_at = time.time()
        for event in chunk:
            metrics.ACK_LATENCY.observe(acked_at - event.message.timestamp)

    writes = InOrderWrites(on_error=lambda exc: crash_worker(app, exc))

    @app.agent(source, name="ingest", concurrency=1)
    async def ingest(stream: Any) -> None:
        try:
            for sink in sinks:  # idempotent DDL; retried like writes while the sink is down
                await pipeline.retry.run(sink.name, sink.start)
                started.add(sink.name)
            collector = BatchCollector(
                lambda events: handle(stream, events),
                max_events=settings.pipeline.batch_messages,
                max_bytes=settings.pipeline.batch_bytes,
                within_s=settings.clickhouse.flush_interval_s,
                on_error=lambda exc: crash_worker(app, exc),
            )
            await collector.run(stream)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await crash_worker(app, exc)
        finally:
            await writes.cancel()  # before the sinks it writes to are closed
            for sink in sinks:
                await sink.close()
            await gate.probe.close()

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """Liveness: answering at all means the event loop is not stuck."""
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        """Readiness: sinks connected, state recovered once, no sink failing for long.

        A rebalance does not make a worker unready (its tables were recovered before), so the
        probe does not flap while partitions move.
        """
        problems = [f"{s.name} not connected yet" for s in sinks if s.name not in started]
        if not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
            problems.append("table recovery not finished")
        now = time.monotonic()
        for name, since in pipeline.retry.failing_since.items():
            if now - since > settings.pipeline.unready_after_s:
                problems.append(f"{name} failing for {now - since:.0f}s")
        if problems:
            return web.json({"status": "not ready", "problems": problems}, status=503)
        return web.json({"status": "ready"})

    census = StateCensus(table)

    @app.page("/aggregates")
    async def aggregates_page(web: Any, request: Any) -> Any:
        """Counts of the aggregates this worker holds (its partitions), for the demo and ops."""
        return web.json(await census.counts())

    app.millstream_pipeline = pipeline  # type: ignore[attr-defined]
    return pipeline
