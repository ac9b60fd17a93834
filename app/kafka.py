"""Kafka connection options from the validated settings, for faust and for plain aiokafka
clients (the simulator, the offset gate's probe). No faust import: the CLI stays quick."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from app.settings import KafkaSettings

_providers: dict[str, Any] = {}


def iam_token_provider(kafka: KafkaSettings) -> Any:
    """The process's one MSK IAM token provider for the configured region (app/msk.py)."""
    from app.msk import MskIamTokenProvider, aws_signer  # aiokafka and botocore: only when IAM is used

    assert kafka.aws_region is not None  # enforced by KafkaSettings
    if kafka.aws_region not in _providers:
        _providers[kafka.aws_region] = MskIamTokenProvider(aws_signer(kafka.aws_region))
    return _providers[kafka.aws_region]


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL (system CAs unless a CA file is set), else None."""
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
    if kafka.ssl_certfile:
        key_password = kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else None
        context.load_cert_chain(
            str(kafka.ssl_certfile), str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None, password=key_password
        )
    return context


def kafka_client_options(kafka: KafkaSettings) -> dict[str, object]:
    """aiokafka connection options (bootstrap, TLS, SASL: PLAIN, SCRAM or MSK IAM as OAUTHBEARER)."""
    options: dict[str, object] = {
        "bootstrap_servers": ",".join(kafka.bootstrap_servers),
        "security_protocol": kafka.security_protocol,
    }
    context = ssl_context(kafka)
    if context is not None:
        options["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL") and kafka.sasl_mechanism == "AWS_MSK_IAM":
        options.update(sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=iam_token_provider(kafka))
    elif kafka.security_protocol.startswith("SASL"):
        assert kafka.sasl_password is not None  # enforced by KafkaSettings
        options.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=kafka.sasl_password.get_secret_value(),
        )
    return options


async def check_login(kafka: KafkaSettings, timeout_s: float = 20.0) -> str | None:
    """Connect and log in to a bootstrap broker the way every client of the worker will.

    One line when the login or the TLS handshake fails, or MSK IAM cannot sign a token: a setting
    is wrong, and retrying it forever (what the clients would do) helps nobody. None when a broker
    took the login, and when none answered at all: the clients wait for Kafka as they always do.
    """
    if kafka.security_protocol == "PLAINTEXT":
        return None
    from aiokafka import errors
    from aiokafka.conn import create_conn

    from app.msk import MskIamUnavailable

    options: dict[str, Any] = kafka_client_options(kafka)
    del options["bootstrap_servers"]
    if "sasl_oauth_token_provider" in options:  # sign a token first: no credentials need no broker to tell
        try:
            await asyncio.get_running_loop().run_in_executor(None, options["sasl_oauth_token_provider"].current)
        except MskIamUnavailable as exc:
            return f"MILLSTREAM_KAFKA__SASL_MECHANISM=AWS_MSK_IAM: {exc}"
    refused = (
        errors.SaslAuthenticationFailed, errors.UnsupportedSaslMechanismError, errors.IllegalSaslStateError,
        errors.AuthenticationFailedError, errors.AuthenticationMethodNotSupported,
    )  # fmt: skip
    how = kafka.sasl_mechanism if kafka.security_protocol.startswith("SASL") else "TLS"
    for server in kafka.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            conn = await asyncio.wait_for(create_conn(host, int(port), **options), timeout_s)
        except MskIamUnavailable as exc:
            return f"MILLSTREAM_KAFKA__SASL_MECHANISM=AWS_MSK_IAM: {exc}"
        except refused as exc:
            return f"Kafka {server} refused the {how} login: {type(exc).__name__}: {exc}"
        except ssl.SSLError as exc:
            return f"TLS with Kafka {server} failed (MILLSTREAM_KAFKA__SSL_*): {exc}"
        except (TimeoutError, OSError, errors.KafkaError):
            continue  # not up yet, or not reachable from here: the clients will wait and retry
        except KeyError:  # aiokafka's SCRAM, given a server-final message with e= instead of v=
            return f"Kafka {server} refused the {how} login (its last SCRAM message is an error): user or password?"
        conn.close()
        return None
    return None
