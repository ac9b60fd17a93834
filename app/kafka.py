"""Kafka connection options from the validated settings, for faust and for plain aiokafka
clients (the simulator, the offset gate's probe). No faust import: the CLI stays quick."""

from __future__ import annotations

import ssl

from app.settings import KafkaSettings


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
    """aiokafka connection options (bootstrap, TLS, SASL)."""
    options: dict[str, object] = {
        "bootstrap_servers": ",".join(kafka.bootstrap_servers),
        "security_protocol": kafka.security_protocol,
    }
    context = ssl_context(kafka)
    if context is not None:
        options["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL"):
        assert kafka.sasl_password is not None  # enforced by KafkaSettings
        options.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=kafka.sasl_password.get_secret_value(),
        )
    return options
