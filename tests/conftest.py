"""Shared fixtures: the real servers of the test world live in tests/support."""

from tests.support.fixtures import (  # noqa: F401 - fixtures are found by name
    clickhouse_server,
    cql_faults,
    cql_server,
    kafka_broker,
    prometheus_factory,
    servers_dir,
)
