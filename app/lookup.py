"""The device lookup API on the worker's web port and in ``millstream api`` (docs/api.md).

``GET /devices/{id}/latest`` and ``GET /devices/{id}/windows?metric=&size=&from=&to=&limit=``,
answered from ScyllaDB when it is configured (any worker answers for any device: the aggregates
are there), else from this worker's own table (only devices of the partitions it holds; the
answer says so). Parameters are checked before anything is read: a bad one is a 400 with a
message naming it; an unknown device a 404. Output is bounded: ``limit`` (default 100, at most
1000) windows per answer, newest first, with ``next`` naming the request for the page before.

Reads are single-partition queries (ScyllaDB) or one key (the table). In a worker that is
ingesting, each ScyllaDB read's crossings to the driver's I/O thread slow ingestion (docs/api.md,
Cost), so production answers lookups from ``millstream api`` (app/api.py) instead.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from app import metrics
from models.decode import device_id_problem
from models.times import MAX_MS, MIN_MS, NoTimeZone, iso_ms, ms_of_iso
from sinks.base import SinkError

if TYPE_CHECKING:
    from sinks.scylla import ScyllaAggregateWriter

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


class BadRequest(ValueError):
    """A parameter the API refuses; the message names it (HTTP 400)."""


@dataclass(frozen=True)
class WindowQuery:
    metric: str
    size_s: int
    from_ms: int
    to_ms: int
    limit: int

    def next_page(self, device: str, oldest_start_ms: int) -> str:
        params = {"metric": self.metric, "size": self.size_s, "from": self.from_ms, "to": oldest_start_ms,
                  "limit": self.limit}  # fmt: skip
        return f"/devices/{quote(device, safe='')}/windows?{urlencode(params)}"


def parse_time(name: str, text: str) -> int:
    """Epoch milliseconds from ISO-8601 with a zone, or from an integer of epoch milliseconds,
    within years 1-9999 UTC (what an answer can write back as ISO-8601)."""
    try:
        millis = int(text) if re.fullmatch(r"-?\d{1,16}", text) else ms_of_iso(text)
    except NoTimeZone:
        raise BadRequest(f"{name}: {text[:40]!r} has no time zone (add Z or +01:00)") from None
    except (ValueError, OverflowError):
        raise BadRequest(f"{name}: {text[:40]!r} is neither ISO-8601 nor epoch milliseconds") from None
    if not MIN_MS <= millis <= MAX_MS:
        raise BadRequest(f"{name}: {text[:40]} is outside years 1-9999 UTC (epoch milliseconds {MIN_MS} to {MAX_MS})")
    return millis


def check_device(device: str, max_length: int) -> str:
    """The decoder's check (MILLSTREAM_LIMITS__MAX_DEVICE_ID_LENGTH): an id no message could carry is a 400."""
    problem = device_id_problem(device, max_length)
    if problem is not None:
        raise BadRequest(problem)
    return device


def window_query(params: Mapping[str, str], sizes_s: list[int], now_ms: int) -> WindowQuery:
    """The windows a request asks for; raises BadRequest."""
    unknown = sorted(set(params) - {"metric", "size", "from", "to", "limit"})
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r} (metric, size, from, to, limit)")
    metric = params.get("metric", "")
    if not metric:
        raise BadRequest("metric is required")
    size_text = params.get("size", str(sizes_s[0]))
    if not size_text.isdigit() or int(size_text) not in sizes_s:
        raise BadRequest(f"size: {size_text[:20]!r} is not a window size of this service {sizes_s}")
    size_s = int(size_text)
    from_ms, to_ms, limit = _span(params, now_ms, 24 * 3_600_000)
    return WindowQuery(metric, size_s, from_ms, to_ms, limit)


def alerts_query(params: Mapping[str, str], now_ms: int) -> WindowQuery:
    """The alerts a request asks for (event time in [from, to), at most limit); raises BadRequest."""
    unknown = sorted(set(params) - {"from", "to", "limit"})
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r} (from, to, limit)")
    from_ms, to_ms, limit = _span(params, now_ms, 7 * 24 * 3_600_000)
    return WindowQuery("", 0, from_ms, to_ms, limit)


