"""OffsetGate: events admitted only in offset order from the committed offset; commits decided
by what was written, never by faust's acks or gap filling."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka.errors import IllegalStateError

from agents.offsets import RESEEK_AFTER_S, OffsetGate
from app import metrics

SOURCE = "telemetry"


class TP(NamedTuple):
    topic: str
    partition: int


A, B = TP(SOURCE, 0), TP(SOURCE, 1)
CHANGELOG = TP("millstream-device-windows-changelog", 0)


@dataclass
class Msg:
    tp: TP
    offset: int


@dataclass
class Ev:
    message: Msg


@dataclass
class FakeConsumer:
    """The parts of faust's consumer the gate touches, with faust's own defaults."""

    commits: dict[TP, int] = field(default_factory=dict)
    seeks: list[tuple[TP, int]] = field(default_factory=list)
    start_seeks: list[tuple[TP, int]] = field(default_factory=list)  # set apart by admit() below
    _read_offset: defaultdict[TP, int | None] = field(default_factory=lambda: defaultdict(lambda: None))
    _acked: defaultdict[TP, list[int]] = field(default_factory=lambda: defaultdict(list))
    _acked_index: defaultdict[TP, set[int]] = field(default_factory=lambda: defaultdict(set))
    _gap: dict[TP, Any] = field(default_factory=dict)
    _committed_offset: dict[TP, int] = field(default_factory=dict)

    def _new_offset(self, tp: TP) -> int | None:
        return 4242  # what faust would compute from its acks

    @property
    def _thread(self) -> FakeConsumer:
        return self

    def _ensure_consumer(self) -> FakeConsumer:
        return self

    in_thread: bool = False  # inside call_thread: on faust's consumer thread

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        self.in_thread = True
        try:
            return await fun(*args)
        finally:
            self.in_thread = False

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return dict.fromkeys(tps, 0)

    revoked: set[TP] = field(default_factory=set)  # partitions aiokafka no longer has assigned

    async def seek(self, tp: TP, offset: int) -> None:
        if tp in self.revoked:
            raise IllegalStateError(f"No current assignment for partition {tp}")
        # aiokafka's consumer lives on faust's consumer thread; seeking it from the event loop's
        # thread races its fetcher (KeyError in fetched_records crashed a worker in CI).
        assert self.in_thread, "seek() must run on the consumer's thread"
        self.seeks.append((tp, offset))
        self._read_offset[tp] = offset

    async def committed(self, tp: TP) -> int | None:
        return self.commits.get(tp)


@dataclass
class FakeProbe:
    """The broker's answer: the first offset at or after the one asked (absent = it exists)."""

    first: dict[tuple[TP, int], int] = field(default_factory=dict)
    asked: list[tuple[TP, int]] = field(default_factory=list)

    async def first_offset(self, tp: Any, offset: int) -> int | None:
        self.asked.append((tp, offset))
        return self.first.get((tp, offset), offset)

    async def close(self) -> None:
        return None


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate_with(commits: dict[TP, int], probe: FakeProbe | None = None) -> tuple[OffsetGate, FakeConsumer, Clock]:
    consumer, clock = FakeConsumer(commits), Clock()
    gate = OffsetGate(SOURCE, probe or FakeProbe(), clock=clock)
    gate.install(consumer)
    return gate, consumer, clock


async def admit(gate: OffsetGate, evs: list[Ev]) -> tuple[list[tuple[TP, int]], list[tuple[TP, int]]]:
    consumer = gate.consumer
    before = len(consumer.seeks)
    await gate.prepare({e.message.tp for e in evs})
    consumer.start_seeks += consumer.seeks[before:]  # to where each new partition starts
    del consumer.seeks[before:]
    admitted, skipped = await gate.admit(evs, gate.generation)
    return offsets(admitted), offsets(skipped)


def events(tp: TP, *offs: int) -> list[Ev]:
    return [Ev(Msg(tp, o)) for o in offs]


