"""millstream settings: one validated, frozen model read from ``MILLSTREAM_*`` variables.

Nested groups use ``__``: ``MILLSTREAM_KAFKA__BOOTSTRAP_SERVERS=b-1:9092,b-2:9092``.
Lists are comma-separated. Durations are seconds. Nothing here reads the environment at
import time; :func:`load_settings` does, once, at start.

A bad value raises :class:`SettingsError` whose message is one line naming the variable; secret
values are never echoed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "MILLSTREAM_"
ENV_NESTED_DELIMITER = "__"


class SettingsError(ValueError):
    """A setting is missing or invalid; ``str()`` is one line naming the variable."""


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Group):
    """Where telemetry comes from and where rejects and alerts go."""

    bootstrap_servers: CsvList = Field(
        default_factory=lambda: ["localhost:9092"], description="Kafka brokers, comma-separated host:port."
    )
    telemetry_topic: str = Field("telemetry", min_length=1, description="Source topic, key = device id.")
    dlq_topic: str = Field("telemetry-dlq", min_length=1, description="Dead-letter topic for rejected input.")
    alerts_topic: str = Field("telemetry-alerts", min_length=1, description="Topic for alerts.")
    consumer_group: str = Field("millstream", min_length=1, description="Consumer group id; also the faust app id.")
    group_instance_id: str | None = Field(
        None,
        description="Static group membership id, unique per worker (the pod name): a restarted worker gets its "
        "partitions back without a rebalance.",
    )
    partitions: int = Field(
        4, ge=1, le=10_000, description="Partitions of the telemetry topic (changelogs must match)."
    )
    replication_factor: int = Field(
        3, ge=1, le=16, description="Replication factor of the topics millstream creates (changelogs, DLQ)."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (MSK: SASL_SSL)."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "AWS_MSK_IAM"] = Field(
        "SCRAM-SHA-512",
        description="SASL mechanism when security_protocol is SASL_*: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (MSK port "
        "9096) or AWS_MSK_IAM (MSK port 9098: IAM credentials from the standard AWS chain, sent as OAUTHBEARER "
        "tokens; needs the msk extra).",
    )  # fmt: skip
    sasl_username: str | None = Field(None, description="SASL user name (PLAIN and SCRAM).")
    sasl_password: SecretStr | None = Field(None, description="SASL password (PLAIN and SCRAM; secret).")
    aws_region: str | None = Field(
        None, description="AWS region of the MSK cluster (e.g. eu-west-1); required with AWS_MSK_IAM."
    )
    allow_secrets_without_tls: bool = Field(
        False,
        description="Allow SASL_PLAINTEXT with PLAIN or AWS_MSK_IAM, which send a password or a bearer token "
        "unencrypted; refused unless this is true (SCRAM sends neither).",
    )  # fmt: skip
    ssl_cafile: Path | None = Field(None, description="CA bundle for TLS; system CAs when unset.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client key for mutual TLS.")
    ssl_key_password: SecretStr | None = Field(None, description="Password of the client key (secret).")
    session_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Consumer session timeout; a dead worker is expelled after it."
    )
    request_timeout_s: float = Field(
        40.0, gt=0, le=3600,
        description="Broker request timeout, also for each produce request (unanswered, it is sent again on "
        "a new connection); must be >= session_timeout_s.",
    )  # fmt: skip
    fetch_max_wait_ms: int = Field(
        500, ge=0, le=30_000,
        description="Longest the broker may hold a fetch waiting for data (faust alone would fix 1500).",
    )  # fmt: skip
    producer_linger_ms: int = Field(
        5, ge=0, le=10_000,
        description="How long the producer waits to fill a request with changelog and DLQ records (0: send at once).",
    )  # fmt: skip
    producer_max_batch_size: int = Field(
        16384, ge=1, description="Producer batch size in bytes (tests against tansu use 1)."
    )

    _split = field_validator("bootstrap_servers", mode="before")(_split_csv)

    @field_validator("aws_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if not value:
            return None  # set but empty: as unset
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d{1,2}", value):
            raise ValueError(f"{value[:40]!r} is not an AWS region name such as eu-west-1")
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _hosts_have_ports(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one host:port")
        for server in value:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> KafkaSettings:
        if self.session_timeout_s > self.request_timeout_s:
            # faust/aiokafka misbehave when a request can outlive the session (DESIGN.md §4).
            raise ValueError(
                f"{ENV_PREFIX}KAFKA__SESSION_TIMEOUT_S ({self.session_timeout_s:g}) must be <= "
                f"{ENV_PREFIX}KAFKA__REQUEST_TIMEOUT_S ({self.request_timeout_s:g})"
            )
        if not self.security_protocol.startswith("SASL"):
            return self
        if self.sasl_mechanism == "AWS_MSK_IAM":
            if not self.aws_region:
                raise ValueError(
                    f"{ENV_PREFIX}KAFKA__AWS_REGION is required with {ENV_PREFIX}KAFKA__SASL_MECHANISM=AWS_MSK_IAM"
                )
        elif not (self.sasl_username and self.sasl_password):
            raise ValueError(
                f"{ENV_PREFIX}KAFKA__SASL_USERNAME and {ENV_PREFIX}KAFKA__SASL_PASSWORD are required "
                f"with {ENV_PREFIX}KAFKA__SECURITY_PROTOCOL={self.security_protocol}"
            )
        if (
            self.security_protocol == "SASL_PLAINTEXT"
            and self.sasl_mechanism in ("PLAIN", "AWS_MSK_IAM")
            and not self.allow_secrets_without_tls
        ):
            raise ValueError(
                f"{ENV_PREFIX}KAFKA__SECURITY_PROTOCOL=SASL_PLAINTEXT would send the {self.sasl_mechanism} "
                f"{'password' if self.sasl_mechanism == 'PLAIN' else 'token'} unencrypted: use SASL_SSL, or set "
                f"{ENV_PREFIX}KAFKA__ALLOW_SECRETS_WITHOUT_TLS=true"
            )
        return self


class ClickHouseSettings(_Group):
    """Raw rows go to ClickHouse ``telemetry_raw``."""

    url: str = Field(
        "clickhouse://default@localhost:9000/millstream",
        description="clickhouse://user@host:port/database (native protocol; clickhouses:// for TLS) "
        "or chdb:///path for the embedded engine.",
    )
    password: SecretStr = Field(SecretStr(""), description="ClickHouse password (secret).")
    tls_cafile: FilePath | None = Field(
        None, description="CA bundle that signed the server's certificate, for clickhouses://; system CAs when unset."
    )
    tls_verify: bool = Field(
        True,
        description="For clickhouses://, check the server's certificate and that it names the URL's host; false "
        "encrypts without knowing who answers (a test server with a self-signed certificate only).",
    )  # fmt: skip
    table: str = Field("telemetry_raw", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Raw rows table.")
    batch_rows: int = Field(100_000, ge=1, le=10_000_000, description="Rows per insert at most.")
    flush_interval_s: float = Field(
        0.5, gt=0, le=600,
        description="A batch goes at most this long after its first message arrived, full or not: bounds the "
        "latency below the full rate (p99 about 1 s at half of it); raise it for fewer, larger inserts.",
    )  # fmt: skip
    connect_timeout_s: float = Field(10.0, gt=0, le=600, description="Connect timeout.")
    query_timeout_s: float = Field(30.0, gt=0, le=3600, description="Timeout of one insert or query.")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("clickhouse", "clickhouses", "chdb"):
            raise ValueError("scheme must be clickhouse://, clickhouses:// or chdb://")
        if parts.password:
            raise ValueError("put the password in MILLSTREAM_CLICKHOUSE__PASSWORD, not in the URL")
        if parts.scheme != "chdb":
            if not parts.hostname:
                raise ValueError("needs a host")
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError as exc:
                raise ValueError("bad port") from exc
            if not parts.path.strip("/"):
                raise ValueError("needs a database: clickhouse://user@host:9000/DATABASE")
        elif not parts.path:
            raise ValueError("needs a directory: chdb:///var/lib/millstream/chdb")
        return value

    @model_validator(mode="after")
    def _tls_needs_clickhouses(self) -> ClickHouseSettings:
        if self.tls_cafile is not None and urlsplit(self.url).scheme != "clickhouses":
            raise ValueError(
                f"{ENV_PREFIX}CLICKHOUSE__TLS_CAFILE is set but {ENV_PREFIX}CLICKHOUSE__URL is not clickhouses:// "
                "(the secure native port, 9440)"
            )
        return self

    @property
    def database(self) -> str:
        return urlsplit(self.url).path.strip("/") if not self.embedded else "millstream"

    @property
    def embedded(self) -> bool:
        return urlsplit(self.url).scheme == "chdb"


# Write versions are generation << 40 | offset and must stay below 2**63 (a CQL bigint).
MAX_WRITE_GENERATION = (1 << 23) - 2


class ScyllaSettings(_Group):
    """Windowed aggregates and latest values go to ScyllaDB."""

    enabled: bool = Field(True, description="Write aggregates to ScyllaDB; off serves them from tables only.")
    contact_points: CsvList = Field(
        default_factory=lambda: ["localhost"], description="Scylla nodes, comma-separated hosts."
    )
    port: int = Field(9042, ge=1, le=65535, description="CQL native protocol port.")
    keyspace: str = Field("millstream", pattern=r"^[a-z_][a-z0-9_]{0,47}$", description="Keyspace.")
    replication_class: Literal["NetworkTopologyStrategy", "SimpleStrategy"] = Field(
        "NetworkTopologyStrategy", description="Keyspace replication strategy."
    )
    replication_factor: int = Field(3, ge=1, le=16, description="Replicas per data center.")
    local_dc: str | None = Field(None, description="Local data center for DC-aware routing.")
    consistency: Literal["ONE", "TWO", "QUORUM", "LOCAL_ONE", "LOCAL_QUORUM", "ALL"] = Field(
        "LOCAL_QUORUM", description="Write consistency level."
    )
    concurrency: int = Field(64, ge=1, le=4096, description="In-flight requests per worker at most.")
    batch_rows: int = Field(
        50, ge=1, le=1000,
        description="Upserts per UNLOGGED BATCH request at most (1: one request per row). A request costs the "
        "worker far more CPU than a row in it (docs/performance.md); 50 window rows are about 8 KB, well below "
        "ScyllaDB's batch_size_warn_threshold_in_kb (128).",
    )  # fmt: skip
    batch_across_partitions: bool = Field(
        True,
        description="Let an UNLOGGED BATCH hold rows of several partitions (packed in partition order). Off: a "
        "batch holds one partition's rows only, for clusters that warn on or forbid multi-partition batches; then "
        "most upserts with many devices are requests of their own.",
    )  # fmt: skip
    request_timeout_s: float = Field(10.0, gt=0, le=600, description="Timeout of one request.")
    username: str | None = Field(None, description="User name (PasswordAuthenticator); needs the password.")
    password: SecretStr | None = Field(None, description="Password (secret); needs the user name.")
    tls: bool = Field(
        False, description="Connect with TLS (the nodes' client_encryption_options; their TLS port is often 9142)."
    )
    tls_cafile: FilePath | None = Field(
        None, description="CA bundle that signed the nodes' certificates; system CAs when unset."
    )
    tls_verify_hostname: bool = Field(
        True,
        description="Check that a node's certificate names the address the driver reaches it at (the contact point "
        "or the address in system.peers); false checks the CA only, for certificates without those names.",
    )  # fmt: skip
    tls_certfile: FilePath | None = Field(None, description="Client certificate, if the nodes require_client_auth.")
    tls_keyfile: FilePath | None = Field(None, description="Key of the client certificate.")
    write_generation: int = Field(
        0, ge=0, le=MAX_WRITE_GENERATION,
        description="Generation of every write version (generation times 2^40 plus the source offset): raise it "
        "by one when moving to a new telemetry topic or Kafka cluster, where offsets start again (docs/migrations.md).",
    )  # fmt: skip
    shadow_check_every: int = Field(
        50, ge=0, le=1_000_000,
        description="Read back the write time of one upserted row every N batches; a newer one than the write's "
        "version counts in millstream_scylla_shadowed_writes_total. 0 turns the check off.",
    )  # fmt: skip

    _split = field_validator("contact_points", mode="before")(_split_csv)

    @field_validator("contact_points")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one host")
        return value

    @model_validator(mode="after")
    def _login_and_tls(self) -> ScyllaSettings:
        _both_or_neither("SCYLLA", self.username, self.password)
        if not self.tls:
            for name in ("tls_cafile", "tls_certfile", "tls_keyfile"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{ENV_PREFIX}SCYLLA__{name.upper()} is set but {ENV_PREFIX}SCYLLA__TLS is false")
        return self


def _both_or_neither(group: str, username: str | None, password: SecretStr | None) -> None:
    """A user name without a password (or the other way round) is a mistake: the driver would
    silently connect without authentication."""
    if bool(username) != bool(password and password.get_secret_value()):
        given, missing = ("USERNAME", "PASSWORD") if username else ("PASSWORD", "USERNAME")
        raise ValueError(f"{ENV_PREFIX}{group}__{missing} is required with {ENV_PREFIX}{group}__{given}")


class WindowSettings(_Group):
    """Event-time tumbling windows of the aggregates."""

    sizes_s: Annotated[list[PositiveInt], NoDecode] = Field(
        default_factory=lambda: [60, 3600], description="Window sizes in seconds, comma-separated."
    )
    grace_s: float = Field(60.0, ge=0, le=86_400, description="How late a reading may be and still count.")
    dedup_s: float = Field(
        300.0, ge=0, le=86_400,
        description="A reading re-sent under a new offset within this much event time of the device's newest is "
        "applied to windows once (0: off).",
    )  # fmt: skip
    retention_windows: int = Field(3, ge=1, le=1000, description="How many closed windows of each size a table keeps.")

    _split = field_validator("sizes_s", mode="before")(_split_csv)

    @field_validator("sizes_s")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one size")
        if len(set(value)) != len(value):
            raise ValueError("sizes repeat")
        return sorted(value)


class LimitSettings(_Group):
    """What counts as bad input (rejected to the DLQ with a reason)."""

    max_message_bytes: int = Field(1_048_576, ge=64, description="Larger messages are rejected.")
    max_readings_per_message: int = Field(1000, ge=1, description="Larger batches are rejected.")
    max_device_id_length: int = Field(128, ge=1, le=4096, description="Longer device ids are rejected.")
    max_future_skew_s: float = Field(300.0, ge=0, description="Readings further in the future are rejected.")
    max_metrics_per_reading: int = Field(
        500, ge=1, le=100_000, description="Readings with more metrics are rejected (too_many_metrics)."
    )
    max_state_bytes: int = Field(
        512 * 1024, ge=4096, le=64 * 1024 * 1024,
        description="A message that would grow its device's window state past this is rejected (state_too_large); "
        "keep it below the changelog topic's max.message.bytes.",
    )  # fmt: skip
    dlq_max_consecutive: int = Field(
        10_000, ge=1, description="This many rejects in a row crash the worker (bad upstream deploy)."
    )


class PipelineSettings(_Group):
    """How the ingest agent batches and how long it retries a failing sink."""

    batch_messages: int = Field(
        5000,
        ge=1,
        le=1_000_000,
        description="Messages per batch at most (flushed at least every MILLSTREAM_CLICKHOUSE__FLUSH_INTERVAL_S).",
    )
    batch_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3,
        description="Message bytes per batch at most (a batch goes when it has batch_messages or this many bytes); "
        "bounds memory for many-reading messages.",
    )  # fmt: skip
    buffer_messages: int = Field(
        20_000, ge=1, le=10_000_000,
        description="Messages read ahead while a batch is written (faust's stream buffer); memory is about this "
        "times the message size.",
    )  # fmt: skip
    retry_budget_s: float = Field(
        300.0, gt=0, le=86_400, description="Retry a failing sink this long, then crash the worker."
    )
    unready_after_s: float = Field(
        30.0, gt=0, le=86_400, description="/readyz fails once a sink has been failing this long."
    )


class AlertSettings(_Group):
    """Threshold alerts on closed windows (agents/alerts.py), to MILLSTREAM_KAFKA__ALERTS_TOPIC and
    ScyllaDB ``alerts_by_device``."""

    rules_file: FilePath | None = Field(
        None,
        description="YAML file of threshold rules (README, Alerts); checked at start, a bad rule stops it. "
        "Unset: no alerts.",
    )
    reload_interval_s: float = Field(
        10.0, ge=0, le=3600,
        description="How often the rules file is checked for a change; a changed file that parses applies "
        "from the next batch, a bad one is logged and the rules in force stay. 0: never reloaded.",
    )  # fmt: skip


class RegistrySettings(_Group):
    """A Confluent-compatible schema registry, for schema-registry framed payloads (docs/msk.md)."""

    url: str | None = Field(
        None, pattern=r"^https?://[^/\s]+(/[^\s]*)?$",
        description="Registry base URL (https://registry:8081). Unset: framed payloads go to the DLQ as "
        "unknown_schema; plain JSON is read either way.",
    )  # fmt: skip
    username: str | None = Field(
        None, description="Basic-auth user (Confluent Cloud: the API key); needs the password."
    )
    password: SecretStr | None = Field(None, description="Basic-auth password (secret); needs the user.")
    tls_cafile: FilePath | None = Field(None, description="CA bundle for an https registry; system CAs when unset.")
    timeout_s: float = Field(10.0, gt=0, le=600, description="Timeout of one registry request.")
    retry_max_s: float = Field(
        30.0, gt=0, le=3600,
        description="Longest wait between attempts while the registry is unreachable; consumption waits meanwhile "
        "(a message is never rejected because the registry is down).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _login(self) -> RegistrySettings:
        _both_or_neither("REGISTRY", self.username, self.password)
        return self


_MQTT_URL = r"^mqtts?://[^/:@\s]+(:\d{1,5})?/?$"


class ApiSettings(_Group):
    """``millstream api``: the lookup API answered from ScyllaDB by a process of its own, apart from
    the workers' ingestion (docs/api.md)."""

    web_port: int = Field(
        6068, ge=1, le=65535, description="Port of millstream api's /devices/..., /metrics, /healthz, /readyz."
    )


