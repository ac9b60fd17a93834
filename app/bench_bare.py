"""The framework floor for ``millstream bench``: a faust agent that only counts.

Same faust version, broker settings and topic as the pipeline run; no decoding, no state, no
sinks. Two shapes: ``iterate`` (``async for value in stream``, faust acks as it goes: the
plain floor) and ``take`` (``noack_take`` batches acked by hand: the shape commit-after-write
forces on millstream). Run as ``python -m app.bench_bare BOOTSTRAP TOPIC GROUP WEB_PORT
DATA_DIR [iterate|take]``; the bench reads ``/count`` to time it exactly like it times the
pipeline through ``/metrics``.
"""

from __future__ import annotations

import sys
from typing import Any

import faust


def build(bootstrap: str, topic_name: str, group: str, web_port: int, data_dir: str, shape: str) -> faust.App:
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
    )
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    seen = {"count": 0}

    @app.agent(topic, name="count")
    async def count(stream: Any) -> None:
        if shape == "take":
            async for events in stream.noack_take(5000, within=1.0):
                for event in events:
                    await stream.ack(event)
                seen["count"] += len(events)
        else:
            async for _value in stream:  # faust acks each event as the loop moves on
                seen["count"] += 1

    @app.page("/count")
    async def count_page(web: Any, request: Any) -> Any:
        # Ready as the worker's /readyz means it: partitions assigned and recovered.
        return web.json({**seen, "ready": app.tables.recovery.completed.is_set()})  # type: ignore[attr-defined]

    return app


def main() -> None:
    bootstrap, topic, group, port, data_dir = sys.argv[1:6]
    shape = sys.argv[6] if len(sys.argv) > 6 else "iterate"
    app = build(bootstrap, topic, group, int(port), data_dir, shape)
    sys.argv = ["millstream-bench-bare", "worker", "--loglevel", "warn"]
    app.main()


if __name__ == "__main__":
    main()
