"""The one decode boundary: bytes in, readings or a rejection with a reason out. Never raises.

Accepted shapes (all JSON objects):

- flat, as an AWS IoT rule emits it: ``{"device_id": "sensor-001", "temperature": 25.5,
  "humidity": 60, "ingestion_time": "2024-01-15T10:30:00Z", "location": "factory-a"}`` —
  every numeric field that is not metadata is a metric;
- nested: ``{"device_id": ..., "ts": ..., "metrics": {name: value}, "factory": ..., "line": ...}``;
- batched: ``{"device_id": ..., "readings": [{"ts": ..., "metrics": {...}}, ...]}``.

Each shape may also come schema-registry framed (Confluent's wire format: Avro or JSON after a
5-byte header), beside plain JSON in the same topic (models/framing.py).

Timestamps are ISO-8601 strings or epoch seconds / milliseconds (numbers above 10^11 are
milliseconds), from 2000-01-01 to ``max_future_skew_s`` ahead of now. A message without a
timestamp takes the Kafka record's timestamp, checked the same way; a reading of a batched
message without one takes the message's. Two readings of one message that measure the same
metric at the same millisecond are rejected: both stores identify a measurement by device,
metric and time, so one would silently replace the other.

In the flat shape every number that is not metadata is a metric; strings, booleans, nulls,
lists and objects beside them are descriptive fields that are not stored (counted in
:attr:`Decoder.ignored_fields`). Metric values are finite and within ±1e100, so that window
sums stay finite.
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson

from models.framing import FramingError, SchemaBook, unframe
from models.records import Reading, Rejection, RejectReason
from models.times import NoTimeZone, ms_of_iso

METADATA_FIELDS = frozenset(
    {
        "device_id", "ts", "timestamp", "time", "ingestion_time", "event_time", "location", "factory",
        "line", "metrics", "readings", "message_id", "msg_id", "seq", "schema", "version",
    }
)  # fmt: skip
TIME_FIELDS = ("ts", "timestamp", "event_time", "time", "ingestion_time")
METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MIN_EVENT_MS = 946_684_800_000  # 2000-01-01: older stamps are clock resets, not data
KNOWN_NAMES_MAX = 10_000  # valid metric names remembered, so each is matched once
EPOCH_MS_THRESHOLD = 100_000_000_000  # above: milliseconds; below: seconds (until year 5138)
MAX_ABS_VALUE = 1e100  # larger magnitudes are not measurements, and their sums could overflow


class _Reject(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.rejection = Rejection(reason, detail)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def device_id_problem(device_id: str, max_length: int) -> str | None:
    """What is wrong with a device id, or None: the decoder's check, and the lookup API's."""
    if not device_id or not device_id.strip():
        return "empty device_id"
    if len(device_id) > max_length:
        return f"device_id longer than {max_length}"
    if CONTROL_CHARS.search(device_id):
        return "control characters in device_id"
    return None


def parse_time_ms(value: Any) -> int:
    """Epoch milliseconds from ISO-8601 or epoch seconds/milliseconds; raises _Reject."""
    if isinstance(value, bool):
        raise _Reject(RejectReason.BAD_TIMESTAMP, f"timestamp is a boolean: {value}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise _Reject(RejectReason.BAD_TIMESTAMP, f"timestamp is not finite: {value}")
        millis = int(value) if abs(value) >= EPOCH_MS_THRESHOLD else round(value * 1000)
    elif isinstance(value, str):
        try:
            millis = ms_of_iso(value)
        except NoTimeZone:
            raise _Reject(RejectReason.BAD_TIMESTAMP, f"timestamp without time zone {_short(value)}") from None
        except ValueError:
            raise _Reject(RejectReason.BAD_TIMESTAMP, f"unparseable timestamp {_short(value)}") from None
    else:
        raise _Reject(RejectReason.BAD_TIMESTAMP, f"timestamp of type {type(value).__name__}")
    if millis < MIN_EVENT_MS:
        raise _Reject(RejectReason.BAD_TIMESTAMP, f"timestamp before 2000: {_short(value)}")
    return millis


class Decoder:
    """Decodes telemetry messages against the configured limits."""

    def __init__(
        self,
        *,
        max_message_bytes: int = 1_048_576,
        max_readings_per_message: int = 1000,
        max_device_id_length: int = 128,
        max_future_skew_s: float = 300.0,
        max_metrics_per_reading: int = 500,
        schemas: SchemaBook | None = None,
    ) -> None:
        self.schemas = schemas  # schema-registry framed payloads (models/framing.py); None: rejected
        self.max_message_bytes = max_message_bytes
        self.max_metrics = max_metrics_per_reading
        self.ignored_fields = 0  # non-numeric fields beside the metrics of flat messages, ever
        self.max_readings = max_readings_per_message
        self.max_device_id_length = max_device_id_length
        self.max_future_skew_ms = int(max_future_skew_s * 1000)
        self._known_names: set[str] = set()

    @classmethod
    def from_limits(cls, limits: Any, schemas: SchemaBook | None = None) -> Decoder:
        """A decoder with MILLSTREAM_LIMITS__* (app/settings.py LimitSettings), as the worker and
        ``millstream replay`` decode."""
        return cls(
            max_message_bytes=limits.max_message_bytes, max_readings_per_message=limits.max_readings_per_message,
            max_device_id_length=limits.max_device_id_length, max_future_skew_s=limits.max_future_skew_s,
            max_metrics_per_reading=limits.max_metrics_per_reading, schemas=schemas,
        )  # fmt: skip

    def decode(self, value: bytes | None, *, timestamp_ms: int, now_ms: int) -> list[Reading] | Rejection:
        """Readings of one message, or why it was rejected. Never raises."""
        try:
            return self._decode(value, timestamp_ms, now_ms)
        except _Reject as reject:
            return reject.rejection
        except RecursionError:
            return Rejection(RejectReason.UNDECODABLE, "nesting too deep")
        except OverflowError as exc:  # a number or date out of any range
            return Rejection(RejectReason.UNDECODABLE, f"OverflowError: {str(exc)[:120]}")

    def _decode(self, value: bytes | None, timestamp_ms: int, now_ms: int) -> list[Reading]:
        if value is None:  # a tombstone; its len() would raise, and the DLQ must take it too
            raise _Reject(RejectReason.UNDECODABLE, "no value: the record is a tombstone (its value is null)")
        if len(value) > self.max_message_bytes:
            raise _Reject(RejectReason.TOO_LARGE, f"{len(value)} bytes > {self.max_message_bytes}")
        if value[:1] in (b"\x00", b"\x03"):  # no JSON text starts so: schema-registry framing
            try:
                doc = unframe(value, self.schemas)
            except FramingError as exc:
                raise _Reject(RejectReason(exc.reason), exc.detail) from None
        else:
            try:
                doc = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise _Reject(RejectReason.UNDECODABLE, str(exc)[:120]) from None
        if not isinstance(doc, dict):
            raise _Reject(RejectReason.NOT_OBJECT, f"top level is {type(doc).__name__}")
        device_id = self._device_id(doc)
        factory, line, location = (_label(doc.get(k)) for k in ("factory", "line", "location"))
        doc_ms = self._time(doc, now_ms)
        readings_doc = doc.get("readings")
        if readings_doc is not None:
            if not isinstance(readings_doc, list) or not readings_doc:
                raise _Reject(RejectReason.BAD_READINGS, "readings must be a non-empty list")
            if len(readings_doc) > self.max_readings:
                raise _Reject(RejectReason.TOO_MANY_READINGS, f"{len(readings_doc)} readings > {self.max_readings}")
            readings: list[Reading] = []
            add, nested, newest_ms = readings.append, self._nested_metrics, now_ms + self.max_future_skew_ms
            at: dict[int, int] = {}  # event time -> index of the first reading at it
            for index, item in enumerate(readings_doc):
                if type(item) is not dict:
                    raise _Reject(RejectReason.BAD_READINGS, f"reading {index} is {type(item).__name__}")
                metrics = nested(item.get("metrics"), index)
                event_ms = item.get("ts")
                # The usual stamp of a batched reading, epoch milliseconds in range, is taken as
                # it is; anything else goes through the full parser and its rejections.
                if type(event_ms) is not int or not MIN_EVENT_MS <= event_ms <= newest_ms:
                    event_ms = self._time(item, now_ms)
                    if event_ms is None:
                        event_ms = doc_ms if doc_ms is not None else self._record_time(timestamp_ms, now_ms)
                first = at.setdefault(event_ms, index)
                if first != index:
                    # A metric measured twice at one millisecond is one measurement to both stores:
                    # the second value would silently replace or join the first. Say so instead.
                    shared = metrics.keys() & readings[first].metrics.keys()
                    if shared:
                        raise _Reject(
                            RejectReason.BAD_READINGS,
                            f"readings {first} and {index} both measure {_short(min(shared))} at {event_ms} "
                            "(a reading without a timestamp takes the message's)",
                        )
                add(Reading(device_id, event_ms, metrics, index, factory, line, location))
            return readings
        if "metrics" in doc:
            metrics = self._nested_metrics(doc["metrics"], None)
        else:
            metrics = self._flat_metrics(doc)
        event_ms = doc_ms if doc_ms is not None else self._record_time(timestamp_ms, now_ms)
        return [Reading(device_id, event_ms, metrics, 0, factory, line, location)]

    def _device_id(self, doc: dict[str, Any]) -> str:
        device_id = doc.get("device_id")
        if device_id is None:
            raise _Reject(RejectReason.DEVICE_ID_MISSING, "no device_id")
        if not isinstance(device_id, str):
            raise _Reject(RejectReason.DEVICE_ID_INVALID, f"device_id of type {type(device_id).__name__}")
        problem = device_id_problem(device_id, self.max_device_id_length)
        if problem is not None:
            raise _Reject(RejectReason.DEVICE_ID_INVALID, problem)
        return device_id

    def _time(self, doc: dict[str, Any], now_ms: int) -> int | None:
        """The first timestamp field of ``doc``, checked; None when it has none."""
        for name in TIME_FIELDS:
            raw = doc.get(name)
            if raw is not None:
                event_ms = parse_time_ms(raw)
                if event_ms > now_ms + self.max_future_skew_ms:
                    raise _Reject(RejectReason.FUTURE_TIMESTAMP, f"{name} {(event_ms - now_ms) / 1000:.0f}s ahead")
                return event_ms
        return None

    def _record_time(self, timestamp_ms: int, now_ms: int) -> int:
        """The Kafka record's timestamp for a message without one, checked like any other."""
        if timestamp_ms < MIN_EVENT_MS:
            raise _Reject(
                RejectReason.BAD_TIMESTAMP,
                f"no timestamp field, and the Kafka record timestamp {timestamp_ms} is before 2000",
            )
        if timestamp_ms > now_ms + self.max_future_skew_ms:
            raise _Reject(
                RejectReason.FUTURE_TIMESTAMP,
                f"no timestamp field, and the Kafka record timestamp is {(timestamp_ms - now_ms) / 1000:.0f}s ahead",
            )
        return timestamp_ms

    def _nested_metrics(self, raw: Any, index: int | None) -> dict[str, float]:
        """``index``: the reading's place in a batched message (named in rejections), else None."""
        if type(raw) is not dict:
            raise _Reject(RejectReason.NO_METRICS, f"{_where(index)}metrics is {type(raw).__name__}, not an object")
        if not raw:
            raise _Reject(RejectReason.NO_METRICS, f"{_where(index)}metrics is empty")
        if len(raw) > self.max_metrics:
            raise _Reject(RejectReason.TOO_MANY_METRICS, f"{_where(index)}{len(raw)} metrics > {self.max_metrics}")
        known, isfinite = self._known_names, math.isfinite
        for name, value in raw.items():
            if name not in known:
                self._check_name(name, _where(index))
            # The common case, a finite float of a sane size, costs three checks; the rest go
            # the long way.
            if type(value) is not float or not isfinite(value) or not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
                raw[name] = _number(value, f"{_where(index)}{name}")
        return raw  # validated in place: every value is now a finite float

    def _check_name(self, name: str, where: str) -> None:
        if not METRIC_NAME.fullmatch(name):
            raise _Reject(RejectReason.BAD_METRIC_NAME, f"{where}metric name {_short(name)}")
        if len(self._known_names) < KNOWN_NAMES_MAX:  # metric names repeat; remember valid ones
            self._known_names.add(name)

    def _flat_metrics(self, doc: dict[str, Any]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, value in doc.items():
            if name in METADATA_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.ignored_fields += 1  # strings, objects, flags: descriptive fields, not measurements
                continue
            if name not in self._known_names:
                self._check_name(name, "")
            metrics[name] = _number(value, name)
        if not metrics:
            raise _Reject(RejectReason.NO_METRICS, "no numeric fields")
        if len(metrics) > self.max_metrics:
            raise _Reject(RejectReason.TOO_MANY_METRICS, f"{len(metrics)} metrics > {self.max_metrics}")
        return metrics


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Reject(RejectReason.BAD_VALUE, f"{where} is {type(value).__name__}: {_short(value, 40)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Reject(RejectReason.BAD_VALUE, f"{where} is not finite")
    if not -MAX_ABS_VALUE <= number <= MAX_ABS_VALUE:
        raise _Reject(RejectReason.BAD_VALUE, f"{where} = {number:g} is beyond ±{MAX_ABS_VALUE:g}")
    return number


def _where(index: int | None) -> str:
    return "" if index is None else f"reading {index}: "


def _label(value: Any) -> str:
    """Descriptive labels (factory, line, location): kept as text when text, else dropped."""
    return value[:128] if isinstance(value, str) else ""
