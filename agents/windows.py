"""Event-time tumbling-window aggregates per device, exact under at-least-once replay.

One :class:`DeviceState` per device is the value of a changelog-backed faust table keyed by
device id. It carries the highest source offset applied to it: all messages of a device come
from one partition (key = device id), so offsets are ordered, and a replayed message (offset
at or below it) is skipped. That makes the state exact after a crash even though faust's
at-least-once tables may have written the changelog before the offsets were committed.

A reading is *late* for a window size when its window ended more than ``grace`` before the
device's watermark (newest event time applied). Late readings are not applied to that window
size and are counted; they still reach ClickHouse. Closed windows older than
``retention_windows`` windows behind the watermark are evicted from the state, but only once
the write that carried their last change has finished (``written_through``): a window must
never leave the state before ScyllaDB has it, or a crash before that write loses it (the
replay finds nothing to upsert). Latest values and duplicate-detection times of metrics a
device stopped sending are evicted behind the same horizon, so a device that changes its
metrics does not grow its state for ever.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field
from itertools import accumulate, islice
from operator import lt, sub
from typing import Any, NamedTuple

import orjson

from models.records import Reading

# Aggregate slots (a list, to keep the changelog value compact).
COUNT, SUM, MIN, MAX, LAST, LAST_MS, OFFSET = range(7)


class WindowKey(NamedTuple):
    """A tuple, so the hot path can look windows up by a plain ``(metric, size_s, start_ms)``."""

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
    # Event times applied within the dedup horizon, sorted, per metric: a reading re-sent under
    # a new offset (a device or bridge retry) is recognised and not counted twice. Never empty.
    recent: dict[str, list[int]] = field(default_factory=dict)
    # Offsets of this device's messages that were dead-lettered while being applied (an
    # internal error, a state too large), newest last: a replay rejects them again instead of
    # storing what the first run dead-lettered.
    isolated: list[int] = field(default_factory=list)
    # Alert rules (agents/alerts.py), only when rules are configured: the device's factory and
    # line, each rule's [raised, run of beyond windows, last window evaluated], and alerts kept
    # with the offset that raised them until their batch is written.
    labels: list[str] | None = None
    alerts: dict[str, list[Any]] = field(default_factory=dict)
    pending_alerts: list[list[Any]] = field(default_factory=list)

    def dumps(self) -> bytes:
        doc = {"o": self.offset, "w": self.watermark_ms, "a": {k.encode(): v for k, v in self.windows.items()},
               "l": self.latest, "q": _pack_recent(self.recent)}  # fmt: skip
        if self.isolated:
            doc["x"] = self.isolated
        if self.alerts:
            doc["r"] = {"b": self.labels, "s": self.alerts, "p": self.pending_alerts}
        return orjson.dumps(doc)

    @staticmethod
    def loads(raw: bytes | None) -> DeviceState:
        if raw is None:
            return DeviceState()
        doc = orjson.loads(raw)
        windows = {WindowKey.decode(k): v for k, v in doc["a"].items()}
        recent = _unpack_recent(doc["q"]) if "q" in doc else doc.get("r", {})  # "r": before 2026-12
        # States written before 2026-12 could hold an emptied list (the bug that raised IndexError).
        recent = {metric: times for metric, times in recent.items() if times}
        state = DeviceState(doc["o"], doc["w"], windows, doc["l"], recent, doc.get("x", []))
        rules = doc.get("r") if "q" in doc else None  # before 2026-12, "r" held the recent times
        if rules:
            state.labels, state.alerts, state.pending_alerts = rules["b"], rules["s"], rules["p"]
        return state


def _pack_recent(recent: dict[str, list[int]]) -> list[list[Any]]:
    """The duplicate-detection times, compact: the state is rewritten to the changelog on every
    batch that touches the device, and these lists are most of it. Metrics of one device mostly
    share their list (a reading carries them together): each distinct list is stored once, as
    its first time and the steps between times (a few digits each instead of thirteen)."""
    groups: list[tuple[list[int], list[str]]] = []
    for metric, times in recent.items():
        for group_times, names in groups:
            if group_times == times:
                names.append(metric)
                break
        else:
            groups.append((times, [metric]))
    return [[names, [times[0], *map(sub, times[1:], times[:-1])] if times else []] for times, names in groups]


def _unpack_recent(packed: list[list[Any]]) -> dict[str, list[int]]:
    recent: dict[str, list[int]] = {}
    for names, steps in packed:
        times = list(accumulate(steps))
        for name in names:
            recent[name] = times.copy()  # each metric's list is changed in place later
    return recent


@dataclass(slots=True)
class ApplyResult:
    touched: set[tuple[str, int, int]] = field(default_factory=set)  # (metric, size_s, start_ms) to upsert
    latest_touched: set[str] = field(default_factory=set)  # metrics whose latest value to upsert
    applied: bool = True  # False: a replay, skipped
    late: dict[int, int] = field(default_factory=dict)  # window size -> late readings
    duplicates: int = 0  # (metric, event time) pairs already applied under another offset


ISOLATED_KEPT = 32  # offsets of dead-lettered messages a device state remembers


class WindowPolicy:
    def __init__(self, sizes_s: list[int], grace_s: float, retention_windows: int, dedup_s: float = 0) -> None:
        self.sizes_s = sorted(sizes_s)
        self.grace_ms = int(grace_s * 1000)
        self.retention_windows = retention_windows
        self.dedup_ms = int(dedup_s * 1000)
        # A reading this far behind the watermark is late for every window size, and every
        # window it could belong to has been evicted: latest values older than this go too.
        self.horizon_ms = max(self.sizes_s) * 1000 * (1 + retention_windows) + self.grace_ms

    @staticmethod
    def isolate(state: DeviceState, offset: int) -> None:
        """Remember that the message at ``offset`` was dead-lettered instead of applied."""
        if offset not in state.isolated:
            state.isolated.append(offset)
            del state.isolated[:-ISOLATED_KEPT]
        if offset > state.offset:
            state.offset = offset

    def apply(self, state: DeviceState, readings: list[Reading], offset: int, result: ApplyResult) -> None:
        """Apply one message's readings at ``offset``; record what it touched in ``result``.

        One loop over readings, sizes and metrics on purpose: it runs per reading on the hot
        path, and a helper call per reading or per window costs measurably in ``millstream
        bench``. The batched, in-order case takes :meth:`_apply_in_order` instead.
        """
        if offset <= state.offset:
            self._replayed(state, readings, result)
            return
        if len(readings) > 1 and self._apply_in_order(state, readings, offset, result):
            return
        windows, grace_ms, latest = state.windows, self.grace_ms, state.latest
        touched, watermark = result.touched, state.watermark_ms
        # Consecutive readings of a device mostly share their windows: keep each size's
        # current window's aggregates at hand instead of looking them up per reading.
        current: dict[int, tuple[int, dict[str, list[Any]]]] = {}
        recent, dedup_ms = state.recent, self.dedup_ms
        for reading in readings:
            event_ms, values = reading.event_ms, reading.metrics
            if dedup_ms and event_ms > watermark - dedup_ms:  # older re-sends are not recognised
                if event_ms <= watermark:  # only a reading at or behind the newest can be a re-send
                    seen = [m for m in values if _contains(recent.get(m), event_ms)]
                    if seen:
                        result.duplicates += len(seen)
                        values = {m: v for m, v in values.items() if m not in seen}
                        if not values:
                            continue
                for metric in values:
                    times = recent.get(metric)
                    if not times:
                        recent[metric] = [event_ms]
                    elif event_ms >= times[-1]:
                        times.append(event_ms)
                    else:
                        insort(times, event_ms)
            for size_s in self.sizes_s:
                size_ms = size_s * 1000
                start = event_ms - event_ms % size_ms
                if start + size_ms + grace_ms <= watermark:
                    result.late[size_s] = result.late.get(size_s, 0) + 1
                    continue
                window = current.get(size_s)
                if window is None or window[0] != start:
                    window = current[size_s] = (start, {})
                aggs = window[1]
                for metric, value in values.items():
                    agg = aggs.get(metric)
                    if agg is None:
                        probe = (metric, size_s, start)  # equal to, and hashed like, its WindowKey
                        touched.add(probe)
                        agg = windows.get(probe)  # type: ignore[call-overload]
                        if agg is None:
                            agg = [1, value, value, value, value, event_ms, offset]
                            windows[WindowKey(metric, size_s, start)] = aggs[metric] = agg
                            continue
                        aggs[metric] = agg
                    agg[COUNT] += 1
                    agg[SUM] += value
                    if value < agg[MIN]:
                        agg[MIN] = value
                    if value > agg[MAX]:
                        agg[MAX] = value
                    if event_ms >= agg[LAST_MS]:
                        agg[LAST], agg[LAST_MS] = value, event_ms
                    agg[OFFSET] = offset
            # A reading behind the horizon never becomes the latest value, whether or not an
            # older entry is still in the state (eviction waits for writes, so that would make
            # the result depend on batch boundaries).
            if event_ms > watermark - self.horizon_ms:
                for metric, value in values.items():
                    last = latest.get(metric)
                    if last is None or event_ms >= last[1]:
                        latest[metric] = [value, event_ms, offset]
                        result.latest_touched.add(metric)
            if event_ms > watermark:
                watermark = event_ms
        state.watermark_ms = watermark
        state.offset = offset

    def _replayed(self, state: DeviceState, readings: list[Reading], result: ApplyResult) -> None:
        """A replay after a crash or rebalance: the state already holds this message. Its
        aggregates are still upserted (the first write may not have happened)."""
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

    def _apply_in_order(self, state: DeviceState, readings: list[Reading], offset: int, result: ApplyResult) -> bool:
        """The common batched message, applied a window at a time with C builtins.

        Only when its readings are strictly ascending in time, all newer than the device's
        watermark, and carry the same metrics: then none can be late or a re-send, and each
        window's count, sum, min, max and last value follow from a slice of each metric's
        values. Returns False, having changed nothing, when that does not hold (the caller
        then applies reading by reading). Sums add in the same order as reading by reading.
        """
        times = [reading.event_ms for reading in readings]
        if times[0] <= state.watermark_ms or not all(map(lt, times, islice(times, 1, None))):
            return False
        names = readings[0].metrics.keys()
        if not all(reading.metrics.keys() == names for reading in readings):
            return False
        columns = {metric: [reading.metrics[metric] for reading in readings] for metric in names}
        if self.dedup_ms:
            recent = state.recent
            for metric in names:
                recent.setdefault(metric, []).extend(times)  # all newer: the lists stay sorted
        windows, touched, count = state.windows, result.touched, len(times)
        for size_s in self.sizes_s:
            size_ms = size_s * 1000
            first = 0
            while first < count:
                start = times[first] - times[first] % size_ms
                end = bisect_left(times, start + size_ms, first)
                last_ms, n = times[end - 1], end - first
                for metric, column in columns.items():
                    values = column[first:end]
                    key = (metric, size_s, start)
                    touched.add(key)
                    agg = windows.get(key)  # type: ignore[call-overload]
                    if agg is None:
                        windows[WindowKey(metric, size_s, start)] = [
                            n,
                            sum(values),
                            min(values),
                            max(values),
                            values[-1],
                            last_ms,
                            offset,
                        ]
                        continue
                    agg[COUNT] += n
                    agg[SUM] = sum(values, agg[SUM])
                    agg[MIN] = min(agg[MIN], min(values))
                    agg[MAX] = max(agg[MAX], max(values))
                    agg[LAST], agg[LAST_MS] = values[-1], last_ms  # newer than anything applied
                    agg[OFFSET] = offset
                first = end
        newest = times[-1]
        for metric, column in columns.items():
            state.latest[metric] = [column[-1], newest, offset]
            result.latest_touched.add(metric)
        state.watermark_ms, state.offset = newest, offset
        return True

    def evict(self, state: DeviceState, written_through: int) -> int:
        """Drop closed windows far behind the watermark whose last change is written (its
        offset at or below ``written_through``), latest values behind the horizon, and
        duplicate-detection times behind the dedup horizon; returns how many windows went."""
        watermark, grace_ms = state.watermark_ms, self.grace_ms
        stale = [
            key
            for key, agg in state.windows.items()
            if key.start_ms + key.size_s * 1000 * (1 + self.retention_windows) + grace_ms <= watermark
            and agg[OFFSET] <= written_through
        ]
        for key in stale:
            del state.windows[key]
        horizon = watermark - self.dedup_ms
        recent = state.recent
        for metric in [m for m, times in recent.items() if times[0] <= horizon]:
            times = recent[metric]
            del times[: bisect_right(times, horizon)]
            if not times:
                del recent[metric]  # a metric the device stopped sending
        old = watermark - self.horizon_ms
        latest = state.latest
        for metric in [m for m, last in latest.items() if last[1] <= old and last[2] <= written_through]:
            del latest[metric]
        return len(stale)


def _contains(times: list[int] | None, event_ms: int) -> bool:
    if not times:
        return False
    index = bisect_left(times, event_ms)
    return index < len(times) and times[index] == event_ms
