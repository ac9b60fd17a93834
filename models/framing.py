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


def schema_id_of(value: bytes) -> int | None:
    """The Confluent schema id of a framed payload, else None."""
    if len(value) >= 5 and value[0] == CONFLUENT_MAGIC:
        return int(struct.unpack_from(">I", value, 1)[0])
    return None


def parse_schema(schema_id: int, kind: str, text: str) -> Schema:
    """A registry's answer, parsed; raises ValueError for a schema that does not parse."""
    kind = (kind or "AVRO").upper()
    if kind == "AVRO":
        from fastavro import parse_schema as parse_avro

        return Schema(schema_id, kind, parse_avro(orjson.loads(text)))
    return Schema(schema_id, kind)


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
