"""A millstream deployment over the test servers: workers as real processes, traffic from the
simulator, and independent expectations to compare what was stored against what was sent."""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.tools.broker import create_topics
from app.tools.local import WorkerChild
from app.tools.simulator import send_paced
from tests.support.cql import CqlServer
from tests.support.helpers import ROOT
from tests.support.servers import ClickHouseServer, TansuBroker, free_port

PARTITIONS = 4
# The tests' own Kafka clients name themselves, so that the MSK IAM stand-in (tests/support/msk.py)
# can let them in without a login while every client of a worker must log in.
HARNESS_CLIENT_ID = "millstream-tests"


@dataclass
class World:
    """Names and endpoints of one isolated deployment (own topic, group, database, keyspace)."""

    broker: TansuBroker
    clickhouse: ClickHouseServer
    cql: CqlServer
    workdir: Path
    name: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    workers: list[WorkerProcess] = field(default_factory=list)
    store: str = "rocksdb"  # what production runs (deploy/base/configmap.yaml); a test may say otherwise
    cql_options: dict[str, Any] = field(default_factory=dict)  # the audit's driver: TLS, login, if the server wants
    # Alert rules (YAML) every worker runs with; the audit then checks the alerts (tests/chaos).
    rules: str | None = None
    # Restarts the supervisor made because a worker exited on its own (a crash, a crash loop),
    # as Kubernetes would restart a pod: (worker, exit code, last log lines).
    restarts: list[tuple[int, int | None, str]] = field(default_factory=list)
    _supervisor: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def topic(self) -> str:
        return f"{self.name}-telemetry"

    @property
    def dlq_topic(self) -> str:
        return f"{self.name}-dlq"

    @property
    def alerts_topic(self) -> str:
        return f"{self.name}-alerts"

    @property
    def database(self) -> str:
        return f"db_{self.name}"

    def settings(self, **overrides: str) -> dict[str, str]:
        """The MILLSTREAM_* settings of a worker of this world."""
        env: dict[str, str] = {}
        # Production settings (the defaults and what deploy/ sets: RocksDB state, batch sizes,
        # retry budget, ...) except where a line says why; memory state only where a test says.
        env.update(
            {
                "MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap,
                "MILLSTREAM_KAFKA__TELEMETRY_TOPIC": self.topic,
                "MILLSTREAM_KAFKA__DLQ_TOPIC": self.dlq_topic,
                "MILLSTREAM_KAFKA__ALERTS_TOPIC": self.alerts_topic,
                "MILLSTREAM_KAFKA__CONSUMER_GROUP": f"{self.name}-group",
                "MILLSTREAM_KAFKA__PARTITIONS": str(PARTITIONS),
                "MILLSTREAM_STORE": self.store,
                "MILLSTREAM_KAFKA__REPLICATION_FACTOR": "1",  # one broker
                # tansu answers ListOffsets wrongly for batched records; faust's changelog
                # recovery needs it right (DESIGN.md §5). The batched producer runs in the bench.
                "MILLSTREAM_KAFKA__PRODUCER_MAX_BATCH_SIZE": "1",
                # tansu expels a kill -9'd member only after the session timeout: 30 s per kill
                # would make the crash scenarios take an hour (request timeout must be >= it).
                "MILLSTREAM_KAFKA__SESSION_TIMEOUT_S": "10",
                "MILLSTREAM_KAFKA__REQUEST_TIMEOUT_S": "30",
                "MILLSTREAM_CLICKHOUSE__URL": self.clickhouse.url(self.database),
                # Outage scenarios: notice a stopped server in seconds, not in the production 30 s.
                "MILLSTREAM_CLICKHOUSE__QUERY_TIMEOUT_S": "10",
                "MILLSTREAM_CLICKHOUSE__CONNECT_TIMEOUT_S": "3",
                "MILLSTREAM_SCYLLA__CONTACT_POINTS": "127.0.0.1",
                "MILLSTREAM_SCYLLA__PORT": str(self.cql.port),
                "MILLSTREAM_SCYLLA__KEYSPACE": self.name,
                "MILLSTREAM_SCYLLA__REPLICATION_CLASS": "SimpleStrategy",  # one node
                "MILLSTREAM_SCYLLA__REPLICATION_FACTOR": "1",
                "MILLSTREAM_SCYLLA__CONSISTENCY": "ONE",
                "MILLSTREAM_SCYLLA__REQUEST_TIMEOUT_S": "3",  # the injected timeouts and drops, in seconds
                # A scenario must end inside pytest's timeout even if a sink never comes back.
                "MILLSTREAM_PIPELINE__RETRY_BUDGET_S": "120",
            }
        )
        if self.rules is not None:
            path = self.workdir / "rules.yaml"
            path.write_text(self.rules)
            env["MILLSTREAM_ALERTS__RULES_FILE"] = str(path)
        env.update(overrides)
        return env

    def start_worker(self, *, supervised: bool = True, **overrides: str) -> WorkerProcess:
        """A new worker; ``supervised=False`` for a test that expects it to exit."""
        worker = WorkerProcess(self, len(self.workers), overrides)
        worker.supervised = supervised
        self.workers.append(worker)
        worker.start()
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="worker-supervisor")
            self._supervisor.start()
        return worker

    def _supervise(self) -> None:
        """Restart a worker that exited although no test stopped it, and count it."""
        while not self._stopping.wait(0.5):
            for worker in list(self.workers):
                with worker.lock:
                    if not worker.supervised or not worker.expected_alive or worker.proc is None:
                        continue
                    if worker.proc.poll() is None:
                        continue
                    self.restarts.append((worker.index, worker.proc.returncode, worker.tail(15)))
                    worker.start()

    def stop_all(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        for worker in self.workers:
            worker.stop()


class WorkerProcess(WorkerChild):
    """A worker of the test world: its own web port and data dir (kept across restarts, as a
    StatefulSet pod keeps its volume), restartable, killable with SIGKILL, supervised."""

    def __init__(self, world: World, index: int, overrides: dict[str, str]) -> None:
        port = free_port()
        self.world, self.index = world, index
        self.datadir = world.workdir / f"worker-{index}"
        settings = world.settings(MILLSTREAM_WEB_PORT=str(port), MILLSTREAM_DATA_DIR=str(self.datadir), **overrides)
        super().__init__(
            name=f"worker-{index}", log_path=world.workdir / f"worker-{index}.log", web_port=port, settings=settings,
            cwd=ROOT, new_session=True,
        )  # fmt: skip
        self.starts = 0
        self.expected_alive = False  # False once a test stopped or killed it on purpose
        self.lock = threading.RLock()  # the supervisor and the test both start and stop it
        self.supervised = True  # restarted by the world's supervisor when it exits on its own

    def start(self) -> None:
        with self.lock:
            self.starts += 1
            self.expected_alive = True
            with open(self.log_path, "ab") as log:
                log.write(f"\n===== start {self.starts} =====\n".encode())
            super().start()
        atexit.register(self.stop, 5)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until /readyz answers 200 (sinks connected, tables recovered), as Kubernetes probes."""
        try:
            super().wait_ready(timeout)
        except RuntimeError as exc:
            raise AssertionError(f"worker {self.index}: {exc}\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill9(self) -> None:
        with self.lock:
            assert self.proc is not None
            self.expected_alive = False
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM by PID (graceful), SIGKILL if it lingers; returns the exit code."""
        with self.lock:
            self.expected_alive = False
        return super().stop(timeout)


async def create_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
    await create_topics([topic], partitions=partitions, bootstrap_servers=bootstrap, client_id=HARNESS_CLIENT_ID)


async def produce(
    bootstrap: str,
    topic: str,
    messages: Iterable[tuple[bytes | None, bytes]],
    rate: float | None = None,
    one_per_batch: bool = False,
) -> int:
    """Send messages keyed by device; at ``rate`` messages/s if given. Returns how many.
    ``one_per_batch``: a record batch per message, for tests that need tansu's end offsets
    right (it answers ListOffsets wrongly for batches of several records; DESIGN.md §5)."""
    # max_request_size: the simulator's messages at and over the size limits (8 MiB is tansu's own ceiling too).
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=HARNESS_CLIENT_ID,
        linger_ms=5,
        acks="all",
        max_request_size=8 * 1024 * 1024,
        **({"max_batch_size": 1} if one_per_batch else {}),
    )
    await producer.start()
    try:
        return await send_paced(producer, topic, list(messages), rate=rate)
    finally:
        await producer.stop()


async def committed_total(bootstrap: str, group: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, client_id=HARNESS_CLIENT_ID, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        offsets = [await consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)]
        return sum(o or 0 for o in offsets)
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, expected: int, wait_s: float = 30) -> list[Any]:
    """Everything on a topic (the DLQ, say): wait for ``expected`` records, then make sure no more come."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, client_id=HARNESS_CLIENT_ID, auto_offset_reset="earliest", group_id=None,
        max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=16 * 1024 * 1024,
    )  # fmt: skip
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


read_dlq = read_topic
