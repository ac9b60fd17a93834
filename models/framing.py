"""Schema-registry framed payloads, beside plain JSON in the same topic.

Confluent's wire format: byte 0 is the magic 0, bytes 1-4 the schema id (big-endian), then the
payload: Avro binary (no container header) or JSON, as the schema's type says. AWS Glue Schema
Registry's: byte 0 is the header version 3, byte 1 the compression (0 none, 5 zlib), bytes 2-17
the schema version's UUID; millstream does not read it and says so in the reject reason.

Plain JSON cannot start with byte 0 or 3, so the first byte tells the three apart.

The schemas themselves are fetched by ``app/registry.py`` before a batch is decoded and kept in
a :class:`SchemaBook`; decoding never waits on the network.
"""

from __future__ import annotations

import io
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

CONFLUENT_MAGIC = 0
GLUE_HEADER_VERSION = 3
GLUE_HEADER_BYTES = 18
UNKNOWN_TTL_S = 60.0  # an id the registry did not know is asked again after this long
MAX_DOCUMENT_DEPTH = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


class FramingError(Exception):
    """A framed payload that cannot be decoded: ``reason`` is a RejectReason value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class Schema:
    """A registered schema, parsed once."""

    schema_id: int
    kind: str  # AVRO | JSON | PROTOBUF
    parsed: Any = None  # fastavro's parsed schema for AVRO
    refused: str | None = None  # why its payloads are not read (an Avro schema a message could abuse)


def schema_id_of(value: bytes | None) -> int | None:
    """The Confluent schema id of a framed payload, else None (also for a tombstone's None)."""
    if value is not None and len(value) >= 5 and value[0] == CONFLUENT_MAGIC:
        return int(struct.unpack_from(">I", value, 1)[0])
    return None


def parse_schema(schema_id: int, kind: str, text: str) -> Schema:
    """A registry's answer, parsed; raises ValueError for a schema that does not parse."""
    kind = (kind or "AVRO").upper()
    if kind == "AVRO":
        from fastavro import parse_schema as parse_avro

        parsed = parse_avro(orjson.loads(text))
        return Schema(schema_id, kind, parsed, avro_hazard(parsed))
    return Schema(schema_id, kind)


# Avro types by the fewest bytes a value takes (logical types take their base type's).
_PRIMITIVE_WIDTH = {"null": 0, "boolean": 1, "int": 1, "long": 1, "float": 4, "double": 8, "bytes": 1, "string": 1}


def avro_hazard(schema: Any) -> str | None:
    """Why a message could make fastavro's reader crash the worker or run without end under
    this schema, or None. fastavro reads in C, recursing per level without a depth check: a
    recursive schema lets a 10 KB message nest 10,000 levels deep and crash the process with a
    segmentation fault (every worker that reads it, so the group would stop); an array of items
    that take no bytes (null, an empty record, a fixed of size 0) lets a 10-byte message claim
    billions of items. Both are found in the schema, once, so no message is read under it. A
    schema nesting deeper than MAX_SCHEMA_DEPTH is refused too (documents nest at most
    MAX_DOCUMENT_DEPTH levels; fastavro has crashed here at 10,000)."""
    named: dict[str, Any] = {}  # named types seen: their schema, or their width once walked
    try:
        _width(schema, named, [], 0)
    except _Hazard as hazard:
        return str(hazard)
    return None


MAX_SCHEMA_DEPTH = 32


class _Hazard(Exception):
    pass


def _width(schema: Any, named: dict[str, Any], path: list[str], depth: int) -> int:
    """The fewest bytes a value of ``schema`` takes; raises _Hazard. ``path``: named types
    being walked (a reference back to one of them is recursion)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise _Hazard(f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(schema, str):
        if schema in _PRIMITIVE_WIDTH:
            return _PRIMITIVE_WIDTH[schema]
        if schema in path:
            raise _Hazard(f"is recursive ({schema} contains itself): a small message could nest deep enough to "
                          "crash the reader")  # fmt: skip
        if schema not in named:
            raise _Hazard(f"names an unknown type {schema!r}")
        known = named[schema]
        return known if isinstance(known, int) else _width(known, named, path, depth)
    if isinstance(schema, list):  # a union: its branch index takes a byte at least
        for branch in schema:
            _width(branch, named, path, depth + 1)
        return 1
    if not isinstance(schema, dict):
        raise _Hazard(f"has a type that is neither a name, a union nor a mapping: {str(schema)[:60]}")
    kind = schema.get("type")
    if kind in ("record", "error", "enum", "fixed"):
        name = schema.get("name", "")
        named.setdefault(name, schema)
        if kind == "enum":
            return 1
        if kind == "fixed":
            return int(schema.get("size", 0))
        path.append(name)
        try:
            width = sum(_width(field["type"], named, path, depth + 1) for field in schema.get("fields", []))
        finally:
            path.pop()
        named[name] = width  # walked once: a later reference takes its width
        return width
    if kind == "array":
        if _width(schema["items"], named, path, depth + 1) == 0:
            raise _Hazard("has an array of items that take no bytes (null, an empty record or fixed): a 10-byte "
                          "message could claim billions of them")  # fmt: skip
        return 1
    if kind == "map":
        _width(schema["values"], named, path, depth + 1)  # each entry's key takes a byte at least
        return 1
    return _width(kind, named, path, depth)  # a primitive with attributes (logical types), or a named one


class SchemaBook:
    """Schemas by id, as the registry answered: a schema, or unknown (for a minute)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._known: dict[int, Schema] = {}
        self._unknown: dict[int, float] = {}
        self._clock = clock

    def get(self, schema_id: int) -> Schema | None:
        return self._known.get(schema_id)

    def add(self, schema: Schema) -> None:
        self._known[schema.schema_id] = schema
        self._unknown.pop(schema.schema_id, None)

    def mark_unknown(self, schema_id: int) -> None:
        self._unknown[schema_id] = self._clock() + UNKNOWN_TTL_S

    def needs(self, schema_id: int) -> bool:
        """True if the registry must be asked about this id before a message can be decoded."""
        if schema_id in self._known:
            return False
        until = self._unknown.get(schema_id)
        return until is None or until <= self._clock()

    def __len__(self) -> int:
        return len(self._known)


def unframe(value: bytes, book: SchemaBook | None) -> Any:
    """The document a framed payload carries; raises FramingError."""
    if value[0] == GLUE_HEADER_VERSION:
        if len(value) >= GLUE_HEADER_BYTES and value[1] in (0, 5):
            version = uuid.UUID(bytes=bytes(value[2:GLUE_HEADER_BYTES]))
            raise FramingError(
                "glue_framed", f"AWS Glue Schema Registry framing (schema version {version}); millstream reads plain "
                "JSON and Confluent-framed payloads only",
            )  # fmt: skip
        raise FramingError("undecodable", "starts with byte 3 but is not AWS Glue Schema Registry framing")
    schema_id = schema_id_of(value)
    if schema_id is None:
        raise FramingError("undecodable", "starts with byte 0 but is shorter than a schema-registry header")
    if book is None:
        raise FramingError(
            "unknown_schema", f"schema-registry framed (schema id {schema_id}), and MILLSTREAM_REGISTRY__URL is unset"
        )
    schema = book.get(schema_id)
    if schema is None:
        raise FramingError("unknown_schema", f"schema id {schema_id} is not in the registry")
    payload = memoryview(value)[5:]
    if schema.kind == "JSON":
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise FramingError("schema_mismatch", f"schema id {schema_id} (JSON): {str(exc)[:100]}") from None
    if schema.kind != "AVRO":
        raise FramingError("unknown_schema", f"schema id {schema_id} is {schema.kind}, which millstream does not read")
    if schema.refused is not None:
        raise FramingError("schema_mismatch", f"schema id {schema_id} (Avro) is not read: it {schema.refused}")
    return _avro(schema, payload)


def _avro(schema: Schema, payload: memoryview) -> Any:
    from fastavro import schemaless_reader

    stream = io.BytesIO(payload)
    try:
        doc = schemaless_reader(stream, schema.parsed, None)
    except Exception as exc:
        raise FramingError(
            "schema_mismatch", f"schema id {schema.schema_id} (Avro): {type(exc).__name__}: {str(exc)[:100]}"
        ) from None
    if stream.tell() != len(payload):
        raise FramingError(
            "schema_mismatch", f"schema id {schema.schema_id} (Avro): {len(payload) - stream.tell()} bytes left over"
        )
    return _plain(doc, 0)


def _plain(value: Any, depth: int) -> Any:
    """Avro's logical types as JSON would carry them: timestamps as epoch milliseconds."""
    if depth > MAX_DOCUMENT_DEPTH:
        raise FramingError("undecodable", "nesting too deep")
    if isinstance(value, dict):
        return {key: _plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item, depth + 1) for item in value]
    if isinstance(value, datetime):
        stamp = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return (stamp - _EPOCH) // _MILLISECOND
    if isinstance(value, date):
        return value.isoformat()
    return value
