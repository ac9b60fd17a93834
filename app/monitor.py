"""What a worker reports about itself besides its batches: consumer lag, event freshness,
table recovery and rebalances (the metrics are defined in :mod:`app.metrics`)."""

from __future__ import annotations

import time
from typing import Any

import faust

from agents.offsets import OffsetGate
from app import metrics
from app.settings import Settings


def register(app: faust.App, settings: Settings, gate: OffsetGate) -> None:
    """Two timers and the rebalance hooks."""
    topic = settings.kafka.telemetry_topic

    def revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        gate.reset()  # the broker's committed offsets are the truth again
        metrics.CONSUMER_LAG.clear()  # partitions this worker no longer owns must not linger

    def assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        metrics.REBALANCES.inc()
        revoked(sender)

    app.on_partitions_revoked.connect(revoked)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(assigned)  # type: ignore[arg-type]

    @app.timer(5.0)  # type: ignore[untyped-decorator]
    async def watch_offsets() -> None:
        # Partitions assigned but silent, and re-reads that never arrived (agents/offsets.py).
        # Not during a rebalance: the assignment is changing, and the gate is reset after it.
        if not app.rebalancing:
            await gate.watch(app.consumer.assignment())

    @app.timer(5.0)  # type: ignore[untyped-decorator]
    async def report_lag() -> None:
        # High-water from the last fetch response (tansu answers ListOffsets wrongly for
        # batched records, fetch responses right), committed from faust's own bookkeeping.
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != topic:
                continue
            committed = consumer._committed_offset.get(tp)  # type: ignore[attr-defined]
            try:
                high = consumer.highwater(tp)
            except Exception:
                continue
            if isinstance(high, int) and isinstance(committed, int):
                metrics.CONSUMER_LAG.labels(partition=str(tp.partition)).set(max(0, high - committed))

    @app.timer(2.0)  # type: ignore[untyped-decorator]
    async def report_state() -> None:
        newest = metrics.NEWEST_EVENT._value.get()
        if newest > 0:
            metrics.FRESHNESS.set(max(0.0, time.time() - newest))
        recovery = app.tables.recovery  # type: ignore[attr-defined]
        metrics.RECOVERY_IN_PROGRESS.set(1 if recovery.in_recovery else 0)
