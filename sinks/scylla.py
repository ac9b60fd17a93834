"""Windowed aggregates and latest values to ScyllaDB, as idempotent upserts.

Each upsert is keyed by (device, metric, window size, window start) or (device, metric) and
written ``USING TIMESTAMP <version>``, the version being ``generation << 40 | offset``: the
source offset of the last message applied to that aggregate, under the write generation
(``MILLSTREAM_SCYLLA__WRITE_GENERATION``). All messages of a device come from one partition,
so within a generation the version only grows; with last-write-wins on the cell timestamp, a
late write from a worker that lost the partition in a rebalance (a zombie still retrying) can
never overwrite a newer value. Offsets start again below the rows already written when the
pipeline moves to a new topic or Kafka cluster: the operator raises the generation, and every
write of the new one wins over every write of the old (docs/migrations.md). The table
``write_generations`` records each generation and its topic; a worker refuses to start with a
generation below one already recorded, or with the generation of another topic. A sampled
read-back of ``WRITETIME`` counts writes that lost to a newer version anyway (a row written
by another tool with a wall-clock timestamp, a forgotten bump) in
``millstream_scylla_shadowed_writes_total``.

A consequence of explicit versions: rows of these tables must not be removed with DELETE (its
tombstone carries a wall-clock timestamp that would shadow later writes); use TRUNCATE.

Rows go in UNLOGGED BATCHes of up to ``batch_rows`` (a request costs the worker's CPU far more
than a row in it). The driver's ``execute_async`` futures are bridged to asyncio; blocking
calls (connect, prepare) run in a thread; a semaphore bounds requests in flight.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from app import metrics
from app.settings import MAX_WRITE_GENERATION, ScyllaSettings
from models.rows import AggregateBatch
from models.times import millis_of
from sinks.base import FatalSinkError, RetriableSinkError, certificate_refused

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
DDL_ALERTS = """
CREATE TABLE IF NOT EXISTS {keyspace}.alerts_by_device (
    device_id text,
    event_time timestamp,
    alert_id text,
    rule text,
    metric text,
    state text,
    value double,
    threshold double,
    window_start timestamp,
    source_offset bigint,
    PRIMARY KEY (device_id, event_time, alert_id)
) WITH CLUSTERING ORDER BY (event_time DESC)
"""
UPSERT_ALERT = (
    "INSERT INTO {keyspace}.alerts_by_device (device_id, event_time, alert_id, rule, metric, state, value, "
    "threshold, window_start, source_offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
)
DDL_GENERATIONS = """
CREATE TABLE IF NOT EXISTS {keyspace}.write_generations (
    generation int,
    topic text,
    registered timestamp,
    PRIMARY KEY (generation)
)
"""
SELECT_GENERATIONS = "SELECT generation, topic FROM {keyspace}.write_generations"
REGISTER_GENERATION = "INSERT INTO {keyspace}.write_generations (generation, topic, registered) VALUES (%s, %s, %s)"
# The lookup API's reads (app/lookup.py): a device's partitions only, bounded by LIMIT.
SELECT_LATEST = "SELECT metric, value, event_time, source_offset FROM {keyspace}.latest_values WHERE device_id = ?"
SELECT_WINDOWS = (
    "SELECT window_start, window_end, count, sum, min, max, last_value, last_event_time "
    "FROM {keyspace}.window_aggregates WHERE device_id = ? AND metric = ? AND window_size_s = ? "
    "AND window_start >= ? AND window_start < ? LIMIT ?"
)
SELECT_ALERTS = (
    "SELECT event_time, alert_id, rule, metric, state, value, threshold, window_start, source_offset "
    "FROM {keyspace}.alerts_by_device WHERE device_id = ? AND event_time >= ? AND event_time < ? LIMIT ?"
)
WRITETIME_WINDOW = (
    "SELECT WRITETIME(count) FROM {keyspace}.window_aggregates "
    "WHERE device_id = ? AND metric = ? AND window_size_s = ? AND window_start = ?"
)
WRITETIME_LATEST = "SELECT WRITETIME(value) FROM {keyspace}.latest_values WHERE device_id = ? AND metric = ?"
UPSERT_WINDOW = (
    "INSERT INTO {keyspace}.window_aggregates (device_id, metric, window_size_s, window_start, window_end, "
    "count, sum, min, max, last_value, last_event_time, source_offset) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
)
UPSERT_LATEST = (
    "INSERT INTO {keyspace}.latest_values (device_id, metric, value, event_time, source_offset) "
    "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
)

OFFSET_BITS = 40  # a partition may hold 2**40 (about 1.1e12) messages per generation
MAX_OFFSET = (1 << OFFSET_BITS) - 1


def write_version(generation: int, offset: int) -> int:
    """The write timestamp of an upsert: ``generation << 40 | offset``. A version of a higher
    generation beats every version of a lower one, whatever the offsets."""
    if not 0 <= offset <= MAX_OFFSET:
        raise FatalSinkError(f"source offset {offset} does not fit the {OFFSET_BITS} bits of a ScyllaDB write version")
    return generation << OFFSET_BITS | offset


def generation_of(version: int) -> int:
    return version >> OFFSET_BITS


def check_generation(generation: int, topic: str, recorded: dict[int, str]) -> str | None:
    """Why ``generation`` must not write for ``topic``, given the generations already recorded
    (generation -> topic); None when it may."""
    variable = "MILLSTREAM_SCYLLA__WRITE_GENERATION"
    if not 0 <= generation <= MAX_WRITE_GENERATION:
        return f"{variable}={generation} is outside 0..{MAX_WRITE_GENERATION}"
    newest = max(recorded, default=None)
    if newest is not None and generation < newest:
        return (
            f"{variable}={generation} is below generation {newest} (topic {recorded[newest]!r}) already written: "
            f"its rows would shadow every write; set {newest} to go on with that topic, or {newest + 1} for a new "
            "topic or cluster (docs/migrations.md)"
        )
    if generation in recorded and recorded[generation] != topic:
        return (
            f"{variable}={generation} already wrote topic {recorded[generation]!r}; the offsets of {topic!r} start "
            f"again below its rows: set {max(recorded) + 1} (docs/migrations.md)"
        )
    return None


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


def tls_context(settings: ScyllaSettings) -> ssl.SSLContext | None:
    """The driver's TLS context: the configured CA (else the system's), the node's name checked
    unless turned off, a client certificate if given. None without TLS."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(cafile=str(settings.tls_cafile) if settings.tls_cafile else None)
    # With check_hostname the driver names each node by the address it connects to.
    context.check_hostname = settings.tls_verify_hostname
    if settings.tls_certfile is not None:
        keyfile = str(settings.tls_keyfile) if settings.tls_keyfile else None
        context.load_cert_chain(str(settings.tls_certfile), keyfile)
    return context


