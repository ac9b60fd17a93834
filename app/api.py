"""``millstream api``: the device lookup API (app/lookup.py) answered from ScyllaDB by a process
of its own, apart from the workers (docs/api.md).

A worker answers the same requests on its web port, but there every ScyllaDB read crosses
between the worker's event loop and the driver's I/O thread while the loop is busy with batches,
and that contention, not the answer itself, cost ingestion 27-34 % more CPU per message at 50
queries a second (docs/performance.md). This process holds no state and needs none of
the worker's: any replica answers for any device, it scales apart from the consumers
(deploy/components/lookup-api), and a burst of queries cannot slow ingestion down.

It connects with the workers' ``MILLSTREAM_SCYLLA__*`` settings, runs no DDL and registers no
write generation (the workers own the schema). Until ScyllaDB answers it is alive but not ready
(/readyz 503) and lookups are 503s; it keeps trying every few seconds. A refusal that trying
again cannot mend (credentials, TLS) ends it with one line.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from app.lookup import LookupPages
from app.probes import probe_app
from app.settings import Settings
from sinks.base import RetriableSinkError
from sinks.scylla import ScyllaAggregateWriter

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 5.0


async def connect(reader: ScyllaAggregateWriter, stop: asyncio.Event, retry_s: float = CONNECT_RETRY_S) -> None:
    """Until connected or ``stop``; a FatalSinkError goes up (nothing to wait for)."""
    while not stop.is_set():
        try:
            await reader.connect_for_reads()
            return
        except RetriableSinkError as exc:
            log.warning("ScyllaDB not reachable (%s); trying again in %gs", exc, retry_s)
        try:
            await asyncio.wait_for(stop.wait(), timeout=retry_s)
        except TimeoutError:
            pass


def routes(pages: LookupPages, reader: ScyllaAggregateWriter) -> Any:
    """The aiohttp application: /devices/{id}/latest, /windows, /alerts, and the probes and metrics."""
    from aiohttp import web

    def json(body: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    def device_page(what: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            status, body = await pages.answer(request.query, request.match_info["device"], what)
            return json(body, status)

        return handler

    def readiness() -> tuple[int, dict[str, Any]]:
        if reader.connected:
            return 200, {"status": "ready"}
        return 503, {"status": "not ready", "problems": ["ScyllaDB not connected yet"]}

    app = probe_app(readiness)
    for what in ("latest", "windows", "alerts"):
        app.router.add_get(f"/devices/{{device}}/{what}", device_page(what))
    return app


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Answer lookups on MILLSTREAM_WEB_HOST:MILLSTREAM_API__WEB_PORT until ``stop``."""
    from aiohttp import web

    reader = ScyllaAggregateWriter(settings.scylla, settings.kafka.telemetry_topic)
    pages = LookupPages(reader, None, settings.windows.sizes_s, settings.limits.max_device_id_length)
    runner = web.AppRunner(routes(pages, reader), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.web_host, settings.api.web_port).start()
        log.info("lookup API on %s:%d, from ScyllaDB %s keyspace %s", settings.web_host, settings.api.web_port,
                 ",".join(settings.scylla.contact_points), settings.scylla.keyspace)  # fmt: skip
        await connect(reader, stop)
        await stop.wait()
    finally:
        await runner.cleanup()
        await reader.close()
