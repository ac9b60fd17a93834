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
import logging
import os
import time
from typing import Any

import faust

from agents.batching import BatchCollector
from agents.offsets import OffsetGate
from agents.pipeline import BatchOutcome, Pipeline
from app import metrics
from app.settings import Settings
from models.records import SourceMessage
from sinks.base import FatalSinkError

log = logging.getLogger(__name__)

CRASH_EXIT_CODE = 70  # EX_SOFTWARE: Kubernetes restarts the pod


async def crash_worker(app: faust.App, exc: BaseException) -> None:
    """Stop the worker without acking anything more; the orchestrator restarts it.

    Acked offsets may still be committed on the way down (they are fully written); the
    un-acked batch is replayed by whoever gets its partitions.
    """
    if getattr(app, "_millstream_crashing", False):
        return  # one crash at a time: a failed batch is reported by the collector and the agent
    app._millstream_crashing = True  # type: ignore[attr-defined]
    # A fatal sink error says what to fix in its message (a refused write generation, a bad
    # schema); its traceback only at debug level. Anything else is a bug: with the traceback.
    fatal = isinstance(exc, FatalSinkError)
    log.critical("millstream worker crashing: %s", exc, exc_info=None if fatal else exc)
    if fatal:
        log.debug("traceback of the fatal sink error", exc_info=exc)
    loop = asyncio.get_running_loop()
    # If the graceful stop hangs (a sink or the broker is the trouble), leave anyway.
    loop.call_later(15.0, os._exit, CRASH_EXIT_CODE)
    await app.crash(exc)


class Ingest:
    """One worker's reading: admit events in offset order, hand batches to the pipeline, ack
    each batch once the pipeline says it is durable."""

    def __init__(self, app: faust.App, settings: Settings, pipeline: Pipeline, gate: OffsetGate) -> None:
        self.app, self.settings, self.pipeline, self.gate = app, settings, pipeline, gate
        self.sinks = [s for s in (pipeline.raw_sink, pipeline.aggregate_sink) if s is not None]
        self.started: set[str] = set()  # sinks whose start() (connect + DDL) succeeded
        self.acked_cpu_s: float | None = None  # the process's CPU at the last ack

    async def run(self, stream: Any) -> None:
        """The agent's body: connect the sinks, then read until stopped or a batch fails."""
        try:
            for sink in self.sinks:  # idempotent DDL; retried like writes while the sink is down
                await self.pipeline.retry.run(sink.name, sink.start)
                self.started.add(sink.name)
            pipeline = self.settings.pipeline
            collector = BatchCollector(
                lambda events: self.handle(stream, events),
                max_events=pipeline.batch_messages,
                max_bytes=pipeline.batch_bytes,
                within_s=self.settings.clickhouse.flush_interval_s,
                on_error=self.crash,
            )
            await collector.run(stream)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self.crash(exc)
        finally:
            await self.pipeline.cancel()  # before the sinks it writes to are closed
            for sink in self.sinks:
                await sink.close()
            if self.pipeline.schemas is not None:
                await self.pipeline.schemas.close()
            await self.gate.probe.close()

    async def crash(self, exc: BaseException) -> None:
        await crash_worker(self.app, exc)

    async def handle(self, stream: Any, events: list[Any]) -> None:
        """One batch from the collector: admitted events to the pipeline, the rest acked."""
        if self.app.rebalancing:
            await self.defer(stream, events)
            return
        gate, generation = self.gate, self.gate.generation
        assigned = self.app.consumer.assignment()
        # All assigned source partitions at once: one round trip per rebalance.
        await gate.prepare(tp for tp in assigned if tp.topic == self.settings.kafka.telemetry_topic)
        # Events of partitions revoked while they waited are not processed: the new owner
        # replays them from the committed offset.
        live, skipped = await gate.admit([e for e in events if e.message.tp in assigned], generation)
        # Acked only so that faust knows this stream is done with them (it waits for every
        # event it handed out on a rebalance or a stop); the gate, not acks, decides commits.
        for event in skipped + [e for e in events if e.message.tp not in assigned]:
            await stream.ack(event)
        if not live:
            return
        batch = [
            SourceMessage(e.message.topic, e.message.partition, e.message.offset, e.message.key, e.message.value,
                          int(e.message.timestamp * 1000), handle=e)
            for e in live
        ]  # fmt: skip

        async def written(outcome: BatchOutcome) -> None:
            await self.written(stream, live, generation)

        await self.pipeline.submit(batch, written)

    async def defer(self, stream: Any, events: list[Any]) -> None:
        """faust is rebalancing: from the revoke until its tables are restored, nothing is read
        from or written to the state. A restore applies the changelog above the local store's
        offset, one record after another, to the partitions this worker keeps too: a state
        stored meanwhile could be overwritten with an older one, and the offsets committed after
        it would then stand for readings the state had lost (aggregates short, rows complete).
        Found reading faust while chasing a rebalance failure whose cause turned out to be a
        standby promotion (app/main.py); events do arrive in that window (a few dozen per
        rebalance in the chaos scenario). They are only acked, not admitted, so the gate reads
        them again from the committed offset once the worker is ready."""
        for event in events:
            await stream.ack(event)
        metrics.DEFERRED.inc(len(events))
        log.info("%d events arrived while faust rebalances or restores its tables; read again after it", len(events))

    async def written(self, stream: Any, events: list[Any], generation: int) -> None:
        """Everything derived from these events is durable: they may be committed and acked."""
        self.gate.advance(events, generation)
        for event in events:
            await stream.ack(event)
        cpu_s = time.process_time()
        if self.acked_cpu_s is not None:
            metrics.BATCH_CPU.observe(cpu_s - self.acked_cpu_s)
        self.acked_cpu_s = cpu_s
        metrics.ACKED.inc(len(events))  # with BATCH_CPU, no await between: a scrape sees both or neither
        acked_at = time.time()
        for event in events:
            metrics.ACK_LATENCY.observe(acked_at - event.message.timestamp)

    def unready(self) -> list[str]:
        """Why this worker should not get traffic yet (empty: ready)."""
        problems = [f"{s.name} not connected yet" for s in self.sinks if s.name not in self.started]
        now = time.monotonic()
        for name, since in self.pipeline.retry.failing_since.items():
            if now - since > self.settings.pipeline.unready_after_s:
                problems.append(f"{name} failing for {now - since:.0f}s")
        return problems


def register(app: faust.App, settings: Settings, source: Any, pipeline: Pipeline, gate: OffsetGate) -> Ingest:
    """Declare the ingest agent on ``source``: one actor, so processing stays in offset order."""
    ingest = Ingest(app, settings, pipeline, gate)
    pipeline.on_failure(ingest.crash)

    @app.agent(source, name="ingest", concurrency=1)
    async def ingest_agent(stream: Any) -> None:
        await ingest.run(stream)

    return ingest
