"""Realistic factory telemetry: devices across factories and lines, metrics with drift, noise
and spikes, in the three input formats, with a configurable share of malformed, late and
out-of-order readings. Deterministic for a seed, and it records what it sent, so a run can be
checked exactly against what millstream stored.

Two profiles: ``tidy`` (:class:`Simulator`: fixed metric sets, one reading a second) and
``unruly`` (:class:`UnrulySimulator`: what real factories send on a bad day; see its docstring).
A message is ``(key, value)`` or ``(key, value, record_timestamp_ms)``.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from app.kafka import kafka_client_options
from app.settings import KafkaSettings

METRIC_PROFILES: dict[str, tuple[float, float, float]] = {
    # metric: (base, drift per hour, noise)
    "temperature": (24.0, 0.8, 0.4),
    "humidity": (55.0, -1.5, 1.2),
    "pressure": (1013.0, 0.3, 0.8),
    "vibration": (0.02, 0.001, 0.005),
    "power_kw": (12.0, 0.5, 0.9),
    "rpm": (1450.0, 3.0, 12.0),
}
# Late readings lag their device by this much: past the end of a default window (1 min, 1 h)
# plus grace, so millstream counts them late for every default window size.
LATE_BY_MS = 3 * 3600 * 1000


@dataclass(slots=True, frozen=True)
class SentReading:
    device_id: str
    event_ms: int
    metrics: dict[str, float]
    late: bool  # sent after the device moved on by LATE_BY_MS: not applied to any window


Outgoing = tuple[bytes, bytes] | tuple[bytes, bytes, int]  # key, value[, Kafka record timestamp ms]


@dataclass
class SimulationLog:
    """What was sent, for exact checks."""

    valid_messages: int = 0
    malformed: int = 0
    readings: list[SentReading] = field(default_factory=list)  # of valid messages, in send order
    malformed_kinds: dict[str, int] = field(default_factory=dict)  # what was wrong, for reports
    _rows: tuple[int, int] = (0, 0)  # (readings counted, distinct rows) cache

    @property
    def valid_readings(self) -> int:
        return len(self.readings)

    @property
    def expected_rows(self) -> int:
        """Distinct (device, metric, event time): a re-sent reading is one ClickHouse row."""
        if self._rows[0] != len(self.readings):
            distinct = {(r.device_id, m, r.event_ms) for r in self.readings for m in r.metrics}
            self._rows = (len(self.readings), len(distinct))
        return self._rows[1]

    def bad(self, kind: str) -> None:
        self.malformed += 1
        self.malformed_kinds[kind] = self.malformed_kinds.get(kind, 0) + 1


@dataclass(slots=True)
class _Device:
    device_id: str
    factory: str
    line: str
    metrics: tuple[str, ...]
    fmt: str  # flat | nested | batched
    clock_ms: int
    phase: float
    sent: int = 0


class Simulator:
    """Generates (key, value) messages; :attr:`log` records what they contain."""

    def __init__(
        self,
        *,
        devices: int = 50,
        seed: int = 7,
        malformed_ratio: float = 0.02,
        late_ratio: float = 0.01,
        out_of_order_ratio: float = 0.02,
        batch_size: int = 5,
        start_ms: int | None = None,
        step_ms: int = 1000,
        formats: tuple[str, ...] = ("flat", "nested", "batched"),
    ) -> None:
        self.rng = random.Random(seed)
        self.malformed_ratio, self.late_ratio, self.out_of_order_ratio = malformed_ratio, late_ratio, out_of_order_ratio
        self.batch_size, self.step_ms = batch_size, step_ms
        start = start_ms if start_ms is not None else int(time.time() * 1000) - 6 * 3600 * 1000
        names = list(METRIC_PROFILES)
        self.devices = [
            _Device(
                device_id=f"sensor-{i:04d}",
                factory=f"factory-{chr(ord('a') + i % 3)}",
                line=f"line-{i % 7 + 1}",
                metrics=tuple(self.rng.sample(names, self.rng.randint(2, 4))),
                fmt=formats[i % len(formats)],
                clock_ms=start + self.rng.randint(0, 999),
                phase=self.rng.random() * math.tau,
            )
            for i in range(devices)
        ]
        self.log = SimulationLog()
        self._held: dict[str, tuple[bytes, bytes, list[SentReading]]] = {}

    def _value(self, device: _Device, metric: str, at_ms: int) -> float:
        base, drift, noise = METRIC_PROFILES[metric]
        hours = at_ms / 3_600_000
        value = base + drift * (hours % 24) + noise * math.sin(hours * 6 + device.phase) + self.rng.gauss(0, noise)
        if self.rng.random() < 0.002:
            value *= 3  # an occasional spike
        return round(value, 4)

    def _reading(self, device: _Device, at_ms: int, late: bool) -> SentReading:
        return SentReading(device.device_id, at_ms, {m: self._value(device, m, at_ms) for m in device.metrics}, late)

    def _encode(self, device: _Device, readings: list[SentReading]) -> bytes:
        if device.fmt == "batched":
            doc: dict[str, object] = {
                "device_id": device.device_id, "factory": device.factory, "line": device.line,
                "readings": [{"ts": r.event_ms, "metrics": r.metrics} for r in readings],
            }  # fmt: skip
        elif device.fmt == "nested":
            (reading,) = readings
            doc = {"device_id": device.device_id, "ts": reading.event_ms / 1000, "factory": device.factory,
                   "line": device.line, "metrics": reading.metrics}  # fmt: skip
        else:
            (reading,) = readings
            stamp = datetime.fromtimestamp(reading.event_ms / 1000, UTC).isoformat(timespec="milliseconds")
            doc = {"device_id": device.device_id, **reading.metrics, "ingestion_time": stamp.replace("+00:00", "Z"),
                   "location": device.factory}  # fmt: skip
        return orjson.dumps(doc)

    def _malformed(self, device: _Device) -> bytes:
        kind = self.rng.randrange(8)
        now_ms = device.clock_ms
        bad: list[bytes] = [
            b"\xff\xfe garbage",
            b'{"device_id": "' + device.device_id.encode() + b'", "metrics": {"temperature": ',
            orjson.dumps([device.device_id, 1, 2]),
            orjson.dumps({"metrics": {"temperature": 20.0}, "ts": now_ms}),
            orjson.dumps({"device_id": device.device_id, "metrics": {"temperature": "hot"}, "ts": now_ms}),
            orjson.dumps({"device_id": device.device_id, "metrics": {}, "ts": now_ms}),
            orjson.dumps({"device_id": device.device_id, "metrics": {"t": 1.0}, "ts": "yesterday"}),
            orjson.dumps({"device_id": device.device_id, "status": "ok"}),
        ]
        return bad[kind]

    def messages(self, count: int) -> Iterator[Outgoing]:
        """Yield ``count`` messages (and some held back before); each key is its device id."""
        for _ in range(count):
            yield from self._one(self.rng.choice(self.devices))

    def _one(self, device: _Device) -> Iterator[Outgoing]:
        """The device's next message: malformed, late, held back for reordering, or plain."""
        key = device.device_id.encode()
        if self.rng.random() < self.malformed_ratio:
            self.log.bad("malformed")
            yield key, self._malformed(device)
            return
        # Late only once the device has a watermark (a message already sent).
        late = device.sent > 0 and self.rng.random() < self.late_ratio
        size = self.batch_size if device.fmt == "batched" else 1
        readings = []
        for _ in range(size):
            device.clock_ms += self.step_ms + self.rng.randint(-100, 100)
            at_ms = device.clock_ms - LATE_BY_MS if late else device.clock_ms
            readings.append(self._reading(device, at_ms, late))
        value = self._encode(device, readings)
        held = self._held.pop(device.device_id, None)
        if held is None and not late and self.rng.random() < self.out_of_order_ratio:
            # Hold this one back and send it after the device's next message: out of order
            # by one step, well within the grace period.
            self._held[device.device_id] = (key, value, readings)
            return
        self._sent(device, value, readings)
        yield key, value
        if held is not None:
            self._sent(device, held[1], held[2])
            yield held[0], held[1]

    def _sent(self, device: _Device, value: bytes, readings: list[SentReading]) -> None:
        self.log.valid_messages += 1
        self.log.readings.extend(readings)
        device.sent += 1

    def flush(self) -> Iterator[Outgoing]:
        """Messages still held back for reordering."""
        held, self._held = self._held, {}
        for key, value, readings in held.values():
            self.log.valid_messages += 1
            self.log.readings.extend(readings)
            yield key, value


