"""Servers on loopback that stand between a client and a real server, each on its own event loop.

:class:`LoopbackServer` runs the loop in a daemon thread and ``close()`` stops it, cutting the
connections still open; :class:`DelayProxy` slows a server down (each forwarded chunk waits
``delay_s``) without touching it; tests/support/msk.py's IAM listener logs clients in first.
"""

from __future__ import annotations

import asyncio
import threading

from tests.support.servers import free_port


class LoopbackServer:
    """A server on 127.0.0.1:``port`` (a free one if None) whose connections :meth:`_client`
    serves, on an event loop of its own in a daemon thread. Connections to track for ``close()``
    go in ``_writers``."""

    def __init__(self, port: int | None = None, name: str = "loopback-server") -> None:
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{name} did not start")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()
        for writer in self._writers:  # connections still open: cut them, then close the loop
            writer.transport.abort()
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.loop.close()

    def close(self) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self._thread.join(10)


class DelayProxy(LoopbackServer):
    def __init__(self, upstream_port: int, delay_s: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        super().__init__(name="delay-proxy")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()