def offsets(evs: list[Any]) -> list[tuple[TP, int]]:
    return [(e.message.tp, e.message.offset) for e in evs]


async def test_contiguous_events_pass_and_redeliveries_are_skipped() -> None:
    gate, _, _ = gate_with({A: 10})
    admitted, skipped = await admit(gate, events(A, 9, 10, 11, 12) + events(B, 0, 1))
    assert admitted == [(A, 10), (A, 11), (A, 12), (B, 0), (B, 1)] and skipped == [(A, 9)]
    admitted, skipped = await admit(gate, events(A, 11, 12, 13))
    assert admitted == [(A, 13)] and skipped == [(A, 11), (A, 12)]


async def test_commits_follow_writes_not_faust_acks() -> None:
    gate, consumer, _ = gate_with({A: 10})
    consumer._acked[A].extend([10, 11, 12, 13])  # faust saw acks (e.g. of skipped events) ...
    consumer._gap[A] = "synthetic acks"  # ... and filled a gap on its own
    assert consumer._new_offset(A) is None  # nothing written yet: nothing to commit
    assert consumer._acked[A] == [] and A not in consumer._gap  # faust's lists do not grow
    await gate.prepare([A])
    live, _ = await gate.admit(events(A, 10, 11), gate.generation)
    gate.advance(live, gate.generation)
    assert consumer._new_offset(A) == 12
    assert consumer._new_offset(CHANGELOG) == 4242  # other topics: faust's own bookkeeping


async def test_fausts_drain_delivers_every_source_record() -> None:
    _, consumer, _ = gate_with({})
    consumer._read_offset[A] = 500  # e.g. a record fetched before a seek back raised the mark
    consumer._read_offset[CHANGELOG] = 7
    # faust's drain drops a record when offset < read offset and adds a gap when read offset is
    # set: for the source topic it reads None, so it does neither.
    assert consumer._read_offset[A] is None and consumer._read_offset[TP(SOURCE, 3)] is None
    assert consumer._read_offset[CHANGELOG] == 7 and consumer._read_offset[TP("other", 0)] is None


async def test_a_jump_over_existing_records_seeks_back_and_waits_for_them() -> None:
    gate, consumer, _ = gate_with({A: 228, B: 5})
    admitted, skipped = await admit(gate, events(A, 686, 687) + events(B, 5))
    assert admitted == [(B, 5)] and skipped == [(A, 686), (A, 687)]
    assert consumer.seeks == [(A, 228)]
    # Records fetched before the seek keep coming; none is admitted, none causes another seek.
    admitted, skipped = await admit(gate, events(A, 688, 689))
    assert admitted == [] and skipped == [(A, 688), (A, 689)] and consumer.seeks == [(A, 228)]
    admitted, _ = await admit(gate, events(A, 228, 229, 230))
    assert admitted == [(A, 228), (A, 229), (A, 230)]
    gate.advance([Ev(Msg(A, 230))], gate.generation)
    assert consumer._new_offset(A) == 231


async def test_a_lost_seek_is_repeated_after_a_while() -> None:
    gate, consumer, clock = gate_with({A: 5})
    await admit(gate, events(A, 9))
    clock.now += RESEEK_AFTER_S + 1
    await admit(gate, events(A, 10))
    assert consumer.seeks == [(A, 5), (A, 5)]


async def test_offsets_missing_on_the_broker_are_skipped_and_counted() -> None:
    probe = FakeProbe(first={(A, 5): 7})  # 5 and 6 are transaction markers, say
    gate, consumer, _ = gate_with({A: 5}, probe)
    before = metrics.SKIPPED_OFFSETS._value.get()
    admitted, skipped = await admit(gate, events(A, 7, 8))
    assert admitted == [(A, 7), (A, 8)] and skipped == [] and consumer.seeks == []
    assert metrics.SKIPPED_OFFSETS._value.get() - before == 2


