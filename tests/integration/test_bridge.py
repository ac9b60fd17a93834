"""``millstream bridge`` between a real Mosquitto and the tansu broker: every QoS 1 message
reaches Kafka keyed by its device, unchanged; what cannot be keyed or is too large goes to the
DLQ with its reason; nothing is dropped silently. (Failures of each hop: tests/chaos.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.bridge import KeyRule, Unkeyed
from app.tools.local import metric_value
from tests.support.helpers import run_cli
from tests.support.mqtt import BridgeProcess, Devices, bridge_settings, wait_forwarded
from tests.support.servers import MosquittoServer, TansuBroker
from tests.support.world import create_topic, read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.mqtt, pytest.mark.timeout(240)]


@pytest.fixture
def names() -> tuple[str, str]:
    name = f"b{uuid.uuid4().hex[:8]}"
    return f"{name}-telemetry", f"{name}-dlq"


def start_bridge(tmp_path: Path, broker: TansuBroker, mqtt: MosquittoServer, names: tuple[str, str],
                 **overrides: str) -> BridgeProcess:  # fmt: skip
    topic, dlq = names
    asyncio.run(create_topic(broker.bootstrap, topic))
    asyncio.run(create_topic(broker.bootstrap, dlq, partitions=1))
    bridge = BridgeProcess(tmp_path, bridge_settings(broker.bootstrap, topic, dlq, mqtt.url, **overrides)).start()
    bridge.wait_ready()
    return bridge


@pytest.fixture
def bridge(
    tmp_path: Path, kafka_broker: TansuBroker, mosquitto: MosquittoServer, names: tuple[str, str]
) -> Iterator[BridgeProcess]:
    # A small limit so that an oversized message does not need megabytes (the production
    # default, 1 MiB, is the worker's own limit and is tested there).
    running = start_bridge(tmp_path, kafka_broker, mosquitto, names, LIMITS__MAX_MESSAGE_BYTES="70000")
    yield running
    running.stop()
    print(f"--- bridge log ---\n{running.tail()}")


def by_header(record: Any, name: str) -> bytes | None:
    return dict(record.headers).get(name)


def test_every_message_reaches_kafka_keyed_by_device_and_unchanged(
    bridge: BridgeProcess, kafka_broker: TansuBroker, mosquitto: MosquittoServer, names: tuple[str, str]
) -> None:
    traffic = [(f"dev-{i % 37}".encode(), b'{"device_id":"dev-%d","seq":%d}' % (i % 37, i)) for i in range(3000)]
    traffic.append((b"dev-raw", b"\xff\xfe not UTF-8 \x00"))  # forwarded as it is: the worker rejects it
    devices = Devices(mosquitto.url)
    try:
        devices.publish(traffic)
        devices.wait_acknowledged()
    finally:
        devices.close()
    records = asyncio.run(read_topic(kafka_broker.bootstrap, names[0], len(traffic)))
    got = {(r.key, r.value) for r in records}
    assert got == set(traffic)
    assert len(records) == len(traffic)  # no broker or bridge restart here: no duplicate either
    assert all(by_header(r, "mqtt.topic") == f"devices/{r.key.decode()}/telemetry".encode() for r in records)
    # Per device, Kafka has the messages in the order they were published (one partition each).
    for device in (b"dev-0", b"dev-36"):
        published = [value for key, value in traffic if key == device]
        assert [r.value for r in sorted(records, key=lambda r: (r.partition, r.offset)) if r.key == device] == published
    text = bridge.metrics()
    assert metric_value(text, "millstream_bridge_received_total") == len(traffic)
    assert metric_value(text, "millstream_bridge_acked_total") == len(traffic)
    assert metric_value(text, "millstream_bridge_in_flight") == 0


def test_unkeyable_and_oversized_messages_go_to_the_dlq_with_their_reason(
    bridge: BridgeProcess, kafka_broker: TansuBroker, mosquitto: MosquittoServer, names: tuple[str, str]
) -> None:
    big = b'{"device_id":"dev-1","pad":"' + b"x" * 100_000 + b'"}'
    devices = Devices(mosquitto.url)
    try:
        devices.publish([(b"", b'{"device_id":"nobody"}')])  # devices//telemetry: no device level
        devices.publish([(b"dev-1", big)])
        devices.publish([(b"dev-1", b'{"device_id":"dev-1","ok":1}')])
        devices.wait_acknowledged()
    finally:
        devices.close()
    dlq = asyncio.run(read_topic(kafka_broker.bootstrap, names[1], 2))
    reasons = {by_header(r, "millstream.reason"): r for r in dlq}
    assert set(reasons) == {b"device_id_missing", b"too_large"}
    assert by_header(reasons[b"device_id_missing"], "millstream.source.mqtt_topic") == b"devices//telemetry"
    large = reasons[b"too_large"]
    assert by_header(large, "millstream.truncated") == str(len(big)).encode()
    assert by_header(large, "millstream.sha256") == hashlib.sha256(big).hexdigest().encode()
    assert large.value == big[: len(large.value)] and large.key == b"dev-1"
    good = asyncio.run(read_topic(kafka_broker.bootstrap, names[0], 1))
    assert [r.value for r in good] == [b'{"device_id":"dev-1","ok":1}']


def test_the_key_can_come_from_the_payload(
    tmp_path: Path, kafka_broker: TansuBroker, mosquitto: MosquittoServer, names: tuple[str, str]
) -> None:
    bridge = start_bridge(tmp_path, kafka_broker, mosquitto, names, BRIDGE__KEY_FROM="payload:device_id",
                          BRIDGE__ROUTES="plant/#")  # fmt: skip
    devices = Devices(mosquitto.url)
    try:
        devices.publish([(b"x", b'{"device_id":"press-7","v":1}'), (b"x", b"not json")],
                        topic=lambda key: "plant/hall-2/line-1")  # fmt: skip
        devices.wait_acknowledged()
    finally:
        devices.close()
        bridge.stop()
    [record] = asyncio.run(read_topic(kafka_broker.bootstrap, names[0], 1))
    assert record.key == b"press-7"
    [rejected] = asyncio.run(read_topic(kafka_broker.bootstrap, names[1], 1))
    assert by_header(rejected, "millstream.reason") == b"undecodable" and rejected.value == b"not json"


@pytest.mark.parametrize(
    ("key_from", "topic", "payload", "expected"),
    [
        ("topic:2", "devices/d-1/telemetry", b"", b"d-1"),
        ("topic:3", "devices/d-1", b"", "device_id_missing"),
        ("topic:2", "devices//telemetry", b"", "device_id_missing"),
        ("payload:device_id", "x", b'{"device_id":"d-2"}', b"d-2"),
        ("payload:device_id", "x", b'{"device_id":7}', "device_id_missing"),
        ("payload:device_id", "x", b"[1]", "device_id_missing"),
        ("payload:device_id", "x", b"\xff", "undecodable"),
    ],
)
def test_key_rule(key_from: str, topic: str, payload: bytes, expected: bytes | str) -> None:
    key = KeyRule(key_from).key(topic, payload)
    assert (key.reason if isinstance(key, Unkeyed) else key) == expected


def test_simulate_over_mqtt_through_the_bridge_as_a_user_runs_it(
    bridge: BridgeProcess, kafka_broker: TansuBroker, mosquitto: MosquittoServer, names: tuple[str, str]
) -> None:
    result = run_cli(
        "simulate", "--messages", "800", "--devices", "15", "--mqtt", mosquitto.url, "--json", timeout=100,
        MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS=kafka_broker.bootstrap, MILLSTREAM_KAFKA__TELEMETRY_TOPIC=names[0],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["messages"] == 800 and summary["topic"] == mosquitto.url
    records = asyncio.run(read_topic(kafka_broker.bootstrap, names[0], 800))
    assert len(records) == 800 and len({r.key for r in records}) == 15


def test_simulate_to_an_unreachable_mqtt_broker_is_one_clear_line() -> None:
    result = run_cli("simulate", "--messages", "5", "--mqtt", "mqtt://127.0.0.1:9", timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("millstream: could not publish to mqtt://127.0.0.1:9:"), lines


def test_a_bad_bridge_setting_stops_the_start_with_one_line() -> None:
    result = run_cli("bridge", timeout=60, MILLSTREAM_BRIDGE__KEY_FROM="device")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "millstream: invalid setting MILLSTREAM_BRIDGE__KEY_FROM: 'device' is neither topic:N (N from 1) nor "
        "payload:FIELD"
    ]


def test_a_kafka_that_stops_answering_costs_a_reconnect_not_a_message(
    tmp_path: Path, kafka_broker: TansuBroker, mosquitto: MosquittoServer, names: tuple[str, str]
) -> None:
    # A 3 s request timeout (production: 40 s) so that a broker that stops answering fails the
    # bridge's sends within the test: the bridge must then close its MQTT session, start over
    # and let Mosquitto redeliver what it had not acknowledged.
    bridge = start_bridge(tmp_path, kafka_broker, mosquitto, names, KAFKA__REQUEST_TIMEOUT_S="3",
                          KAFKA__SESSION_TIMEOUT_S="3")  # fmt: skip
    traffic = [(f"dev-{i % 7}".encode(), b'{"seq":%d}' % i) for i in range(600)]
    devices = Devices(mosquitto.url)
    try:
        devices.publish(traffic[:200])
        devices.wait_acknowledged()
        kafka_broker.pause()
        try:
            devices.publish(traffic[200:400])
            time.sleep(10)
        finally:
            kafka_broker.resume()
        devices.publish(traffic[400:])
        devices.wait_acknowledged()
        in_kafka = wait_forwarded(kafka_broker.bootstrap, names[0], len(traffic))
        bridge.wait_ready()
        text = bridge.metrics()
    finally:
        devices.close()
        bridge.stop()
        print(f"--- bridge log ---\n{bridge.tail()}")
    records = asyncio.run(read_topic(kafka_broker.bootstrap, names[0], in_kafka))
    assert {(r.key, r.value) for r in records} == set(traffic)  # every one, duplicates allowed
    assert metric_value(text, "millstream_bridge_errors_total", 'kind="kafka"') >= 1
    assert bridge.proc is not None and bridge.proc.returncode == 0  # it reconnected; it did not crash
