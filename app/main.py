"""The faust App factory. Nothing here reads the environment; settings are passed in."""

from __future__ import annotations

from typing import Any

import faust

from app.kafka import ssl_context
from app.settings import KafkaSettings, Settings


def broker_credentials(kafka: KafkaSettings) -> Any:
    """faust credentials for the configured security protocol (None for PLAINTEXT)."""
    if kafka.security_protocol == "PLAINTEXT":
        return None
    context = ssl_context(kafka)
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    assert kafka.sasl_password is not None  # enforced by KafkaSettings
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value(),
        mechanism=kafka.sasl_mechanism,
        ssl_context=context,
    )


def table_options(settings: Settings) -> dict[str, Any]:
    """RocksDB options for every table: faust's default block cache is 2 GiB per partition DB."""
    cache = settings.rocksdb_block_cache_mb * 1024 * 1024
    return {"block_cache_size": cache, "block_cache_compressed_size": cache // 4, "write_buffer_size": cache // 2}


def create_app(settings: Settings) -> faust.App:
    """Build the faust App from validated settings."""
    kafka = settings.kafka
    app = faust.App(
        kafka.consumer_group,
        broker=[f"kafka://{server}" for server in kafka.bootstrap_servers],
        broker_credentials=broker_credentials(kafka),
        store="rocksdb://" if settings.store == "rocksdb" else "memory://",
        datadir=str(settings.data_dir),
        autodiscover=False,
        # millstream encodes and decodes its own bytes (orjson).
        key_serializer="raw",
        value_serializer="raw",
        # at-least-once plus offset-idempotent aggregates (DESIGN.md §3.3); the test broker
        # cannot run Kafka transactions, and exactness does not need them.
        processing_guarantee="at_least_once",
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        consumer_group_instance_id=kafka.group_instance_id,
        broker_session_timeout=kafka.session_timeout_s,
        broker_request_timeout=kafka.request_timeout_s,
        broker_heartbeat_interval=min(3.0, kafka.session_timeout_s / 3),
        producer_max_batch_size=kafka.producer_max_batch_size,
        web_host=settings.web_host,
        web_port=settings.web_port,
        table_cleanup_interval=30.0,
    )
    _set_fetch_max_wait(kafka.fetch_max_wait_ms)
    app.millstream_settings = settings  # type: ignore[attr-defined]
    _setup_metrics(app)
    from agents.ingest import register

    register(app, settings)
    return app


def _set_fetch_max_wait(milliseconds: int) -> None:
    """faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no way to change
    it. A broker that holds every fetch that long when no data is waiting (tansu does; Kafka
    answers as soon as data arrives) delays each record by up to that much; set ours."""
    from faust.transport.drivers import aiokafka as driver

    thread_class: Any = driver.AIOKafkaConsumerThread
    original = getattr(thread_class, "_millstream_original_create", thread_class._create_worker_consumer)

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = milliseconds  # read by consumer.start() for its fetcher
        return consumer

    thread_class._millstream_original_create = original
    thread_class._create_worker_consumer = create_worker_consumer


def _setup_metrics(app: faust.App) -> None:
    """/metrics on the web port: millstream's metrics and faust's own sensor, one registry."""
    from faust.sensors.prometheus import setup_prometheus_sensors

    try:
        setup_prometheus_sensors(app, pattern="/metrics", name_prefix="faust")
    except ValueError:
        # The faust series are registered once per process (a second App in tests): serve
        # /metrics from the registry as it is.
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        @app.page("/metrics")
        async def metrics_page(web: Any, request: Any) -> Any:
            return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST)