async def test_a_partly_real_gap_rereads_what_exists() -> None:
    probe = FakeProbe(first={(A, 5): 7})
    gate, consumer, _ = gate_with({A: 5}, probe)
    admitted, skipped = await admit(gate, events(A, 9))  # 7 and 8 exist but were not delivered
    assert admitted == [] and skipped == [(A, 9)] and consumer.seeks == [(A, 7)]
    admitted, _ = await admit(gate, events(A, 7, 8, 9))
    assert admitted == [(A, 7), (A, 8), (A, 9)]


async def test_an_unanswered_probe_rereads_rather_than_skips() -> None:
    class Silent(FakeProbe):
        async def first_offset(self, tp: Any, offset: int) -> int | None:
            return None

    gate, consumer, _ = gate_with({A: 5}, Silent())
    admitted, skipped = await admit(gate, events(A, 7))
    assert skipped == [(A, 7)]
    assert admitted == [] and consumer.seeks == [(A, 5)]


async def test_a_rebalance_starts_over_from_the_committed_offset_and_voids_older_batches() -> None:
    gate, consumer, _ = gate_with({A: 0})
    old = gate.generation
    await gate.prepare([A])
    live, _ = await gate.admit(events(A, 0, 1, 2), old)
    consumer.commits[A] = 1  # another worker owned it meanwhile and committed 1
    gate.reset()
    gate.advance(live, old)  # the batch admitted before the rebalance finishes its writes late
    assert consumer._new_offset(A) is None
    stale, skipped = await gate.admit(events(A, 3), old)
    assert stale == [] and offsets(skipped) == [(A, 3)]
    admitted, _ = await admit(gate, events(A, 1, 2))
    assert admitted == [(A, 1), (A, 2)]


async def test_each_new_partition_is_sought_to_where_it_starts() -> None:
    gate, consumer, _ = gate_with({A: 228})
    await gate.prepare([A, B])
    assert sorted(consumer.seeks) == [(A, 228), (B, 0)]  # committed, else the first offset
    await gate.prepare([A, B])
    assert len(consumer.seeks) == 2  # once per assignment


async def test_watch_reads_a_silent_partition_from_its_start_after_a_rebalance() -> None:
    """Regression: after a rebalance faust seeks only partitions with a committed offset and
    drops the events it had buffered; one nobody had committed yet was never delivered again,
    no event arrived to show the gap, and the worker idled for good."""
    gate, consumer, _ = gate_with({})
    admitted, _ = await admit(gate, events(A, 0, 1, 2))
    assert admitted == [(A, 0), (A, 1), (A, 2)]  # processed, not yet written: nothing committed
    gate.reset()  # the rebalance; faust drops the rest of what it had fetched
    await gate.watch([A, CHANGELOG])  # no event arrives; the timer runs
    assert consumer.seeks == [(A, 0)]  # read again from the start
    admitted, _ = await admit(gate, events(A, 0, 1, 2, 3))
    assert admitted == [(A, 0), (A, 1), (A, 2), (A, 3)]


async def test_watch_seeks_again_when_a_reread_never_arrives() -> None:
    gate, consumer, clock = gate_with({A: 5})
    await admit(gate, events(A, 9))  # a gap: sought back to 5
    assert consumer.seeks == [(A, 5)]
    await gate.watch([A])
    assert consumer.seeks == [(A, 5)]  # not yet
    clock.now += RESEEK_AFTER_S + 1
    await gate.watch([A])  # nothing arrived meanwhile: no event would have triggered it
    assert consumer.seeks == [(A, 5), (A, 5)]


async def test_a_partition_revoked_before_its_seek_does_not_crash_the_worker() -> None:
    """aiokafka raises IllegalStateError for a seek on a partition it no longer has; from the
    gate's timer that crashed the worker in the rebalance chaos scenario. The gate is reset
    and prepares the new assignment anyway."""
    gate, consumer, _ = gate_with({A: 5, B: 7})
    consumer.revoked.add(A)
    await gate.prepare([A, B])
    assert consumer.seeks == [(B, 7)]
    await gate.watch([A, B])  # and again from the timer