async def ensure_topic(kafka: KafkaSettings, progress: Callable[[str], None]) -> None:
    """Create the telemetry topic unless it exists."""
    from app.tools.broker import create_topics

    created = await create_topics(
        [kafka.telemetry_topic], partitions=kafka.partitions, replication_factor=kafka.replication_factor,
        **kafka_client_options(kafka),
    )  # fmt: skip
    if created:
        progress(f"created topic {kafka.telemetry_topic} ({kafka.partitions} partitions)")


async def publish(
    kafka: KafkaSettings,
    simulator: Simulator,
    *,
    messages: int,
    rate: float | None,
    create_topic: bool,
    progress: Callable[[str], None],
) -> int:
    """Send ``messages`` simulated messages to the telemetry topic; returns how many."""
    from aiokafka import AIOKafkaProducer

    options = kafka_client_options(kafka)
    if create_topic:
        await ensure_topic(kafka, progress)
    # Large enough for every message the simulator makes (twice max_message_bytes at most).
    producer = AIOKafkaProducer(linger_ms=5, acks="all", max_request_size=8 * 1024 * 1024, **options)
    try:
        # Inside the try: a producer whose start failed (broker unreachable) must still be
        # stopped, or aiokafka warns about an unclosed producer after our one-line error.
        await producer.start()
        stream = list(simulator.messages(messages)) + list(simulator.flush())
        return await send_paced(producer, kafka.telemetry_topic, stream, rate=rate, progress=progress)
    finally:
        await producer.stop()


