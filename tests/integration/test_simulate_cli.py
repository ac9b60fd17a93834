"""`millstream simulate` as a user runs it, against the tansu broker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from tests.support.helpers import run_cli
from tests.support.servers import TansuBroker

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli("simulate", *args, timeout=100, **env)


async def _count(bootstrap: str, topic: str, expected: int) -> tuple[int, set[bytes]]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    seen, keys = 0, set()
    try:
        for _ in range(60):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                seen += len(records)
                keys.update(r.key for r in records)
            if seen >= expected:
                break
    finally:
        await consumer.stop()
    return seen, keys


def test_simulate_publishes_what_it_reports(kafka_broker: TansuBroker) -> None:
    topic = f"sim-{uuid.uuid4().hex[:8]}"
    result = _run(
        "--messages", "1500", "--devices", "20", "--create-topic", "--json",
        MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS=kafka_broker.bootstrap, MILLSTREAM_KAFKA__TELEMETRY_TOPIC=topic,
        MILLSTREAM_KAFKA__REPLICATION_FACTOR="1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["messages"] == summary["valid_messages"] + summary["malformed"] == 1500
    assert summary["valid_readings"] > summary["valid_messages"]  # batched messages carry several
    seen, keys = asyncio.run(_count(kafka_broker.bootstrap, topic, 1500))
    assert seen == 1500
    assert len(keys) == 20  # keyed by device id


def test_unreachable_broker_is_one_clear_line() -> None:
    result = _run("--messages", "5", MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:9")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("millstream: could not publish to 127.0.0.1:9: KafkaConnectionError")
