"""The bridge's decisions without a network: topic matching, routes, keys, dead letters, and
the order of acknowledgements (the network path: tests/integration/test_bridge.py, tests/chaos)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.bridge import AckQueue, Bridge, Pending, topic_matches
from app.settings import BridgeSettings, LimitSettings, Settings
from app.tools.simulator import topic_level
from models.records import RejectReason


def bridge(**options: object) -> Bridge:
    limits = LimitSettings(max_message_bytes=70_000)
    return Bridge(Settings(bridge=BridgeSettings(**options), limits=limits))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mqtt_filter", "topic", "matches"),
    [
        ("devices/+/telemetry", "devices/d1/telemetry", True),
        ("devices/+/telemetry", "devices/d1/status", False),
        ("devices/+/telemetry", "devices/d1/telemetry/x", False),
        ("devices/+/telemetry", "devices//telemetry", True),  # an empty level is a level
        ("devices/#", "devices", True),  # '#' includes the parent level
        ("devices/#", "devices/a/b/c", True),
        ("+/x", "$SYS/x", False),  # wildcards at the first level skip $-topics
        ("#", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("a/b", "a/b", True),
    ],
)
def test_topic_matching(mqtt_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(mqtt_filter, topic) is matches


def test_routes_pick_the_kafka_topic_and_the_default_is_the_telemetry_topic() -> None:
    b = bridge(routes=["devices/+/telemetry", "plant/+/+/data=plant-raw"])
    assert b._record("devices/d1/telemetry", b"{}")[:2] == ("telemetry", b"d1")
    b = bridge(routes=["plant/+/+/data=plant-raw"], key_from="topic:3")
    assert b._record("plant/hall/press-4/data", b"{}")[:2] == ("plant-raw", b"press-4")


def test_what_cannot_be_forwarded_is_dead_lettered_with_its_reason() -> None:
    b = bridge()
    destination, key, value, headers = b._record("elsewhere/d1", b"x")  # e.g. a shared subscription's leftovers
    assert destination == "dlq" and dict(headers)["millstream.reason"] == RejectReason.UNROUTED.value.encode()
    big = b"y" * 100_000
    destination, key, value, headers = b._record("devices/d1/telemetry", big)
    assert (destination, key) == ("dlq", b"d1") and dict(headers)["millstream.reason"] == b"too_large"
    assert dict(headers)["millstream.truncated"] == b"100000" and value == big[: len(value)] < big
    # At the limit it is forwarded whole.
    assert b._record("devices/d1/telemetry", b"z" * 70_000)[0] == "telemetry"


def test_a_username_without_a_password_is_refused() -> None:
    with pytest.raises(ValueError, match="without MILLSTREAM_BRIDGE__PASSWORD"):
        BridgeSettings(username="plant")


@pytest.mark.parametrize("route", ["a/#/b", "a/b+", "=telemetry", "a/+="])
def test_a_bad_route_is_refused(route: str) -> None:
    with pytest.raises(ValueError, match="MILLSTREAM_BRIDGE__ROUTES"):
        BridgeSettings(routes=[route])


@given(st.permutations(list(range(30))))
def test_acks_go_out_in_arrival_order_whatever_order_kafka_answers_in(answers: list[int]) -> None:
    acked: list[int] = []
    queue = AckQueue(lambda entry: acked.append(entry.mid))
    entries = [queue.add(1, mid) for mid in range(30)]
    for i in answers:
        queue.done(entries[i])
        # never a gap: what is acked is always a prefix of what arrived
        assert acked == list(range(len(acked)))
    assert acked == list(range(30)) and len(queue) == 0


def test_a_closed_connection_abandons_its_messages_and_they_block_nothing() -> None:
    acked: list[Pending] = []
    queue = AckQueue(acked.append)
    old = [queue.add(1, mid) for mid in (1, 2)]
    new = [queue.add(2, mid) for mid in (1, 2)]
    assert queue.abandon(1) == 2
    queue.done(new[0])
    queue.done(old[1])  # Kafka answers an abandoned one late: nothing to ack for it
    assert [(e.epoch, e.mid) for e in acked] == [(2, 1)]


@pytest.mark.parametrize(
    ("key", "level"),
    [(b"sensor-0001", "sensor-0001"), (b"a/b", "a_b"), (b"+#", "__"), (b"", "_"), (b"\xff", "\ufffd")],
)
def test_simulated_device_ids_become_one_topic_level(key: bytes, level: str) -> None:
    assert topic_level(key) == level
