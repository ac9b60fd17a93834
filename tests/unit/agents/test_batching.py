"""BatchCollector: batches by size or age, one at a time, in order; errors never vanish."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agents.batching import BatchCollector, InOrderWrites

OnError = Callable[[BaseException], Awaitable[None]]


@pytest.fixture
def no_errors() -> Iterator[OnError]:
    """An ``on_error`` that records what it hears; the test fails at teardown if it heard
    anything (``pytest.fail`` as the callback would raise inside a task, where asyncio logs
    the exception and the test passes anyway)."""
    heard: list[BaseException] = []

    async def record(exc: BaseException) -> None:
        heard.append(exc)

    yield record
    assert not heard, f"on_error was called: {heard!r}"


class FakeStream:
    """Yields values from a queue and exposes the event as faust's ``current_event``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.enable_acks = True
        self.current_event: Any = None

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        event = await self.queue.get()
        if event is StopAsyncIteration:
            raise StopAsyncIteration
        self.current_event = event
        return event


async def test_full_batches_go_at_once_and_acks_are_left_to_the_caller(no_errors: OnError) -> None:
    stream, batches = FakeStream(), []

    async def process(batch: list[Any]) -> None:
        batches.append(batch)

    collector = BatchCollector(process, max_events=3, within_s=60, on_error=no_errors)
    for event in range(7):
        stream.queue.put_nowait(event)
    stream.queue.put_nowait(StopAsyncIteration)
    await collector.run(stream)
    assert batches == [[0, 1, 2], [3, 4, 5]] and collector.buffer == [6]  # 6 waits for its time
    assert stream.enable_acks is False  # faust must not ack as the loop moves on


async def test_a_partial_batch_goes_once_its_first_event_is_old_enough(no_errors: OnError) -> None:
    stream, batches = FakeStream(), []

    async def process(batch: list[Any]) -> None:
        batches.append(batch)

    collector = BatchCollector(process, max_events=100, within_s=0.2, on_error=no_errors)
    task = asyncio.ensure_future(collector.run(stream))
    stream.queue.put_nowait("a")
    stream.queue.put_nowait("b")
    await asyncio.sleep(0.1)
    assert batches == []  # not yet due
    await asyncio.sleep(0.3)
    assert batches == [["a", "b"]]
    task.cancel()


async def test_batches_are_processed_one_at_a_time_in_order_while_reading_goes_on(no_errors: OnError) -> None:
    stream, order, running = FakeStream(), [], []
    release = asyncio.Event()

    async def process(batch: list[Any]) -> None:
        running.append(batch)
        assert len(running) == 1, "two batches at once"
        if batch == [0, 1]:
            await release.wait()  # a slow write
        order.append(batch)
        running.remove(batch)

    collector = BatchCollector(process, max_events=2, within_s=0.05, on_error=no_errors)
    task = asyncio.ensure_future(collector.run(stream))
    for event in range(5):
        stream.queue.put_nowait(event)
    await asyncio.sleep(0.2)
    # The first batch is still being written; the stream was read on meanwhile, until the
    # next buffer was full: then reading waits (two batches in memory at most).
    assert order == [] and collector.buffer == [2, 3] and stream.queue.qsize() == 1
    release.set()
    await asyncio.sleep(0.3)
    assert order == [[0, 1], [2, 3], [4]]
    task.cancel()


async def test_an_error_in_a_timed_flush_is_reported() -> None:
    stream, reported = FakeStream(), []

    async def process(batch: list[Any]) -> None:
        raise RuntimeError("sink broke")

    async def on_error(exc: BaseException) -> None:
        reported.append(exc)

    collector = BatchCollector(process, max_events=100, within_s=0.05, on_error=on_error)
    task = asyncio.ensure_future(collector.run(stream))
    stream.queue.put_nowait("a")
    await asyncio.sleep(0.3)
    assert [str(e) for e in reported] == ["sink broke"]
    task.cancel()


