"""The rows a batch becomes, shared by the pipeline that makes them and the sinks that write
them. Plain tuples: millions are built per minute and handed to the drivers as they are."""

from __future__ import annotations

from dataclasses import dataclass, field

# One ClickHouse row per reading and metric, in the column order of sinks/clickhouse.py COLUMNS:
# (device, factory, line, location, metric, value, event_s, event_ms, ingest_s, partition, offset, reading index)
RawRow = tuple[str, str, str, str, str, float, int, int, int, int, int, int]
# A window aggregate: (device, metric, size_s, start_ms, end_ms, count, sum, min, max, last, last_ms, offset)
WindowRow = tuple[str, str, int, int, int, int, float, float, float, float, int, int]
# A latest value: (device, metric, value, event_ms, offset)
LatestRow = tuple[str, str, float, int, int]


@dataclass(slots=True)
class RawBatch:
    """Raw rows of one flush, plus what names it for deduplication."""

    rows: list[RawRow] = field(default_factory=list)
    token: str = ""  # topic/partition:first-last,...


@dataclass(slots=True)
class AggregateBatch:
    """The window aggregates and latest values one flush touched, to upsert."""

    windows: list[WindowRow] = field(default_factory=list)
    latest: list[LatestRow] = field(default_factory=list)
    # Alerts raised or cleared (agents/alerts.py AlertRow): (alert id, device, rule, metric,
    # raised|cleared, value, threshold, window start ms, window end ms, offset).
    alerts: list[tuple[str, str, str, str, str, float, float, int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.windows) + len(self.latest) + len(self.alerts)
