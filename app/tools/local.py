"""A ``millstream worker`` child process on this machine, for ``millstream demo`` and ``bench``.

Its settings come from the arguments, not from the caller's ``MILLSTREAM_*`` environment, so
a demo or a benchmark measures the configuration it prints. It is watched through its own
``/metrics`` page, as an operator would, and stopped by PID.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

from app.tools.broker import free_port, stop_process


def without_settings(settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its ``MILLSTREAM_*`` variables, plus ``settings``:
    a child runs exactly the configuration it is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILLSTREAM_")}
    env.update(settings or {})
    return env


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+-]+|[+-]Inf|NaN)"
    match = re.search(r"^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def histogram_quantile(text: str, name: str, q: float, labels: str = "") -> float:
    """The q-quantile of a histogram, interpolated inside its bucket as PromQL's does."""
    prefix = labels + "," if labels else ""
    found = re.findall(
        r"^" + re.escape(name) + r"_bucket\{" + re.escape(prefix) + r'le="([^"]+)"\} ([0-9.e+-]+)$', text, re.MULTILINE
    )
    buckets = sorted((math.inf if le == "+Inf" else float(le), float(count)) for le, count in found)
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the largest finite bucket: its bound is all we know
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc); 0 when unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its threads, seconds (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class WorkerChild:
    """``python -m app.cli worker`` as a child process, started with exactly the ``MILLSTREAM_*``
    settings it is given (nothing inherited), logging to ``log_path``, watched through its own
    pages (``/readyz``, ``/metrics``) as an operator would, and stopped by PID."""

    def __init__(
        self, *, name: str, log_path: Path, settings: Mapping[str, str], web_port: int,
        cwd: Path | None = None, new_session: bool = False, command: str = "worker",
    ) -> None:  # fmt: skip
        """``command``: worker, or api (``millstream api``, which has the same pages to watch)."""
        self.name, self.log_path, self.web_port, self.command = name, log_path, web_port, command
        self.settings = dict(settings)  # full variable names, MILLSTREAM_...
        self.cwd, self.new_session = cwd, new_session
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return without_settings(self.settings)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", self.command], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                cwd=self.cwd, start_new_session=self.new_session,
            )  # fmt: skip

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the {self.command} exited with {self.proc.returncode}; see {self.log_path}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def client(self) -> KeepAliveClient:
        """A client of this worker's web port that keeps its connection, as API clients do."""
        return KeepAliveClient("127.0.0.1", self.web_port)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the {self.command} was not ready within {timeout:.0f}s; see {self.log_path}")

    def wait_acked(
        self,
        total: int,
        *,
        timeout: float,
        progress: Callable[[str], None],
        on_poll: Callable[[float, float, str], None] | None = None,
        interval: float = 0.5,
    ) -> str:
        """Poll /metrics until ``total`` messages are acked; returns the last scrape.

        ``on_poll(monotonic_time, acked, text)`` sees every scrape (the benchmark times with it).
        """
        deadline, last_report = time.monotonic() + timeout, time.monotonic()
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                text = self.metrics()
            except OSError:
                time.sleep(interval)
                continue
            now = time.monotonic()
            acked = metric_value(text, "millstream_acked_messages_total")
            if on_poll is not None:
                on_poll(now, acked, text)
            if acked >= total:
                return text
            if now - last_report >= 3:
                last_report = now
                progress(f"{self.name}: {acked:.0f}/{total} messages acked")
            time.sleep(interval)
        raise RuntimeError(f"the worker did not ack {total} messages within {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM by PID, SIGKILL if it lingers; the exit code (None if never started)."""
        stop_process(self.proc, timeout)
        return None if self.proc is None else self.proc.returncode


class KeepAliveClient:
    """GETs over one HTTP/1.1 connection, opened again when the server closed it. The lookup
    API's users (requests.Session, aiohttp, a browser) keep connections; a new TCP connection
    per request would cost the worker about as much again as a ``/latest`` answer."""

    def __init__(self, host: str, port: int, timeout: float = 5) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._connection: http.client.HTTPConnection | None = None

    def get(self, path: str) -> tuple[int, str]:
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._connection.request("GET", path)
                response = self._connection.getresponse()
                return response.status, response.read().decode()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()  # the server closed an idle connection: once more on a new one
                if attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class LocalWorker(WorkerChild):
    """A worker for the demo and the benchmark: the bundled broker, one ClickHouse, no ScyllaDB,
    production state (RocksDB), its own port and data directory under ``workdir``."""

    def __init__(
        self, *, name: str, workdir: Path, bootstrap: str, topic: str, clickhouse_url: str,
        settings: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.workdir = workdir
        port = free_port()
        defaults = {
            "KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA__TELEMETRY_TOPIC": topic,
            "KAFKA__DLQ_TOPIC": f"{topic}-dlq",
            "KAFKA__CONSUMER_GROUP": f"millstream-{name}",
            "KAFKA__REPLICATION_FACTOR": "1",
            "KAFKA__SESSION_TIMEOUT_S": "10",
            "KAFKA__REQUEST_TIMEOUT_S": "30",
            "CLICKHOUSE__URL": clickhouse_url,
            "SCYLLA__ENABLED": "false",
            "STORE": "rocksdb",  # what production runs (deploy/base/configmap.yaml)
            "DATA_DIR": str(workdir / name),
            "WEB_HOST": "127.0.0.1",
            "WEB_PORT": str(port),
            "LOG_LEVEL": "warning",
            **(settings or {}),
        }
        super().__init__(
            name=name, log_path=workdir / f"{name}.log", web_port=port,
            settings={f"MILLSTREAM_{key}": value for key, value in defaults.items()},
        )  # fmt: skip
