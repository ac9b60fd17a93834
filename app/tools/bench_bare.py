"""The framework floor for ``millstream bench``: a faust agent that only counts.

Same faust version, broker and topic as the pipeline run; no decoding, no state, no sinks;
``async for value in stream``, faust acking as it goes. Two configurations: ``stock`` (faust
as installed: what a plain faust agent gets) and ``tuned`` (with the faust changes the
millstream worker makes: :mod:`app.faust_patches`, ``cython_optimizations`` and the larger
stream buffer), so the bench can tell faust tuning apart from millstream's own overhead. Run
as ``python -m app.tools.bench_bare BOOTSTRAP TOPIC GROUP WEB_PORT DATA_DIR [stock|tuned]``; the
bench reads ``/count`` to time it exactly like it times the pipeline through ``/metrics``.
"""

from __future__ import annotations

import sys
from typing import Any

import faust


def build(bootstrap: str, topic_name: str, group: str, web_port: int, data_dir: str, shape: str) -> faust.App:
    tuning: dict[str, Any] = {}
    if shape == "tuned":
        from app import faust_patches
        from app.settings import PipelineSettings

        faust_patches.install_lean_drain()
        tuning = {"cython_optimizations": True, "stream_buffer_maxsize": PipelineSettings().buffer_messages}
    app = faust.App(
        group,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=data_dir,
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        web_host="127.0.0.1",
        web_port=web_port,
        **tuning,
    )
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    seen = {"count": 0}

    @app.agent(topic, name="count")
    async def count(stream: Any) -> None:
        async for _value in stream:  # faust acks each event as the loop moves on
            seen["count"] += 1

    @app.page("/count")
    async def count_page(web: Any, request: Any) -> Any:
        # Ready as the worker's /readyz means it: partitions assigned and recovered.
        return web.json({**seen, "ready": app.tables.recovery.completed.is_set()})  # type: ignore[attr-defined]

    return app


def main() -> None:
    bootstrap, topic, group, port, data_dir = sys.argv[1:6]
    shape = sys.argv[6] if len(sys.argv) > 6 else "stock"
    app = build(bootstrap, topic, group, int(port), data_dir, shape)
    sys.argv = ["millstream-bench-bare", "worker", "--loglevel", "warn"]
    app.main()


if __name__ == "__main__":
    main()