MQTT_TOPIC = "devices/{device}/telemetry"  # the bridge's default route keys on level 2


def topic_level(key: bytes) -> str:
    """A device id as one MQTT topic level: wildcards, separators and NUL replaced by ``_`` (the
    bridge then keys it differently and the worker rejects it as ``key_mismatch``, as a real
    device with such an id would be)."""
    level = key.decode(errors="replace")
    for bad in "/+#\0":
        level = level.replace(bad, "_")
    return level or "_"


def publish_mqtt(
    url: str, simulator: Simulator, *, messages: int, rate: float | None, progress: Callable[[str], None]
) -> int:
    """Publish ``messages`` simulated messages over MQTT with QoS 1, each to
    ``devices/<device id>/telemetry``, as devices would (for ``millstream bridge``); returns how
    many once the broker has acknowledged every one. Blocking."""
    from urllib.parse import urlsplit

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"--mqtt {url!r} is not mqtt://host:port")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)  # paho keeps what it could not send yet and sends it on reconnect
    if parts.scheme == "mqtts":
        client.tls_set()
    if parts.username:
        client.username_pw_set(parts.username, parts.password)
    acknowledged = [0]  # PUBACKs; paho queues what it cannot send yet and sends it on reconnect
    client.on_publish = lambda *args: acknowledged.__setitem__(0, acknowledged[0] + 1)
    client.connect(parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883), keepalive=30)
    client.loop_start()
    try:
        stream = list(simulator.messages(messages)) + list(simulator.flush())
        started = last = time.monotonic()
        for sent, (key, value, *_stamp) in enumerate(stream, 1):
            client.publish(MQTT_TOPIC.format(device=topic_level(key)), value, qos=1)
            if rate and sent % 20 == 0 and (ahead := sent / rate - (time.monotonic() - started)) > 0:
                time.sleep(ahead)
            if time.monotonic() - last >= 5:
                last = time.monotonic()
                progress(f"published {sent}/{len(stream)} messages ({sent / (last - started):.0f}/s)")
        waited = time.monotonic()
        while acknowledged[0] < len(stream):
            if time.monotonic() - waited > 120:
                raise ConnectionError(f"{len(stream) - acknowledged[0]} messages not acknowledged after 120 s")
            time.sleep(0.05)
        return len(stream)
    finally:
        client.disconnect()
        client.loop_stop()


