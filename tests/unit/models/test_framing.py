"""Schema-registry framed payloads decode to the same readings as plain JSON, and every way
they can be wrong has its own reject reason."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.decode import Decoder
from models.framing import SchemaBook, parse_schema, schema_id_of
from models.records import Rejection, RejectReason
from tests.support.registry import AVRO_ID, BATCHED_AVRO, JSON_ID, avro, frame

NOW_MS = 1_764_000_000_000


def book() -> SchemaBook:
    schemas = SchemaBook()
    schemas.add(parse_schema(AVRO_ID, "AVRO", orjson.dumps(BATCHED_AVRO).decode()))
    schemas.add(parse_schema(JSON_ID, "JSON", '{"type": "object"}'))
    schemas.add(parse_schema(9, "PROTOBUF", 'syntax = "proto3";'))
    return schemas


def decode(value: bytes, schemas: SchemaBook | None = None) -> Any:
    return Decoder(schemas=schemas if schemas is not None else book()).decode(value, timestamp_ms=NOW_MS, now_ms=NOW_MS)


BATCH = {
    "device_id": "press-7", "factory": "f1", "line": "l2",
    "readings": [{"ts": NOW_MS - 2000, "metrics": {"temperature": 81.5, "rpm": 1200.0}},
                 {"ts": NOW_MS - 1000, "metrics": {"temperature": 82.0}}],
}  # fmt: skip


def test_avro_and_json_framed_decode_as_plain_json_does() -> None:
    plain = decode(orjson.dumps(BATCH))
    assert decode(frame(AVRO_ID, avro(BATCHED_AVRO, BATCH))) == plain
    assert decode(frame(JSON_ID, orjson.dumps(BATCH))) == plain
    assert len(plain) == 2 and plain[0].metrics == {"temperature": 81.5, "rpm": 1200.0}


@pytest.mark.parametrize(
    ("value", "reason", "detail"),
    [
        (frame(77, b"{}"), RejectReason.UNKNOWN_SCHEMA, "schema id 77 is not in the registry"),
        (frame(9, b"\x08\x01"), RejectReason.UNKNOWN_SCHEMA, "PROTOBUF"),
        (frame(AVRO_ID, b"\x02\x41"), RejectReason.SCHEMA_MISMATCH, "schema id 1 (Avro)"),
        (frame(AVRO_ID, avro(BATCHED_AVRO, BATCH) + b"\x00\x00"), RejectReason.SCHEMA_MISMATCH, "2 bytes left over"),
        (frame(JSON_ID, b"{not json"), RejectReason.SCHEMA_MISMATCH, "schema id 2 (JSON)"),
        (b"\x00\x00\x01", RejectReason.UNDECODABLE, "shorter than a schema-registry header"),
        (b"\x03\x00" + uuid.UUID(int=5).bytes + b"avro", RejectReason.GLUE_FRAMED, str(uuid.UUID(int=5))),
        (b"\x03garbage", RejectReason.UNDECODABLE, "not AWS Glue"),
    ],
)
def test_each_framing_fault_has_its_reason(value: bytes, reason: RejectReason, detail: str) -> None:
    result = decode(value)
    assert isinstance(result, Rejection) and result.reason == reason and detail in result.detail, result


def test_framed_payloads_without_a_registry_say_so() -> None:
    result = Decoder().decode(frame(AVRO_ID, avro(BATCHED_AVRO, BATCH)), timestamp_ms=NOW_MS, now_ms=NOW_MS)
    assert isinstance(result, Rejection) and result.reason == RejectReason.UNKNOWN_SCHEMA
    assert "MILLSTREAM_REGISTRY__URL is unset" in result.detail


def test_an_avro_record_still_passes_every_check_of_the_decoder() -> None:
    future = {**BATCH, "readings": [{"ts": NOW_MS + 3_600_000, "metrics": {"t": 1.0}}]}
    result = decode(frame(AVRO_ID, avro(BATCHED_AVRO, future)))
    assert isinstance(result, Rejection) and result.reason == RejectReason.FUTURE_TIMESTAMP
    epoch = {**BATCH, "readings": [{"ts": 0, "metrics": {"t": 1.0}}]}
    result = decode(frame(AVRO_ID, avro(BATCHED_AVRO, epoch)))
    assert isinstance(result, Rejection) and result.reason == RejectReason.BAD_TIMESTAMP


def test_unknown_ids_are_asked_again_after_a_minute() -> None:
    now = [0.0]
    schemas = SchemaBook(clock=lambda: now[0])
    assert schemas.needs(5)
    schemas.mark_unknown(5)
    assert not schemas.needs(5)
    now[0] += 61
    assert schemas.needs(5)
    assert schema_id_of(frame(5, b"")) == 5 and schema_id_of(b'{"a": 1}') is None


METRIC = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
VALUE = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)
READING = st.fixed_dictionaries(
    {"ts": st.integers(NOW_MS - 86_400_000 * 30, NOW_MS), "metrics": st.dictionaries(METRIC, VALUE, min_size=1)}
)


@settings(max_examples=150, deadline=None)
@given(
    device=st.text(st.characters(min_codepoint=32, max_codepoint=0x10FFFF, exclude_categories=("Cs",)), min_size=1),
    readings=st.lists(READING, min_size=1, max_size=20),
)
def test_avro_framing_changes_nothing_the_decoder_decides(device: str, readings: list[dict[str, Any]]) -> None:
    """Property: any batched message, Avro-framed, gets exactly the plain JSON outcome, accepted or rejected."""
    doc = {"device_id": device, "factory": "f", "line": "l", "readings": readings}
    assert decode(frame(AVRO_ID, avro(BATCHED_AVRO, doc))) == decode(orjson.dumps(doc))


def _zigzag(n: int) -> bytes:
    n, out = (n << 1) ^ (n >> 63), bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


RECURSIVE = {"type": "record", "name": "Node", "namespace": "plant",
             "fields": [{"name": "next", "type": ["null", "plant.Node"]}]}  # fmt: skip
NULL_ARRAY = {"type": "record", "name": "r", "fields": [{"name": "a", "type": {"type": "array", "items": "null"}}]}
EMPTY_RECORDS = {"type": "record", "name": "r", "fields": [
    {"name": "a", "type": {"type": "array", "items": {"type": "record", "name": "e", "fields": []}}}]}  # fmt: skip


@pytest.mark.parametrize(
    ("schema", "payload", "said"),
    [
        # fastavro crashed the process (SIGSEGV) reading this 10 KB message: 10,000 levels deep.
        (RECURSIVE, b"\x02" * 10_000 + b"\x00", "is recursive (plant.Node contains itself)"),
        # ... and built a list of 2**40 Nones from these few bytes (without end, then out of memory).
        (NULL_ARRAY, _zigzag(2**40) + b"\x00", "an array of items that take no bytes"),
        (EMPTY_RECORDS, _zigzag(2**40) + b"\x00", "an array of items that take no bytes"),
    ],
)
def test_a_schema_a_message_could_abuse_is_not_read(schema: dict[str, Any], payload: bytes, said: str) -> None:
    """Regression (found reviewing the Avro path): such messages go to the DLQ with the reason,
    and nothing of them reaches fastavro. The payload is run in a child process first, so that
    if the guard ever went, the test would fail rather than crash pytest."""
    import subprocess
    import sys

    schemas = book()
    schemas.add(parse_schema(21, "AVRO", orjson.dumps(schema).decode()))
    script = (
        "import orjson, sys\n"
        "from tests.unit.models.test_framing import decode, book\n"
        "from models.framing import parse_schema\n"
        "schemas = book()\n"
        f"schemas.add(parse_schema(21, 'AVRO', {orjson.dumps(schema).decode()!r}))\n"
        "print(decode(sys.stdin.buffer.read(), schemas))\n"
    )  # fmt: skip
    child = subprocess.run([sys.executable, "-c", script], input=frame(21, payload), capture_output=True, timeout=60)
    assert child.returncode == 0, child.stderr.decode()[-500:]
    result = decode(frame(21, payload), schemas)
    assert isinstance(result, Rejection)
    assert result.reason is RejectReason.SCHEMA_MISMATCH
    assert said in result.detail and "schema id 21 (Avro) is not read" in result.detail


@pytest.mark.parametrize(
    "schema",
    [
        BATCHED_AVRO,
        # a named type used twice, a map of nulls (every entry's key takes a byte), a timestamp
        {"type": "record", "name": "r", "fields": [
            {"name": "a", "type": {"type": "record", "name": "p", "fields": [{"name": "x", "type": "double"}]}},
            {"name": "b", "type": "p"}, {"name": "m", "type": {"type": "map", "values": "null"}},
            {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "s", "type": {"type": "array", "items": {"type": "record", "name": "q", "fields": [
                {"name": "n", "type": "null"}, {"name": "v", "type": "int"}]}}}]},
    ],
)  # fmt: skip
def test_ordinary_schemas_are_read(schema: dict[str, Any]) -> None:
    assert parse_schema(22, "AVRO", orjson.dumps(schema).decode()).refused is None


def test_a_schema_nesting_deeper_than_documents_can_is_refused() -> None:
    schema: Any = "double"
    for level in range(40):
        schema = {"type": "record", "name": f"r{level}", "fields": [{"name": "f", "type": schema}]}
    assert "nests deeper than" in (parse_schema(23, "AVRO", orjson.dumps(schema).decode()).refused or "")
