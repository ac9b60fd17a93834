"""``millstream bridge``: MQTT to Kafka without loss. A message is acknowledged to MQTT only
once Kafka has it, in the order it arrived.

The hop:

1. paho-mqtt subscribes with QoS 1 under a persistent session (fixed client id, clean session
   off), with ``manual_ack``: paho does not send the PUBACK itself;
2. each message gets its Kafka topic from the route its MQTT topic matches and its key (the
   device id) from the topic or the payload; the record goes to Kafka with ``acks=all``, the
   payload unchanged, the MQTT topic in the header ``mqtt.topic``;
3. when Kafka has acknowledged a message and every message that arrived before it, the bridge
   sends their PUBACKs, in arrival order (MQTT requires in-order acks);
4. a message the bridge cannot key, or too large for Kafka, goes to the dead-letter topic with
   its reason (the worker's DLQ headers), and is acknowledged once the DLQ has it.

Nothing is acknowledged that Kafka does not have: when the connection to MQTT drops, the
acknowledgements of that connection are abandoned (a PUBACK names a packet id of one
connection) and the broker sends those messages again; when Kafka refuses or times out a
record, the bridge closes its MQTT session, starts a new producer and reconnects, so the
broker redelivers everything not acknowledged. A redelivered message that Kafka had already
is a duplicate there: the worker collapses re-sent readings (docs/reliability.md), and
``millstream_bridge_redelivered_total`` counts them.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from prometheus_client import Counter, Gauge

from app.kafka import kafka_client_options
from app.probes import probe_app
from app.settings import BridgeSettings, Settings
from models.records import RejectReason
from sinks.dead_letters import DETAIL_BYTES, HEADROOM_BYTES, TRUNCATED_BYTES  # the worker's DLQ limits

log = logging.getLogger(__name__)

RECONNECT_DELAY_S = (1.0, 30.0)  # MQTT reconnect back-off, first and longest

RECEIVED = Counter("millstream_bridge_received_total", "MQTT messages received")
PRODUCED = Counter("millstream_bridge_produced_total", "Records Kafka acknowledged", ["destination"])
ACKED = Counter("millstream_bridge_acked_total", "MQTT messages acknowledged (PUBACK sent)")
REDELIVERED = Counter("millstream_bridge_redelivered_total", "MQTT messages received with the DUP flag")
ABANDONED = Counter(
    "millstream_bridge_abandoned_total", "Messages left unacknowledged when their MQTT connection closed"
)
DEAD_LETTERED = Counter("millstream_bridge_dead_lettered_total", "Messages sent to the DLQ", ["reason"])
ERRORS = Counter("millstream_bridge_errors_total", "Failures, by kind", ["kind"])
IN_FLIGHT = Gauge("millstream_bridge_in_flight", "Messages received and not yet acknowledged")
CONNECTED = Gauge("millstream_bridge_mqtt_connected", "1 while the MQTT session is up")


# ---- routes and keys (pure)


@dataclass(frozen=True, slots=True)
class Route:
    mqtt_filter: str
    kafka_topic: str

    def matches(self, topic: str) -> bool:
        return topic_matches(self.mqtt_filter, topic)


def parse_routes(settings: Settings) -> list[Route]:
    routes = []
    for route in settings.bridge.routes:
        mqtt_filter, _, kafka_topic = route.partition("=")
        routes.append(Route(mqtt_filter.strip(), kafka_topic.strip() or settings.kafka.telemetry_topic))
    return routes


def topic_matches(mqtt_filter: str, topic: str) -> bool:
    """MQTT topic matching: ``+`` one level, ``#`` the rest; wildcards at the first level do not
    match topics that start with ``$`` (MQTT 3.1.1 §4.7.2)."""
    wanted, levels = mqtt_filter.split("/"), topic.split("/")
    if topic.startswith("$") and wanted[0] in ("+", "#"):
        return False
    for i, want in enumerate(wanted):
        if want == "#":
            return True
        if i >= len(levels) or (want != "+" and want != levels[i]):
            return False
    return len(wanted) == len(levels)


@dataclass(frozen=True, slots=True)
class Unkeyed:
    """Why a message has no device id: the DLQ reason and detail."""

    reason: RejectReason
    detail: str


class KeyRule:
    """The Kafka key of a message, from ``MILLSTREAM_BRIDGE__KEY_FROM``."""

    def __init__(self, key_from: str) -> None:
        self.source, _, where = key_from.partition(":")
        self.level = int(where) if self.source == "topic" else 0
        self.field = where if self.source == "payload" else ""

    def key(self, topic: str, payload: bytes) -> bytes | Unkeyed:
        if self.source == "topic":
            levels = topic.split("/")
            if self.level > len(levels) or not levels[self.level - 1]:
                return Unkeyed(RejectReason.DEVICE_ID_MISSING, f"MQTT topic {topic[:200]!r} has no level {self.level}")
            return levels[self.level - 1].encode()
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            return Unkeyed(RejectReason.UNDECODABLE, f"payload is not JSON ({exc}); key_from=payload:{self.field}")
        value = document.get(self.field) if isinstance(document, dict) else None
        if not isinstance(value, str) or not value:
            return Unkeyed(RejectReason.DEVICE_ID_MISSING, f"payload has no string field {self.field!r} for the key")
        return value.encode()


# ---- acknowledgements in arrival order (pure)


@dataclass(slots=True)
class Pending:
    epoch: int  # the MQTT connection it arrived on
    mid: int  # its packet id on that connection
    done: bool = False


class AckQueue:
    """Messages in arrival order; the head is acknowledged once Kafka has it, and then the next
    one if Kafka has that too, and so on. A message done out of order waits for those before it."""

    def __init__(self, ack: Callable[[Pending], None]) -> None:
        self._ack = ack
        self._queue: collections.deque[Pending] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, epoch: int, mid: int) -> Pending:
        entry = Pending(epoch, mid)
        self._queue.append(entry)
        return entry

    def done(self, entry: Pending) -> int:
        """Mark ``entry`` as in Kafka; acknowledge what can be. Returns how many were acked."""
        entry.done = True
        acked = 0
        queue = self._queue
        while queue and queue[0].done:
            self._ack(queue.popleft())
            acked += 1
        return acked

    def abandon(self, epoch: int) -> int:
        """Forget the messages of a closed connection (the broker sends them again)."""
        kept = [entry for entry in self._queue if entry.epoch != epoch]
        dropped = len(self._queue) - len(kept)
        self._queue = collections.deque(kept)
        return dropped


# ---- the process


class KafkaFailed(Exception):
    """Kafka refused or lost a record: reconnect everything, let MQTT redeliver."""


class Bridge:
    """One bridge process: an MQTT session, a Kafka producer, the queue between them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bridge: BridgeSettings = settings.bridge
        self.routes = parse_routes(settings)
        self.keys = KeyRule(self.bridge.key_from)
        self.max_value_bytes = max(TRUNCATED_BYTES, settings.limits.max_message_bytes)
        self._epochs = itertools.count(1)
        self._epoch = 0  # the open MQTT connection's; 0 while none is open (set in paho's thread)
        self._room = threading.Semaphore(self.bridge.max_pending)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._producer: Any = None
        self._outbox: asyncio.Queue[tuple[Pending, str, bytes, bool]] = asyncio.Queue()
        self._acks = AckQueue(self._send_ack)
        self._failed: asyncio.Future[None] | None = None
        self.ready = False

    # -- MQTT side (paho's network thread)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connection refused: %s", reason)
            return
        self._epoch = next(self._epochs)
        CONNECTED.set(1)
        prefix = f"$share/{self.bridge.shared_group}/" if self.bridge.shared_group else ""
        client.subscribe([(prefix + route.mqtt_filter, 1) for route in self.routes])
        log.info("MQTT connected (session present: %s), subscribed to %s", flags.session_present,
                 ", ".join(prefix + route.mqtt_filter for route in self.routes))  # fmt: skip

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        closed, self._epoch = self._epoch, 0
        CONNECTED.set(0)
        if reason.is_failure:
            log.warning("MQTT connection lost (%s); unacknowledged messages will be redelivered", reason)
        else:  # the bridge's own disconnect: on stop, or to start over after a Kafka failure
            log.info("MQTT disconnected")
        if self._loop is not None and closed:
            self._loop.call_soon_threadsafe(self._abandon, closed)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        epoch = self._epoch
        while not self._room.acquire(timeout=1.0):  # max_pending reached: stop reading until acks free room
            if self._epoch != epoch:
                return  # the connection closed meanwhile: the broker sends it again
        assert self._loop is not None
        self._loop.call_soon_threadsafe(
            self._received, epoch, message.mid, message.topic, message.payload, bool(message.dup)
        )

    # -- asyncio side

    def _received(self, epoch: int, mid: int, topic: str, payload: bytes, dup: bool) -> None:
        RECEIVED.inc()
        if dup:
            REDELIVERED.inc()
        if epoch != self._epoch:  # its connection has closed: it comes again, not acked now
            self._room.release()
            return
        entry = self._acks.add(epoch, mid)
        IN_FLIGHT.set(len(self._acks))
        self._outbox.put_nowait((entry, topic, payload, dup))

    def _send_ack(self, entry: Pending) -> None:
        self._room.release()
        if entry.epoch != self._epoch or self._client is None:
            ABANDONED.inc()
            return
        self._client.ack(entry.mid, 1)
        ACKED.inc()

    def _abandon(self, epoch: int) -> None:
        dropped = self._acks.abandon(epoch)
        for _ in range(dropped):
            self._room.release()
        ABANDONED.inc(dropped)
        IN_FLIGHT.set(len(self._acks))

    def _delivered(self, entry: Pending, destination: str, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
            ERRORS.labels(kind="kafka").inc()
            if self._failed is not None and not self._failed.done():
                self._failed.set_exception(KafkaFailed(f"Kafka did not take a record: {exc!r}"))
            return
        PRODUCED.labels(destination=destination).inc()
        self._acks.done(entry)
        IN_FLIGHT.set(len(self._acks))

    async def _forward(self) -> None:
        """The one task that hands records to the producer, in arrival order."""
        while True:
            entry, topic, payload, _dup = await self._outbox.get()
            if entry.epoch != self._epoch:
                continue  # its connection closed: already abandoned, the broker sends it again
            destination, key, value, headers = self._record(topic, payload)
            kafka_topic = self.settings.kafka.dlq_topic if destination == "dlq" else destination
            try:
                future = await self._producer.send(kafka_topic, value=value, key=key, headers=headers)
            except Exception as exc:  # refused before sending (too large, producer closed)
                future = asyncio.get_running_loop().create_future()
                future.set_exception(exc)
            future.add_done_callback(lambda f, e=entry, d=destination: self._delivered(e, d, f))

    def _record(self, topic: str, payload: bytes) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
        """(destination, key, value, headers): a Kafka topic, or "dlq" with the reason in headers."""
        route = next((r for r in self.routes if r.matches(topic)), None)
        headers = [("mqtt.topic", topic.encode())] if self.bridge.topic_header else []
        if route is None:  # a shared or overlapping subscription delivered a topic no route names
            detail = f"no route matches MQTT topic {topic[:200]!r}"
            return self._dead_letter(topic, None, payload, RejectReason.UNROUTED, detail)
        key = self.keys.key(topic, payload)
        if isinstance(key, Unkeyed):
            return self._dead_letter(topic, None, payload, key.reason, key.detail)
        if len(payload) > self.max_value_bytes:
            detail = f"{len(payload)} bytes > {self.max_value_bytes} (MILLSTREAM_LIMITS__MAX_MESSAGE_BYTES)"
            return self._dead_letter(topic, key, payload, RejectReason.TOO_LARGE, detail)
        return route.kafka_topic, key, payload, headers

    def _dead_letter(
        self, topic: str, key: bytes | None, payload: bytes, reason: RejectReason, detail: str
    ) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
        DEAD_LETTERED.labels(reason=reason.value).inc()
        log.warning("MQTT message on %r to the DLQ: %s: %s", topic[:200], reason.value, detail)
        headers = [
            ("millstream.reason", reason.value.encode()),
            ("millstream.detail", detail.encode(errors="replace")[:DETAIL_BYTES]),
            ("millstream.source.mqtt_topic", topic.encode()[:1000]),
        ]
        if len(payload) > self.max_value_bytes:
            headers += [
                ("millstream.truncated", str(len(payload)).encode()),
                ("millstream.sha256", hashlib.sha256(payload).hexdigest().encode()),
            ]
            payload = payload[:TRUNCATED_BYTES]
        return "dlq", key, payload, headers

    # -- lifecycle

    def _mqtt_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        b = self.bridge
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=b.client_id, clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311, manual_ack=True,
        )  # fmt: skip
        client.on_connect, client.on_disconnect, client.on_message = (
            self._on_connect, self._on_disconnect, self._on_message
        )  # fmt: skip
        client.reconnect_delay_set(int(RECONNECT_DELAY_S[0]), int(RECONNECT_DELAY_S[1]))
        if b.username:
            client.username_pw_set(b.username, b.password.get_secret_value() if b.password else None)
        if urlsplit(b.mqtt_url).scheme == "mqtts":
            context = ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)
            if b.certfile:
                context.load_cert_chain(str(b.certfile), str(b.keyfile) if b.keyfile else None)
            client.tls_set_context(context)
        return client

    async def _start_producer(self) -> Any:
        from aiokafka import AIOKafkaProducer

        kafka = self.settings.kafka
        producer = AIOKafkaProducer(
            acks="all", enable_idempotence=self.bridge.idempotent, linger_ms=kafka.producer_linger_ms,
            max_request_size=self.max_value_bytes + HEADROOM_BYTES,
            request_timeout_ms=int(kafka.request_timeout_s * 1000), **kafka_client_options(kafka),
        )  # fmt: skip
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: a producer and an MQTT session; on a Kafka failure both anew."""
        self._loop = asyncio.get_running_loop()
        forward = asyncio.create_task(self._forward())
        delay = RECONNECT_DELAY_S[0]
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                    delay = RECONNECT_DELAY_S[0]
                except (KafkaFailed, OSError, ConnectionError) as exc:
                    log.error("%s; reconnecting to Kafka and MQTT in %.0fs (nothing unacknowledged is lost: the "
                              "MQTT broker sends it again)", exc, delay)  # fmt: skip
                except Exception as exc:
                    if type(exc).__module__.split(".")[0] != "aiokafka":
                        raise
                    ERRORS.labels(kind="kafka").inc()
                    log.error("Kafka: %r; retrying in %.0fs", exc, delay)
                await _sleep_unless(stop, delay)
                delay = min(delay * 2, RECONNECT_DELAY_S[1])
        finally:
            forward.cancel()
            await asyncio.gather(forward, return_exceptions=True)

    async def _session(self, stop: asyncio.Event) -> None:
        """One producer and one MQTT client, until stop (returns) or a Kafka failure (raises)."""
        self._producer = await self._start_producer()
        self._failed = asyncio.get_running_loop().create_future()
        client = self._client = self._mqtt_client()
        parts = urlsplit(self.bridge.mqtt_url)
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        client.connect_async(parts.hostname, port, keepalive=self.bridge.keepalive_s)
        client.loop_start()
        self.ready = True
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        waits: list[asyncio.Future[Any]] = [self._failed, stopping]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if self._failed.done():
                self._failed.result()  # raises KafkaFailed
        finally:
            self.ready = False
            stopping.cancel()
            await self._close_session(client)

    async def _close_session(self, client: Any) -> None:
        """On stop: let what Kafka is about to acknowledge be acked, then close. On failure: close;
        what is not acknowledged is redelivered."""
        if self._failed is not None and not self._failed.done():
            deadline = time.monotonic() + 5
            while len(self._acks) and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a plain deque
                await asyncio.sleep(0.05)
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        if self._epoch:
            self._abandon(self._epoch)
            self._epoch = 0
        producer, self._producer = self._producer, None
        try:
            await asyncio.wait_for(producer.stop(), timeout=10)
        except Exception:
            log.debug("producer stop raised", exc_info=True)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """The bridge and its web pages (/metrics, /healthz, /readyz) until ``stop``."""
    from aiohttp import web

    bridge = Bridge(settings)

    def readiness() -> tuple[int, dict[str, Any]]:
        connected = bool(bridge._epoch)
        status = 200 if bridge.ready and connected else 503
        return status, {"ready": status == 200, "kafka": bridge.ready, "mqtt": connected}

    runner = web.AppRunner(probe_app(readiness), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.web_host, settings.bridge.web_port).start()
    log.info("bridge %s -> Kafka %s; web on %s:%d", settings.bridge.mqtt_url,
             ",".join(settings.kafka.bootstrap_servers), settings.web_host, settings.bridge.web_port)  # fmt: skip
    try:
        await bridge.run(stop)
    finally:
        await runner.cleanup()
