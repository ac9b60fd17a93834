"""Realistic factory telemetry: devices across factories and lines, metrics with drift, noise
and spikes, in the three input formats, with a configurable share of malformed, late and
out-of-order readings. Deterministic for a seed, and it records what it sent, so a run can be
checked exactly against what millstream stored.
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


@dataclass
class SimulationLog:
    """What was sent, for exact checks."""

    valid_messages: int = 0
    malformed: int = 0
    readings: list[SentReading] = field(default_factory=list)

    @property
    def valid_readings(self) -> int:
        return len(self.readings)

    @property
    def expected_rows(self) -> int:
        return sum(len(r.metrics) for r in self.readings)


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

    def messages(self, count: int) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``count`` messages as (key, value); each key is its device id."""
        for _ in range(count):
            device = self.rng.choice(self.devices)
            key = device.device_id.encode()
            if self.rng.random() < self.malformed_ratio:
                self.log.malformed += 1
                yield key, self._malformed(device)
                continue
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
                continue
            self.log.valid_messages += 1
            self.log.readings.extend(readings)
            device.sent += 1
            yield key, value
            if held is not None:
                self.log.valid_messages += 1
                self.log.readings.extend(held[2])
                yield held[0], held[1]

    def flush(self) -> Iterator[tuple[bytes, bytes]]:
        """Messages still held back for reordering."""
        for key, value, readings in self._held.values():
            self.log.valid_messages += 1
            self.log.readings.extend(readings)
            yield key, value
        self._held.clear()


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
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    options = kafka_client_options(kafka)
    if create_topic:
        admin = AIOKafkaAdminClient(**options)
        await admin.start()
        try:
            topic = NewTopic(
                kafka.telemetry_topic, num_partitions=kafka.partitions, replication_factor=kafka.replication_factor
            )
            await admin.create_topics([topic])
            progress(f"created topic {kafka.telemetry_topic} ({kafka.partitions} partitions)")
        except TopicAlreadyExistsError:
            pass
        finally:
            await admin.close()
    producer = AIOKafkaProducer(linger_ms=5, acks="all", **options)
    try:
        # Inside the try: a producer whose start failed (broker unreachable) must still be
        # stopped, or aiokafka warns about an unclosed producer after our one-line error.
        await producer.start()
        stream = list(simulator.messages(messages)) + list(simulator.flush())
        return await send_paced(producer, kafka.telemetry_topic, stream, rate=rate, progress=progress)
    finally:
        await producer.stop()


async def send_paced(
    producer: Any,
    topic: str,
    messages: Sequence[tuple[bytes | None, bytes]],
    *,
    rate: float | None,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Send ``messages`` in order with a started aiokafka producer, at ``rate`` per second if
    given; returns how many once the broker has every one. Progress every 5 s if asked."""
    started = last_report = time.monotonic()
    pending = []
    for sent, (key, value) in enumerate(messages, 1):
        pending.append(await producer.send(topic, value, key=key))
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
