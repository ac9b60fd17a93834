"""Facts about faust 0.15.3 that millstream's design relies on, pinned: if a faust release
changes one, its test fails and says what to revisit."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from faust.transport.producer import ProducerBuffer


async def test_the_producer_buffer_flush_returns_with_records_still_in_it() -> None:
    """faust flushes its producer before committing offsets, but the flush of its buffer returns
    as soon as no record has left it for 0.1 s. millstream therefore waits for each batch's
    changelog acknowledgements itself (agents/ingest.py ChangelogAcks)."""
    buffer = ProducerBuffer()
    buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))  # type: ignore[assignment]
    sent: list[Any] = []

    async def slow_send(future: Any) -> None:  # a busy loop or a slow broker
        await asyncio.sleep(0.3)
        sent.append(future)

    buffer._send_pending = slow_send  # type: ignore[method-assign]
    await buffer.start()
    try:
        for record in range(3):
            buffer.put(record)  # type: ignore[arg-type]
        await buffer.flush()
        assert buffer.size > 0 or len(sent) < 3  # "flushed", yet records are still on their way
    finally:
        for _ in range(50):  # let the rest go before stopping (its stop flushes and raises otherwise)
            if not buffer.size:
                break
            await asyncio.sleep(0.1)
        await buffer.stop()
