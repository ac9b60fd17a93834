"""The sink contract and the three signals a write can give.

- success: the whole batch is durably written;
- :class:`RetriableSinkError`: nothing or part was written; writing the same batch again is
  safe (writes are idempotent) and is what the caller does, with backoff, without acking;
- :class:`FatalSinkError`: retrying cannot help (schema, auth, bad statement); the worker
  crashes so Kubernetes restarts it, and nothing unwritten is committed.

Bad *input* is not a sink concern: it was rejected to the DLQ before any sink saw it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from app import metrics

log = logging.getLogger(__name__)

B = TypeVar("B", contravariant=True)
T = TypeVar("T")


class SinkError(Exception):
    """A write failed."""


class RetriableSinkError(SinkError):
    """Transient trouble (timeout, unavailable, overloaded, too many parts, lost connection)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalSinkError(SinkError):
    """Retrying cannot help; crash the worker."""


def certificate_refused(exc: BaseException | None) -> str | None:
    """Why a server's certificate did not verify, if that is somewhere in ``exc`` or its causes.

    A certificate that does not verify is a setting to fix, not an outage to wait out: the sinks
    make it fatal, with the reason, instead of retrying for the whole budget. Drivers wrap the
    ``ssl`` error (asynch as a cause; cassandra-driver only as text in an OSError).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {exc.verify_message}"
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return "certificate verify failed: " + text.partition("certificate verify failed: ")[2].split(" (_ssl")[0]
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class Sink(Protocol, Generic[B]):
    """A destination of one kind of rows."""

    name: str

    async def start(self) -> None:
        """Connect and apply the DDL idempotently. May raise a SinkError."""

    async def write(self, batch: B) -> None:
        """Write the whole batch or raise. Idempotent: the same batch may come again."""

    async def close(self) -> None:
        """Release connections. Never raises."""


class RetryPolicy:
    """Exponential backoff with full jitter, bounded by a total time budget."""

    def __init__(
        self,
        *,
        budget_s: float = 300.0,
        base_s: float = 0.2,
        cap_s: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.budget_s, self.base_s, self.cap_s, self.sleep = budget_s, base_s, cap_s, sleep
        self.failing_since: dict[str, float] = {}  # sink -> monotonic time of its first failure in a row

    async def run(self, sink_name: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` until it succeeds; retriable errors back off, the rest propagate.

        Raises FatalSinkError when the budget is spent.
        """
        started = time.monotonic()
        tries = 0
        while True:
            try:
                result = await attempt()
                self.failing_since.pop(sink_name, None)
                return result
            except RetriableSinkError as exc:
                self.failing_since.setdefault(sink_name, time.monotonic())
                tries += 1
                metrics.SINK_ERRORS.labels(sink=sink_name, kind="retriable").inc()
                elapsed = time.monotonic() - started
                if elapsed >= self.budget_s:
                    metrics.SINK_ERRORS.labels(sink=sink_name, kind="exhausted").inc()
                    raise FatalSinkError(
                        f"{sink_name}: still failing after {tries} tries in {elapsed:.0f}s: {exc}"
                    ) from exc
                delay = random.uniform(0, min(self.cap_s, self.base_s * 2 ** min(tries, 16)))
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                delay = min(delay, max(0.0, self.budget_s - elapsed))
                metrics.SINK_RETRIES.labels(sink=sink_name).inc()
                log.warning("%s write failed (try %d), retrying in %.2fs: %s", sink_name, tries, delay, exc)
                await self.sleep(delay)
            except FatalSinkError:
                metrics.SINK_ERRORS.labels(sink=sink_name, kind="fatal").inc()
                raise
