"""OffsetGuard: events are admitted only in offset order from the committed offset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agents.offsets import REAL_GAP_AFTER, OffsetGuard


@dataclass
class Msg:
    tp: str
    offset: int


@dataclass
class Ev:
    message: Msg


@dataclass
class FakeConsumer:
    commits: dict[str, int] = field(default_factory=dict)
    _gap: dict[str, set[int]] = field(default_factory=dict)
    seeks: list[tuple[str, int]] = field(default_factory=list)

    @property
    def _thread(self) -> FakeConsumer:
        return self

    def _ensure_consumer(self) -> FakeConsumer:
        return self

    async def call_thread(self, fun: Any, *args: Any) -> Any:
        return await fun(*args)

    async def earliest_offsets(self, *tps: str) -> dict[str, int]:
        return dict.fromkeys(tps, 0)

    async def seek(self, tp: str, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def committed(self, tp: str) -> int | None:
        return self.commits.get(tp)


async def admit(guard: OffsetGuard, evs: list[Ev]) -> tuple[list[Any], dict[Any, int]]:
    await guard.prepare(e.message.tp for e in evs)
    return guard.admit(evs)


def events(tp: str, *offsets: int) -> list[Ev]:
    return [Ev(Msg(tp, o)) for o in offsets]


def offsets(admitted: list[Any]) -> list[tuple[str, int]]:
    return [(e.message.tp, e.message.offset) for e in admitted]


async def test_contiguous_events_pass_and_duplicates_are_dropped() -> None:
    guard = OffsetGuard(FakeConsumer({"a": 10}))
    admitted, rewind = await admit(guard, events("a", 10, 11, 12) + events("b", 0, 1))
    assert offsets(admitted) == [("a", 10), ("a", 11), ("a", 12), ("b", 0), ("b", 1)] and rewind == {}
    admitted, rewind = await admit(guard, events("a", 11, 12, 13))
    assert offsets(admitted) == [("a", 13)] and rewind == {}


async def test_a_jump_rewinds_the_partition_and_clears_fausts_gap() -> None:
    consumer = FakeConsumer({"a": 228, "b": 5}, {"a": {229, 230}})
    guard = OffsetGuard(consumer)
    admitted, rewind = await admit(guard, events("a", 686, 687) + events("b", 5))
    assert offsets(admitted) == [("b", 5)] and rewind == {"a": 228}
    await guard.rewind(rewind)
    assert consumer.seeks == [("a", 228)] and consumer._gap["a"] == set()
    admitted, rewind = await admit(guard, events("a", 228, 229))
    assert offsets(admitted) == [("a", 228), ("a", 229)]


async def test_a_gap_that_never_fills_is_accepted() -> None:
    guard = OffsetGuard(FakeConsumer({"a": 5}))
    for _ in range(REAL_GAP_AFTER - 1):
        admitted, rewind = await admit(guard, events("a", 7))
        assert admitted == [] and rewind == {"a": 5}
    admitted, rewind = await admit(guard, events("a", 7))
    assert offsets(admitted) == [("a", 7)] and rewind == {}


async def test_rebalance_resets_to_the_committed_offset() -> None:
    consumer = FakeConsumer({"a": 0})
    guard = OffsetGuard(consumer)
    await admit(guard, events("a", 0, 1, 2))
    consumer.commits["a"] = 1  # another worker owned it meanwhile
    guard.reset()
    admitted, _ = await admit(guard, events("a", 1, 2))
    assert offsets(admitted) == [("a", 1), ("a", 2)]
