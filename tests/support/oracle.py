"""What millstream must have stored for a sequence of sent readings: an independent model.

Written from the documented semantics (docs/reliability.md), not from agents/windows.py, and
as plainly as possible: no fast paths, no eviction, no offsets. Used by the audits of the
end-to-end and chaos tests and by the pipeline's stateful property test.

Per device, readings are taken in the order they were sent (offset order). With ``W`` the
device's newest event time before a reading:

- **re-sent**: a (metric, event time) already applied is skipped when the reading is within
  ``dedup_s`` behind ``W`` (``W - dedup < t <= W``);
- **late** for a window size: the window ended ``grace_s`` or more before ``W``;
- **latest value**: the reading with the newest event time (a tie goes to the later one),
  among readings less than the horizon (largest window x (retention + 1) + grace) behind ``W``;
- **ClickHouse**: one row per distinct (device, metric, event time in ms).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

Aggregate = tuple[int, float, float, float, float, int]  # count, sum, min, max, last, last_ms
WindowId = tuple[str, str, int, int]  # device, metric, size_s, start_ms


class Sent(Protocol):
    device_id: str
    event_ms: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class WindowRules:
    """The window settings the workers run with (millstream's defaults unless a test says)."""

    sizes_s: tuple[int, ...] = (60, 3600)
    grace_s: float = 60.0
    dedup_s: float = 300.0
    retention_windows: int = 3


@dataclass
class Expected:
    windows: dict[WindowId, Aggregate] = field(default_factory=dict)
    latest: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    rows: set[tuple[str, str, int]] = field(default_factory=set)
    watermarks: dict[str, int] = field(default_factory=dict)  # newest event time applied, per device


def expected(readings: Iterable[Sent], rules: WindowRules = WindowRules()) -> Expected:
    grace_ms, dedup_ms = int(rules.grace_s * 1000), int(rules.dedup_s * 1000)
    horizon_ms = max(rules.sizes_s) * 1000 * (1 + rules.retention_windows) + grace_ms
    out = Expected()
    windows: dict[WindowId, list[float]] = {}
    newest: dict[str, int] = {}
    applied: set[tuple[str, str, int]] = set()
    for reading in readings:
        device, at = reading.device_id, reading.event_ms
        for metric in reading.metrics:
            out.rows.add((device, metric, at))
        watermark = newest.get(device, 0)
        values = dict(reading.metrics)
        if dedup_ms and watermark - dedup_ms < at <= watermark:
            values = {m: v for m, v in values.items() if (device, m, at) not in applied}
        applied.update((device, m, at) for m in values)
        for size in rules.sizes_s:
            start = at - at % (size * 1000)
            if start + size * 1000 + grace_ms <= watermark:
                continue  # late for this size
            for metric, value in values.items():
                agg = windows.get((device, metric, size, start))
                if agg is None:
                    windows[(device, metric, size, start)] = [1, value, value, value, value, at]
                    continue
                agg[0] += 1
                agg[1] += value
                agg[2], agg[3] = min(agg[2], value), max(agg[3], value)
                if at >= agg[5]:
                    agg[4], agg[5] = value, at
        if at > watermark - horizon_ms:
            for metric, value in values.items():
                current = out.latest.get((device, metric))
                if current is None or at >= current[1]:
                    out.latest[(device, metric)] = (value, at)
        newest[device] = max(watermark, at)
    out.windows = {k: (int(v[0]), v[1], v[2], v[3], v[4], int(v[5])) for k, v in windows.items()}
    out.watermarks = newest
    return out


def expected_alerts(want: Expected, rules_yaml: str, grace_s: float = 60.0) -> set[tuple[str, str, str, int]]:
    """(device, rule, raised|cleared, window start) that threshold rules raise on the expected
    windows, worked out here from the rules' text (not with agents/alerts.py): a window counts
    once closed (its end plus grace at or behind the device's newest reading), in start order;
    beyond = max above (min below) the threshold; raise after for_windows beyond in a row; clear
    at the first window at or past the clear level; windows without the metric change nothing."""
    import fnmatch

    import yaml

    out: set[tuple[str, str, str, int]] = set()
    by_series: dict[tuple[str, str, int], list[int]] = {}
    for device, metric, size, start in want.windows:
        by_series.setdefault((device, metric, size), []).append(start)
    for rule in yaml.safe_load(rules_yaml)["rules"]:
        above = "above" in rule
        level = rule["above" if above else "below"]
        clear, run_needed, size = rule.get("clear", level), rule.get("for_windows", 1), rule.get("window_s", 60)
        for (device, metric, series_size), starts in by_series.items():
            if metric != rule["metric"] or series_size != size:
                continue
            if rule.get("devices") and not any(fnmatch.fnmatchcase(device, p) for p in rule["devices"]):
                continue
            raised, run = False, 0
            for start in sorted(starts):
                if start + size * 1000 + grace_s * 1000 > want.watermarks[device]:
                    break  # not closed yet
                _count, _sum, low, high, _last, _ms = want.windows[(device, metric, size, start)]
                value = high if above else low
                if (value > level) if above else (value < level):
                    run += 1
                    if not raised and run >= run_needed:
                        raised = True
                        out.add((device, rule["name"], "raised", start))
                else:
                    run = 0
                    if raised and ((value <= clear) if above else (value >= clear)):
                        raised = False
                        out.add((device, rule["name"], "cleared", start))
    return out
