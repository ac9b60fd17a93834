"""Event-time tumbling-window aggregates per device, exact under at-least-once replay.

One :class:`DeviceState` per device is the value of a changelog-backed faust table keyed by
device id. It carries the highest source offset applied to it: all messages of a device come
from one partition (key = device id), so offsets are ordered, and a replayed message (offset
at or below it) is skipped. That makes the state exact after a crash even though faust's
at-least-once tables may have written the changelog before the offsets were committed.

A reading is *late* for a window size when its window ended more than ``grace`` before the
device's watermark (newest event time applied). Late readings are not applied to that window
size and are counted; they still reach ClickHouse. Closed windows older than
``retention_windows`` windows behind the watermark are evicted from the state (they were
upserted to ScyllaDB when last changed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from models.records import Reading

# Aggregate slots (a list, to keep the changelog value compact).
COUNT, SUM, MIN, MAX, LAST, LAST_MS, OFFSET = range(7)


@dataclass(slots=True, frozen=True)
class WindowKey:
    metric: str
    size_s: int
    start_ms: int

    def encode(self) -> str:
        return f"{self.size_s}|{self.start_ms}|{self.metric}"

    @staticmethod
    def decode(text: str) -> WindowKey:
        size, start, metric = text.split("|", 2)
        return WindowKey(metric, int(size), int(start))


@dataclass(slots=True)
class DeviceState:
    offset: int = -1  # highest source offset applied
    watermark_ms: int = 0  # newest event time applied
    windows: dict[WindowKey, list[Any]] = field(default_factory=dict)
    latest: dict[str, list[Any]] = field(default_factory=dict)  # metric -> [value, event_ms, offset]

    def dumps(self) -> bytes:
        return orjson.dumps(
            {"o": self.offset, "w": self.watermark_ms, "a": {k.encode(): v for k, v in self.windows.items()},
             "l": self.latest}
        )  # fmt: skip

    @staticmethod
    def loads(raw: bytes | None) -> DeviceState:
        if raw is None:
            return DeviceState()
        doc = orjson.loads(raw)
        windows = {WindowKey.decode(k): v for k, v in doc["a"].items()}
        return DeviceState(doc["o"], doc["w"], windows, doc["l"])


@dataclass(slots=True)
class ApplyResult:
    touched: set[WindowKey] = field(default_factory=set)  # aggregates to upsert
    latest_touched: set[str] = field(default_factory=set)  # metrics whose latest value to upsert
    applied: bool = True  # False: a replay, skipped
    late: dict[int, int] = field(default_factory=dict)  # window size -> late readings


class WindowPolicy:
    def __init__(self, sizes_s: list[int], grace_s: float, retention_windows: int) -> None:
        self.sizes_s = sorted(sizes_s)
        self.grace_ms = int(grace_s * 1000)
        self.retention_windows = retention_windows

    def apply(self, state: DeviceState, readings: list[Reading], offset: int, result: ApplyResult) -> None:
        """Apply one message's readings at ``offset``; record what it touched in ``result``."""
        if offset <= state.offset:
            # Replay after a crash or rebalance: the state already holds this message. Its
            # aggregates are still upserted (the first write may not have happened).
            result.applied = False
            for reading in readings:
                for size_s in self.sizes_s:
                    size_ms = size_s * 1000
                    start = reading.event_ms - reading.event_ms % size_ms
                    for metric in reading.metrics:
                        key = WindowKey(metric, size_s, start)
                        if key in state.windows:
                            result.touched.add(key)
                result.latest_touched.update(m for m in reading.metrics if m in state.latest)
            return
        windows, grace_ms = state.windows, self.grace_ms
        for reading in readings:
            event_ms = reading.event_ms
            for size_s in self.sizes_s:
                size_ms = size_s * 1000
                start = event_ms - event_ms % size_ms
                if start + size_ms + grace_ms <= state.watermark_ms:
                    result.late[size_s] = result.late.get(size_s, 0) + 1
                    continue
                for metric, value in reading.metrics.items():
                    key = WindowKey(metric, size_s, start)
                    agg = windows.get(key)
                    if agg is None:
                        windows[key] = [1, value, value, value, value, event_ms, offset]
                    else:
                        agg[COUNT] += 1
                        agg[SUM] += value
                        if value < agg[MIN]:
                            agg[MIN] = value
                        if value > agg[MAX]:
                            agg[MAX] = value
                        if event_ms >= agg[LAST_MS]:
                            agg[LAST], agg[LAST_MS] = value, event_ms
                        agg[OFFSET] = offset
                    result.touched.add(key)
            for metric, value in reading.metrics.items():
                latest = state.latest.get(metric)
                if latest is None or event_ms >= latest[1]:
                    state.latest[metric] = [value, event_ms, offset]
                    result.latest_touched.add(metric)
            if event_ms > state.watermark_ms:
                state.watermark_ms = event_ms
        state.offset = offset

    def evict(self, state: DeviceState) -> int:
        """Drop closed windows far behind the watermark; returns how many."""
        watermark, grace_ms = state.watermark_ms, self.grace_ms
        stale = [
            key
            for key in state.windows
            if key.start_ms + key.size_s * 1000 * (1 + self.retention_windows) + grace_ms <= watermark
        ]
        for key in stale:
            del state.windows[key]
        return len(stale)
