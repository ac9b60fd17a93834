"""The MQTT hop in the test world: ``millstream bridge`` as a real process, and devices that
publish the simulator's traffic over MQTT with QoS 1 (paho-mqtt), as a plant's devices would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from app.tools.broker import free_port, stop_process
from app.tools.simulator import Outgoing


def device_topic(key: bytes) -> str:
    return f"devices/{key.decode()}/telemetry"


class BridgeProcess:
    """``millstream bridge`` in a child process: start, wait ready, kill -9, stop (by PID)."""

    def __init__(self, workdir: Path, settings: dict[str, str]) -> None:
        self.workdir = workdir
        self.web_port = free_port()
        self.settings = {
            **settings,
            "MILLSTREAM_BRIDGE__WEB_PORT": str(self.web_port),
            "MILLSTREAM_WEB_HOST": "127.0.0.1",
        }
        self.log_path = workdir / "bridge.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> BridgeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
        env.update(self.settings)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "bridge"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=3) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.get("/readyz")[0] != 200:
            assert self.proc is not None and self.proc.poll() is None, f"bridge exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"bridge not ready after {timeout}s:\n{self.tail()}"
            time.sleep(0.2)

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else None
        stop_process(self.proc, 20)
        return self.proc.returncode

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Devices:
    """Devices publishing over MQTT with QoS 1 through one paho client with a persistent
    session: while the broker is away, paho keeps what is not acknowledged and sends it again
    on reconnect, so every message reaches the broker once it is back."""

    def __init__(self, url: str, client_id: str = "test-devices") -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)  # no limit: nothing dropped while the broker is away
        self.client.reconnect_delay_set(1, 2)
        self.connected = threading.Event()
        self.client.on_connect = lambda *args: self.connected.set()
        # A message published while the broker is away is queued by paho (its info says "not
        # connected") and sent on reconnect; on_publish counts the broker's PUBACKs.
        self.published = self.acknowledged = 0
        self.client.on_publish = self._on_publish
        self.client.connect(host, int(port), keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(10), "devices could not connect to MQTT"

    def _on_publish(self, *args: Any) -> None:
        self.acknowledged += 1

    def publish(self, traffic: Sequence[Outgoing], rate: float | None = None, topic: Any = None) -> None:
        started = time.monotonic()
        for sent, (key, value, *_stamp) in enumerate(traffic, 1):
            self.client.publish((topic or device_topic)(key), value, qos=1)
            self.published += 1
            if rate and sent % 20 == 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)

    def wait_acknowledged(self, timeout: float = 120) -> None:
        """Until the broker has acknowledged every message published."""
        deadline = time.monotonic() + timeout
        while self.acknowledged < self.published:
            left = self.published - self.acknowledged
            assert time.monotonic() < deadline, f"{left} of {self.published} messages not acknowledged by MQTT"
            time.sleep(0.2)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bridge_settings(bootstrap: str, topic: str, dlq_topic: str, mqtt_url: str, **overrides: str) -> dict[str, str]:
    settings = {
        "MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "MILLSTREAM_KAFKA__TELEMETRY_TOPIC": topic,
        "MILLSTREAM_KAFKA__DLQ_TOPIC": dlq_topic,
        "MILLSTREAM_BRIDGE__MQTT_URL": mqtt_url,
        "MILLSTREAM_BRIDGE__CLIENT_ID": f"bridge-{topic}",
        # tansu has no InitProducerId: the idempotent producer (the default, for MSK) cannot
        # start against it. Without it a produce retried after a lost answer may be written
        # twice, which the worker collapses like any re-send (tests/chaos counts them).
        "MILLSTREAM_BRIDGE__IDEMPOTENT": "false",
    }
    settings.update({f"MILLSTREAM_{k}": v for k, v in overrides.items()})
    return settings


def wait_forwarded(bootstrap: str, topic: str, at_least: int, timeout: float = 240, quiet_s: float = 5) -> int:
    """Until the topic holds at least ``at_least`` records and no more arrive for ``quiet_s``
    (redelivered duplicates come after the originals); returns how many it holds. Counted by
    reading: tansu's end offsets are wrong for batched records (DESIGN.md §5)."""
    import asyncio

    from aiokafka import AIOKafkaConsumer

    async def count() -> int:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
        await consumer.start()
        total, since = 0, time.monotonic()
        deadline = since + timeout
        try:
            while not (total >= at_least and time.monotonic() - since >= quiet_s):
                assert time.monotonic() < deadline, f"Kafka has {total} of at least {at_least} records after {timeout}s"
                got = sum(len(batch) for batch in (await consumer.getmany(timeout_ms=500)).values())
                if got:
                    total, since = total + got, time.monotonic()
            return total
        finally:
            await consumer.stop()

    return asyncio.run(count())
