"""The records that flow through millstream.

Plain slotted dataclasses, not faust Records: they are built per reading on the hot path and
never serialized by faust (decoding is ours, in :mod:`models.decode`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RejectReason(enum.StrEnum):
    """Why a message went to the dead-letter topic. The value is the ``reason`` header."""

    TOO_LARGE = "too_large"  # message bytes over limits.max_message_bytes
    UNDECODABLE = "undecodable"  # not UTF-8 JSON
    NOT_OBJECT = "not_object"  # JSON, but not an object
    DEVICE_ID_MISSING = "device_id_missing"  # no device_id, or null
    DEVICE_ID_INVALID = "device_id_invalid"  # not a string, empty, too long, control characters
    NO_METRICS = "no_metrics"  # a reading without a single metric
    BAD_VALUE = "bad_value"  # a metric value that is not a finite number
    BAD_METRIC_NAME = "bad_metric_name"  # a metric name outside [A-Za-z_][A-Za-z0-9_.-]{0,63}
    BAD_TIMESTAMP = "bad_timestamp"  # unparseable, negative or before 2000
    FUTURE_TIMESTAMP = "future_timestamp"  # further ahead than limits.max_future_skew_s
    BAD_READINGS = "bad_readings"  # "readings" is not a non-empty list of objects
    TOO_MANY_READINGS = "too_many_readings"  # batch over limits.max_readings_per_message
    KEY_MISMATCH = "key_mismatch"  # Kafka message key is not the device_id (breaks per-device order)
    TOO_MANY_METRICS = "too_many_metrics"  # a reading with more metrics than limits.max_metrics_per_reading
    STATE_TOO_LARGE = "state_too_large"  # applying it would grow its device's state past limits.max_state_bytes
    INTERNAL_ERROR = "internal_error"  # millstream raised while handling it (a bug): isolated, kept for replay
    UNROUTED = "unrouted"  # (millstream bridge) an MQTT topic that no route of MILLSTREAM_BRIDGE__ROUTES names
    UNKNOWN_SCHEMA = "unknown_schema"  # schema-registry framed, with an id the registry does not know (or none set)
    SCHEMA_MISMATCH = "schema_mismatch"  # schema-registry framed, but the payload does not decode with its schema
    GLUE_FRAMED = "glue_framed"  # AWS Glue Schema Registry framing, which millstream does not read


@dataclass(slots=True)
class Reading:
    """One measurement instant of one device: several metrics share a timestamp.

    Not frozen: a frozen dataclass pays an ``object.__setattr__`` per field, per reading.
    """

    device_id: str
    event_ms: int  # event time, epoch milliseconds
    metrics: dict[str, float]
    index: int = 0  # position inside a batched message; with partition+offset it names the reading
    factory: str = ""
    line: str = ""
    location: str = ""


@dataclass(slots=True, frozen=True)
class Rejection:
    """A message that cannot be used, and why."""

    reason: RejectReason
    detail: str


@dataclass(slots=True)
class SourceMessage:
    """A Kafka message as the pipeline sees it (independent of faust, for unit tests)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone (rejected as undecodable, dead-lettered as it came)
    timestamp_ms: int
    readings: list[Reading] = field(default_factory=list)
    rejection: Rejection | None = None
    handle: Any = None  # the faust event this came from, if any
