"""The server: connections, frames, requests, and the CQL statements run against the store."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tests.support.cql.faults import Faults
from tests.support.cql.parser import Tokens
from tests.support.cql.protocol import (
    ERR_ALREADY_EXISTS,
    ERR_BAD_CREDENTIALS,
    ERR_OVERLOADED,
    ERR_PROTOCOL,
    ERR_READ_TIMEOUT,
    ERR_SYNTAX,
    ERR_UNAVAILABLE,
    ERR_UNPREPARED,
    ERR_WRITE_TIMEOUT,
    OP_AUTH_RESPONSE,
    OP_AUTH_SUCCESS,
    OP_AUTHENTICATE,
    OP_BATCH,
    OP_ERROR,
    OP_EXECUTE,
    OP_OPTIONS,
    OP_PREPARE,
    OP_QUERY,
    OP_READY,
    OP_REGISTER,
    OP_RESULT,
    OP_STARTUP,
    OP_SUPPORTED,
    UNSET,
    CqlError,
    DropConnection,
    Reader,
    _bytes,
    _int,
    _short,
    _string,
    invalid,
)
from tests.support.cql.store import Prepared, Table
from tests.support.cql.types import COLLECTIONS, CqlType, parse_type

SYSTEM_LOCAL = [
    ("key", "text"), ("bootstrapped", "text"), ("broadcast_address", "inet"), ("cluster_name", "text"),
    ("cql_version", "text"), ("data_center", "text"), ("host_id", "uuid"), ("listen_address", "inet"),
    ("native_protocol_version", "text"), ("partitioner", "text"), ("rack", "text"),
    ("release_version", "text"), ("rpc_address", "inet"), ("schema_version", "uuid"),
    ("tokens", "set<text>"),
]  # fmt: skip
SYSTEM_PEERS = [
    ("peer", "inet"), ("data_center", "text"), ("host_id", "uuid"), ("preferred_ip", "inet"),
    ("rack", "text"), ("release_version", "text"), ("rpc_address", "inet"), ("schema_version", "uuid"),
    ("tokens", "set<text>"),
]  # fmt: skip


@dataclass(frozen=True)
class _WriteShape:
    """A parsed INSERT, UPDATE or DELETE: its values by source (marker, literal, null)."""

    verb: str
    table: Table
    assignments: list[tuple[str, Any]]
    key: list[tuple[str, Any]]
    using: list[tuple[str, Any]]
    markers: int


class CqlServer:
    """Run with ``start()`` (own thread and event loop) and ``stop()``; ``port`` after start."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        """``ssl_context``: serve TLS only (client_encryption_options); ``credentials``: require this
        user and password, as PasswordAuthenticator does (SASL PLAIN after STARTUP)."""
        self.host, self.port = host, port
        self.ssl_context, self.credentials = ssl_context, credentials
        self.logins = {"accepted": 0, "refused": 0}
        self.keyspaces: dict[str, dict[str, Table]] = {}
        self.prepared: dict[bytes, Prepared] = {}
        self.faults = Faults()
        self.schema_version = uuid.uuid4()
        self.host_id = uuid.uuid4()
        self.stats = {"requests": 0, "writes": 0, "rows_written": 0}
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._write_shapes: dict[tuple[str, str | None], _WriteShape] = {}

    # -- lifecycle
    def start(self) -> CqlServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port, ssl=self.ssl_context)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="cql-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("CQL test server did not start")
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shutdown() -> None:
            server.close()
            for writer in list(self._writers):
                writer.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop = self._server = None

    def drop_connections(self) -> None:
        """Close every client connection now (the driver must reconnect)."""
        if self._loop:
            for writer in list(self._writers):
                self._loop.call_soon_threadsafe(writer.close)

    # -- test helpers
    def rows(self, keyspace: str, table: str) -> list[dict[str, Any]]:
        """Decoded rows of a table, for assertions."""
        with self._lock:
            t = self.keyspaces[keyspace][table]
            return [{c: t.columns[c].validate(v, c) for c, v in row.items()} for row in t.rows.values()]

    # -- connection handling
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        state: dict[str, str | None] = {"keyspace": None}
        try:
            while True:
                header = await reader.readexactly(9)
                version, _flags, stream, opcode, length = struct.unpack(">BBhBi", header)
                body = await reader.readexactly(length)
                if version & 0x7F != 4:
                    message = f"Invalid or unsupported protocol version ({version & 0x7F}); supported: 4/v4"
                    writer.write(self._frame(stream, OP_ERROR, _int(ERR_PROTOCOL) + _string(message)))
                    await writer.drain()
                    continue
                try:
                    opcode_out, payload = await self._handle(opcode, Reader(body), state)
                except CqlError as err:
                    opcode_out, payload = OP_ERROR, _int(err.code) + _string(err.message) + err.extra
                except DropConnection:
                    break
                writer.write(self._frame(stream, opcode_out, payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _authenticate(self, body: Reader, state: dict[str, str | None]) -> tuple[int, bytes]:
        token = body.take(body.int())
        _authzid, user, password = token.split(b"\x00", 2) if token.count(b"\x00") == 2 else (b"", b"", b"")
        if self.credentials is None or (user.decode(), password.decode()) != self.credentials:
            self.logins["refused"] += 1
            raise CqlError(ERR_BAD_CREDENTIALS, "Username and/or password are incorrect")
        self.logins["accepted"] += 1
        state["login"] = "done"
        return OP_AUTH_SUCCESS, _int(-1)

    @staticmethod
    def _frame(stream: int, opcode: int, body: bytes) -> bytes:
        return struct.pack(">BBhBi", 0x84, 0, stream, opcode, len(body)) + body

    async def _handle(self, opcode: int, body: Reader, state: dict[str, str | None]) -> tuple[int, bytes]:
        self.stats["requests"] += 1
        if opcode == OP_OPTIONS:
            options = {"CQL_VERSION": ["3.4.4"], "COMPRESSION": []}
            payload = _short(len(options)) + b"".join(
                _string(k) + _short(len(v)) + b"".join(map(_string, v)) for k, v in options.items()
            )
            return OP_SUPPORTED, payload
        if opcode == OP_STARTUP:
            body.string_map()
            if self.credentials is not None:
                state["login"] = "pending"
                return OP_AUTHENTICATE, _string("org.apache.cassandra.auth.PasswordAuthenticator")
            return OP_READY, b""
        if opcode == OP_AUTH_RESPONSE:
            return self._authenticate(body, state)
        if state.get("login") == "pending":
            raise CqlError(ERR_PROTOCOL, f"Unexpected message {opcode:#x}, expecting AUTH_RESPONSE")
        if opcode == OP_REGISTER:
            return OP_READY, b""
        if opcode == OP_QUERY:
            query = body.long_string()
            values, timestamp = self._read_params(body)
            return await self._run(query, values, state, None, timestamp)
        if opcode == OP_PREPARE:
            return OP_RESULT, self._prepare(body.long_string(), state)
        if opcode == OP_EXECUTE:
            query_id = body.short_bytes()
            stmt = self.prepared.get(query_id)
            if stmt is None:
                raise CqlError(ERR_UNPREPARED, "Prepared query with ID not found", _short(len(query_id)) + query_id)
            values, timestamp = self._read_params(body)
            return await self._run(stmt.query, values, state, stmt, timestamp)
        if opcode == OP_BATCH:
            return await self._batch(body, state)
        raise CqlError(ERR_PROTOCOL, f"unsupported opcode {opcode:#x}")

    @staticmethod
    def _read_params(body: Reader) -> tuple[list[Any], int | None]:
        """Bound values and the client-side default timestamp, if sent."""
        body.short()  # consistency: every level is accepted
        flags = body.byte()
        values: list[Any] = []
        if flags & 0x01:
            for _ in range(body.short()):
                if flags & 0x40:
                    body.string()
                values.append(body.value())
        if flags & 0x04:
            body.int()  # page size: all rows come in one page
        if flags & 0x08:
            body.take(max(body.int(), 0))
        if flags & 0x10:
            body.short()
        timestamp = struct.unpack(">q", body.take(8))[0] if flags & 0x20 else None
        return values, timestamp

    async def _batch(self, body: Reader, state: dict[str, str | None]) -> tuple[int, bytes]:
        body.byte()  # logged / unlogged / counter
        statements: list[tuple[str, Prepared | None, list[Any]]] = []
        for _ in range(body.short()):
            if body.byte() == 0:
                query, stmt = body.long_string(), None
            else:
                query_id = body.short_bytes()
                stmt = self.prepared.get(query_id)
                if stmt is None:
                    raise CqlError(ERR_UNPREPARED, "Prepared query not found", _short(len(query_id)) + query_id)
                query = stmt.query
            statements.append((query, stmt, [body.value() for _ in range(body.short())]))
        body.short()  # consistency
        flags = body.byte()
        if flags & 0x10:
            body.short()
        timestamp = struct.unpack(">q", body.take(8))[0] if flags & 0x20 else None
        await self._maybe_fault(is_write=True, batch=True)
        with self._lock:  # all-or-nothing: validate every statement before applying any
            plans = [self._plan_write(q, s, v, state, timestamp) for q, s, v in statements]
            for apply in plans:
                apply()
        return OP_RESULT, _int(1)

    async def _maybe_fault(self, is_write: bool, batch: bool = False) -> None:
        fault = self.faults.take(is_write)
        if fault is None:
            return
        kind, delay_s = fault
        if kind == "delay":
            await asyncio.sleep(delay_s)
        elif kind == "drop":
            raise DropConnection
        elif kind == "write_timeout":
            write_type = "BATCH" if batch else "SIMPLE"
            raise CqlError(ERR_WRITE_TIMEOUT, "Operation timed out - received only 0 responses.",
                           _short(0x0006) + _int(0) + _int(2) + _string(write_type))  # fmt: skip
        elif kind == "read_timeout":
            raise CqlError(ERR_READ_TIMEOUT, "Operation timed out - received only 0 responses.",
                           _short(0x0006) + _int(0) + _int(2) + b"\x00")  # fmt: skip
        elif kind == "unavailable":
            raise CqlError(ERR_UNAVAILABLE, "Cannot achieve consistency level LOCAL_QUORUM",
                           _short(0x0006) + _int(2) + _int(1))  # fmt: skip
        elif kind == "overloaded":
            raise CqlError(ERR_OVERLOADED, "Too many in flight hints / overloaded")

    # -- statements
    def _table(self, tokens: Tokens, state: dict[str, str | None]) -> Table:
        keyspace, name = self._qualified(tokens, state)
        if keyspace not in self.keyspaces:
            raise invalid(f"Keyspace {keyspace} does not exist")
        if name not in self.keyspaces[keyspace]:
            raise invalid(f"unconfigured table {name}")
        return self.keyspaces[keyspace][name]

    @staticmethod
    def _qualified(tokens: Tokens, state: dict[str, str | None]) -> tuple[str, str]:
        first = tokens.ident()
        if tokens.accept("."):
            return first.lower(), tokens.ident().lower()
        if state["keyspace"] is None:
            raise invalid("No keyspace has been specified. USE a keyspace, or explicitly specify keyspace.tablename")
        return state["keyspace"], first.lower()

    def _value(self, tokens: Tokens, column: str, kind: CqlType, values: list[Any]) -> bytes | object | None:
        """The next value of a statement parsed for this execution only (a SELECT's WHERE)."""
        return self._bound(self._source(tokens, column, kind), values, tokens.markers)

    def _prepare(self, query: str, state: dict[str, str | None]) -> bytes:
        markers: list[tuple[str, CqlType]] = []
        table: Table | None = None
        with self._lock:
            tokens = Tokens(query)
            verb = tokens.ident().lower()
            if verb == "insert":
                tokens.expect("into")
                table = self._table(tokens, state)
                columns = self._name_list(tokens)
                tokens.expect("values", "(")
                for column in columns:
                    token = tokens.next()
                    if token.text == "?":
                        markers.append((column, table.column(column)))
                    tokens.accept(",")
                previous = ""
                while not tokens.done():  # USING TIMESTAMP ? / TTL ?
                    token = tokens.next()
                    if token.text == "?":
                        markers.append(self._using_marker(previous))
                    previous = token.text.lower()
            elif verb in ("update", "delete", "select"):
                if verb == "update":
                    table = self._table(tokens, state)
                else:
                    while not tokens.accept("from"):
                        tokens.next()
                    table = self._table(tokens, state)
                last_column = ""
                while not tokens.done():
                    token = tokens.next()
                    if token.kind == "ident" and token.text.lower() in table.columns:
                        last_column = token.text.lower()
                    elif token.text == "?" and last_column in ("", "timestamp", "ttl", "limit"):
                        markers.append(self._using_marker(last_column))
                    elif token.text == "?":
                        markers.append((last_column, table.column(last_column)))
                    elif token.kind == "ident" and token.text.lower() in ("timestamp", "ttl", "limit"):
                        last_column = token.text.lower()
            else:
                raise invalid(f"cannot prepare {verb.upper()} in the test server")
            result_columns = self._select_columns(query, table, state) if verb == "select" else []
        query_id = uuid.uuid5(uuid.NAMESPACE_OID, (state["keyspace"] or "") + query).bytes
        self.prepared[query_id] = Prepared(query, markers, table, result_columns)
        assert table is not None
        pk_index = [i for pk in table.partition_key for i, (c, _) in enumerate(markers) if c == pk][:]
        if len(pk_index) != len(table.partition_key):
            pk_index = []
        meta = _int(1) + _int(len(markers)) + _int(len(pk_index)) + b"".join(_short(i) for i in pk_index)
        meta += _string(table.keyspace) + _string(table.name)
        meta += b"".join(_string(c) + t.option() for c, t in markers)
        return _int(4) + _short(len(query_id)) + query_id + meta + self._rows_meta(table, result_columns)

    @staticmethod
    def _using_marker(previous: str) -> tuple[str, CqlType]:
        if previous == "timestamp":
            return "[timestamp]", CqlType("bigint")
        if previous == "ttl":
            return "[ttl]", CqlType("int")
        if previous == "limit":
            return "[limit]", CqlType("int")
        raise CqlError(ERR_SYNTAX, "bind marker outside VALUES/SET/WHERE/USING")

    @staticmethod
    def _rows_meta(table: Table | None, columns: list[tuple[str, CqlType]]) -> bytes:
        if not columns:
            return _int(0x0004) + _int(0)
        keyspace, name = (table.keyspace, table.name) if table else ("system", "local")
        specs = b"".join(_string(c) + t.option() for c, t in columns)
        return _int(0x0001) + _int(len(columns)) + _string(keyspace) + _string(name) + specs

    def _select_columns(self, query: str, table: Table | None, state: dict[str, str | None]) -> list[
        tuple[str, CqlType]]:  # fmt: skip
        tokens = Tokens(query)
        tokens.expect("select")
        if tokens.accept("count", "(", "*", ")"):
            return [("count", CqlType("bigint"))]
        if tokens.accept("*"):
            assert table is not None
            return list(table.columns.items())
        assert table is not None
        columns: list[tuple[str, CqlType]] = []
        while True:
            if tokens.accept("writetime", "("):  # the write timestamp of a cell, as Scylla's WRITETIME()
                name = tokens.ident().lower()
                tokens.expect(")")
                table.column(name)
                if name in table.primary_key:
                    raise invalid(f"Cannot use selection function writeTime on PRIMARY KEY part {name}")
                columns.append((f"writetime({name})", CqlType("bigint")))
            else:
                name = tokens.ident()
                columns.append((name.lower(), table.column(name)))
            if not tokens.accept(","):
                return columns

    @staticmethod
    def _name_list(tokens: Tokens) -> list[str]:
        tokens.expect("(")
        names = [tokens.ident().lower()]
        while tokens.accept(","):
            names.append(tokens.ident().lower())
        tokens.expect(")")
        return names

    async def _run(
        self, query: str, values: list[Any], state: dict[str, str | None], prepared: Prepared | None,
        timestamp: int | None,
    ) -> tuple[int, bytes]:  # fmt: skip
        verb = query.lstrip().split(None, 1)[0].lower() if query.strip() else ""
        if verb in ("insert", "update", "delete"):
            await self._maybe_fault(is_write=True)
            with self._lock:
                self._plan_write(query, prepared, values, state, timestamp)()
            return OP_RESULT, _int(1)
        if verb == "select":
            lowered = " ".join(query.lower().split())
            if "from system." in lowered or "from system_schema." in lowered or "system_virtual" in lowered:
                return OP_RESULT, self._system_select(lowered)
            await self._maybe_fault(is_write=False)
            with self._lock:
                return OP_RESULT, self._select(query, values, state)
        with self._lock:
            return OP_RESULT, self._ddl(query, state)

    def _plan_write(
        self, query: str, prepared: Prepared | None, values: list[Any], state: dict[str, str | None],
        default_timestamp: int | None,
    ) -> Any:  # fmt: skip
        """Parse (once per statement text and keyspace) and validate a write; return a function
        that applies it. The parse is cached as a real server caches a prepared statement: the
        bench writes tens of thousands of rows a second through this server."""
        cache_key = (query, state["keyspace"])
        shape = self._write_shapes.get(cache_key)
        if shape is None:
            shape = self._parse_write(query, state)
            if len(self._write_shapes) > 4096:
                self._write_shapes.clear()
            self._write_shapes[cache_key] = shape
        return self._bind_write(shape, values, default_timestamp)

    def _parse_write(self, query: str, state: dict[str, str | None]) -> _WriteShape:
        tokens = Tokens(query)
        verb = tokens.ident().lower()
        assignments: list[tuple[str, Any]] = []
        using: list[tuple[str, Any]] = []
        key: list[tuple[str, Any]]
        if verb == "insert":
            tokens.expect("into")
            table = self._table(tokens, state)
            columns = self._name_list(tokens)
            tokens.expect("values", "(")
            for i, column in enumerate(columns):
                if i:
                    tokens.expect(",")
                assignments.append((column, self._source(tokens, column, table.column(column))))
            tokens.expect(")")
            key = assignments
            if tokens.accept("if", "not", "exists"):
                pass  # lightweight transactions are not implemented: a plain upsert
            if tokens.accept("using"):
                using = self._using_sources(tokens)
        elif verb == "update":
            table = self._table(tokens, state)
            if tokens.accept("using"):
                using = self._using_sources(tokens)
            tokens.expect("set")
            while True:
                column = tokens.ident().lower()
                tokens.expect("=")
                assignments.append((column, self._source(tokens, column, table.column(column))))
                if not tokens.accept(","):
                    break
            tokens.expect("where")
            key = self._where_sources(tokens, table)
        elif verb == "delete":
            tokens.expect("from")
            table = self._table(tokens, state)
            if tokens.accept("using"):
                using = self._using_sources(tokens)
            tokens.expect("where")
            key = self._where_sources(tokens, table)
        else:
            raise CqlError(ERR_SYNTAX, f"unsupported write {verb}")
        named = {column for column, _ in key}
        for pk in table.partition_key:
            if pk not in named:
                raise invalid(f"Some partition key parts are missing: {pk}")
        for ck in table.clustering:
            if ck not in named:
                raise invalid(f"Some clustering keys are missing: {ck}")
        if verb == "update":
            for column, _ in assignments:
                if column in table.primary_key:
                    raise invalid(f"PRIMARY KEY part {column} found in SET part")
        return _WriteShape(verb, table, assignments, key, using, tokens.markers)

    def _source(self, tokens: Tokens, column: str, kind: CqlType) -> Any:
        """Where a value comes from: (column, kind, marker index), None for null, or the bytes of
        a literal (validated now)."""
        token = tokens.next()
        if token.text == "?" and token.kind == "symbol":
            tokens.markers += 1
            return (column, kind, tokens.markers - 1)
        if token.kind == "ident" and token.text.lower() == "null":
            return None
        return kind.encode_literal(token, column)

    def _using_sources(self, tokens: Tokens) -> list[tuple[str, Any]]:
        """``USING TIMESTAMP t [AND TTL n]`` (TTL is accepted, not enforced)."""
        found: list[tuple[str, Any]] = []
        while True:
            if tokens.accept("timestamp"):
                found.append(("timestamp", self._source(tokens, "[timestamp]", CqlType("bigint"))))
            elif tokens.accept("ttl"):
                found.append(("ttl", self._source(tokens, "[ttl]", CqlType("int"))))
            else:
                raise CqlError(ERR_SYNTAX, "expected TIMESTAMP or TTL after USING")
            if not tokens.accept("and"):
                return found

    def _where_sources(self, tokens: Tokens, table: Table) -> list[tuple[str, Any]]:
        conditions: list[tuple[str, Any]] = []
        while True:
            column = tokens.ident().lower()
            if not tokens.accept("="):
                raise invalid("only equality restrictions are supported by the test server")
            conditions.append((column, self._source(tokens, column, table.column(column))))
            if not tokens.accept("and"):
                break
        return conditions

    @staticmethod
    def _bound(source: Any, values: list[Any], markers: int) -> bytes | object | None:
        """The value of a source for this execution, validated against its column's type."""
        if not isinstance(source, tuple):
            return source  # None (null) or a literal's bytes
        column, kind, index = source
        if index >= len(values):
            raise invalid(f"There were {markers} markers(?) in CQL but {len(values)} bound variables")
        raw = values[index]
        if isinstance(raw, bytes) and (raw or kind.name in ("text", "ascii", "blob")):
            kind.validate(raw, column)
        return raw

    def _bind_write(self, shape: _WriteShape, values: list[Any], default_timestamp: int | None) -> Any:
        verb, table, markers = shape.verb, shape.table, shape.markers
        assignments = {column: self._bound(source, values, markers) for column, source in shape.assignments}
        key = assignments if verb == "insert" else {c: self._bound(s, values, markers) for c, s in shape.key}
        using: int | None = None
        for what, source in shape.using:
            raw = self._bound(source, values, markers)
            if what == "timestamp":
                if not isinstance(raw, bytes):
                    raise invalid("Invalid null value of timestamp")
                using = int.from_bytes(raw, "big", signed=True)
        for column in table.primary_key:
            if not isinstance(key[column], bytes):
                raise invalid(f"Invalid null value in condition for column {column}")
        row_key = tuple(key[c] for c in table.primary_key)  # type: ignore[misc]
        stamp = using if using is not None else default_timestamp
        if stamp is None:
            stamp = time.time_ns() // 1000  # server-side write time, microseconds

        def apply() -> None:
            # Last write wins per cell by write timestamp, as on Cassandra/Scylla.
            self.stats["writes"] += 1
            stamps = table.stamps.setdefault(row_key, {})
            if verb == "delete":
                row = table.rows.get(row_key, {})
                for column in [c for c in row if c not in table.primary_key and stamps.get(c, -1) <= stamp]:
                    del row[column]
                if row and all(c in table.primary_key for c in row) and stamps.get("", -1) <= stamp:
                    table.drop(row_key)
                return
            self.stats["rows_written"] += 1
            row = table.upsert(row_key, {c: key[c] for c in table.primary_key})  # type: ignore[misc]
            if verb == "insert":
                stamps[""] = max(stamps.get("", -1), stamp)  # the row marker
            for column, value in assignments.items():
                if column in table.primary_key or value is UNSET or stamps.get(column, -1) > stamp:
                    continue
                stamps[column] = stamp
                if value is None:
                    row.pop(column, None)
                else:
                    row[column] = value  # type: ignore[assignment]

        return apply

    def _where(
        self, tokens: Tokens, table: Table, values: list[Any], ranges: list[tuple[str, str, Any]] | None = None
    ) -> dict[str, Any]:
        """Equality restrictions; with ``ranges``, also <, <=, >, >= on clustering columns (SELECT)."""
        conditions: dict[str, Any] = {}
        while True:
            column = tokens.ident().lower()
            operator = None
            if ranges is not None:  # the tokenizer's symbols are single characters
                operator = next(
                    ("".join(op) for op in (("<", "="), (">", "="), ("<",), (">",)) if tokens.accept(*op)), None
                )
            if operator is not None:
                if column not in table.clustering:
                    raise invalid(f"Only clustering key columns can be restricted with a slice: {column}")
                ranges.append((column, operator, self._value(tokens, column, table.column(column), values)))  # type: ignore[union-attr]
            elif not tokens.accept("="):
                raise invalid("only =, <, <=, > and >= restrictions are supported by the test server")
            else:
                conditions[column] = self._value(tokens, column, table.column(column), values)
            if not tokens.accept("and"):
                break
        if ranges and set(table.partition_key) - set(conditions):
            raise invalid("Cannot execute this query as it might involve data filtering: restrict the partition key")
        return conditions

    @staticmethod
    def _in_ranges(table: Table, row: dict[str, bytes], ranges: list[tuple[str, str, Any]]) -> bool:
        for column, operator, raw in ranges:
            kind = table.columns[column]
            value, bound = kind.validate(row[column], column), kind.validate(raw, column)
            if not {"<": value < bound, "<=": value <= bound, ">": value > bound, ">=": value >= bound}[operator]:
                return False
        return True

    @staticmethod
    def _limit(token: str, values: list[Any]) -> int:
        """LIMIT n, or LIMIT ? bound to the last value of the execution."""
        if token == "?":
            if not values or not isinstance(values[-1], bytes) or len(values[-1]) != 4:
                raise invalid("LIMIT ? needs an int bound value")
            limit = int(struct.unpack(">i", values[-1])[0])
        else:
            limit = int(token)
        if limit <= 0:
            raise invalid(f"LIMIT must be strictly positive, got {limit}")
        return limit

    def _select(self, query: str, values: list[Any], state: dict[str, str | None]) -> bytes:
        tokens = Tokens(query)
        tokens.expect("select")
        while not tokens.accept("from"):
            tokens.next()
        table = self._table(tokens, state)
        columns = self._select_columns(query, table, state)
        conditions: dict[str, Any] = {}
        ranges: list[tuple[str, str, Any]] = []
        limit: int | None = None
        if tokens.accept("where"):
            conditions = self._where(tokens, table, values, ranges)
        if tokens.accept("limit"):
            token = tokens.next().text
            limit = self._limit(token, values)
        tokens.accept("allow", "filtering")
        keyed = [(k, r) for k, r in table.candidates(conditions) if all(r.get(c) == v for c, v in conditions.items())]
        if ranges:
            keyed = [(k, r) for k, r in keyed if self._in_ranges(table, r, ranges)]
        keyed.sort(key=lambda item: table.sort_key(item[1]))
        if Tokens(query).accept("select", "count", "(", "*", ")"):
            encoded = [[struct.pack(">q", len(keyed))]]
        else:
            encoded = [[self._cell(table, key, row, c) for c, _ in columns] for key, row in keyed[:limit]]
        return self._rows(table, columns, encoded)

    @staticmethod
    def _cell(table: Table, key: tuple[bytes, ...], row: dict[str, bytes], column: str) -> bytes | None:
        if column.startswith("writetime(") and column.endswith(")"):
            name = column[len("writetime(") : -1]
            stamp = table.stamps.get(key, {}).get(name)
            return struct.pack(">q", stamp) if stamp is not None and name in row else None
        return row.get(column)

    def _rows(self, table: Table | None, columns: list[tuple[str, CqlType]],
              rows: list[list[bytes | None]]) -> bytes:  # fmt: skip
        meta = self._rows_meta(table, columns)
        body = b"".join(_bytes(v) for row in rows for v in row)
        return _int(2) + meta + _int(len(rows)) + body

    def _system_select(self, lowered: str) -> bytes:
        def typed(spec: list[tuple[str, str]]) -> list[tuple[str, CqlType]]:
            out = []
            for name, kind in spec:
                out.append((name, CqlType("set", (CqlType("text"),)) if kind == "set<text>" else CqlType(kind)))
            return out

        system = Table("system", "local", {}, [], [])
        if "from system.local" in lowered:
            columns = typed(SYSTEM_LOCAL)
            ip = ipaddress.ip_address(self.host).packed
            values = {
                "key": b"local", "bootstrapped": b"COMPLETED", "broadcast_address": ip,
                "cluster_name": b"millstream-test", "cql_version": b"3.4.4", "data_center": b"datacenter1",
                "host_id": self.host_id.bytes, "listen_address": ip, "native_protocol_version": b"4",
                "partitioner": b"org.apache.cassandra.dht.Murmur3Partitioner", "rack": b"rack1",
                "release_version": b"3.11.4", "rpc_address": ip, "schema_version": self.schema_version.bytes,
                "tokens": _int(1) + _bytes(b"0"),
            }  # fmt: skip
            wanted = self._system_columns(lowered, columns)
            return self._rows(system, wanted, [[values[c] for c, _ in wanted]])
        if "from system.peers_v2" in lowered:
            raise invalid("unconfigured table peers_v2")
        if "from system.peers" in lowered:
            system.name = "peers"
            return self._rows(system, self._system_columns(lowered, typed(SYSTEM_PEERS)), [])
        # system_schema.*: no metadata rows to report (the driver needs at least one column spec)
        return self._rows(system, [("keyspace_name", CqlType("text"))], [])

    @staticmethod
    def _system_columns(lowered: str, columns: list[tuple[str, CqlType]]) -> list[tuple[str, CqlType]]:
        selected = lowered.split("select", 1)[1].split(" from ", 1)[0].strip()
        if selected == "*":
            return columns
        names = [n.strip() for n in selected.split(",")]
        by_name = dict(columns)
        return [(n, by_name.get(n, CqlType("text"))) for n in names]

    def _ddl(self, query: str, state: dict[str, str | None]) -> bytes:
        self._write_shapes.clear()  # a parsed write names a table that may be dropped or re-created
        tokens = Tokens(query)
        if tokens.accept("use"):
            keyspace = tokens.ident().lower()
            if keyspace not in self.keyspaces:
                raise invalid(f"Keyspace '{keyspace}' does not exist")
            state["keyspace"] = keyspace
            return _int(3) + _string(keyspace)
        if tokens.accept("create", "keyspace"):
            if_not = tokens.accept("if", "not", "exists")
            keyspace = tokens.ident().lower()
            tokens.expect("with")
            if "replication" not in query.lower() or "class" not in query.lower():
                raise CqlError(ERR_SYNTAX, "Missing mandatory replication strategy class")
            tokens.skip_rest()
            if keyspace in self.keyspaces:
                if if_not:
                    return _int(1)
                raise CqlError(ERR_ALREADY_EXISTS, f"Keyspace {keyspace} already exists",
                               _string(keyspace) + _string(""))  # fmt: skip
            self.keyspaces[keyspace] = {}
            return self._schema_change("CREATED", "KEYSPACE", keyspace)
        if tokens.accept("create", "table") or tokens.accept("create", "columnfamily"):
            if_not = tokens.accept("if", "not", "exists")
            keyspace, name = self._qualified(tokens, state)
            if keyspace not in self.keyspaces:
                raise invalid(f"Keyspace {keyspace} doesn't exist")
            table = self._parse_table(tokens, keyspace, name)
            if name in self.keyspaces[keyspace]:
                if if_not:
                    return _int(1)
                raise CqlError(ERR_ALREADY_EXISTS, f"Table {keyspace}.{name} already exists",
                               _string(keyspace) + _string(name))  # fmt: skip
            self.keyspaces[keyspace][name] = table
            return self._schema_change("CREATED", "TABLE", keyspace, name)
        if tokens.accept("drop", "table"):
            if_exists = tokens.accept("if", "exists")
            keyspace, name = self._qualified(tokens, state)
            if name not in self.keyspaces.get(keyspace, {}):
                if if_exists:
                    return _int(1)
                raise invalid(f"Table '{keyspace}.{name}' doesn't exist")
            del self.keyspaces[keyspace][name]
            return self._schema_change("DROPPED", "TABLE", keyspace, name)
        if tokens.accept("drop", "keyspace"):
            if_exists = tokens.accept("if", "exists")
            keyspace = tokens.ident().lower()
            if keyspace not in self.keyspaces:
                if if_exists:
                    return _int(1)
                raise invalid(f"Keyspace '{keyspace}' doesn't exist")
            del self.keyspaces[keyspace]
            return self._schema_change("DROPPED", "KEYSPACE", keyspace)
        if tokens.accept("truncate"):
            tokens.accept("table")
            truncated = self._table(tokens, state)
            truncated.clear()
            return _int(1)
        raise CqlError(ERR_SYNTAX, f"the test server does not support: {query[:60]}")

    def _schema_change(self, change: str, target: str, keyspace: str, name: str | None = None) -> bytes:
        self.schema_version = uuid.uuid4()
        body = _int(5) + _string(change) + _string(target) + _string(keyspace)
        return body + (_string(name) if name is not None else b"")

    @staticmethod
    def _parse_table(tokens: Tokens, keyspace: str, name: str) -> Table:
        columns: dict[str, CqlType] = {}
        partition: list[str] = []
        clustering: list[str] = []
        tokens.expect("(")
        while True:
            if tokens.accept("primary", "key"):
                tokens.expect("(")
                if tokens.accept("("):
                    partition = [tokens.ident().lower()]
                    while tokens.accept(","):
                        partition.append(tokens.ident().lower())
                    tokens.expect(")")
                else:
                    partition = [tokens.ident().lower()]
                while tokens.accept(","):
                    clustering.append(tokens.ident().lower())
                tokens.expect(")")
            else:
                column = tokens.ident().lower()
                columns[column] = parse_type(tokens)
                if tokens.accept("primary", "key"):
                    partition = [column]
            if not tokens.accept(","):
                break
        tokens.expect(")")
        if not partition:
            raise invalid("No PRIMARY KEY specifed (exactly one required)")
        for key in partition + clustering:
            if key not in columns:
                raise invalid(f"Unknown definition {key} referenced in PRIMARY KEY")
            if columns[key].name in COLLECTIONS:
                raise invalid(f"Invalid collection type for PRIMARY KEY component {key}")
        descending: set[str] = set()
        if tokens.accept("with"):
            while not tokens.done():
                if tokens.accept("clustering", "order", "by", "("):
                    while True:
                        column = tokens.ident().lower()
                        if column not in clustering:
                            raise invalid(f"Missing CLUSTERING ORDER for column {column}")
                        if tokens.accept("desc"):
                            descending.add(column)
                        else:
                            tokens.accept("asc")
                        if not tokens.accept(","):
                            break
                    tokens.expect(")")
                else:
                    tokens.next()
        return Table(keyspace, name, columns, partition, clustering, descending)


def main() -> None:
    """Run the server in the foreground: ``python -m tests.support.cql.server --port 19042``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=19042)
    args = parser.parse_args()
    server = CqlServer(args.host, args.port).start()
    print(f"CQL test server on {server.host}:{server.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
