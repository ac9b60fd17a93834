"""Break things under load, then count: nothing lost, nothing twice, every aggregate exact.

Each scenario drives simulated traffic through real `millstream worker` processes (tansu,
ClickHouse 18.16, the CQL server), injects its failure, waits until everything produced is
committed and stored, and audits the result independently (tests/support/audit.py). The
audit goes into the chaos report before the assertions, so a failing scenario shows its
numbers too. Run on its own with ``python -m pytest tests/chaos``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Callable

import pytest

from app.tools.local import metric_value, rss_mb
from app.tools.simulator import SimulationLog
from tests.support.audit import (
    Audit,
    audit,
    committed,
    produce_in_background,
    simulate,
    stored_rows,
    wait_until_complete,
)
from tests.support.mqtt import BridgeProcess, Devices, bridge_settings, wait_forwarded
from tests.support.poison import KINDS, poison
from tests.support.proxy import DelayProxy
from tests.support.servers import MosquittoServer
from tests.support.world import World, produce

pytestmark = [pytest.mark.chaos, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(480)]
Record = Callable[[Audit], Audit]


def wait_for_rows(world: World, at_least: int = 1, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (rows := stored_rows(world)) < at_least:
        assert time.monotonic() < deadline, f"no progress: {rows} rows after {timeout}s"
        time.sleep(0.2)
    return rows


def finish(world: World, record: Record, scenario: str, log: SimulationLog, sent: int, fault_end: float,
           malformed_extra: int = 0, **details: object) -> Audit:  # fmt: skip
    incomplete = None
    try:
        wait_until_complete(world, log, sent, timeout=240)
    except AssertionError as exc:  # still count what is there: the report shows what was lost
        incomplete = str(exc).splitlines()[0]
    result = audit(world, log, sent, scenario=scenario, recovery_s=time.monotonic() - fault_end,
                   malformed_extra=malformed_extra)  # fmt: skip
    result.details.update(details)
    if incomplete:
        result.details["incomplete"] = incomplete
    record(result)
    assert result.ok and not incomplete, result.as_dict()
    return result


def test_crash_loop_ten_kill9_under_load(world: World, record: Record) -> None:
    # 20,000 devices (issue 18): most messages are a device's first or second, so nearly every
    # one changes aggregate rows and a device state of its own; each restart restores those
    # states from the changelog and re-writes what was not yet committed.
    traffic, log = simulate(9000, seed=21, devices=20_000)
    rng = random.Random(21)
    worker = world.start_worker()
    worker.wait_ready()
    # 140 s of traffic: ten restarts take about 100 s (each waits for the group to expel the
    # killed member), and the last kill must still land while data flows.
    producer = produce_in_background(world, traffic, rate=65)
    wait_for_rows(world)  # the first batch of a new group takes a second or two; kill after it
    rows_at_kill = []
    for kill in range(10):
        # At a random moment while it processes (every third kill: during start-up/recovery).
        if kill % 3 != 2:
            worker.wait_ready()
        time.sleep(rng.uniform(0.3, 3.0))
        rows_at_kill.append(stored_rows(world))
        worker.kill9()
        worker.start()
    fault_end = time.monotonic()
    assert 0 < rows_at_kill[0] < rows_at_kill[-1] < log.expected_rows, "the kills must land while data flows"
    producer.join(120)
    finish(world, record, "crash loop: 10 x kill -9", log, len(traffic), fault_end, rows_at_kill=rows_at_kill)


def test_rebalance_join_leave_and_die(world: World, record: Record) -> None:
    traffic, log = simulate(7000, seed=22)
    first, second = world.start_worker(), world.start_worker()
    first.wait_ready()
    second.wait_ready()
    producer = produce_in_background(world, traffic, rate=120)
    time.sleep(8)
    third = world.start_worker()  # joins mid-load
    time.sleep(12)
    graceful_exit = first.stop(60)  # SIGTERM: leaves the group cleanly
    time.sleep(12)
    second.kill9()  # dies without a word
    fault_end = time.monotonic()
    producer.join(120)
    assert third.proc is not None and third.proc.poll() is None
    finish(world, record, "rebalance: +1 joins, 1 leaves, 1 dies", log, len(traffic), fault_end,
           graceful_exit_code=graceful_exit)  # fmt: skip
    assert graceful_exit == 0


def test_clickhouse_down_for_thirty_seconds(world: World, record: Record) -> None:
    traffic, log = simulate(7000, seed=23)
    worker = world.start_worker()
    worker.wait_ready()
    producer = produce_in_background(world, traffic, rate=120)
    wait_for_rows(world)
    world.clickhouse.stop()
    rss, commits = [], []
    for second in range(30):
        time.sleep(1)
        if second == 15:  # and the worker dies while its batch waits for ClickHouse
            worker.kill9()
            worker.start()
        assert worker.proc is not None
        rss.append(rss_mb(worker.proc.pid))
        commits.append(committed(world))
    world.clickhouse.start()
    fault_end = time.monotonic()
    producer.join(120)
    result = finish(world, record, "ClickHouse down 30 s, kill -9 during it", log, len(traffic), fault_end,
                    rss_peak_mb=max(rss), committed_during_outage=[commits[4], commits[-1]])  # fmt: skip
    # Consumption paused: nothing was committed while nothing could be written.
    assert commits[4] == commits[-1], result.details
    assert max(rss) < 1024, result.details  # memory stayed bounded while input waited in Kafka


def test_clickhouse_slow(world: World, record: Record) -> None:
    traffic, log = simulate(6000, seed=24)
    proxy = DelayProxy(world.clickhouse.tcp_port)
    try:
        url = f"clickhouse://default@127.0.0.1:{proxy.port}/{world.database}"
        worker = world.start_worker(MILLSTREAM_CLICKHOUSE__URL=url)
        worker.wait_ready()
        producer = produce_in_background(world, traffic, rate=150)
        wait_for_rows(world)
        assert worker.proc is not None
        proxy.delay_s = 0.3  # every chunk each way waits 0.3 s
        rss = []
        for _ in range(20):
            time.sleep(1)
            rss.append(rss_mb(worker.proc.pid))
        proxy.delay_s = 0.0
        fault_end = time.monotonic()
        producer.join(120)
        result = finish(world, record, "ClickHouse slow (+0.3 s per chunk, 20 s)", log, len(traffic), fault_end,
                        rss_peak_mb=max(rss))  # fmt: skip
        assert max(rss) < 1024, result.details
    finally:
        proxy.close()


def test_scylla_faults_of_every_kind(world: World, record: Record) -> None:
    traffic, log = simulate(7000, seed=25)
    worker = world.start_worker()
    worker.wait_ready()
    producer = produce_in_background(world, traffic, rate=150)
    wait_for_rows(world)
    injected = {}
    # By count, not by time: a worker backing off after one fault must still meet the next.
    for kind, count in (("write_timeout", 20), ("unavailable", 20), ("overloaded", 20), ("drop", 3), ("delay", 10)):
        before = world.cql.faults.injected
        world.cql.faults.inject(kind, count=count, delay_s=1.5 if kind == "delay" else 0.0)
        deadline = time.monotonic() + 60
        while world.cql.faults.injected - before < count and time.monotonic() < deadline:
            time.sleep(0.2)
        injected[kind] = world.cql.faults.injected - before
        world.cql.faults.clear()
    fault_end = time.monotonic()
    producer.join(120)
    finish(world, record, "ScyllaDB: timeouts, unavailable, overloaded, drops, slow", log, len(traffic), fault_end,
           faults_injected=injected)  # fmt: skip
    assert all(count > 0 for count in injected.values()), injected


def test_broker_frozen_for_twenty_seconds(world: World, record: Record) -> None:
    traffic, log = simulate(6000, seed=26)
    worker = world.start_worker()
    worker.wait_ready()
    producer = produce_in_background(world, traffic, rate=120)
    wait_for_rows(world)
    broker_pid = world.broker.pid
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        time.sleep(20)
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    fault_end = time.monotonic()
    producer.join(180)
    finish(world, record, "broker frozen 20 s (SIGSTOP)", log, len(traffic), fault_end)


def test_poison_input_ten_thousand_bad_messages(world: World, record: Record) -> None:
    traffic, log = simulate(8000, seed=27)
    bad = list(poison(10_000, seed=27))
    rng = random.Random(27)
    # Bad messages between the valid ones; the valid ones keep their order (lateness depends on it).
    slots = sorted(rng.randrange(len(traffic) + 1) for _ in bad)
    mixed: list[tuple[bytes | None, bytes]] = []
    position = 0
    for slot, (key, value, _kind) in zip(slots, bad, strict=True):
        mixed.extend(traffic[position:slot])
        mixed.append((key, value))
        position = max(position, slot)
    mixed.extend(traffic[position:])
    worker = world.start_worker()  # production limits: rejects near 1 MiB must reach the DLQ too
    worker.wait_ready()
    fault_start = time.monotonic()
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, mixed))
    result = finish(world, record, f"poison: {len(bad)} bad messages mixed in", log, sent, fault_start,
                    malformed_extra=len(bad), poison_kinds=len(KINDS))  # fmt: skip
    assert worker.starts == 1 and worker.proc is not None and worker.proc.poll() is None  # never died
    assert len(result.details["dlq_reasons"]) >= 10  # type: ignore[arg-type]


def test_duplicated_input_resent_slice(world: World, record: Record) -> None:
    traffic, log = simulate(7000, seed=28, malformed=0.0)
    resent = traffic[2500:4000]  # a bridge retrying 1500 messages it had already delivered
    sequence = traffic[:4500] + resent + traffic[4500:]
    worker = world.start_worker()
    worker.wait_ready()
    fault_start = time.monotonic()
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, sequence, rate=400))
    result = finish(world, record, f"duplicated input: {len(resent)} messages re-sent", log, sent, fault_start,
                    resent_messages=len(resent))  # fmt: skip
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/metrics", timeout=5) as response:
        recognised = metric_value(response.read().decode(), "millstream_duplicate_readings_total")
    result.details["duplicate_readings_recognised"] = recognised
    assert recognised > 0  # the windows saw the re-sends and skipped them, not just luck


def test_worker_returns_with_its_old_local_state(world: World, record: Record) -> None:
    """The StatefulSet pod that comes back after its partitions moved on elsewhere: it recovers
    from its own RocksDB (as it was when it left, possibly ahead of the changelog after a
    kill -9) plus the changelog tail the other worker wrote meanwhile."""
    traffic, log = simulate(8000, seed=29)
    first, second = world.start_worker(), world.start_worker()
    first.wait_ready()
    second.wait_ready()
    producer = produce_in_background(world, traffic, rate=110)
    wait_for_rows(world)
    time.sleep(6)
    first.kill9()  # gone without a word; the second takes its partitions after the session timeout
    time.sleep(22)
    kept = sorted(p.name for p in first.datadir.rglob("*.sst")) + sorted(p.name for p in first.datadir.rglob("CURRENT"))
    first.start()  # back with the data directory it had
    first.wait_ready()
    time.sleep(10)
    graceful = second.stop(60)  # and the other way round, leaving cleanly this time
    time.sleep(15)
    second.start()
    second.wait_ready()
    fault_end = time.monotonic()
    producer.join(120)
    finish(world, record, "worker returns with its old local state (x2)", log, len(traffic), fault_end,
           local_state_files_kept=len(kept), graceful_exit_code=graceful)  # fmt: skip
    assert kept, "the returning worker must find its RocksDB state in its data directory"


def test_unruly_factory_traffic(world: World, record: Record) -> None:
    """Devices as real factories have them (app/simulator.py UnrulySimulator): metric sets that
    change, devices silent for hours, broken clocks, re-sends, messages at and over the size
    limits, hours of event time. No worker may restart, nothing may be lost, every aggregate
    must equal the independent recomputation."""
    traffic, log = simulate(9000, seed=30, devices=150, profile="unruly")
    first, second = world.start_worker(), world.start_worker()
    first.wait_ready()
    second.wait_ready()
    fault_start = time.monotonic()
    sent = asyncio.run(produce(world.broker.bootstrap, world.topic, traffic, rate=300))
    result = finish(world, record, "unruly factory: clocks, silence, metric churn, size limits, re-sends", log,
                    sent, fault_start)  # fmt: skip
    reasons = result.details["dlq_reasons"]
    assert isinstance(reasons, dict) and {"bad_timestamp", "future_timestamp", "too_large"} <= set(reasons)
    assert result.details.get("dlq_truncated") == 1  # twice the limit: its DLQ copy is truncated


# ---- the MQTT hop: devices -> Mosquitto -> millstream bridge -> Kafka -> workers -> stores


def through_mqtt(world: World, record: Record, mosquitto: MosquittoServer, scenario: str, seed: int,
                 fault: Callable[[BridgeProcess], None]) -> Audit:  # fmt: skip
    """The simulator's traffic published over MQTT (QoS 1) while ``fault`` strikes; the audit
    is the pipeline's: everything the devices published is stored once, every aggregate exact.
    Re-sends after a fault are duplicates in Kafka, counted in the report."""
    traffic, log = simulate(5000, seed=seed, malformed=0.0)
    settings = bridge_settings(world.broker.bootstrap, world.topic, world.dlq_topic, mosquitto.url)
    bridge = BridgeProcess(world.workdir, settings).start()
    worker = world.start_worker()
    try:
        bridge.wait_ready()
        worker.wait_ready()
        devices = Devices(mosquitto.url)
        publisher = threading.Thread(target=devices.publish, args=(traffic, 250), daemon=True)
        publisher.start()
        wait_for_rows(world)
        fault(bridge)
        fault_end = time.monotonic()
        publisher.join(120)
        devices.wait_acknowledged(240)
        devices.close()
        in_kafka = wait_forwarded(world.broker.bootstrap, world.topic, len(traffic))
        redelivered = metric_value(bridge.metrics(), "millstream_bridge_redelivered_total")
        resumed = "(session present: True)" in bridge.tail(200)
        return finish(world, record, scenario, log, in_kafka, fault_end, mqtt_published=len(traffic),
                      kafka_duplicates=in_kafka - len(traffic), bridge_starts=bridge.starts,
                      redelivered_since_last_start=redelivered, session_resumed=resumed)  # fmt: skip
    finally:
        bridge.stop()
        print(f"--- bridge log ---\n{bridge.tail()}")


def test_mqtt_bridge_killed_mid_stream(world: World, record: Record, mosquitto: MosquittoServer) -> None:
    in_flight: list[float] = []

    def kill_and_restart(bridge: BridgeProcess) -> None:
        # Kafka held for 3 s first, so that the kill lands with hundreds of messages received and
        # sent to Kafka but not acknowledged to MQTT (some of them written once Kafka resumes).
        os.kill(world.broker.pid, signal.SIGSTOP)
        try:
            time.sleep(3)
            in_flight.append(metric_value(bridge.metrics(), "millstream_bridge_in_flight"))
            bridge.kill9()
        finally:
            os.kill(world.broker.pid, signal.SIGCONT)
        time.sleep(2)
        bridge.start()  # the same client id: its persistent session, with what was not acknowledged

    result = through_mqtt(world, record, mosquitto, "MQTT bridge kill -9 mid-stream", 40, kill_and_restart)
    assert in_flight[0] > 0 and result.details["redelivered_since_last_start"] > 0, (in_flight, result.details)


def test_mqtt_kafka_frozen_behind_the_bridge(world: World, record: Record, mosquitto: MosquittoServer) -> None:
    def freeze_kafka(bridge: BridgeProcess) -> None:
        os.kill(world.broker.pid, signal.SIGSTOP)
        try:
            time.sleep(20)
        finally:
            os.kill(world.broker.pid, signal.SIGCONT)

    through_mqtt(world, record, mosquitto, "MQTT bridge, Kafka frozen 20 s (SIGSTOP)", 41, freeze_kafka)


def test_mqtt_broker_restarted(world: World, record: Record, mosquitto: MosquittoServer) -> None:
    def restart_mosquitto(bridge: BridgeProcess) -> None:
        time.sleep(2)
        mosquitto.stop()  # SIGTERM: Mosquitto saves its sessions and their queued messages
        time.sleep(2)
        mosquitto.start()

    result = through_mqtt(world, record, mosquitto, "MQTT broker (Mosquitto) restarted", 42, restart_mosquitto)
    # The bridge's session outlived the restart (it did not: Mosquitto, started as root, ran as
    # the user "mosquitto" and could not write its persistence file; found by this scenario).
    assert result.details["session_resumed"], result.details
