"""The decode boundary: every input format and every reject reason; it never raises."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.decode import Decoder
from models.records import Reading, Rejection, RejectReason

NOW_MS = 1_705_314_600_000  # 2024-01-15T10:30:00Z
KAFKA_TS = NOW_MS - 5_000
decoder = Decoder(
    max_message_bytes=4096, max_readings_per_message=3, max_device_id_length=16, max_future_skew_s=60,
    max_metrics_per_reading=8,
)  # fmt: skip


def decode(doc: object) -> list[Reading] | Rejection:
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return decoder.decode(raw, timestamp_ms=KAFKA_TS, now_ms=NOW_MS)


def readings(doc: object) -> list[Reading]:
    result = decode(doc)
    assert isinstance(result, list), result
    return result


def test_flat_aws_iot_shape() -> None:
    (reading,) = readings(
        {"device_id": "sensor-001", "temperature": 25.5, "humidity": 60, "ingestion_time": "2024-01-15T10:30:00Z",
         "location": "factory-a", "status": "ok", "online": True}
    )  # fmt: skip
    assert reading == Reading("sensor-001", NOW_MS, {"temperature": 25.5, "humidity": 60.0}, 0, "", "", "factory-a")


def test_nested_shape_with_labels() -> None:
    (reading,) = readings(
        {
            "device_id": "d1",
            "ts": NOW_MS / 1000,
            "metrics": {"rpm": 1450, "power_kw": 12.5},
            "factory": "f1",
            "line": "l2",
        }
    )
    assert reading == Reading("d1", NOW_MS, {"rpm": 1450.0, "power_kw": 12.5}, 0, "f1", "l2", "")


def test_batched_shape_indexes_readings_and_inherits_time() -> None:
    result = readings(
        {"device_id": "d1", "ts": NOW_MS, "readings": [
            {"ts": NOW_MS - 2000, "metrics": {"t": 1}},
            {"metrics": {"t": 2}},
            {"ts": "2024-01-15T10:29:59.5Z", "metrics": {"t": 3}},
        ]}
    )  # fmt: skip
    assert [(r.index, r.event_ms, r.metrics["t"]) for r in result] == [
        (0, NOW_MS - 2000, 1.0),
        (1, NOW_MS, 2.0),
        (2, NOW_MS - 500, 3.0),
    ]


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2024-01-15T10:30:00Z", NOW_MS),
        ("2024-01-15T11:30:00.123+01:00", NOW_MS + 123),
        (NOW_MS / 1000, NOW_MS),
        (NOW_MS, NOW_MS),
        (1_705_314_599.999, NOW_MS - 1),
    ],
)
def test_timestamps(stamp: object, expected: int) -> None:
    assert readings({"device_id": "d", "ts": stamp, "metrics": {"t": 1}})[0].event_ms == expected


def test_missing_timestamp_takes_the_kafka_timestamp() -> None:
    assert readings({"device_id": "d", "metrics": {"t": 1}})[0].event_ms == KAFKA_TS


REJECTS = [
    (b"x" * 5000, RejectReason.TOO_LARGE),
    (b"\xff\xfe\x00garbage", RejectReason.UNDECODABLE),
    (b'{"device_id": "d", "metrics": {"t": ', RejectReason.UNDECODABLE),
    (b'{"device_id": "d", "metrics": {"t": NaN}}', RejectReason.UNDECODABLE),
    (b'{"device_id": "\xed\xa0\x80", "t": 1}', RejectReason.UNDECODABLE),
    ([1, 2, 3], RejectReason.NOT_OBJECT),
    ("just a string", RejectReason.NOT_OBJECT),
    ({"metrics": {"t": 1}}, RejectReason.DEVICE_ID_MISSING),
    ({"device_id": None, "t": 1}, RejectReason.DEVICE_ID_MISSING),
    ({"device_id": 17, "t": 1}, RejectReason.DEVICE_ID_INVALID),
    ({"device_id": "", "t": 1}, RejectReason.DEVICE_ID_INVALID),
    ({"device_id": "   ", "t": 1}, RejectReason.DEVICE_ID_INVALID),
    ({"device_id": "d" * 17, "t": 1}, RejectReason.DEVICE_ID_INVALID),
    ({"device_id": "d\n1", "t": 1}, RejectReason.DEVICE_ID_INVALID),
    ({"device_id": "d", "status": "ok"}, RejectReason.NO_METRICS),
    ({"device_id": "d", "metrics": {}}, RejectReason.NO_METRICS),
    ({"device_id": "d", "metrics": [1, 2]}, RejectReason.NO_METRICS),
    ({"device_id": "d", "metrics": {"t": "hot"}}, RejectReason.BAD_VALUE),
    ({"device_id": "d", "metrics": {"t": None}}, RejectReason.BAD_VALUE),
    ({"device_id": "d", "metrics": {"t": True}}, RejectReason.BAD_VALUE),
    ({"device_id": "d", "metrics": {"t": {"v": 1}}}, RejectReason.BAD_VALUE),
    (b'{"device_id": "d", "metrics": {"t": 1e999}}', RejectReason.UNDECODABLE),  # orjson refuses infinity
    ({"device_id": "d", "metrics": {"bad name": 1}}, RejectReason.BAD_METRIC_NAME),
    ({"device_id": "d", "metrics": {"": 1}}, RejectReason.BAD_METRIC_NAME),
    ({"device_id": "d", "temp;drop": 1}, RejectReason.BAD_METRIC_NAME),
    ({"device_id": "d", "ts": "yesterday", "t": 1}, RejectReason.BAD_TIMESTAMP),
    ({"device_id": "d", "ts": "2024-01-15T10:30:00", "t": 1}, RejectReason.BAD_TIMESTAMP),
    ({"device_id": "d", "ts": -5, "t": 1}, RejectReason.BAD_TIMESTAMP),
    ({"device_id": "d", "ts": 12345, "t": 1}, RejectReason.BAD_TIMESTAMP),
    ({"device_id": "d", "ts": True, "t": 1}, RejectReason.BAD_TIMESTAMP),
    ({"device_id": "d", "ts": [1], "t": 1}, RejectReason.BAD_TIMESTAMP),
    ({"device_id": "d", "ts": NOW_MS + 61_000, "t": 1}, RejectReason.FUTURE_TIMESTAMP),
    ({"device_id": "d", "readings": []}, RejectReason.BAD_READINGS),
    ({"device_id": "d", "readings": {"t": 1}}, RejectReason.BAD_READINGS),
    ({"device_id": "d", "readings": [{"metrics": {"t": 1}}, 5]}, RejectReason.BAD_READINGS),
    ({"device_id": "d", "readings": [{"metrics": {"t": 1}}] * 4}, RejectReason.TOO_MANY_READINGS),
    ({"device_id": "d", "readings": [{"metrics": {"t": 1}}, {"metrics": {"t": "x"}}]}, RejectReason.BAD_VALUE),
    ({"device_id": "d", "readings": [{"ts": NOW_MS * 2, "metrics": {"t": 1}}]}, RejectReason.FUTURE_TIMESTAMP),
    # Regressions (issue: no single record may stop the group): calendar edges, bad record
    # timestamps, readings collapsing into one, more metrics than allowed, sums that overflow.
    ({"device_id": "d", "ts": "0001-01-01T00:00:00+01:00", "t": 1}, RejectReason.BAD_TIMESTAMP),
    ({"device_id": "d", "ts": "9999-12-31T23:59:00-01:00", "t": 1}, RejectReason.FUTURE_TIMESTAMP),
    (
        {"device_id": "d", "readings": [{"ts": "0001-01-01T00:00:00+01:00", "metrics": {"t": 1}}]},
        RejectReason.BAD_TIMESTAMP,
    ),
    (
        {"device_id": "d", "readings": [{"ts": "9999-12-31T23:59:00-01:00", "metrics": {"t": 1}}]},
        RejectReason.FUTURE_TIMESTAMP,
    ),
    ({"device_id": "d", "readings": [{"metrics": {"t": 1}}, {"metrics": {"t": 2}}]}, RejectReason.BAD_READINGS),
    (
        {"device_id": "d", "readings": [{"ts": NOW_MS, "metrics": {"t": 1}}, {"ts": NOW_MS, "metrics": {"t": 2}}]},
        RejectReason.BAD_READINGS,
    ),
    ({"device_id": "d", "ts": NOW_MS, "metrics": {f"m{i}": 1 for i in range(9)}}, RejectReason.TOO_MANY_METRICS),
    ({"device_id": "d", "ts": NOW_MS, **{f"m{i}": 1 for i in range(9)}}, RejectReason.TOO_MANY_METRICS),
    ({"device_id": "d", "ts": NOW_MS, "metrics": {"t": 1e101}}, RejectReason.BAD_VALUE),
    ({"device_id": "d", "ts": NOW_MS, "t": -1.5e300}, RejectReason.BAD_VALUE),
]


@pytest.mark.parametrize(("doc", "reason"), REJECTS, ids=[f"{r.value}-{i}" for i, (_, r) in enumerate(REJECTS)])
def test_every_reject_reason(doc: object, reason: RejectReason) -> None:
    result = decode(doc)
    assert isinstance(result, Rejection), result
    assert result.reason is reason
    assert result.detail


def test_every_reason_is_exercised() -> None:
    # Decided in the pipeline, not the decoder: tests/unit/test_pipeline.py; in the MQTT bridge:
    # tests/unit/app/test_bridge.py; schema-registry framing: tests/unit/models/test_framing.py.
    elsewhere = {RejectReason.KEY_MISMATCH, RejectReason.STATE_TOO_LARGE, RejectReason.INTERNAL_ERROR,
                 RejectReason.UNROUTED, RejectReason.UNKNOWN_SCHEMA, RejectReason.SCHEMA_MISMATCH,
                 RejectReason.GLUE_FRAMED}  # fmt: skip
    covered = {reason for _, reason in REJECTS} | elsewhere
    assert covered == set(RejectReason)


@pytest.mark.parametrize("record_ms", [0, -1, 946_684_799_999, NOW_MS + 61_000, 2**63 - 1])
def test_a_message_without_a_timestamp_gets_the_record_timestamp_checked(record_ms: int) -> None:
    """Regression: a record timestamp of 0 or -1 reached the sinks (and broke the batch),
    a far-future one froze the device's windows."""
    for doc in ({"device_id": "d", "t": 1}, {"device_id": "d", "metrics": {"t": 1}},
                {"device_id": "d", "readings": [{"metrics": {"t": 1}}]}):  # fmt: skip
        result = decoder.decode(orjson.dumps(doc), timestamp_ms=record_ms, now_ms=NOW_MS)
        assert isinstance(result, Rejection), (doc, result)
        assert result.reason in (RejectReason.BAD_TIMESTAMP, RejectReason.FUTURE_TIMESTAMP)
        assert "record timestamp" in result.detail