class BridgeSettings(_Group):
    """``millstream bridge``: MQTT to Kafka, each message acknowledged to MQTT only once Kafka has
    it (docs/mqtt.md)."""

    mqtt_url: str = Field(
        "mqtt://localhost:1883", pattern=_MQTT_URL, description="MQTT broker: mqtt://host:port, or mqtts:// for TLS."
    )
    routes: CsvList = Field(
        default_factory=lambda: ["devices/+/telemetry"],
        description="MQTT topic filters to forward, comma-separated, each FILTER or FILTER=KAFKA_TOPIC (no Kafka "
        "topic: MILLSTREAM_KAFKA__TELEMETRY_TOPIC). Subscribed with QoS 1.",
    )  # fmt: skip
    key_from: str = Field(
        "topic:2",
        description="Where the Kafka key (the device id) comes from: topic:N, the Nth level of the MQTT topic "
        "(1-based, like an IoT rule's topic(N)), or payload:FIELD, a top-level field of the JSON payload.",
    )  # fmt: skip
    client_id: str = Field(
        "millstream-bridge", min_length=1, max_length=128,
        description="MQTT client id of the persistent session: fixed per bridge process (the pod name), or the "
        "broker drops what it queued for the old one.",
    )  # fmt: skip
    shared_group: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Subscribe as $share/GROUP/FILTER so several bridges share the messages (each its own "
        "client_id).",
    )  # fmt: skip
    username: str | None = Field(None, description="MQTT user name.")
    password: SecretStr | None = Field(None, description="MQTT password (secret).")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts://; system CAs when unset.")
    certfile: Path | None = Field(None, description="Client certificate for mutual TLS to MQTT.")
    keyfile: Path | None = Field(None, description="Client key for mutual TLS to MQTT.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive.")
    max_pending: int = Field(
        10_000, ge=1, le=1_000_000,
        description="Messages received and not yet acknowledged at most; past it the bridge stops reading from "
        "MQTT until Kafka catches up (the broker's own in-flight limit usually binds first).",
    )  # fmt: skip
    topic_header: bool = Field(True, description="Stamp each Kafka record with its MQTT topic (header mqtt.topic).")
    idempotent: bool = Field(
        True,
        description="Idempotent producer: a produce request retried after a lost answer is not written twice "
        "(needs InitProducerId; MSK and Kafka have it, the tansu test broker does not).",
    )  # fmt: skip
    web_port: int = Field(6067, ge=1, le=65535, description="Port of the bridge's /metrics, /healthz, /readyz.")

    @field_validator("key_from")
    @classmethod
    def _key_rule(cls, value: str) -> str:
        if not re.fullmatch(r"topic:[1-9][0-9]{0,2}|payload:[A-Za-z_][A-Za-z0-9_]{0,63}", value):
            raise ValueError(f"{value!r} is neither topic:N (N from 1) nor payload:FIELD")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> BridgeSettings:
        for route in self.routes:
            mqtt_filter, _, kafka_topic = route.partition("=")
            if not mqtt_filter.strip() or ("=" in route and not kafka_topic.strip()):
                raise ValueError(f"{ENV_PREFIX}BRIDGE__ROUTES: {route!r} is not FILTER or FILTER=KAFKA_TOPIC")
            levels = mqtt_filter.strip().split("/")
            if any(("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+")
                   for i, level in enumerate(levels)):  # fmt: skip
                raise ValueError(f"{ENV_PREFIX}BRIDGE__ROUTES: {mqtt_filter!r} is not a valid MQTT topic filter")
        if not self.routes:
            raise ValueError(f"{ENV_PREFIX}BRIDGE__ROUTES: needs at least one topic filter")
        if self.username and self.password is None:
            raise ValueError(
                f"{ENV_PREFIX}BRIDGE__USERNAME is set without {ENV_PREFIX}BRIDGE__PASSWORD (no silent anonymous login)"
            )
        return self

    _split = field_validator("routes", mode="before")(_split_csv)


