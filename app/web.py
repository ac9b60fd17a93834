"""The worker's web pages: health for Kubernetes, metrics for Prometheus, aggregate counts, and
the device lookup API (app/lookup.py).

faust listens on ``MILLSTREAM_WEB_HOST:MILLSTREAM_WEB_PORT`` (its ``web_bind``); its own
``/router`` and ``/table`` pages are switched off in :mod:`app.main`.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import faust
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from agents.ingest import Ingest
from app import lookup
from app.settings import Settings
from sinks.base import SinkError
from sinks.scylla import ScyllaAggregateWriter


class StateCensus:
    """How many devices, window aggregates and latest values a worker's table holds.

    With RocksDB most of the state is on disk and is never read again after a restart (only the
    changelog tail is), so counting it means walking the table. That happens on request, at
    most every ``max_age_s``, in slices of ``slice_devices`` between which the event loop
    serves everything else; a request within ``max_age_s`` of the last count gets that count.
    """

    def __init__(self, table: Any, max_age_s: float = 5.0, slice_devices: int = 500) -> None:
        self.table, self.max_age_s, self.slice_devices = table, max_age_s, slice_devices
        self._counted: dict[str, Any] = {}
        self._at = -math.inf
        self._lock = asyncio.Lock()

    async def counts(self) -> dict[str, Any]:
        async with self._lock:
            if time.monotonic() - self._at > self.max_age_s:
                self._counted = await self._count()
                self._at = time.monotonic()
            return self._counted

    async def _count(self) -> dict[str, Any]:
        started = time.monotonic()
        keys = list(self.table.keys())  # one pass over keys, no values; the slices then look each up
        devices = windows = latest = 0
        for first in range(0, len(keys), self.slice_devices):
            for key in keys[first : first + self.slice_devices]:
                raw = self.table.get(key)
                if raw is None:
                    continue  # gone since (a rebalance)
                doc = orjson.loads(bytes(raw))
                devices, windows, latest = devices + 1, windows + len(doc["a"]), latest + len(doc["l"])
            await asyncio.sleep(0)
        return {"devices": devices, "window_aggregates": windows, "latest_values": latest,
                "counted_in_s": round(time.monotonic() - started, 3)}  # fmt: skip


def register(app: faust.App, ingest: Ingest, windows_table: Any, settings: Settings) -> None:
    """/healthz, /readyz, /metrics, /aggregates and the lookup API on the worker's web port."""
    census = StateCensus(windows_table)
    _register_lookup(app, ingest, windows_table, settings)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        """Liveness: answering at all means the event loop is not stuck."""
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        """Readiness: sinks connected, state recovered once, no sink failing for long.

        A rebalance does not make a worker unready (its tables were recovered before), so the
        probe does not flap while partitions move.
        """
        problems = ingest.unready()
        if not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
            problems.append("table recovery not finished")
        if problems:
            return web.json({"status": "not ready", "problems": problems}, status=503)
        return web.json({"status": "ready"})

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        """millstream's metrics (app/metrics.py) and faust's own sensor, one registry."""
        # As a header: aiohttp refuses a content type that carries a charset parameter.
        return web.bytes(generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page("/aggregates")
    async def aggregates_page(web: Any, request: Any) -> Any:
        """Counts of the aggregates this worker holds (its partitions), for the demo and ops."""
        return web.json(await census.counts())


class LookupPages:
    """The lookup API's answers (app/lookup.py): from ScyllaDB when configured, else this
    worker's table."""

    def __init__(self, ingest: Ingest, windows_table: Any, settings: Settings) -> None:
        sink = ingest.pipeline.aggregate_sink
        self.scylla = sink if isinstance(sink, ScyllaAggregateWriter) else None
        self.source = "scylla" if self.scylla is not None else "table"
        self.table, self.sizes = windows_table, settings.windows.sizes_s
        self.max_length = settings.limits.max_device_id_length

    def _state(self, device: str) -> Any:
        from agents.windows import DeviceState

        raw = self.table.get(device.encode())
        return None if raw is None else DeviceState.loads(bytes(raw))

    def _not_found(self, web: Any, device: str) -> Any:
        where = "ScyllaDB" if self.scylla is not None else "this worker's partitions (no ScyllaDB configured)"
        return web.json({"error": f"unknown device {device[:80]!r} in {where}"}, status=404)

    async def answer(self, web: Any, request: Any, device: str, what: str) -> Any:
        """``what``: latest, windows or alerts; a 400 for a bad parameter, a 503 if ScyllaDB fails."""
        try:
            lookup.check_device(device, self.max_length)
            now_ms = int(time.time() * 1000)
            if what == "alerts":
                return await self._alerts(web, device, lookup.alerts_query(dict(request.query), now_ms))
            query = lookup.window_query(dict(request.query), self.sizes, now_ms) if what == "windows" else None
            return await self._aggregates(web, device, query)
        except lookup.BadRequest as exc:
            return web.json({"error": str(exc)}, status=400)
        except SinkError as exc:
            return web.json({"error": f"ScyllaDB: {exc}"}, status=503)

    async def _aggregates(self, web: Any, device: str, query: lookup.WindowQuery | None) -> Any:
        scylla = self.scylla
        if scylla is not None:
            if query is None:
                rows: list[Any] = await scylla.read_latest(device)
            else:
                rows = await scylla.read_windows(
                    device, query.metric, query.size_s, query.from_ms, query.to_ms, query.limit
                )
            if not rows and (query is None or not await scylla.read_latest(device)):
                return self._not_found(web, device)
        else:
            state = self._state(device)
            if state is None:
                return self._not_found(web, device)
            rows = lookup.from_state(state, query)
        if query is None:
            return web.json(lookup.latest_answer(device, rows, self.source))
        return web.json(lookup.windows_answer(device, query, rows, self.source))

    async def _alerts(self, web: Any, device: str, query: lookup.WindowQuery) -> Any:
        if self.scylla is not None:
            rows = await self.scylla.read_alerts(device, query.from_ms, query.to_ms, query.limit)
            if len(rows) == query.limit:  # the page's oldest instant in full: the next page starts before it
                oldest, ids = rows[-1][8], {row[0] for row in rows}
                more = await self.scylla.read_alerts(device, oldest, oldest + 1, lookup.MAX_LIMIT)
                rows += [row for row in more if row[0] not in ids]
        else:  # the table keeps an alert only until it is written; the alerts topic has them all
            state = self._state(device)
            if state is None:
                return self._not_found(web, device)
            rows = sorted((tuple(a) for a in state.pending_alerts if query.from_ms <= a[8] < query.to_ms),
                          key=lambda a: (-a[8], a[0]))[: query.limit]  # fmt: skip
        return web.json(lookup.alerts_answer(device, query, rows, self.source))


def _register_lookup(app: faust.App, ingest: Ingest, windows_table: Any, settings: Settings) -> None:
    """GET /devices/{id}/latest, /windows and /alerts (app/lookup.py, docs/api.md)."""
    pages = LookupPages(ingest, windows_table, settings)

    @app.page("/devices/{device}/latest")
    async def device_latest(web: Any, request: Any, device: str) -> Any:
        """The newest value of every metric of a device."""
        return await pages.answer(web, request, device, "latest")

    @app.page("/devices/{device}/windows")
    async def device_windows(web: Any, request: Any, device: str) -> Any:
        """A device's window aggregates of one metric and size, newest first, paged."""
        return await pages.answer(web, request, device, "windows")

    @app.page("/devices/{device}/alerts")
    async def device_alerts(web: Any, request: Any, device: str) -> Any:
        """A device's alerts, newest first, paged."""
        return await pages.answer(web, request, device, "alerts")
