"""Both stores over TLS, for real: ClickHouse 18.16 serving its secure native port with a
certificate made here, and the CQL test server behind TLS with PasswordAuthenticator-style logins,
each reached by the production writers (asynch, cassandra-driver), then a worker writing to both."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.settings import ClickHouseSettings, ScyllaSettings
from models.rows import AggregateBatch, RawBatch
from sinks.base import FatalSinkError, RetriableSinkError
from sinks.clickhouse import ClickHouseRawWriter
from sinks.scylla import ScyllaAggregateWriter
from tests.support.audit import audit, simulate, wait_until_complete
from tests.support.cql import CqlServer
from tests.support.servers import ClickHouseServer, TansuBroker
from tests.support.tls import Certificates, make_ca
from tests.support.world import World, create_topic, produce

pytestmark = [pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(240)]

USER, PASSWORD = "millstream", "s3cret"
T = 1_705_314_600
RAW = ("d1", "f", "l", "loc", "temperature", 21.5, T, T * 1000 + 123, T + 1, 3, 42, 0)
START = T * 1000
WINDOW = ("d1", "temperature", 60, START, START + 60_000, 2, 3.0, 1.0, 2.0, 2.0, START + 1000, 42)
LATEST = ("d1", "temperature", 2.0, START + 1000, 42)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_ca(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_clickhouse(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    server = ClickHouseServer(tmp_path_factory.mktemp("clickhouse-tls"), tls=(certs.server_cert, certs.server_key))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_cql(certs: Certificates) -> Iterator[CqlServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    server = CqlServer(ssl_context=context, credentials=(USER, PASSWORD)).start()
    yield server
    server.stop()


def secure_url(server: ClickHouseServer, database: str) -> str:
    return f"clickhouses://default@127.0.0.1:{server.secure_port}/{database}"


async def write_raw(settings: ClickHouseSettings) -> None:
    writer = ClickHouseRawWriter(settings)
    try:
        await writer.start()
        await writer.write(RawBatch([RAW], "telemetry/0:42-42"))
    finally:
        await writer.close()


def test_clickhouse_over_tls_trusting_the_configured_ca(tls_clickhouse: ClickHouseServer, certs: Any) -> None:
    database = f"tls_{uuid.uuid4().hex[:8]}"
    asyncio.run(write_raw(ClickHouseSettings(url=secure_url(tls_clickhouse, database), tls_cafile=certs.ca_file)))
    assert tls_clickhouse.query(f"SELECT device_id, value FROM {database}.telemetry_raw").split() == ["d1", "21.5"]


def test_clickhouse_with_a_certificate_its_ca_did_not_sign_is_fatal(
    tls_clickhouse: ClickHouseServer, certs: Any
) -> None:
    settings = ClickHouseSettings(url=secure_url(tls_clickhouse, "nope"), tls_cafile=certs.other_ca_file)
    with pytest.raises(FatalSinkError, match=r"^ClickHouse TLS: certificate verify failed: unable to get local"):
        asyncio.run(write_raw(settings))
    # Without a CA the system's are trusted, and none of them signed the test certificate either.
    with pytest.raises(FatalSinkError, match="certificate verify failed"):
        asyncio.run(write_raw(ClickHouseSettings(url=secure_url(tls_clickhouse, "nope"))))
    # tls_verify=false: encrypted, the certificate unchecked (documented as for test servers only).
    database = f"tls_{uuid.uuid4().hex[:8]}"
    asyncio.run(write_raw(ClickHouseSettings(url=secure_url(tls_clickhouse, database), tls_verify=False)))
    assert tls_clickhouse.query(f"SELECT count() FROM {database}.telemetry_raw").strip() == "1"


def scylla(server: CqlServer, keyspace: str, **values: Any) -> ScyllaSettings:
    return ScyllaSettings(
        contact_points=["127.0.0.1"], port=server.port, keyspace=keyspace, replication_class="SimpleStrategy",
        replication_factor=1, consistency="ONE", shadow_check_every=0, request_timeout_s=3, **values,
    )  # fmt: skip


async def write_aggregates(settings: ScyllaSettings) -> None:
    writer = ScyllaAggregateWriter(settings, "telemetry")
    try:
        await asyncio.wait_for(writer.start(), 60)
        await writer.write(AggregateBatch(windows=[WINDOW], latest=[LATEST]))
    finally:
        await writer.close()


def test_scylla_over_tls_with_a_password(tls_cql: CqlServer, certs: Certificates) -> None:
    before = tls_cql.logins["accepted"]
    settings = scylla(tls_cql, "tls_ok", tls=True, tls_cafile=certs.ca_file, username=USER, password=PASSWORD)
    asyncio.run(write_aggregates(settings))
    assert [r["count"] for r in tls_cql.rows("tls_ok", "window_aggregates")] == [2]
    assert [r["value"] for r in tls_cql.rows("tls_ok", "latest_values")] == [2.0]
    assert tls_cql.logins["accepted"] > before  # every connection logged in


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ({"tls_cafile": "other", "password": PASSWORD}, FatalSinkError, "^ScyllaDB TLS: certificate verify failed"),
        ({"tls_cafile": "ca", "password": "wrong"}, FatalSinkError, "AuthenticationFailed.*incorrect"),
        ({"tls": False, "password": PASSWORD}, RetriableSinkError, "NoHostAvailable"),  # never in clear text
    ],
)
def test_scylla_refusals(
    tls_cql: CqlServer, certs: Certificates, values: dict[str, Any], error: type, message: str
) -> None:
    ca = {"ca": certs.ca_file, "other": certs.other_ca_file}.get(values.pop("tls_cafile", ""), None)
    tls = values.pop("tls", True)
    settings = scylla(tls_cql, "tls_refused", tls=tls, tls_cafile=ca, username=USER, **values)
    with pytest.raises(error, match=message):
        asyncio.run(write_aggregates(settings))


@pytest.mark.kafka
def test_a_worker_writes_exactly_to_both_stores_over_tls(
    kafka_broker: TansuBroker, tls_clickhouse: ClickHouseServer, tls_cql: CqlServer, certs: Any, tmp_path: Path
) -> None:
    from cassandra.auth import PlainTextAuthProvider

    world = World(kafka_broker, tls_clickhouse, tls_cql, tmp_path)
    world.cql_options = {
        "ssl_context": ssl.create_default_context(cafile=str(certs.ca_file)),
        "auth_provider": PlainTextAuthProvider(USER, PASSWORD),
    }
    asyncio.run(create_topic(kafka_broker.bootstrap, world.topic))
    try:
        worker = world.start_worker(
            MILLSTREAM_CLICKHOUSE__URL=secure_url(tls_clickhouse, world.database),
            MILLSTREAM_CLICKHOUSE__TLS_CAFILE=str(certs.ca_file),
            MILLSTREAM_SCYLLA__TLS="true",
            MILLSTREAM_SCYLLA__TLS_CAFILE=str(certs.ca_file),
            MILLSTREAM_SCYLLA__USERNAME=USER,
            MILLSTREAM_SCYLLA__PASSWORD=PASSWORD,
        )
        worker.wait_ready()
        traffic, log = simulate(3000, seed=21)
        sent = asyncio.run(produce(kafka_broker.bootstrap, world.topic, traffic))
        wait_until_complete(world, log, sent)
        result = audit(world, log, sent, scenario="tls-stores", recovery_s=0)
        assert result.ok, result.as_dict()
        assert result.aggregates_checked > 100
    finally:
        world.stop_all()
        for worker in world.workers:
            print(f"--- worker {worker.index} log tail ---\n{worker.tail(40)}")
