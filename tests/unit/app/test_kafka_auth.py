"""What reaches aiokafka for each way of logging in to Kafka, and the MSK IAM token provider.

The broker side of these logins cannot run here (tansu has no TLS and no working SASL; DESIGN.md
§5); tests/integration/test_msk_auth.py runs IAM logins against a protocol-level stand-in.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from typing import Any

import pytest
from aiokafka.abc import AbstractTokenProvider
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from app.kafka import kafka_client_options
from app.main import broker_credentials
from app.msk import REFRESH_MARGIN_S, MskIamTokenProvider, aws_signer, decode_token
from app.settings import KafkaSettings, SettingsError, load_settings

AWS = {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}


def kafka(**values: Any) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=["b-1.example:9098"], **values)


def both_views(settings: KafkaSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """What millstream's own aiokafka clients get, and what faust hands its clients."""
    return kafka_client_options(settings), dict(credentials_to_aiokafka_auth(broker_credentials(settings)))


def test_plaintext_passes_no_credentials() -> None:
    own, faust = both_views(kafka())
    assert own["security_protocol"] == "PLAINTEXT" and "ssl_context" not in own and "sasl_mechanism" not in own
    assert broker_credentials(kafka()) is None and faust == {"security_protocol": "PLAINTEXT"}


def test_scram_over_tls_reaches_every_client_with_a_verifying_context() -> None:
    settings = kafka(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="ingest", sasl_password="pw"
    )
    own, faust = both_views(settings)
    for options in (own, faust):
        assert options["security_protocol"] == "SASL_SSL"
        assert options["sasl_mechanism"] == "SCRAM-SHA-512"
        assert options["sasl_plain_username"] == "ingest" and options["sasl_plain_password"] == "pw"
        context = options["ssl_context"]
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_iam_is_oauthbearer_with_one_shared_token_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = kafka(security_protocol="SASL_SSL", sasl_mechanism="AWS_MSK_IAM", aws_region="eu-west-1")
    own, faust = both_views(settings)
    for options in (own, faust):
        assert options["security_protocol"] == "SASL_SSL"
        assert options["sasl_mechanism"] == "OAUTHBEARER"
        assert isinstance(options["sasl_oauth_token_provider"], AbstractTokenProvider)
        assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
        assert "sasl_plain_password" not in options or options["sasl_plain_password"] is None
    # The consumer, the producers, the admin client and the probe: one provider, one cache.
    assert own["sasl_oauth_token_provider"] is faust["sasl_oauth_token_provider"]


def test_a_ca_bundle_setting_is_the_one_trusted(tmp_path: Any) -> None:
    from tests.support.tls import make_ca

    ca = make_ca(tmp_path)
    context = kafka_client_options(kafka(security_protocol="SSL", ssl_cafile=ca.ca_file))["ssl_context"]
    subjects = [dict(item[0] for item in cert["subject"]) for cert in context.get_ca_certs()]
    assert subjects == [{"commonName": "millstream test CA"}]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SASL_MECHANISM": "AWS_MSK_IAM"}, "MILLSTREAM_KAFKA__AWS_REGION is required with"),
        ({"SASL_MECHANISM": "PLAIN", "SASL_USERNAME": "u", "SASL_PASSWORD": "p", "SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
         "would send the PLAIN password unencrypted"),
        ({"SASL_MECHANISM": "AWS_MSK_IAM", "AWS_REGION": "eu-west-1", "SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
         "would send the AWS_MSK_IAM token unencrypted"),
        ({"SASL_MECHANISM": "SCRAM-SHA-512", "SASL_USERNAME": "u"}, "MILLSTREAM_KAFKA__SASL_PASSWORD are required"),
        ({"SASL_MECHANISM": "AWS_MSK_IAM", "AWS_REGION": "Ireland"}, "AWS_REGION: 'Ireland' is not an AWS region"),
        ({"SASL_MECHANISM": "AWS_MSK_IAM", "AWS_REGION": ""}, "MILLSTREAM_KAFKA__AWS_REGION is required with"),
    ],
)  # fmt: skip
def test_bad_login_settings_stop_the_start_with_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("MILLSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    for name, value in env.items():
        monkeypatch.setenv(f"MILLSTREAM_KAFKA__{name}", value)
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings()
    assert "\n" not in str(caught.value)


def test_secrets_without_tls_only_when_asked_and_scram_without(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILLSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("MILLSTREAM_KAFKA__SASL_USERNAME", "u")
    monkeypatch.setenv("MILLSTREAM_KAFKA__SASL_PASSWORD", "p")
    assert load_settings().kafka.sasl_mechanism == "SCRAM-SHA-512"  # no secret on the wire
    monkeypatch.setenv("MILLSTREAM_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("MILLSTREAM_KAFKA__ALLOW_SECRETS_WITHOUT_TLS", "true")
    assert load_settings().kafka.security_protocol == "SASL_PLAINTEXT"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_provider_reuses_a_token_until_shortly_before_it_expires() -> None:
    clock, signed = Clock(), []

    def sign() -> tuple[str, int]:
        signed.append(clock.now)
        return f"token-{len(signed)}", int((clock.now + 900) * 1000)

    provider = MskIamTokenProvider(sign, clock=clock)
    assert asyncio.run(provider.token()) == "token-1"
    clock.now += 900 - REFRESH_MARGIN_S - 1
    assert asyncio.run(provider.token()) == "token-1"  # still fresh: every reconnect reuses it
    clock.now += 2
    assert asyncio.run(provider.token()) == "token-2"  # about to expire: a new one
    assert provider.signed == 2


def test_clients_on_several_loops_and_threads_share_one_signing() -> None:
    """faust's consumer has a thread and an event loop of its own; they all log in at start."""
    calls = []

    def slow_sign() -> tuple[str, int]:
        calls.append(1)
        time.sleep(0.2)
        return "token", int((time.time() + 900) * 1000)

    provider = MskIamTokenProvider(slow_sign)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(asyncio.run(provider.token()))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == ["token"] * 4 and len(calls) == 1


def test_a_real_token_is_a_presigned_connect_url_valid_15_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    before = time.time()
    token, expiry_ms = aws_signer("eu-west-1")()
    fields = decode_token(token)
    assert fields["scheme"] == "https" and fields["host"] == "kafka.eu-west-1.amazonaws.com"
    assert fields["Action"] == "kafka-cluster:Connect"
    assert fields["X-Amz-Credential"].startswith("AKIAIOSFODNN7EXAMPLE/")
    assert fields["X-Amz-Credential"].endswith("/eu-west-1/kafka-cluster/aws4_request")
    assert fields["X-Amz-Expires"] == "900" and len(fields["X-Amz-Signature"]) == 64
    assert before + 890 <= expiry_ms / 1000 <= time.time() + 901
    assert "wJalrXUtnFEMI" not in token  # the secret signs, it never travels