async def test_a_failed_batch_is_reported_once_and_reading_stops() -> None:
    stream, reported, processed = FakeStream(), [], []

    async def process(batch: list[Any]) -> None:
        processed.append(batch)
        raise RuntimeError("sink broke")

    async def on_error(exc: BaseException) -> None:
        reported.append(exc)

    collector = BatchCollector(process, max_events=1, within_s=60, on_error=on_error)
    for event in ("a", "b", "c", "d"):
        stream.queue.put_nowait(event)
    await asyncio.wait_for(collector.run(stream), 5)  # returns: no more reading
    await asyncio.sleep(0)
    assert [str(e) for e in reported] == ["sink broke"]
    assert processed == [["a"]]  # nothing after the failed batch was processed


async def test_cancelling_the_reader_cancels_the_batch_in_progress(no_errors: OnError) -> None:
    stream, started = FakeStream(), asyncio.Event()

    async def process(batch: list[Any]) -> None:
        started.set()
        await asyncio.sleep(60)

    collector = BatchCollector(process, max_events=1, within_s=60, on_error=no_errors)
    task = asyncio.ensure_future(collector.run(stream))
    stream.queue.put_nowait("a")
    await started.wait()
    batch = collector._batch
    task.cancel()
    await asyncio.wait([task])
    assert batch is not None and batch.cancelled()  # un-acked: replayed by the next owner


async def test_writes_run_one_at_a_time_in_order_while_the_caller_goes_on(no_errors: OnError) -> None:
    log: list[str] = []
    gates = [asyncio.Event(), asyncio.Event()]
    writes = InOrderWrites(on_error=no_errors)

    def write(i: int) -> Any:
        async def run() -> None:
            log.append(f"write {i}")
            await gates[i].wait()

        return run

    def then(i: int) -> Any:
        async def run() -> None:
            log.append(f"ack {i}")

        return run

    await writes.submit(write(0), then(0))
    log.append("prepared 1")  # the caller works on while write 0 is in flight
    second = asyncio.ensure_future(writes.submit(write(1), then(1)))
    await asyncio.sleep(0.05)
    assert sorted(log) == ["prepared 1", "write 0"] and not second.done()  # write 1 waits for write 0
    gates[0].set()
    await second
    gates[1].set()
    await writes.wait()
    assert log[2:] == ["ack 0", "write 1", "ack 1"]


async def test_a_failed_write_is_reported_and_stops_the_next_one() -> None:
    reported: list[BaseException] = []

    async def on_error(exc: BaseException) -> None:
        reported.append(exc)

    async def fail() -> None:
        raise RuntimeError("fatal sink error")

    acked: list[str] = []

    async def ack() -> None:
        acked.append("acked")

    writes = InOrderWrites(on_error=on_error)
    await writes.submit(fail, ack)
    with pytest.raises(RuntimeError, match="fatal sink error"):
        await writes.submit(ack, ack)
    await asyncio.sleep(0)
    assert acked == [] and [str(e) for e in reported] == ["fatal sink error"]


async def test_cancel_abandons_the_write_in_flight(no_errors: OnError) -> None:
    acked: list[str] = []

    async def slow() -> None:
        await asyncio.sleep(60)

    async def ack() -> None:
        acked.append("acked")

    writes = InOrderWrites(on_error=no_errors)
    await writes.submit(slow, ack)
    await writes.cancel()
    assert acked == []
    with pytest.raises(asyncio.CancelledError):
        await writes.wait()


async def test_a_batch_also_goes_when_its_bytes_reach_the_limit(no_errors: OnError) -> None:
    @dataclass
    class Message:
        value: bytes

    @dataclass
    class Event:
        message: Message

    stream, batches = FakeStream(), []

    async def process(batch: list[Any]) -> None:
        batches.append([len(e.message.value) for e in batch])

    collector = BatchCollector(process, max_events=100, max_bytes=1000, within_s=60, on_error=no_errors)
    for size in (400, 400, 300, 900, 50):
        stream.queue.put_nowait(Event(Message(b"x" * size)))
    stream.queue.put_nowait(StopAsyncIteration)
    await collector.run(stream)
    # The 300 would make 1100 > 1000: what was there goes first, as the ingest's byte chunks cut.
    assert batches == [[400, 400], [300]] and collector.buffered_bytes == 950 and len(collector.buffer) == 2
