"""Shared fixtures: the real servers of the test world live in tests/support."""

import signal
import sys

import pytest

from tests.support.fixtures import (  # noqa: F401 - fixtures are found by name
    clickhouse_server,
    cql_faults,
    cql_server,
    kafka_broker,
    mosquitto,
    prometheus_factory,
    servers_dir,
    world,
)


def pytest_sessionstart(session: pytest.Session) -> None:
    # A SIGTERM (CI timeout, `kill <pid>`) would skip fixture teardown and leave the servers
    # and workers running; exiting through SystemExit runs the atexit hook that stops them.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