def classify(exc: BaseException) -> RetriableSinkError | FatalSinkError:
    """Map a driver error to retry-or-crash. NoHostAvailable is judged by what it wraps."""
    name = type(exc).__name__
    causes = list(getattr(exc, "errors", {}).values()) if name == "NoHostAvailable" else [exc]
    refused = next((r for r in map(certificate_refused, causes) if r is not None), None)
    if refused is not None:
        return FatalSinkError(f"ScyllaDB TLS: {refused} (MILLSTREAM_SCYLLA__TLS_*)")
    if name == "NoHostAvailable":
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


_PACKERS: dict[str, Callable[[Any], bytes]] = {
    "varchar": str.encode,  # UTF-8; anything but a str is a TypeError
    "text": str.encode,
    "ascii": lambda v: v.encode("ascii"),
    "int": struct.Struct(">i").pack,
    "bigint": struct.Struct(">q").pack,
    "counter": struct.Struct(">q").pack,
    "timestamp": struct.Struct(">q").pack,  # milliseconds since the epoch, as millstream's rows hold them
    "double": struct.Struct(">d").pack,
}


class RowEncoder:
    """Serializes rows for one prepared statement as the driver's ``bind`` does, about seven
    times cheaper: one ``struct`` packer per bound column, chosen from the column types the
    server returned when the statement was prepared (the driver's ``bind`` looks each type up
    and checks each value, per value, per row). A statement with another column type, or a row
    with a null, goes through ``bind``. tests/integration/test_scylla_batches.py checks that
    both give the same bytes, and that a batch built from :meth:`item` s is the batch the
    driver builds from bound statements."""

    def __init__(self, prepared: Any) -> None:
        from cassandra.query import BoundStatement

        self.prepared = prepared
        self.query_id = prepared.query_id
        self._bound_statement = BoundStatement
        meta = prepared.column_metadata
        self.keyspace = meta[0].keyspace_name if meta else None
        self.routing_indexes = list(prepared.routing_key_indexes or ())
        names = [getattr(column.type, "typename", "") for column in meta]
        self.packers = [_PACKERS.get(name) for name in names]
        self.fast = all(packer is not None for packer in self.packers)
        self.width = len(self.packers)
        self._serialize = _serializer(self.packers) if self.fast else None

    def item(self, values: tuple[Any, ...]) -> Any:
        """``values`` serialized (a list of bytes, for :meth:`add_to` a batch), or a bound
        statement from the driver's ``bind`` when the fast path does not apply."""
        if self._serialize is None:
            return self.prepared.bind(values)
        try:
            if len(values) != self.width:
                raise ValueError(f"{len(values)} values for {self.width} columns")
            return self._serialize(values)
        except (struct.error, TypeError, ValueError, AttributeError, UnicodeError) as exc:
            if None in values:  # a null (no packer takes None): the driver's bind knows them
                return self.prepared.bind(values)
            raise FatalSinkError(f"ScyllaDB row {values!r:.200} does not fit its columns: {exc}") from exc

    def bound(self, values: tuple[Any, ...]) -> Any:
        """A bound statement of ``values``, ready to execute or to add to a batch."""
        return self.statement(self.item(values))

    def statement(self, item: Any) -> Any:
        """A bound statement of an :meth:`item`."""
        if type(item) is not list:
            return item
        statement = self._bound_statement(self.prepared)
        statement.values = item
        return statement

    def add_to(self, batch: Any, item: Any) -> None:
        """Add an :meth:`item` to a BatchStatement as ``batch.add(bound statement)`` would,
        without building the statement: its query id and values, and the batch's routing (the
        first row's partition key, for token-aware routing) if it has none yet."""
        if type(item) is not list:
            batch.add(item)
            return
        if batch.routing_key is None and self.keyspace and self.routing_indexes:
            indexes = self.routing_indexes
            if len(indexes) == 1:
                batch.routing_key = item[indexes[0]]
            else:
                batch.routing_key = b"".join(_routing_part(len(item[i]), item[i]) for i in indexes)
            batch.keyspace = self.keyspace
        batch._add_statement_and_params(True, self.query_id, item)


