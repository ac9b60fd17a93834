"""Workers that log in to Kafka with MSK IAM, end to end.

tansu cannot authenticate (DESIGN.md §5), so the broker here is tansu behind the MSK IAM
stand-in (tests/support/msk.py): it takes the workers' SASL/OAUTHBEARER logins, checks each
token's form, scope and expiry, and, like MSK when a token expires, closes every logged-in
connection after a few seconds. The stand-in has no TLS: these workers run SASL_PLAINTEXT with
MILLSTREAM_KAFKA__ALLOW_SECRETS_WITHOUT_TLS; the TLS context that SASL_SSL adds is tested in
tests/unit/app/test_kafka_auth.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.tools.broker import broker_command
from tests.support.audit import audit, produce_in_background, simulate, wait_until_complete
from tests.support.cql import CqlServer
from tests.support.helpers import ROOT
from tests.support.msk import IamListener
from tests.support.servers import ClickHouseServer as ClickHouse
from tests.support.servers import TansuBroker, free_port
from tests.support.world import World, create_topic

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.cql, pytest.mark.timeout(300)]

REGION = "eu-west-1"
SESSION_S = 12.0  # MSK: at most 15 minutes. Short here, so that sessions end mid-stream; longer than a
# JoinGroup takes on tansu (about half the 10 s consumer session), or no join would ever complete
# Static credentials of the kind AWS documents as examples; signing needs no AWS account.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance metadata service to ask here
}


def iam_settings(region: str = REGION) -> dict[str, str]:
    return {
        "MILLSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "MILLSTREAM_KAFKA__SASL_MECHANISM": "AWS_MSK_IAM",
        "MILLSTREAM_KAFKA__AWS_REGION": region,
        "MILLSTREAM_KAFKA__ALLOW_SECRETS_WITHOUT_TLS": "true",  # the stand-in has no TLS (module docstring)
        **AWS_ENV,
    }


class TansuBehindListener(TansuBroker):
    """tansu that tells clients to connect to the IAM listener in front of it."""

    def __init__(self, workdir: Path, listener_port: int, authentication: bool = False) -> None:
        super().__init__(workdir)
        self.listener_port = listener_port
        self.authentication = authentication

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.listener_port}"

    def command(self) -> list[str]:
        return broker_command(self.binary, self.port, self.listener_port) + (
            ["--authentication"] if self.authentication else []
        )


@pytest.fixture
def msk(clickhouse_server: ClickHouse, cql_server: CqlServer, tmp_path: Path) -> Iterator[tuple[World, IamListener]]:
    listener_port = free_port()
    broker = TansuBehindListener(tmp_path / "tansu", listener_port)
    broker.start()
    listener = IamListener(broker.port, REGION, SESSION_S, port=listener_port)
    world = World(broker, clickhouse_server, cql_server, tmp_path)
    try:
        asyncio.run(create_topic(broker.bootstrap, world.topic))
        yield world, listener
    finally:
        world.stop_all()
        listener.close()
        broker.stop()
        for worker in world.workers:
            print(f"--- worker {worker.index} log tail ---\n{worker.tail(40)}")


def test_iam_workers_store_exactly_while_msk_closes_their_connections(msk: tuple[World, IamListener]) -> None:
    world, listener = msk
    traffic, log = simulate(4000, seed=14)
    worker = world.start_worker(**iam_settings())
    worker.wait_ready()
    sender = produce_in_background(world, traffic, rate=250)  # about 16 s: several sessions end mid-stream
    sender.join(120)
    sent = len(traffic)
    wait_until_complete(world, log, sent)
    result = audit(world, log, sent, scenario="msk-iam", recovery_s=0)
    assert result.ok, result.as_dict()  # nothing lost, nothing twice, no worker restart
    logins = listener.logins
    print(f"logins: {logins.accepted} accepted, {logins.sessions_ended} sessions ended mid-stream")
    assert logins.refused == [] and logins.closed_unauthenticated == 0
    assert logins.sessions_ended >= 4, logins  # MSK-style disconnects happened while it worked
    assert logins.accepted > logins.sessions_ended  # every cut connection came back with a new login
    assert len(logins.tokens) == 1  # one signed token served every client and reconnect (it lives 15 min)


def _worker_exits(settings: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MILLSTREAM_", "AWS_"))}
    env.update(settings, MILLSTREAM_DATA_DIR=str(tmp_path / "data"), MILLSTREAM_WEB_PORT=str(free_port()))
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "worker"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=90
    )


def test_a_refused_iam_login_stops_the_worker_with_one_line(msk: tuple[World, IamListener], tmp_path: Path) -> None:
    world, listener = msk
    # Signed for the wrong region: the listener refuses it, as MSK would.
    settings = {**iam_settings("us-east-1"), "MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS": world.broker.bootstrap}
    result = _worker_exits(settings, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr
    assert "refused the AWS_MSK_IAM login" in result.stderr and "us-east-1" in result.stderr
    assert listener.logins.accepted == 0 and len(listener.logins.refused) == 1


def test_tansu_refusing_the_login_stops_the_worker_with_one_line(tmp_path: Path) -> None:
    """The real broker's own refusal (tansu --authentication fails every OAUTHBEARER login)."""
    port = free_port()
    broker = TansuBehindListener(tmp_path / "tansu", port, authentication=True)
    broker.listener_port = broker.port  # no listener: the worker talks to tansu itself
    broker.start()
    try:
        result = _worker_exits({**iam_settings(), "MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap}, tmp_path)
    finally:
        broker.stop()
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1, result.stderr
    assert "refused the AWS_MSK_IAM login: SaslAuthenticationFailed" in result.stderr


def test_no_aws_credentials_stop_the_worker_with_one_line(tmp_path: Path) -> None:
    settings = {**iam_settings(), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    settings["AWS_SHARED_CREDENTIALS_FILE"] = settings["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    result = _worker_exits(settings, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "millstream: MILLSTREAM_KAFKA__SASL_MECHANISM=AWS_MSK_IAM: no AWS credentials found (environment, "
        "profile, web identity / IRSA, pod identity or instance role)"
    )
