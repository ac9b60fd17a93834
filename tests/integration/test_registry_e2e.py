"""Schema-registry framed payloads beside plain JSON in one topic, end to end: a worker with a
registry (tests/support/registry.py, Confluent's REST subset), the simulator's traffic with its
batched messages as Avro and its nested ones as framed JSON, audited like every pipeline test."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.support.audit import audit, committed, simulate, wait_until_complete
from tests.support.registry import AVRO_ID, BATCHED_AVRO, JSON_ID, NESTED_JSON_SCHEMA, TestRegistry, frame, reframe
from tests.support.world import World, produce, read_dlq

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(300)]


@pytest.fixture
def registry() -> Iterator[TestRegistry]:
    server = TestRegistry()
    server.register(AVRO_ID, BATCHED_AVRO)
    server.register(JSON_ID, NESTED_JSON_SCHEMA, kind="JSON")
    yield server
    server.close()


BAD = [
    (b"dev-unknown", frame(4242, b"{}"), "unknown_schema"),
    (b"dev-mismatch", frame(AVRO_ID, b"\x02\x41\x99"), "schema_mismatch"),
    (b"dev-glue", b"\x03\x00" + uuid.UUID(int=7).bytes + b"\x02", "glue_framed"),
]


def test_framed_and_plain_payloads_are_stored_exactly_and_an_outage_rejects_nothing(
    world: World, registry: TestRegistry
) -> None:
    traffic, log = simulate(6000, seed=31)
    framed, kinds = reframe(traffic)
    assert kinds["avro"] > 300 and kinds["json"] > 300 and kinds["plain"] > 300, kinds
    registry.down = True  # the registry is unreachable when the worker meets its first framed payload
    worker = world.start_worker(MILLSTREAM_REGISTRY__URL=registry.url, MILLSTREAM_REGISTRY__RETRY_MAX_S="1")
    worker.wait_ready()
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, framed + [(k, v) for k, v, _ in BAD]))
    deadline = time.monotonic() + 60
    while not registry.requests and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)  # consumption waits: nothing is rejected and not everything is committed
    assert registry.requests, "the worker never asked the registry"
    assert committed(world) < sent
    assert asyncio.run(read_dlq(world.broker.bootstrap, world.dlq_topic, 0, wait_s=1)) == []
    asked_while_down = len(registry.requests)
    registry.down = False
    wait_until_complete(world, log, sent)
    result = audit(world, log, sent, scenario="registry", recovery_s=0, malformed_extra=len(BAD))
    assert result.ok, result.as_dict()
    reasons = result.details["dlq_reasons"]
    assert all(reasons.get(reason) == 1 for _, _, reason in BAD), reasons
    # Once it answers, one lookup per schema id, not one per message (one more for the id whose
    # request may have been answered 503 as the outage ended).
    after = Counter(registry.requests[asked_while_down:])
    assert set(after) <= {AVRO_ID, JSON_ID, 4242} and all(n <= 2 for n in after.values()), after
