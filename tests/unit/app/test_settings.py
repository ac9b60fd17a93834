"""Settings: defaults, parsing, and one clear line naming the variable for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import SettingsError, load_settings, settings_doc


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("MILLSTREAM_"):
            monkeypatch.delenv(key)


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == ["localhost:9092"]
    assert settings.windows.sizes_s == [60, 3600]
    assert settings.clickhouse.batch_rows == 100_000
    assert settings.clickhouse.database == "millstream"
    assert settings.store == "rocksdb"


def test_nested_lists_and_numbers_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS", "b-1:9092, b-2:9092")
    monkeypatch.setenv("MILLSTREAM_WINDOWS__SIZES_S", "3600,60,300")
    monkeypatch.setenv("MILLSTREAM_SCYLLA__CONTACT_POINTS", "10.0.0.1,10.0.0.2")
    monkeypatch.setenv("MILLSTREAM_CLICKHOUSE__URL", "clickhouse://ingest@ch:9000/factory")
    monkeypatch.setenv("MILLSTREAM_STORE", "memory")
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == ["b-1:9092", "b-2:9092"]
    assert settings.windows.sizes_s == [60, 300, 3600]
    assert settings.scylla.contact_points == ["10.0.0.1", "10.0.0.2"]
    assert settings.clickhouse.database == "factory"
    assert settings.store == "memory"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "MILLSTREAM_KAFKA__PARTITIONS",
            "0",
            "MILLSTREAM_KAFKA__PARTITIONS: Input should be greater than or equal to 1",
        ),
        ("MILLSTREAM_KAFKA__PARTITIONS", "four", "MILLSTREAM_KAFKA__PARTITIONS: Input should be a valid integer"),
        (
            "MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS",
            "broker",
            "MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS: 'broker' is not host:port",
        ),
        ("MILLSTREAM_KAFKA__SECURITY_PROTOCOL", "TLS", "MILLSTREAM_KAFKA__SECURITY_PROTOCOL: Input should be"),
        ("MILLSTREAM_CLICKHOUSE__URL", "http://ch:8123", "MILLSTREAM_CLICKHOUSE__URL: scheme must be"),
        ("MILLSTREAM_CLICKHOUSE__URL", "clickhouse://ch:9000", "MILLSTREAM_CLICKHOUSE__URL: needs a database"),
        ("MILLSTREAM_CLICKHOUSE__BATCH_ROWS", "-5", "MILLSTREAM_CLICKHOUSE__BATCH_ROWS: Input should be greater than"),
        ("MILLSTREAM_SCYLLA__KEYSPACE", "Bad-Name", "MILLSTREAM_SCYLLA__KEYSPACE: String should match pattern"),
        ("MILLSTREAM_SCYLLA__CONSISTENCY", "SOME", "MILLSTREAM_SCYLLA__CONSISTENCY: Input should be"),
        ("MILLSTREAM_WINDOWS__SIZES_S", "60,60", "MILLSTREAM_WINDOWS__SIZES_S: sizes repeat"),
        ("MILLSTREAM_WINDOWS__SIZES_S", "60,-1", "MILLSTREAM_WINDOWS__SIZES_S: Input should be greater than 0"),
        ("MILLSTREAM_WEB_PORT", "70000", "MILLSTREAM_WEB_PORT: Input should be less than or equal to 65535"),
        ("MILLSTREAM_STORE", "redis", "MILLSTREAM_STORE: Input should be 'rocksdb' or 'memory'"),
        ("MILLSTREAM_KAFKA__BOOTSTRAP", "x:1", "MILLSTREAM_KAFKA__BOOTSTRAP: unknown setting"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_cross_field_rule_names_both_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MILLSTREAM_KAFKA__SESSION_TIMEOUT_S", "60")
    monkeypatch.setenv("MILLSTREAM_KAFKA__REQUEST_TIMEOUT_S", "30")
    with pytest.raises(SettingsError, match=r"^MILLSTREAM_KAFKA__SESSION_TIMEOUT_S \(60\) must be <= "
                       r"MILLSTREAM_KAFKA__REQUEST_TIMEOUT_S \(30\)$"):  # fmt: skip
        load_settings()


def test_secrets_never_appear_in_errors_or_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hunter2-very-secret"
    monkeypatch.setenv("MILLSTREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MILLSTREAM_KAFKA__SASL_USERNAME", "ingest")
    monkeypatch.setenv("MILLSTREAM_KAFKA__SASL_PASSWORD", secret)
    monkeypatch.setenv("MILLSTREAM_CLICKHOUSE__PASSWORD", secret)
    settings = load_settings()
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == secret
    assert secret not in repr(settings)
    assert secret not in settings.model_dump_json()
    # A bad value next to a secret: the error names the variable and shows no value at all.
    monkeypatch.setenv("MILLSTREAM_KAFKA__SASL_USERNAME", "")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert secret not in str(caught.value)
    assert "MILLSTREAM_KAFKA__SASL_USERNAME" in str(caught.value)


def test_every_setting_is_documented() -> None:
    rows = settings_doc()
    assert len(rows) == len({env for env, _, _ in rows})
    assert all(text for _, _, text in rows), [env for env, _, text in rows if not text]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SCYLLA__USERNAME": "millstream"}, "^MILLSTREAM_SCYLLA__PASSWORD is required with MILLSTREAM_SCYLLA__USERN"),
        ({"SCYLLA__PASSWORD": "pw"}, "^MILLSTREAM_SCYLLA__USERNAME is required with MILLSTREAM_SCYLLA__PASSWORD$"),
        ({"SCYLLA__TLS_CAFILE": "{file}"}, "^MILLSTREAM_SCYLLA__TLS_CAFILE is set but MILLSTREAM_SCYLLA__TLS is false"),
        ({"SCYLLA__TLS": "true", "SCYLLA__TLS_CAFILE": "/nonexistent/ca.pem"}, "^MILLSTREAM_SCYLLA__TLS_CAFILE: Path"),
        ({"CLICKHOUSE__TLS_CAFILE": "{file}"}, "^MILLSTREAM_CLICKHOUSE__TLS_CAFILE is set but MILLSTREAM_CLICKHOUSE__"),
    ],
)  # fmt: skip
def test_store_login_and_tls_mistakes_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], message: str
) -> None:
    existing = tmp_path / "ca.pem"
    existing.write_text("not checked here")
    for name, value in env.items():
        monkeypatch.setenv(f"MILLSTREAM_{name}", value.format(file=existing))
    with pytest.raises(SettingsError, match=message):
        load_settings()