def _serializer(packers: list[Any]) -> Callable[[tuple[Any, ...]], list[bytes]]:
    """``lambda v: [p0(v[0]), p1(v[1]), ...]`` for these packers, written out: a list display
    of direct calls costs less than half of a comprehension over ``zip`` (0.9 against 2.1 µs for
    a window row), and this runs once per aggregate row."""
    names = [f"p{index}" for index in range(len(packers))]
    source = (
        f"def serialize(v, {', '.join(f'{name}={name}' for name in names)}):\n"
        f"    return [{', '.join(f'{name}(v[{index}])' for index, name in enumerate(names))}]\n"
    )
    scope: dict[str, Any] = dict(zip(names, packers, strict=True))
    exec(source, scope)
    return scope["serialize"]  # type: ignore[no-any-return]


def _routing_part(length: int, part: bytes) -> bytes:
    return struct.pack(f">H{length}sB", length, part, 0)


class ScyllaAggregateWriter:
    """Upserts :class:`AggregateBatch` es."""

    name = "scylla"

    def __init__(self, settings: ScyllaSettings, topic: str) -> None:
        self.settings = settings
        self.topic = topic  # the source topic, recorded with the write generation
        self.generation = settings.write_generation
        self._cluster: Any = None
        self._session: Any = None
        self._reads: dict[str, Any] = {}  # the lookup API's prepared statements
        self._upsert_alert: Any = None
        self._upsert_window: Any = None
        self._upsert_latest: Any = None
        self._window_encoder: Any = None
        self._latest_encoder: Any = None
        self._alert_encoder: Any = None
        self._writetime_window: Any = None
        self._writetime_latest: Any = None
        self._inflight = asyncio.Semaphore(settings.concurrency)
        self._batches = 0

    def _build_cluster(self) -> Any:
        from cassandra import ConsistencyLevel
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import DCAwareRoundRobinPolicy, RoundRobinPolicy, TokenAwarePolicy
        from cassandra.query import tuple_factory

        s = self.settings
        balancing = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=s.local_dc) if s.local_dc else RoundRobinPolicy())
        profile = ExecutionProfile(
            load_balancing_policy=balancing,
            consistency_level=getattr(ConsistencyLevel, s.consistency),
            request_timeout=s.request_timeout_s,
            # plain tuples: the default builds a namedtuple class for every result (the lookup
            # API reads by position; about a fifth of a 100-row read's CPU)
            row_factory=tuple_factory,
        )
        auth = None
        if s.username and s.password:  # both or neither: ScyllaSettings
            auth = PlainTextAuthProvider(s.username, s.password.get_secret_value())
        return Cluster(
            s.contact_points, port=s.port, protocol_version=4, auth_provider=auth, ssl_context=tls_context(s),
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
            for ddl in (DDL_WINDOWS, DDL_LATEST, DDL_GENERATIONS, DDL_ALERTS):
                await self._run(ddl.format(keyspace=s.keyspace))
            await self._register_generation()
            prepare = self._session.prepare
            self._upsert_window = await asyncio.to_thread(prepare, UPSERT_WINDOW.format(keyspace=s.keyspace))
            self._upsert_latest = await asyncio.to_thread(prepare, UPSERT_LATEST.format(keyspace=s.keyspace))
            self._upsert_alert = await asyncio.to_thread(prepare, UPSERT_ALERT.format(keyspace=s.keyspace))
            self._window_encoder = RowEncoder(self._upsert_window)
            self._latest_encoder = RowEncoder(self._upsert_latest)
            self._alert_encoder = RowEncoder(self._upsert_alert)
            self._writetime_window = await asyncio.to_thread(prepare, WRITETIME_WINDOW.format(keyspace=s.keyspace))
            self._writetime_latest = await asyncio.to_thread(prepare, WRITETIME_LATEST.format(keyspace=s.keyspace))
        except (RetriableSinkError, FatalSinkError):
            raise
        except Exception as exc:
            raise classify(exc) from exc
        log.info("ScyllaDB %s ready, keyspace %s, write generation %d", ",".join(s.contact_points), s.keyspace,
                 self.generation)  # fmt: skip

    async def connect_for_reads(self) -> None:
        """Only a session, for ``millstream api``: no DDL, no write generation (the workers own
        the schema); the reads are prepared when first asked for."""
        try:
            self._cluster = self._build_cluster()
            self._session = await asyncio.to_thread(self._cluster.connect)
        except Exception as exc:
            cluster, self._cluster = self._cluster, None
            if cluster is not None:
                await asyncio.to_thread(cluster.shutdown)
            raise classify(exc) from exc
        log.info("ScyllaDB %s connected for lookups, keyspace %s", ",".join(self.settings.contact_points),
                 self.settings.keyspace)  # fmt: skip

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def _register_generation(self) -> None:
        """Refuse a generation that would write into the void; record this one and its topic."""
        keyspace = self.settings.keyspace
        rows = await self._run(SELECT_GENERATIONS.format(keyspace=keyspace))
        recorded = {int(row[0]): str(row[1]) for row in rows}
        problem = check_generation(self.generation, self.topic, recorded)
        if problem is not None:
            raise FatalSinkError(problem)
        if self.generation not in recorded:
            registered = datetime.datetime.now(datetime.UTC)
            await self._run(REGISTER_GENERATION.format(keyspace=keyspace), (self.generation, self.topic, registered))
            log.info("write generation %d registered for topic %r in %s.write_generations", self.generation,
                     self.topic, keyspace)  # fmt: skip

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

    def _requests(self, batch: AggregateBatch) -> list[Any]:
        """The batch's upserts as few requests: UNLOGGED BATCHes of up to ``batch_rows`` rows,
        packed in partition order (a partition's rows together), crossing partitions unless
        ``batch_across_partitions`` is off. A request costs the worker about 90 µs of CPU in the
        driver, a row in a batch serialized by :class:`RowEncoder` about 6 µs (measured against
        the CQL test server). Atomicity is not what the batch is for: every row is an idempotent
        upsert with its own version, so a batch retried after a timeout, applied in part or
        twice, converges to the same rows."""
        from cassandra.query import BatchStatement, BatchType

        generation, limit = self.generation, self.settings.batch_rows
        window, latest, alert = self._window_encoder, self._latest_encoder, self._alert_encoder
        # (partition, encoder, item); the partition of a window row is (device, metric, size),
        # of a latest value the device (and of an alert the device).
        rows: list[tuple[tuple[Any, ...], RowEncoder, Any]] = [
            ((r[0], r[1], r[2]), window, window.item((*r, write_version(generation, r[11])))) for r in batch.windows
        ]
        rows += [((r[0],), latest, latest.item((*r, write_version(generation, r[4])))) for r in batch.latest]
        rows += [((a[1],), alert, alert.item((a[1], a[8], a[0], a[2], a[3], a[4], a[5], a[6], a[7], a[9],
                                             write_version(generation, a[9])))) for a in batch.alerts]  # fmt: skip
        if limit == 1:
            return [encoder.statement(item) for _, encoder, item in rows]
        rows.sort(key=lambda row: row[0])
        across = self.settings.batch_across_partitions
        groups: list[list[tuple[tuple[Any, ...], RowEncoder, Any]]] = []
        group: list[tuple[tuple[Any, ...], RowEncoder, Any]] = []
        partition: tuple[Any, ...] | None = None
        for row in rows:
            if not group or len(group) >= limit or (not across and row[0] != partition):
                group = []
                groups.append(group)
                partition = row[0]
            group.append(row)
        requests: list[Any] = []
        for group in groups:
            if len(group) == 1:
                _, encoder, item = group[0]
                requests.append(encoder.statement(item))
                continue
            request = BatchStatement(batch_type=BatchType.UNLOGGED)
            for _, encoder, item in group:
                encoder.add_to(request, item)
            requests.append(request)
        return requests

    async def write(self, batch: AggregateBatch) -> None:
        if not len(batch):
            return
        started = time.perf_counter()
        requests = self._requests(batch)
        metrics.SCYLLA_WRITE_REQUESTS.inc(len(requests))
        results = await asyncio.gather(*(self._run(request) for request in requests), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            fatal = [e for e in errors if isinstance(e, FatalSinkError)]
            raise (fatal or errors)[0]
        metrics.SINK_BATCH_ROWS.labels(sink=self.name).observe(len(batch))
        metrics.SINK_WRITE_SECONDS.labels(sink=self.name).observe(time.perf_counter() - started)
        metrics.SINK_LAST_SUCCESS.labels(sink=self.name).set(time.time())
        self._batches += 1
        every = self.settings.shadow_check_every
        if every and self._batches % every == 0:
            await self._check_shadowed(batch)

    async def _check_shadowed(self, batch: AggregateBatch) -> None:
        """Read back the write time of the batch's newest window and latest value: a newer one
        than the version just written means the write lost (a row written by another tool with
        a wall-clock timestamp, a generation not raised after a move, or, rarely, this worker
        lost the partition meanwhile). One or two reads per check; a failed read is ignored."""
        checks: list[tuple[str, Any, tuple[Any, ...], int]] = []
        if batch.windows:
            window = max(batch.windows, key=lambda r: r[11])
            checks.append(("window_aggregates", self._writetime_window, window[:4], window[11]))
        if batch.latest:
            latest = max(batch.latest, key=lambda r: r[4])
            checks.append(("latest_values", self._writetime_latest, latest[:2], latest[4]))
        for table, statement, key, offset in checks:
            version = write_version(self.generation, offset)
            try:
                rows = list(await self._run(statement, key))
            except Exception:
                log.debug("write time read-back of %s failed", table, exc_info=True)
                continue
            written = rows[0][0] if rows else None
            if isinstance(written, int) and written > version:
                metrics.SCYLLA_SHADOWED.labels(table=table).inc()
                log.warning(
                    "ScyllaDB write to %s %s at version %d (generation %d, offset %d) is shadowed by write time %d "
                    "(generation %d): see docs/migrations.md",
                    table, key, version, self.generation, offset, written, generation_of(written),
                )  # fmt: skip

    async def _read(self, name: str, template: str, params: tuple[Any, ...]) -> list[Any]:
        """A lookup's rows. Not under the write concurrency limit: reads must not queue behind a
        backlog of writes (the API bounds its own requests). Bound by a RowEncoder, like the
        writes: timestamps as epoch milliseconds, no datetime (a third of a windows read's CPU)."""
        if self._session is None:
            raise RetriableSinkError("ScyllaDB is not connected yet")
        try:
            encoder = self._reads.get(name)
            if encoder is None:
                prepare = self._session.prepare
                prepared = await asyncio.to_thread(prepare, template.format(keyspace=self.settings.keyspace))
                encoder = self._reads[name] = RowEncoder(prepared)
            return list(await self._execute(encoder.bound(params)))
        except Exception as exc:
            raise classify(exc) from exc

    async def read_latest(self, device: str) -> list[tuple[str, float, int, int]]:
        """(metric, value, event_ms, source offset) of every latest value of a device."""
        rows = await self._read("latest", SELECT_LATEST, (device,))
        return [(metric, value, millis_of(event_time), offset) for metric, value, event_time, offset in rows]

    async def read_windows(
        self, device: str, metric: str, size_s: int, from_ms: int, to_ms: int, limit: int
    ) -> list[tuple[Any, ...]]:
        """(start_ms, end_ms, count, sum, min, max, last, last_ms) of windows starting in
        [from_ms, to_ms), newest first, at most ``limit``."""
        params = (device, metric, size_s, from_ms, to_ms, limit)
        rows = await self._read("windows", SELECT_WINDOWS, params)
        return [
            (millis_of(start), millis_of(end), count, total, low, high, last, millis_of(last_time))
            for start, end, count, total, low, high, last, last_time in rows
        ]

    async def read_alerts(self, device: str, from_ms: int, to_ms: int, limit: int) -> list[tuple[Any, ...]]:
        """Alerts as AlertRows (agents/alerts.py) with event time in [from_ms, to_ms), newest first."""
        rows = await self._read("alerts", SELECT_ALERTS, (device, from_ms, to_ms, limit))
        return [
            (alert_id, device, rule, metric, state, value, threshold, millis_of(start), millis_of(event_time), offset)
            for event_time, alert_id, rule, metric, state, value, threshold, start, offset in rows
        ]

    async def close(self) -> None:
        cluster, self._cluster, self._session = self._cluster, None, None
        if cluster is not None:
            try:
                await asyncio.to_thread(cluster.shutdown)
            except Exception:
                log.debug("Scylla cluster shutdown raised", exc_info=True)