def test_a_reading_may_take_the_message_time_when_nothing_collides() -> None:
    result = readings({"device_id": "d", "ts": NOW_MS, "readings": [
        {"metrics": {"t": 1}}, {"ts": NOW_MS, "metrics": {"h": 2}}, {"ts": NOW_MS - 1, "metrics": {"t": 3}},
    ]})  # fmt: skip
    assert [(r.event_ms, r.metrics) for r in result] == [
        (NOW_MS, {"t": 1.0}), (NOW_MS, {"h": 2.0}), (NOW_MS - 1, {"t": 3.0})
    ]  # fmt: skip


def test_flat_fields_that_are_not_numbers_are_counted_not_silently_dropped() -> None:
    counting = Decoder()
    before = counting.ignored_fields
    result = counting.decode(
        orjson.dumps({"device_id": "d", "ts": NOW_MS, "t": 1.5, "status": "ok", "door": True, "cfg": {"a": 1}}),
        timestamp_ms=KAFKA_TS, now_ms=NOW_MS,
    )  # fmt: skip
    assert isinstance(result, list) and result[0].metrics == {"t": 1.5}
    assert counting.ignored_fields - before == 3


def test_deep_nesting_is_a_rejection_not_a_crash() -> None:
    deep = b'{"device_id": "d", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    result = Decoder().decode(deep, timestamp_ms=KAFKA_TS, now_ms=NOW_MS)
    assert isinstance(result, Rejection)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert isinstance(decoder.decode(raw, timestamp_ms=KAFKA_TS, now_ms=NOW_MS), list | Rejection)


@settings(max_examples=300, deadline=None)
@given(JSON, st.text(max_size=20))
def test_arbitrary_json_never_raises(doc: object, device: str) -> None:
    if isinstance(doc, dict):
        doc["device_id"] = device
    result = decode(doc)
    if isinstance(result, list):
        for reading in result:
            assert reading.metrics and all(isinstance(v, float) for v in reading.metrics.values())


def test_a_tombstone_is_rejected_not_raised() -> None:
    """Regression: a record whose value is null (a Kafka tombstone) raised TypeError here."""
    result = Decoder().decode(None, timestamp_ms=1_763_000_000_000, now_ms=1_763_000_000_000)
    assert isinstance(result, Rejection) and result.reason is RejectReason.UNDECODABLE
    assert "tombstone" in result.detail