class Settings(BaseSettings):
    """All of millstream's settings. Read with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    clickhouse: ClickHouseSettings = Field(default_factory=ClickHouseSettings)
    scylla: ScyllaSettings = Field(default_factory=ScyllaSettings)
    windows: WindowSettings = Field(default_factory=WindowSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    bridge: BridgeSettings = Field(default_factory=BridgeSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    store: Literal["rocksdb", "memory"] = Field(
        "rocksdb", description="Table store: rocksdb (production) or memory (tests)."
    )
    data_dir: Path = Field(Path("/var/lib/millstream"), description="RocksDB tables and local state.")
    rocksdb_block_cache_mb: int = Field(
        64, ge=8, le=65_536, description="RocksDB block cache per table partition, MiB."
    )
    web_host: str = Field(
        "0.0.0.0",
        description="Address the web server (/metrics, /healthz, /readyz, /aggregates) listens on: 0.0.0.0 every "
        "interface (pods), 127.0.0.1 this machine only.",
    )
    web_port: int = Field(6066, ge=1, le=65535, description="Port of /metrics, /healthz, /readyz.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")


def _env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(part).upper() for part in loc if isinstance(part, str))


def _known_variables() -> set[str]:
    known: set[str] = set()
    for name, field in Settings.model_fields.items():
        known.add(ENV_PREFIX + name.upper())
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            known.update(ENV_PREFIX + name.upper() + ENV_NESTED_DELIMITER + child.upper() for child in sub.model_fields)
    return known


def load_settings() -> Settings:
    """Read and validate settings from ``MILLSTREAM_*`` environment variables.

    Raises :class:`SettingsError` with one line naming the offending variable. Unknown
    ``MILLSTREAM_*`` names are errors too: a typo must not silently fall back to a default.
    """
    known = _known_variables()
    unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if unknown:
        raise SettingsError(f"{unknown[0]}: unknown setting (`millstream settings --doc` lists them all)")
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        if message.startswith(ENV_PREFIX):  # a cross-field rule names its variables itself
            raise SettingsError(message) from None
        raise SettingsError(f"{_env_name(error['loc'])}: {message}") from None


def settings_doc() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, in declaration order."""
    rows: list[tuple[str, str, str]] = []

    def default_text(field: Any) -> str:
        value = field.get_default(call_default_factory=True)
        if isinstance(value, list):
            return ",".join(str(item) for item in value)
        if isinstance(value, SecretStr):
            return "(empty)" if not value.get_secret_value() else "(set)"
        return "(unset)" if value is None else str(value)

    for name, field in Settings.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for child, child_field in sub.model_fields.items():
                env = ENV_PREFIX + name.upper() + ENV_NESTED_DELIMITER + child.upper()
                rows.append((env, default_text(child_field), child_field.description or ""))
        else:
            rows.append((ENV_PREFIX + name.upper(), default_text(field), field.description or ""))
    return rows


def settings_markdown() -> str:
    """The settings table of docs/settings.md, generated so it cannot drift from the model."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{env}` | `{default}` | {text} |" for env, default, text in settings_doc()]
    return "\n".join(lines) + "\n"