UNRULY_METRICS = (*METRIC_PROFILES, "current_a", "flow_lpm", "torque_nm", "oil_temp", "voltage", "co2_ppm")


class UnrulySimulator(Simulator):
    """Devices as real factories have them, in event time that spans hours (generated, not waited
    for); everything it calls bad is what millstream must dead-letter, everything else it must
    store exactly:

    - metric sets change: devices add and drop metrics as they go (a sensor unplugged, firmware);
    - devices fall silent for one to six hours of event time and come back;
    - broken clocks: year 1, epoch 0, far future (bad), and messages without a timestamp whose
      Kafka record timestamp is 0 (bad). Not -1: that is Kafka's "no timestamp", and a record
      sent with it arrives with -1 only when it does not open a producer batch (otherwise with
      the batch's base timestamp, seen with aiokafka and tansu), so its fate here would depend
      on batching; millstream's handling of -1 is covered by the decoder and pipeline tests;
    - re-sends of a device's previous message (a bridge retry: a new offset, the same readings);
    - messages right at ``max_message_bytes`` (valid, padded with a descriptive field), one byte
      over it (bad), a bad one between the producer's default request limit (1,000,000 bytes)
      and ``max_message_bytes``, and one of twice ``max_message_bytes`` (bad, and too large for
      the worker's producer: its DLQ copy is truncated); ``size_edges`` of each kind in a run;
    - late (hours behind their device) and out-of-order readings, as in the tidy profile.
    """

    def __init__(
        self,
        *,
        devices: int = 50,
        seed: int = 7,
        malformed_ratio: float = 0.02,
        late_ratio: float = 0.01,
        out_of_order_ratio: float = 0.02,
        batch_size: int = 5,
        max_message_bytes: int = 1_048_576,
        size_edges: int = 1,
        now_ms: int | None = None,
    ) -> None:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        super().__init__(
            devices=devices, seed=seed, malformed_ratio=malformed_ratio, late_ratio=late_ratio,
            out_of_order_ratio=out_of_order_ratio, batch_size=batch_size, start_ms=now - 36 * 3600 * 1000,
        )  # fmt: skip
        self.now_ms, self.max_message_bytes, self.size_edges = now, max_message_bytes, size_edges
        self._last: dict[str, tuple[bytes, list[SentReading]]] = {}
        self._edges_sent = 0

    def _step(self, device: _Device) -> None:
        rng = self.rng
        if rng.random() < 0.004:
            device.clock_ms += rng.randint(1, 6) * 3_600_000 + rng.randint(0, 3_599_999)  # silent for hours
        else:
            device.clock_ms += rng.randint(5_000, 60_000)
        device.clock_ms = min(device.clock_ms, self.now_ms - 120_000)  # never ahead of the workers' clock
        if rng.random() < 0.02:  # the metric set changes
            names = list(device.metrics)
            if len(names) > 1 and rng.random() < 0.5:
                names.remove(rng.choice(names))
            else:
                names.append(rng.choice([m for m in UNRULY_METRICS if m not in names] or names))
            device.metrics = tuple(dict.fromkeys(names))

    def _value(self, device: _Device, metric: str, at_ms: int) -> float:
        if metric in METRIC_PROFILES:
            return super()._value(device, metric, at_ms)
        return round(self.rng.uniform(-50, 500), 3)

    def _broken_clock(self, device: _Device) -> Outgoing:
        kind = self.rng.choice(["year_1", "epoch_0", "far_future", "record_ts_0"])
        self.log.bad(kind)
        key, metrics = device.device_id.encode(), {m: 1.0 for m in device.metrics}
        if kind == "year_1":
            return key, orjson.dumps({"device_id": device.device_id, "ts": "0001-01-01T00:00:00+01:00", **metrics})
        if kind == "epoch_0":
            return key, orjson.dumps({"device_id": device.device_id, "ts": 0, "metrics": metrics})
        if kind == "far_future":
            return key, orjson.dumps({"device_id": device.device_id, "ts": "9999-12-31T23:59:00-01:00", **metrics})
        return key, orjson.dumps({"device_id": device.device_id, **metrics}), 0

    def _size_edge(self, device: _Device, which: int) -> Outgoing:
        """0: exactly max_message_bytes and valid; 1: one byte over; 2: between the producer's
        default request limit and max_message_bytes, with a bad value; 3: twice the limit."""
        key = device.device_id.encode()
        device.clock_ms += 1000
        reading = self._reading(device, device.clock_ms, late=False)
        doc: dict[str, object] = {"device_id": device.device_id, "ts": reading.event_ms, "metrics": reading.metrics}
        target = (self.max_message_bytes, self.max_message_bytes + 1, 0, 2 * self.max_message_bytes)[which]
        if which == 2:
            doc["metrics"] = {**reading.metrics, "bad": "not a number"}
            target = (1_000_000 + self.max_message_bytes) // 2
        doc["note"] = ""
        doc["note"] = "x" * (target - len(orjson.dumps(doc)))
        value = orjson.dumps(doc)
        assert len(value) == target
        if which == 0:
            self._sent(device, value, [reading])
        else:
            self.log.bad(
                ("", "over_max_message_bytes", "over_producer_request_limit", "twice_max_message_bytes")[which]
            )
        return key, value

    def messages(self, count: int) -> Iterator[Outgoing]:
        edges = {count * (i + 1) // (4 * self.size_edges + 1): i % 4 for i in range(4 * self.size_edges)}
        for index in range(count):
            device = self.rng.choice(self.devices)
            if index in edges:
                yield self._size_edge(device, edges[index])
            elif device.sent and self.rng.random() < 0.01:
                yield self._broken_clock(device)
            elif device.device_id in self._last and self.rng.random() < 0.01:
                value, readings = self._last[device.device_id]  # a bridge retry: the same message again
                self.log.valid_messages += 1
                self.log.readings.extend(readings)
                yield device.device_id.encode(), value
            else:
                self._step(device)
                yield from self._one(device)

    def _sent(self, device: _Device, value: bytes, readings: list[SentReading]) -> None:
        super()._sent(device, value, readings)
        self._last[device.device_id] = (value, readings)


async def send_paced(
    producer: Any,
    topic: str,
    messages: Sequence[Outgoing],
    *,
    rate: float | None,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Send ``messages`` in order with a started aiokafka producer, at ``rate`` per second if
    given; returns how many once the broker has every one. Progress every 5 s if asked."""
    started = last_report = time.monotonic()
    pending = []
    for sent, (key, value, *stamp) in enumerate(messages, 1):
        pending.append(await producer.send(topic, value, key=key, timestamp_ms=stamp[0] if stamp else None))
        if sent % 1000 == 0:
            await asyncio.gather(*pending)
            pending.clear()
        if rate and sent % 20 == 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        if progress is not None and time.monotonic() - last_report >= 5:
            last_report = time.monotonic()
            progress(f"sent {sent}/{len(messages)} messages ({sent / (last_report - started):.0f}/s)")
    await asyncio.gather(*pending)
    return len(messages)