def _span(params: Mapping[str, str], now_ms: int, default_span_ms: int) -> tuple[int, int, int]:
    """``from``, ``to`` (default: now, and ``default_span_ms`` before ``to``) and ``limit``; raises BadRequest."""
    to_ms = parse_time("to", params["to"]) if "to" in params else now_ms + 1
    from_ms = parse_time("from", params["from"]) if "from" in params else max(to_ms - default_span_ms, MIN_MS)
    if from_ms >= to_ms:
        raise BadRequest("from must be before to")
    limit_text = params.get("limit", str(DEFAULT_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise BadRequest(f"limit: {limit_text[:20]!r} is not a whole number from 1 to {MAX_LIMIT}")
    return from_ms, to_ms, int(limit_text)


def alerts_answer(device: str, query: WindowQuery, rows: list[tuple[Any, ...]], source: str) -> dict[str, Any]:
    """Rows are AlertRows (agents/alerts.py), newest first."""
    from sinks.alerts import alert_document

    more = len(rows) >= query.limit  # a page may hold more: every alert of its oldest instant
    page = {"from": query.from_ms, "to": rows[-1][8] if rows else 0, "limit": query.limit}
    return {
        "device_id": device, "from": iso_ms(query.from_ms), "to": iso_ms(query.to_ms), "source": source,
        "alerts": [alert_document(row) for row in rows],
        "next": f"/devices/{quote(device, safe='')}/alerts?{urlencode(page)}" if more else None,
    }  # fmt: skip


def latest_answer(device: str, rows: list[tuple[str, float, int, int]], source: str) -> dict[str, Any]:
    metrics = {metric: {"value": value, "event_time": iso_ms(event_ms), "event_ms": event_ms, "source_offset": offset}
               for metric, value, event_ms, offset in sorted(rows)}  # fmt: skip
    return {"device_id": device, "source": source, "metrics": metrics}


def windows_answer(device: str, query: WindowQuery, rows: list[tuple[Any, ...]], source: str) -> dict[str, Any]:
    """Rows are (start_ms, end_ms, count, sum, min, max, last, last_ms), newest first."""
    windows = [
        {"start": iso_ms(start), "end": iso_ms(end), "count": count, "sum": total, "min": low, "max": high,
         "mean": total / count if count else None, "last": last, "last_event_time": iso_ms(last_ms)}
        for start, end, count, total, low, high, last, last_ms in rows
    ]  # fmt: skip
    more = len(rows) == query.limit
    return {
        "device_id": device, "metric": query.metric, "size_s": query.size_s, "from": iso_ms(query.from_ms),
        "to": iso_ms(query.to_ms), "source": source, "windows": windows,
        "next": query.next_page(device, rows[-1][0]) if more else None,
    }  # fmt: skip


def from_state(doc: Any, query: WindowQuery | None) -> list[tuple[Any, ...]]:
    """Latest values (query None) or windows of a device's stored state, in the rows' shapes."""
    from agents.windows import COUNT, LAST, LAST_MS, MAX, MIN, SUM

    if query is None:
        return [(metric, last[0], last[1], last[2]) for metric, last in doc.latest.items()]
    size_ms = query.size_s * 1000
    rows = [
        (key.start_ms, key.start_ms + size_ms, agg[COUNT], agg[SUM], agg[MIN], agg[MAX], agg[LAST], agg[LAST_MS])
        for key, agg in doc.windows.items()
        if key.metric == query.metric and key.size_s == query.size_s and query.from_ms <= key.start_ms < query.to_ms
    ]
    rows.sort(reverse=True)
    return rows[: query.limit]


Answer = tuple[int, dict[str, Any]]  # HTTP status, JSON body


class LookupPages:
    """The lookup API's answers as (status, body): from ScyllaDB when ``scylla`` (the aggregate
    writer's session, or ``millstream api``'s reader) is given, else from ``table``, a worker's
    windows table. The web layer (app/web.py, app/api.py) only encodes them."""

    def __init__(self, scylla: ScyllaAggregateWriter | None, table: Any, sizes_s: list[int], max_length: int) -> None:
        self.scylla, self.table, self.sizes, self.max_length = scylla, table, sizes_s, max_length
        self.source = "scylla" if scylla is not None else "table"

    def _state(self, device: str) -> Any:
        from agents.windows import DeviceState

        raw = self.table.get(device.encode())
        return None if raw is None else DeviceState.loads(bytes(raw))

    def _not_found(self, device: str) -> Answer:
        where = "ScyllaDB" if self.scylla is not None else "this worker's partitions (no ScyllaDB configured)"
        return 404, {"error": f"unknown device {device[:80]!r} in {where}"}

    async def answer(self, params: Mapping[str, str], device: str, what: str) -> Answer:
        """``what``: latest, windows or alerts; a 400 for a bad parameter, a 503 if ScyllaDB fails.
        Counted in millstream_api_requests_total and timed in millstream_api_request_seconds."""
        started = time.perf_counter()
        try:
            status, body = await self._answer(params, device, what)
        except SinkError as exc:
            status, body = 503, {"error": f"ScyllaDB: {exc}"}
        metrics.API_REQUESTS.labels(what, str(status)).inc()
        metrics.API_SECONDS.labels(what).observe(time.perf_counter() - started)
        return status, body

    async def _answer(self, params: Mapping[str, str], device: str, what: str) -> Answer:
        try:
            check_device(device, self.max_length)
            now_ms = int(time.time() * 1000)
            if what == "alerts":
                return await self._alerts(device, alerts_query(params, now_ms))
            query = window_query(params, self.sizes, now_ms) if what == "windows" else None
        except BadRequest as exc:
            return 400, {"error": str(exc)}
        return await self._aggregates(device, query)

    async def _aggregates(self, device: str, query: WindowQuery | None) -> Answer:
        scylla = self.scylla
        if scylla is not None:
            if query is None:
                rows: list[Any] = await scylla.read_latest(device)
            else:
                rows = await scylla.read_windows(
                    device, query.metric, query.size_s, query.from_ms, query.to_ms, query.limit
                )
            if not rows and (query is None or not await scylla.read_latest(device)):
                return self._not_found(device)
        else:
            state = self._state(device)
            if state is None:
                return self._not_found(device)
            rows = from_state(state, query)
        if query is None:
            return 200, latest_answer(device, rows, self.source)
        return 200, windows_answer(device, query, rows, self.source)

    async def _alerts(self, device: str, query: WindowQuery) -> Answer:
        if self.scylla is not None:
            rows = await self.scylla.read_alerts(device, query.from_ms, query.to_ms, query.limit)
            if len(rows) == query.limit:  # the page's oldest instant in full: the next page starts before it
                oldest, ids = rows[-1][8], {row[0] for row in rows}
                more = await self.scylla.read_alerts(device, oldest, oldest + 1, MAX_LIMIT)
                rows += [row for row in more if row[0] not in ids]
        else:  # the table keeps an alert only until it is written; the alerts topic has them all
            state = self._state(device)
            if state is None:
                return self._not_found(device)
            rows = sorted((tuple(a) for a in state.pending_alerts if query.from_ms <= a[8] < query.to_ms),
                          key=lambda a: (-a[8], a[0]))[: query.limit]  # fmt: skip
        return 200, alerts_answer(device, query, rows, self.source)
