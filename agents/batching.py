"""Events of a faust stream, collected into batches that are processed one at a time, in order.

Why not faust's ``noack_take``: it pulls every event through a processor coroutine and stops
pulling while its caller works on a batch, which costs more than faust's plain iteration
(``millstream bench`` shows both). Here the stream is iterated directly with acks off; a
batch is handed to ``process`` when it holds ``max_events`` events, or ``within_s`` after
its first event arrived, whichever comes first; the stream keeps being read while a batch
is processed (the next one fills meanwhile, bounded by ``max_events``: a full buffer waits
for the batch in progress). ``process`` acks; nothing here acks.
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.process, self.max_events, self.within_s = process, max_events, within_s
        self.on_error, self.clock = on_error, clock
        self.buffer: list[Any] = []
        self.first_at = 0.0
        self._turn = asyncio.Lock()  # one batch at a time, in the order the buffers filled

    async def run(self, stream: Any) -> None:
        """Read ``stream`` (acks off) until it ends or this task is cancelled."""
        stream.enable_acks = False  # as noack_take does: millstream acks after the writes
        timer = asyncio.ensure_future(self._flush_when_due())
        try:
            async for _value in stream:
                event = stream.current_event
                if event is None:
                    continue
                if not self.buffer:
                    self.first_at = self.clock()
                self.buffer.append(event)
                if len(self.buffer) >= self.max_events:
                    await self.flush()
        finally:
            timer.cancel()

    async def flush(self) -> None:
        async with self._turn:
            batch, self.buffer = self.buffer, []
            if batch:
                await self.process(batch)

    async def _flush_when_due(self) -> None:
        tick = min(0.05, self.within_s / 4)
        while True:
            await asyncio.sleep(tick)
            if self.buffer and not self._turn.locked() and self.clock() - self.first_at >= self.within_s:
                try:
                    await self.flush()
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # nobody awaits this task: report, never swallow
                    await self.on_error(exc)
                    return
