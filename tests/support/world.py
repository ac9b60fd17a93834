"""A millstream deployment over the test servers: workers as real processes, traffic from the
simulator, and independent expectations to compare what was stored against what was sent."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.simulator import SimulationLog, send_paced
from tests.support.cql_server import CqlServer
from tests.support.servers import ClickHouseServer, TansuBroker, free_port

PARTITIONS = 4
WINDOW_SIZES = (60, 3600)


@dataclass
class World:
    """Names and endpoints of one isolated deployment (own topic, group, database, keyspace)."""

    broker: TansuBroker
    clickhouse: ClickHouseServer
    cql: CqlServer
    workdir: Path
    name: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return f"{self.name}-telemetry"

    @property
    def dlq_topic(self) -> str:
        return f"{self.name}-dlq"

    @property
    def database(self) -> str:
        return f"db_{self.name}"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
        env.update(
            {
                "MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap,
                "MILLSTREAM_KAFKA__TELEMETRY_TOPIC": self.topic,
                "MILLSTREAM_KAFKA__DLQ_TOPIC": self.dlq_topic,
                "MILLSTREAM_KAFKA__CONSUMER_GROUP": f"{self.name}-group",
                "MILLSTREAM_KAFKA__PARTITIONS": str(PARTITIONS),
                "MILLSTREAM_KAFKA__REPLICATION_FACTOR": "1",
                # tansu answers ListOffsets wrongly for batched records; faust's changelog
                # recovery needs it right (DESIGN.md §5).
                "MILLSTREAM_KAFKA__PRODUCER_MAX_BATCH_SIZE": "1",
                "MILLSTREAM_KAFKA__SESSION_TIMEOUT_S": "10",
                "MILLSTREAM_KAFKA__REQUEST_TIMEOUT_S": "30",
                "MILLSTREAM_CLICKHOUSE__URL": self.clickhouse.url(self.database),
                "MILLSTREAM_CLICKHOUSE__FLUSH_INTERVAL_S": "0.5",
                "MILLSTREAM_CLICKHOUSE__QUERY_TIMEOUT_S": "10",
                "MILLSTREAM_CLICKHOUSE__CONNECT_TIMEOUT_S": "3",
                "MILLSTREAM_SCYLLA__CONTACT_POINTS": "127.0.0.1",
                "MILLSTREAM_SCYLLA__PORT": str(self.cql.port),
                "MILLSTREAM_SCYLLA__KEYSPACE": self.name,
                "MILLSTREAM_SCYLLA__REPLICATION_CLASS": "SimpleStrategy",
                "MILLSTREAM_SCYLLA__REPLICATION_FACTOR": "1",
                "MILLSTREAM_SCYLLA__CONSISTENCY": "ONE",
                "MILLSTREAM_SCYLLA__REQUEST_TIMEOUT_S": "3",
                "MILLSTREAM_STORE": "memory",
                "MILLSTREAM_PIPELINE__BATCH_MESSAGES": "2000",
                "MILLSTREAM_PIPELINE__RETRY_BUDGET_S": "120",
            }
        )
        env.update(overrides)
        return env

    def start_worker(self, **overrides: str) -> WorkerProcess:
        worker = WorkerProcess(self, len(self.workers), overrides)
        self.workers.append(worker)
        worker.start()
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()


class WorkerProcess:
    """``millstream worker`` as a child process with its own web port and data dir."""

    def __init__(self, world: World, index: int, overrides: dict[str, str]) -> None:
        self.world = world
        self.index = index
        self.web_port = free_port()
        self.datadir = world.workdir / f"worker-{index}"
        self.log_path = world.workdir / f"worker-{index}.log"
        self.overrides = overrides
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.expected_alive = False  # False once a test stopped or killed it on purpose

    def start(self) -> None:
        env = self.world.env(
            MILLSTREAM_WEB_PORT=str(self.web_port), MILLSTREAM_DATA_DIR=str(self.datadir), **self.overrides
        )
        self.starts += 1
        self.expected_alive = True
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2], start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop, 5)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        marker = f"===== start {self.starts} ====="
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "[^Worker]: Ready" in text.rsplit(marker, 1)[-1]:
                return
            assert self.proc is not None and self.proc.poll() is None, f"worker exited:\n{self.tail()}"
            time.sleep(0.2)
        raise AssertionError(f"worker {self.index} not ready in {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill9(self) -> None:
        assert self.proc is not None
        self.expected_alive = False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM by PID (graceful), SIGKILL if it lingers; returns the exit code."""
        self.expected_alive = False
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


async def create_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]], rate: float | None = None
) -> int:
    """Send messages keyed by device; at ``rate`` messages/s if given. Returns how many."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        return await send_paced(producer, topic, list(messages), rate=rate)
    finally:
        await producer.stop()


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = [await consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)]
        return sum(o or 0 for o in offsets)
    finally:
        await consumer.stop()


async def read_dlq(bootstrap: str, topic: str, expected: int, wait_s: float = 30) -> list[Any]:
    """Everything on the DLQ topic: wait for ``expected`` records, then make sure no more come."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and len(records) < expected:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        for batch in (await consumer.getmany(timeout_ms=1500)).values():
            records.extend(batch)
    finally:
        await consumer.stop()
    return records


Aggregate = tuple[int, float, float, float, float, int]  # count, sum, min, max, last, last_ms


def expected_windows(
    log: SimulationLog, sizes: Iterable[int] = WINDOW_SIZES
) -> dict[tuple[str, str, int, int], Aggregate]:
    """Aggregates computed from what was sent: every reading not sent late, in send order."""
    out: dict[tuple[str, str, int, int], list[Any]] = {}
    for reading in log.readings:
        if reading.late:
            continue
        for size in sizes:
            start = reading.event_ms // (size * 1000) * size * 1000
            for metric, value in reading.metrics.items():
                agg = out.get((reading.device_id, metric, size, start))
                if agg is None:
                    out[(reading.device_id, metric, size, start)] = [1, value, value, value, value, reading.event_ms]
                    continue
                agg[0] += 1
                agg[1] += value
                agg[2], agg[3] = min(agg[2], value), max(agg[3], value)
                if reading.event_ms >= agg[5]:
                    agg[4], agg[5] = value, reading.event_ms
    return {k: (v[0], v[1], v[2], v[3], v[4], v[5]) for k, v in out.items()}


def expected_latest(log: SimulationLog) -> dict[tuple[str, str], tuple[float, int]]:
    out: dict[tuple[str, str], tuple[float, int]] = {}
    for reading in log.readings:
        for metric, value in reading.metrics.items():
            current = out.get((reading.device_id, metric))
            if current is None or reading.event_ms >= current[1]:
                out[(reading.device_id, metric)] = (value, reading.event_ms)
    return out
