"""pytest fixtures for the real servers: session-scoped, free ports, temp dirs, stopped by PID.

A missing server binary skips the test with the reason on a developer's machine and fails it
under ``CI=true``, where `.ci/run` has installed everything.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support.cql import CqlServer
from tests.support.servers import (
    ClickHouseServer,
    ManagedProcess,
    MosquittoServer,
    PrometheusServer,
    ServerUnavailable,
    TansuBroker,
)
from tests.support.world import World, create_topic

T = TypeVar("T", bound=ManagedProcess)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _build(factory: Callable[[], T]) -> T:
    try:
        return factory()
    except ServerUnavailable as exc:
        if in_ci():
            pytest.fail(f"required server missing in CI: {exc}")
        pytest.skip(f"server not installed here: {exc}")


def _served(server: ManagedProcess) -> Iterator[ManagedProcess]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def kafka_broker(servers_dir: Path) -> Iterator[TansuBroker]:
    broker = _build(lambda: TansuBroker(servers_dir / "tansu"))
    yield from _served(broker)  # type: ignore[misc]


@pytest.fixture(scope="session")
def clickhouse_server(servers_dir: Path) -> Iterator[ClickHouseServer]:
    server = _build(lambda: ClickHouseServer(servers_dir / "clickhouse"))
    yield from _served(server)  # type: ignore[misc]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    """A Mosquitto of the test's own (a scenario may restart it), persistence on."""
    server = _build(lambda: MosquittoServer(tmp_path / "mosquitto"))
    yield from _served(server)  # type: ignore[misc]


@pytest.fixture(scope="session")
def cql_server() -> Iterator[CqlServer]:
    server = CqlServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cql_faults(cql_server: CqlServer) -> Iterator[CqlServer]:
    """The CQL server with fault injection cleared before and after the test."""
    cql_server.faults.clear()
    yield cql_server
    cql_server.faults.clear()


@pytest.fixture(scope="session")
def prometheus_factory(servers_dir: Path) -> Iterator[Callable[[list[str]], PrometheusServer]]:
    """Start a Prometheus scraping the given host:port targets; all stopped at session end."""
    started: list[PrometheusServer] = []

    def start(targets: list[str]) -> PrometheusServer:
        server = _build(lambda: PrometheusServer(servers_dir / f"prometheus-{len(started)}", targets))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def world(
    kafka_broker: TansuBroker, clickhouse_server: ClickHouseServer, cql_server: CqlServer, tmp_path: Path
) -> Iterator[World]:
    """An isolated deployment (own topic, group, database, keyspace) over the session servers.

    Leaves the shared servers as it found them: faults cleared, ClickHouse running.
    """
    cql_server.faults.clear()
    world = World(kafka_broker, clickhouse_server, cql_server, tmp_path)
    asyncio.run(create_topic(kafka_broker.bootstrap, world.topic))
    yield world
    world.stop_all()
    cql_server.faults.clear()
    if not clickhouse_server.running():
        clickhouse_server.start()
    for worker in world.workers:  # shown by pytest when the test failed
        print(f"--- worker {worker.index} log tail ---\n{worker.tail(60)}")
