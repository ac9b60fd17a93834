"""Which source offsets get processed, and which may be committed: millstream decides, not faust.

faust 0.15's own bookkeeping can commit past a record nobody processed, or stop a partition:

- its drain loop drops every record below the highest offset it has delivered for a
  partition; after any seek back, records fetched before the seek raise that mark again and
  the re-read records are dropped without a word (seen with tansu in a kill -9 loop: a
  partition that never moved again);
- it fills "gaps" between delivered offsets with synthetic acks (meant for transaction
  markers and compaction), and after a restart a record fetched before its seek to the
  committed offset opens such a gap;
- with a single un-acked offset at the head of a partition it commits past it (faust #606).

So for the source topic the gate

1. lets faust's drain deliver every record it fetches (no drop, no synthetic gap);
2. admits events strictly in offset order from the broker's committed offset (else the first
   offset), and seeks every newly assigned partition there itself: after a rebalance faust
   seeks only partitions with a committed offset and drops the events it had buffered, so a
   partition nobody had committed yet was never read again and its worker idled for good
   (found by the kill -9 test: the restarted worker joined twice). An offset below the next
   one expected was delivered again and is skipped. An offset above it is a gap: the broker
   is asked directly (a plain consumer reading at the missing offset) whether the missing
   records exist. If they do not (transaction markers, compaction, retention), the gap is real
   and skipped, counted in ``millstream_skipped_offsets_total``. If they do, the partition is
   sought back and events are skipped until the missing record arrives. :meth:`watch`, run
   every few seconds, learns partitions no event has arrived for and seeks again where a
   re-read has not arrived;
3. answers faust's commit with the offset after the last admitted event whose writes have
   finished. faust's acks then only tell it that an event is done (for its shutdown and
   rebalance waits); they never decide what is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from aiokafka.errors import IllegalStateError

from app import metrics

log = logging.getLogger(__name__)

RESEEK_AFTER_S = 30.0  # still waiting for a re-read record after this long: seek again (harmless)
PROBE_TIMEOUT_S = 10.0


class GapProbe(Protocol):
    async def first_offset(self, tp: Any, offset: int) -> int | None:
        """Offset of the first record at or after ``offset`` on the broker; None when unknown."""

    async def close(self) -> None: ...


class BrokerProbe:
    """Reads one record at an offset with a plain aiokafka consumer (no group, no commits)."""

    def __init__(self, client_options: dict[str, Any], timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.client_options, self.timeout_s = client_options, timeout_s
        self._consumer: Any = None
        self._lock = asyncio.Lock()

    async def first_offset(self, tp: Any, offset: int) -> int | None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        async with self._lock:  # one partition at a time on the one connection
            try:
                if self._consumer is None:
                    consumer = AIOKafkaConsumer(
                        group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", **self.client_options
                    )
                    await consumer.start()
                    self._consumer = consumer
                partition = TopicPartition(tp.topic, tp.partition)
                self._consumer.assign([partition])
                self._consumer.seek(partition, offset)
                deadline = time.monotonic() + self.timeout_s
                while (left := deadline - time.monotonic()) > 0:
                    records = await self._consumer.getmany(partition, timeout_ms=int(left * 1000), max_records=1)
                    if records.get(partition):
                        return int(records[partition][0].offset)
            except Exception:
                log.warning("could not ask the broker about %s at offset %s", tp, offset, exc_info=True)
            return None

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


class _SourceReadOffsets(dict[Any, Any]):
    """faust's per-partition read offsets, with the source topic's always unknown: its drain
    then delivers every source record (``offset >= None`` is never tested) and adds no gap."""

    def __init__(self, topic: str, existing: dict[Any, Any]) -> None:
        super().__init__(existing)
        self.topic = topic

    def __missing__(self, tp: Any) -> None:
        return None

    def __getitem__(self, tp: Any) -> Any:
        return None if tp.topic == self.topic else super().__getitem__(tp)


class OffsetGate:
    def __init__(self, topic: str, probe: GapProbe, clock: Callable[[], float] = time.monotonic) -> None:
        self.topic = topic
        self.probe = probe
        self.clock = clock
        self.consumer: Any = None
        self.generation = 0  # bumped on every rebalance: batches of an older one commit nothing
        self.next_offset: dict[Any, int] = {}  # tp -> the offset to admit next
        self.rewinding: dict[Any, float] = {}  # tp -> when it was last sought back to next_offset
        self.committable: dict[Any, int] = {}  # tp -> everything below is written
        self._faust_new_offset: Callable[[Any], int | None] | None = None
        self._preparing = asyncio.Lock()  # prepare() runs from batches and from watch()

    def attach(self, app: Any) -> None:
        """Install on every consumer ``app`` builds, before faust's fetcher starts."""
        new_consumer = app._new_consumer

        def _new_consumer() -> Any:
            consumer = new_consumer()
            self.install(consumer)
            return consumer

        app._new_consumer = _new_consumer

    def install(self, consumer: Any) -> None:
        """Take over commit decisions and record delivery for the source topic (before faust's
        fetcher starts: its drain loop binds the read-offset mapping once)."""
        self.consumer = consumer
        consumer._read_offset = _SourceReadOffsets(self.topic, consumer._read_offset)
        self._faust_new_offset = consumer._new_offset
        consumer._new_offset = self._new_offset

    def _new_offset(self, tp: Any) -> int | None:
        """faust asks this at every commit: the offset to commit for ``tp``, or None."""
        if tp.topic != self.topic:
            assert self._faust_new_offset is not None
            return self._faust_new_offset(tp)
        # faust's acks and gaps for the source topic decide nothing; keep them from growing.
        consumer = self.consumer
        acked = consumer._acked.get(tp)
        if acked:
            acked.clear()
        index = consumer._acked_index.get(tp)
        if index:
            index.clear()
        consumer._gap.pop(tp, None)
        return self.committable.get(tp)

    def reset(self) -> None:
        """On every rebalance: the broker's committed offsets are the truth again."""
        self.generation += 1
        self.next_offset.clear()
        self.rewinding.clear()
        self.committable.clear()

    async def prepare(self, tps: Iterable[Any]) -> None:
        """Learn where each new partition starts: its committed offset, else its first offset.

        Asked of the broker, not of faust's consumer state, which right after an assignment
        may not be filled in yet while records already flow.
        """
        async with self._preparing:
            await self._prepare(set(tps))

    async def _prepare(self, tps: set[Any]) -> None:
        new = tps - self.next_offset.keys()
        if not new:
            return
        generation = self.generation
        starts = {tp: await self._committed(tp) for tp in new}
        # One ListOffsets for every partition without a commit (each call waits for a fetch
        # round of faust's consumer thread, about a second and a half).
        uncommitted = [tp for tp, offset in starts.items() if offset is None]
        earliest = await self.consumer.earliest_offsets(*uncommitted) if uncommitted else {}
        if generation != self.generation:
            return  # a rebalance came in meanwhile; these answers may be stale
        for tp, committed in starts.items():
            offset = committed if committed is not None else earliest.get(tp, 0)
            self.next_offset.setdefault(tp, offset)
            # Where faust sought to, for comparison: when the two differ, the gate's start wins
            # (a lower start replays idempotently; faust never commits below its own).
            sought = self.consumer._committed_offset.get(tp)
            log.info("%s starts at offset %s (committed: %s; faust sought to %s)", tp, offset, committed, sought)
            # Read it from there whatever faust's fetcher did: harmless when faust sought there
            # too (the records it delivered again are skipped as below the expected offset).
            await self._seek_on_thread(tp, offset)

    async def watch(self, tps: Iterable[Any]) -> None:
        """Every few seconds: learn the assigned partitions no event has arrived for yet (and
        seek them to their start), and seek again where a re-read has not arrived."""
        await self.prepare(tp for tp in tps if tp.topic == self.topic)
        for tp, since in list(self.rewinding.items()):
            if self.clock() - since > RESEEK_AFTER_S and tp in self.next_offset:
                log.warning("%s: offset %s has not arrived after a seek; seeking again", tp, self.next_offset[tp])
                await self._seek(tp, self.next_offset[tp])

    async def _committed(self, tp: Any) -> int | None:
        # faust runs aiokafka in its own thread; ask that consumer, on that thread.
        thread = self.consumer._thread
        aiokafka_consumer = thread._ensure_consumer()
        committed = await thread.call_thread(aiokafka_consumer.committed, tp)
        return committed if isinstance(committed, int) and committed >= 0 else None

    async def admit(self, events: Iterable[Any], generation: int) -> tuple[list[Any], list[Any]]:
        """Split events into those to process now, in offset order, and those to skip."""
        admitted: list[Any] = []
        skipped: list[Any] = []
        for event in events:
            tp, offset = event.message.tp, event.message.offset
            expected = self.next_offset.get(tp)
            if generation != self.generation or expected is None:
                skipped.append(event)  # a rebalance came in: redelivered from the committed offset
                continue
            if tp in self.rewinding:
                if offset != expected:
                    skipped.append(event)  # fetched before the seek back
                    if self.clock() - self.rewinding[tp] > RESEEK_AFTER_S:
                        await self._seek(tp, expected)
                    continue
                del self.rewinding[tp]
            if offset > expected:
                expected = await self._gap(tp, expected, offset)
            if offset != expected:
                skipped.append(event)  # delivered again (below), or waiting for a re-read (above)
                continue
            self.next_offset[tp] = offset + 1
            admitted.append(event)
        return admitted, skipped

    async def _gap(self, tp: Any, expected: int, offset: int) -> int:
        """``offset`` arrived where ``expected`` was due; returns the offset now due."""
        first = await self.probe.first_offset(tp, expected)
        if first is not None and first > expected:
            log.warning(
                "offsets %s-%s of %s are not on the broker (transaction markers, compaction or retention); "
                "going on from %s",
                expected, first - 1, tp, first,
            )  # fmt: skip
            metrics.SKIPPED_OFFSETS.inc(first - expected)
            self.next_offset[tp] = expected = first
        if offset > expected:
            log.warning("offsets %s-%s of %s were not delivered; re-reading them", expected, offset - 1, tp)
            await self._seek(tp, expected)
        return expected

    async def _seek(self, tp: Any, offset: int) -> None:
        self.rewinding[tp] = self.clock()
        await self._seek_on_thread(tp, offset)

    async def _seek_on_thread(self, tp: Any, offset: int) -> None:
        # faust's consumer.seek() calls aiokafka from this thread, but aiokafka's consumer lives
        # on faust's consumer thread: a seek racing its fetcher raised KeyError in
        # fetched_records and crashed the worker (seen in CI once every partition was sought
        # after each rebalance). So on that thread, as _committed() does.
        thread = self.consumer._thread
        try:
            await thread.call_thread(thread._ensure_consumer().seek, tp, offset)
        except IllegalStateError:
            # Revoked meanwhile: a rebalance came in, and the gate is reset and prepares the
            # partitions it gets from scratch. (Raised from a timer, this crashed the worker in
            # the rebalance chaos scenario.)
            log.info("%s is no longer assigned; not sought to %s", tp, offset)

    def advance(self, events: Iterable[Any], generation: int) -> None:
        """These admitted events are written: their offsets may be committed."""
        if generation != self.generation:
            return  # admitted before a rebalance; the new owner starts from the committed offset
        committable = self.committable
        for event in events:
            committable[event.message.tp] = event.message.offset + 1
