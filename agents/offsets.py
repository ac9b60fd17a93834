"""Per-partition offset continuity: every offset is processed before a later one is acked.

faust 0.15's consumer fills "gaps" in the offsets it sees (meant for compacted or
transactional topics) with synthetic acks, and after a restart it can hand a stream a record
fetched before it sought to the committed offset. Together that skips records: seen with
tansu after a kill -9, where offsets between the committed offset and the first record
delivered were marked acked without being delivered. This guard admits events only in
offset order from the committed offset; on a jump it drops faust's gap for the partition and
seeks back, so the missing records are delivered again. A gap that persists after repeated
seeks is real (transaction markers) and is accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

REAL_GAP_AFTER = 3  # the same gap after this many seeks is taken as real


class OffsetGuard:
    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.next_offset: dict[Any, int] = {}
        self.seen_gaps: dict[tuple[Any, int, int], int] = {}

    def reset(self) -> None:
        """On every rebalance: the committed offsets are the truth again."""
        self.next_offset.clear()

    async def prepare(self, tps: Iterable[Any]) -> None:
        """Learn where each new partition starts: its committed offset, else its first offset.

        Asked of the broker, not of faust's consumer state, which right after an assignment
        may not be filled in yet while records already flow.
        """
        new = set(tps) - self.next_offset.keys()
        if not new:
            return
        starts = {tp: await self._committed(tp) for tp in new}
        # One ListOffsets for every partition without a commit (each call waits for a fetch
        # round of faust's consumer thread, about a second and a half).
        uncommitted = [tp for tp, offset in starts.items() if offset is None]
        earliest = await self.consumer.earliest_offsets(*uncommitted) if uncommitted else {}
        for tp, committed in starts.items():
            offset = committed if committed is not None else earliest.get(tp, 0)
            self.next_offset.setdefault(tp, offset)
            log.info("%s starts at offset %s", tp, offset)

    async def _committed(self, tp: Any) -> int | None:
        # faust runs aiokafka in its own thread; ask that consumer, on that thread.
        thread = self.consumer._thread
        aiokafka_consumer = thread._ensure_consumer()
        committed = await thread.call_thread(aiokafka_consumer.committed, tp)
        return committed if isinstance(committed, int) and committed >= 0 else None

    def admit(self, events: Iterable[Any]) -> tuple[list[Any], dict[Any, int]]:
        """Events to process now, in order; and partitions to rewind (tp -> offset)."""
        admitted: list[Any] = []
        rewind: dict[Any, int] = {}
        for event in events:
            tp, offset = event.message.tp, event.message.offset
            if tp in rewind:
                continue  # after a gap nothing more of this partition until it is re-read
            expected = self.next_offset.get(tp)
            if expected is not None and offset < expected:
                continue  # delivered again; already processed in this session
            if expected is not None and offset > expected:
                key = (tp, expected, offset)
                self.seen_gaps[key] = self.seen_gaps.get(key, 0) + 1
                if self.seen_gaps[key] < REAL_GAP_AFTER:
                    log.warning(
                        "offsets %s-%s of %s were skipped by the consumer; re-reading", expected, offset - 1, tp
                    )
                    rewind[tp] = expected
                    continue
                log.warning("offsets %s-%s of %s never arrive; accepting the gap", expected, offset - 1, tp)
            self.next_offset[tp] = offset + 1
            admitted.append(event)
        return admitted, rewind

    async def rewind(self, partitions: dict[Any, int]) -> None:
        for tp, offset in partitions.items():
            # Without this, faust would count the skipped offsets as acked at the next commit.
            gap = self.consumer._gap.get(tp)
            if gap is not None:
                gap.clear()
            await self.consumer.seek(tp, offset)
