"""The schema-registry client: the schemas of a batch's framed payloads, fetched before it is
decoded, once per schema id (``GET /schemas/ids/{id}``, Confluent's REST API).

The registry answering "no such id" (404) is the message's fault: it goes to the DLQ as
``unknown_schema``. The registry not answering is nobody's message's fault: the batch waits,
retried with a growing pause up to ``retry_max_s``, until it answers; consumption stops
meanwhile and nothing is rejected or committed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from app import metrics
from app.settings import RegistrySettings
from models.framing import SchemaBook, parse_schema, schema_id_of

log = logging.getLogger(__name__)


class RegistryUnavailable(Exception):
    """The registry did not answer, or answered with a server error."""


class SchemaRegistry:
    """Fetches schemas into a :class:`SchemaBook` that the decoder reads."""

    def __init__(self, settings: RegistrySettings, book: SchemaBook | None = None) -> None:
        assert settings.url is not None
        self.settings = settings
        self.base = settings.url.rstrip("/")
        self.book = book if book is not None else SchemaBook()
        self._session: Any = None
        self.waiting = False  # true while the registry is unreachable and a batch waits

    async def _client(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            s = self.settings
            auth = aiohttp.BasicAuth(s.username, s.password.get_secret_value()) if s.username and s.password else None
            context: ssl.SSLContext | bool = True
            if s.tls_cafile is not None:
                context = ssl.create_default_context(cafile=str(s.tls_cafile))
            self._session = aiohttp.ClientSession(
                auth=auth, timeout=aiohttp.ClientTimeout(total=s.timeout_s),
                connector=aiohttp.TCPConnector(ssl=context),
            )  # fmt: skip
        return self._session

    async def fetch(self, schema_id: int) -> None:
        """Ask once; the answer goes into the book. Raises RegistryUnavailable."""
        import aiohttp

        session = await self._client()
        try:
            async with session.get(f"{self.base}/schemas/ids/{schema_id}") as response:
                if response.status == 404:
                    metrics.REGISTRY_REQUESTS.labels(result="unknown").inc()
                    self.book.mark_unknown(schema_id)
                    return
                if response.status != 200:
                    text = (await response.text())[:200]
                    raise RegistryUnavailable(f"HTTP {response.status}: {text}")
                answer = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise RegistryUnavailable(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        try:
            schema = parse_schema(schema_id, answer.get("schemaType", "AVRO"), answer["schema"])
        except Exception as exc:
            log.error(
                "schema id %d: the registry's schema does not parse (%s); its messages are rejected", schema_id, exc
            )
            metrics.REGISTRY_REQUESTS.labels(result="unknown").inc()
            self.book.mark_unknown(schema_id)
            return
        metrics.REGISTRY_REQUESTS.labels(result="found").inc()
        self.book.add(schema)
        metrics.REGISTRY_SCHEMAS.set(len(self.book))

    async def ensure(self, values: Iterable[bytes | None]) -> None:
        """Every schema these payloads name is in the book (or known to be unknown); waits out
        an unreachable registry."""
        wanted = {i for i in map(schema_id_of, values) if i is not None and self.book.needs(i)}
        for schema_id in sorted(wanted):
            pause = 0.5
            while True:
                try:
                    await self.fetch(schema_id)
                    break
                except RegistryUnavailable as exc:
                    metrics.REGISTRY_REQUESTS.labels(result="error").inc()
                    self.waiting = True
                    log.warning("schema registry %s: %s; retrying in %.1fs (consumption waits)", self.base, exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, self.settings.retry_max_s)
            self.waiting = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
