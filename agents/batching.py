"""Events of a faust stream, collected into batches that are processed one at a time, in order.

Why not faust's ``noack_take``: it pulls every event through a processor coroutine and stops
pulling while its caller works on a batch, which costs more than faust's plain iteration
(``millstream bench`` shows both). Here the stream is iterated directly with acks off. A
batch is handed over when it holds ``max_events`` events or ``max_bytes`` of message values
(memory stays bounded when messages carry many readings), or ``within_s`` after its first
event arrived; it is processed in a task of its own while the stream is read on into the
next buffer (writes overlap reading). Reading waits only when that next buffer is full and
the batch before it is still being processed: at most two batches are in memory. Batches
run strictly one after the other, in the order they filled. ``process`` acks; nothing here
acks. A failed batch is reported to ``on_error`` (the worker crashes) and reading stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

Process = Callable[[list[Any]], Awaitable[None]]


class BatchCollector:
    def __init__(
        self,
        process: Process,
        *,
        max_events: int,
        within_s: float,
        on_error: Callable[[BaseException], Awaitable[None]],
        max_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.process, self.max_events, self.within_s = process, max_events, within_s
        self.max_bytes = max_bytes
        self.on_error, self.clock = on_error, clock
        self.buffer: list[Any] = []
        self.buffered_bytes = 0
        self.first_at = 0.0
        self.failed: BaseException | None = None
        self._batch: asyncio.Task[None] | None = None  # the batch being processed
        self._handing_over = asyncio.Lock()
        self._report: asyncio.Future[None] | None = None

    async def run(self, stream: Any) -> None:
        """Read ``stream`` (acks off) until it ends, a batch fails, or this task is cancelled.

        On cancellation the batch in progress is cancelled too: it is not acked, and whoever
        owns its partitions next processes it again from the committed offset.
        """
        stream.enable_acks = False  # as noack_take does: millstream acks after the writes
        timer = asyncio.ensure_future(self._hand_over_when_due())
        try:
            async for _value in stream:
                event = stream.current_event
                if event is None:
                    continue
                if self.max_bytes is not None:
                    size = len(event.message.value or b"")
                    if self.buffer and self.buffered_bytes + size > self.max_bytes:
                        await self.hand_over()  # this event would overfill it: it starts the next batch
                    self.buffered_bytes += size
                if not self.buffer:
                    self.first_at = self.clock()
                self.buffer.append(event)
                if len(self.buffer) >= self.max_events:
                    await self.hand_over()
                if self.failed is not None:
                    return
            if self._batch is not None:  # the stream ended (tests): let the last batch finish
                await asyncio.wait([self._batch])
        finally:
            timer.cancel()
            if self._batch is not None and not self._batch.done():
                self._batch.cancel()

    async def hand_over(self) -> None:
        """Start processing the buffer once the batch before it is done."""
        async with self._handing_over:
            previous = self._batch
            if previous is not None:
                await asyncio.wait([previous])  # its failure is reported by _finished
            if self.failed is not None or not self.buffer:
                return
            batch, self.buffer, self.buffered_bytes = self.buffer, [], 0
            self._batch = asyncio.ensure_future(self.process(batch))
            self._batch.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        self.failed = exc
        self._report = asyncio.ensure_future(self.on_error(exc))  # kept: a task must be referenced

    async def _hand_over_when_due(self) -> None:
        tick = min(0.05, self.within_s / 4)
        while self.failed is None:
            await asyncio.sleep(tick)
            idle = self._batch is None or self._batch.done()
            if self.buffer and idle and self.clock() - self.first_at >= self.within_s:
                await self.hand_over()


class InOrderWrites:
    """One batch's writes in flight while the caller prepares the next; each batch's ``then``
    (commit and ack) runs right after its writes, strictly in the order batches were handed in.

    A failed write is reported to ``on_error`` (the worker crashes), and the next
    :meth:`submit` raises it too, so nothing after it is written or acked.
    """

    def __init__(self, on_error: Callable[[BaseException], Awaitable[None]]) -> None:
        self.on_error = on_error
        self._inflight: asyncio.Task[None] | None = None
        self._report: asyncio.Future[None] | None = None

    async def submit(self, write: Callable[[], Awaitable[Any]], then: Callable[[], Awaitable[None]]) -> None:
        """Start ``write()`` once the write before it and its ``then`` are done."""
        await self.wait()
        self._inflight = asyncio.ensure_future(self._run(write, then))
        self._inflight.add_done_callback(self._finished)

    async def wait(self) -> None:
        """Until the write in flight and its ``then`` are done; raises the error if it failed."""
        task = self._inflight
        if task is None:
            return
        await asyncio.wait([task])  # a cancellation of the caller must not cancel the write
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            raise exc
        if task.cancelled():
            raise asyncio.CancelledError("the write before was cancelled")

    async def cancel(self) -> None:
        """Abandon the write in flight (on stop): not acked, so replayed by the next owner."""
        task = self._inflight
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    @staticmethod
    async def _run(write: Callable[[], Awaitable[Any]], then: Callable[[], Awaitable[None]]) -> None:
        await write()
        await then()

    def _finished(self, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._report = asyncio.ensure_future(self.on_error(exc))  # kept: a task must be referenced
