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


def _register_lookup(app: faust.App, ingest: Ingest, windows_table: Any, settings: Settings) -> None:
    """GET /devices/{id}/latest, /windows and /alerts (app/lookup.py, docs/api.md)."""
    sink = ingest.pipeline.aggregate_sink
    scylla = sink if isinstance(sink, ScyllaAggregateWriter) else None
    pages = lookup.LookupPages(scylla, windows_table, settings.windows.sizes_s, settings.limits.max_device_id_length)

    @app.page("/devices/{device}/latest")
    async def device_latest(web: Any, request: Any, device: str) -> Any:
        """The newest value of every metric of a device."""
        status, body = await pages.answer(dict(request.query), device, "latest")
        return web.json(body, status=status)

    @app.page("/devices/{device}/windows")
    async def device_windows(web: Any, request: Any, device: str) -> Any:
        """A device's window aggregates of one metric and size, newest first, paged."""
        status, body = await pages.answer(dict(request.query), device, "windows")
        return web.json(body, status=status)

    @app.page("/devices/{device}/alerts")
    async def device_alerts(web: Any, request: Any, device: str) -> Any:
        """A device's alerts, newest first, paged."""
        status, body = await pages.answer(dict(request.query), device, "alerts")
        return web.json(body, status=status)
