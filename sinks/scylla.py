"""Windowed aggregates and latest values to ScyllaDB, as idempotent upserts.

Each upsert is keyed by (device, metric, window size, window start) or (device, metric) and
written ``USING TIMESTAMP <source offset>``: the offset of the last message applied to that
aggregate. All messages of a device come from one partition, so the offset only grows; with
last-write-wins on the cell timestamp, a late write from a worker that lost the partition in
a rebalance (a zombie still retrying) can never overwrite a newer value. A consequence: rows
of these tables must not be removed with DELETE (its tombstone carries a wall-clock
timestamp that would shadow later writes); use TRUNCATE.

The driver's ``execute_async`` futures are bridged to asyncio; blocking calls (connect,
prepare) run in a thread; a semaphore bounds requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from app import metrics
from app.settings import ScyllaSettings
from models.rows import AggregateBatch
from sinks.base import FatalSinkError, RetriableSinkError

log = logging.getLogger(__name__)

DDL_KEYSPACE = (
    "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {{'class': '{strategy}', '{factor_key}': {factor}}}"
)
DDL_WINDOWS = """
CREATE TABLE IF NOT EXISTS {keyspace}.window_aggregates (
    device_id text,
    metric text,
    window_size_s int,
    window_start timestamp,
    window_end timestamp,
    count bigint,
    sum double,
    min double,
    max double,
    last_value double,
    last_event_time timestamp,
    source_offset bigint,
    PRIMARY KEY ((device_id, metric, window_size_s), window_start)
) WITH CLUSTERING ORDER BY (window_start DESC)
"""
DDL_LATEST = """
CREATE TABLE IF NOT EXISTS {keyspace}.latest_values (
    device_id text,
    metric text,
    value double,
    event_time timestamp,
    source_offset bigint,
    PRIMARY KEY (device_id, metric)
)
"""
UPSERT_WINDOW = (
    "INSERT INTO {keyspace}.window_aggregates (device_id, metric, window_size_s, window_start, window_end, "
    "count, sum, min, max, last_value, last_event_time, source_offset) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
)
UPSERT_LATEST = (
    "INSERT INTO {keyspace}.latest_values (device_id, metric, value, event_time, source_offset) "
    "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
)

# ---- error classification (cassandra-driver exception class names)
RETRIABLE_ERRORS = frozenset(
    {
        "WriteTimeout", "ReadTimeout", "Unavailable", "OperationTimedOut", "OverloadedErrorMessage",
        "IsBootstrappingErrorMessage", "ConnectionException", "ConnectionShutdown", "ConnectionBusy",
        "CoordinationFailure", "WriteFailure", "ReadFailure", "ServerError", "TruncateError",
        "CDCWriteFailure", "RateLimitReached",
    }
)  # fmt: skip
FATAL_ERRORS = frozenset(
    {
        "InvalidRequest", "Unauthorized", "AuthenticationFailed", "SyntaxException", "ConfigurationException",
        "AlreadyExists", "UnsupportedOperation", "ProtocolException", "TypeError", "ValueError",
    }
)  # fmt: skip


def classify(exc: BaseException) -> RetriableSinkError | FatalSinkError:
    """Map a driver error to retry-or-crash. NoHostAvailable is judged by what it wraps."""
    name = type(exc).__name__
    if name == "NoHostAvailable":
        causes = list(getattr(exc, "errors", {}).values())
        if any(type(c).__name__ in FATAL_ERRORS for c in causes):
            fatal = next(c for c in causes if type(c).__name__ in FATAL_ERRORS)
            return FatalSinkError(f"ScyllaDB {type(fatal).__name__}: {str(fatal)[:300]}")
        summary = ", ".join(sorted({type(c).__name__ for c in causes})) or "no host up"
        return RetriableSinkError(f"ScyllaDB NoHostAvailable ({summary})")
    if name in FATAL_ERRORS:
        return FatalSinkError(f"ScyllaDB {name}: {str(exc)[:300]}")
    if name in RETRIABLE_ERRORS or isinstance(exc, OSError | asyncio.TimeoutError):
        return RetriableSinkError(f"ScyllaDB {name}: {str(exc)[:300]}")
    return RetriableSinkError(f"ScyllaDB {name} (unclassified): {str(exc)[:300]}")


class ScyllaAggregateWriter:
    """Upserts :class:`AggregateBatch` es."""

    name = "scylla"

    def __init__(self, settings: ScyllaSettings) -> None:
        self.settings = settings
        self._cluster: Any = None
        self._session: Any = None
        self._upsert_window: Any = None
        self._upsert_latest: Any = None
        self._inflight = asyncio.Semaphore(settings.concurrency)

    def _build_cluster(self) -> Any:
        from cassandra import ConsistencyLevel
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import DCAwareRoundRobinPolicy, RoundRobinPolicy, TokenAwarePolicy

        s = self.settings
        balancing = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=s.local_dc) if s.local_dc else RoundRobinPolicy())
        profile = ExecutionProfile(
            load_balancing_policy=balancing,
            consistency_level=getattr(ConsistencyLevel, s.consistency),
            request_timeout=s.request_timeout_s,
        )
        auth = None
        if s.username and s.password:
            auth = PlainTextAuthProvider(s.username, s.password.get_secret_value())
        return Cluster(
            s.contact_points, port=s.port, protocol_version=4, auth_provider=auth,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile}, connect_timeout=s.request_timeout_s,
            schema_metadata_enabled=False,  # millstream never reads schema metadata
        )  # fmt: skip

    async def start(self) -> None:
        s = self.settings
        try:
            self._cluster = self._build_cluster()
            self._session = await asyncio.to_thread(self._cluster.connect)
            factor_key = (
                "replication_factor"
                if s.replication_class == "SimpleStrategy"
                else (s.local_dc or "replication_factor")
            )
            await self._run(
                DDL_KEYSPACE.format(
                    keyspace=s.keyspace,
                    strategy=s.replication_class,
                    factor_key=factor_key,
                    factor=s.replication_factor,
                )
            )
            await self._run(DDL_WINDOWS.format(keyspace=s.keyspace))
            await self._run(DDL_LATEST.format(keyspace=s.keyspace))
            self._upsert_window = await asyncio.to_thread(
                self._session.prepare, UPSERT_WINDOW.format(keyspace=s.keyspace)
            )
            self._upsert_latest = await asyncio.to_thread(
                self._session.prepare, UPSERT_LATEST.format(keyspace=s.keyspace)
            )
        except (RetriableSinkError, FatalSinkError):
            raise
        except Exception as exc:
            raise classify(exc) from exc
        log.info("ScyllaDB %s ready, keyspace %s", ",".join(s.contact_points), s.keyspace)

    def _execute(self, statement: Any, params: Any = None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, failed: bool) -> None:
            if future.done():
                return
            if failed:
                future.set_exception(result)
            else:
                future.set_result(result)

        response = self._session.execute_async(statement, params)
        response.add_callbacks(
            lambda result: loop.call_soon_threadsafe(settle, result, False),
            lambda exc: loop.call_soon_threadsafe(settle, exc, True),
        )
        return future

    async def _run(self, statement: Any, params: Any = None) -> Any:
        async with self._inflight:
            try:
                return await self._execute(statement, params)
            except Exception as exc:
                raise classify(exc) from exc

    async def write(self, batch: AggregateBatch) -> None:
        if not len(batch):
            return
        started = time.perf_counter()
        calls = [self._run(self._upsert_window, (*row, row[11])) for row in batch.windows] + [
            self._run(self._upsert_latest, (*row, row[4])) for row in batch.latest
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            fatal = [e for e in errors if isinstance(e, FatalSinkError)]
            raise (fatal or errors)[0]
        metrics.SINK_BATCH_ROWS.labels(sink=self.name).observe(len(batch))
        metrics.SINK_WRITE_SECONDS.labels(sink=self.name).observe(time.perf_counter() - started)
        metrics.SINK_LAST_SUCCESS.labels(sink=self.name).set(time.time())

    async def close(self) -> None:
        cluster, self._cluster, self._session = self._cluster, None, None
        if cluster is not None:
            try:
                await asyncio.to_thread(cluster.shutdown)
            except Exception:
                log.debug("Scylla cluster shutdown raised", exc_info=True)
