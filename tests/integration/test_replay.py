"""``millstream replay`` against a worker's finished work: replaying what was processed changes
no count and no aggregate in either store, and dead letters sent back after a fix are stored."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.support.audit import audit, committed, simulate, stored_rows, wait_until_complete
from tests.support.helpers import run_cli
from tests.support.world import HARNESS_CLIENT_ID, World, produce

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(300)]


def aggregates(world: World) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: sorted(tuple(sorted(row.items())) for row in world.cql.rows(world.name, table))
        for table in ("window_aggregates", "latest_values")
    }


def replay(world: World, *args: str) -> tuple[dict[str, Any], str]:
    result = run_cli("replay", *args, "--json", timeout=180, **world.settings())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_replaying_processed_data_changes_no_count_and_no_aggregate(world: World) -> None:
    traffic, log = simulate(5000, seed=41)
    worker = world.start_worker()
    worker.wait_ready()
    # One record batch per message: the replay's default end is the partitions' end offsets, which
    # tansu gets wrong for batches of several records (real Kafka does not).
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, traffic, one_per_batch=True))
    wait_until_complete(world, log, sent)
    assert audit(world, log, sent, scenario="before replay", recovery_s=0).ok
    before_final, before_raw, before_aggregates = stored_rows(world), stored_rows(world, final=False), aggregates(world)

    # A background merge collapses the replayed rows at any moment (it did in CI between the replay
    # and the count): held off so the count below can see that they were written again.
    world.clickhouse.execute(f"SYSTEM STOP MERGES {world.database}.telemetry_raw")
    report, stderr = replay(world)
    assert report["messages"] == sent and report["rows"] == log.expected_rows
    assert sum(report["rejected"].values()) == log.malformed
    assert "replay: " in stderr and f"{sent}/{sent} messages (100 %)" in stderr  # progress, then done
    assert stored_rows(world, final=False) == before_raw + log.expected_rows  # really written again ...
    world.clickhouse.execute(f"SYSTEM START MERGES {world.database}.telemetry_raw")
    assert stored_rows(world) == before_final  # ... and collapsed: no reading counted twice
    assert aggregates(world) == before_aggregates
    result = audit(world, log, sent, scenario="after replay", recovery_s=0)
    assert result.ok, result.as_dict()

    again, _ = replay(world)  # the group remembers how far it got
    assert again["messages"] == 0
    part, _ = replay(world, "--group", "partial", "--from-offset", "10", "--to-offset", "20", "--partitions", "1")
    assert part["partitions"] == {"1": [10, 20]} and part["messages"] == 10


def _dead_letter(device: str, reason: str, value: bytes, **extra: bytes) -> tuple[bytes, bytes, list[Any]]:
    headers = {"millstream.reason": reason.encode(), "millstream.detail": b"ValueError while applying the readings",
               "millstream.source.topic": b"telemetry", "millstream.source.partition": b"0",
               "millstream.source.offset": b"99", **extra}  # fmt: skip
    return device.encode(), value, list(headers.items())


async def _send_dead_letters(world: World, letters: list[tuple[bytes, bytes, list[Any]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=world.broker.bootstrap, client_id=HARNESS_CLIENT_ID, acks="all")
    await producer.start()
    try:
        for key, value, headers in letters:
            await producer.send_and_wait(world.dlq_topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


def test_dead_letters_sent_back_after_a_fix_are_stored(world: World) -> None:
    worker = world.start_worker()
    worker.wait_ready()
    now_ms = int(time.time() * 1000)
    fixed = [f"fixed-{n}" for n in range(5)]
    letters = [
        _dead_letter(d, "internal_error", orjson.dumps({"device_id": d, "ts": now_ms - 5000,
                                                        "metrics": {"temperature": 20.0 + n, "rpm": 900.0}}))
        for n, d in enumerate(fixed)
    ]  # fmt: skip
    letters += [_dead_letter("junk", "undecodable", b"\xff\xfe") for _ in range(2)]
    truncated = {"millstream.truncated": b"2000000"}
    letters.append(_dead_letter("big", "internal_error", b'{"device_id": "big"', **truncated))
    asyncio.run(_send_dead_letters(world, letters))

    report, _ = replay(world, "--dlq")
    assert report["sent_back"] == 5 and report["messages"] == 8
    assert report["skipped"] == {"reason undecodable": 2, "truncated": 1}
    deadline = time.monotonic() + 60
    query = f"SELECT count() FROM {world.database}.telemetry_raw FINAL WHERE device_id LIKE 'fixed-%'"
    # Until the 5 are committed, which happens only once both stores have them: ClickHouse's rows
    # alone can show before ScyllaDB's write of the same batch has finished (it did in CI).
    while time.monotonic() < deadline and committed(world) < 5:
        time.sleep(1)
    assert committed(world) == 5
    assert world.clickhouse.query(query).strip() == "10"  # 5 devices x 2 metrics
    latest = {(r["device_id"], r["metric"]): r["value"] for r in world.cql.rows(world.name, "latest_values")}
    assert [latest[(d, "temperature")] for d in fixed] == [20.0, 21.0, 22.0, 23.0, 24.0]
    windows = [r for r in world.cql.rows(world.name, "window_aggregates") if r["device_id"] in fixed]
    assert len(windows) == 5 * 2 * 2 and all(r["count"] == 1 for r in windows)  # 2 metrics x 2 window sizes
    again, _ = replay(world, "--dlq")
    assert again["sent_back"] == 0  # a second run does not send them twice
