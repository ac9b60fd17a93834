"""/healthz, /readyz and /metrics for the processes beside the workers (``millstream api`` and
``millstream bridge``), as an aiohttp application each adds its own pages to. The workers'
pages are faust views (app/web.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

Readiness = Callable[[], tuple[int, dict[str, Any]]]  # the /readyz status and JSON body


def probe_app(readiness: Readiness) -> Any:
    """An aiohttp application answering /healthz (alive: 200), /readyz (``readiness()``) and
    /metrics (every millstream metric of this process)."""
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        status, body = readiness()
        return web.json_response(body, status=status)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
