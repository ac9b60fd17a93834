"""The faust App factory and the composition of a worker, in the order data flows through it.

Nothing here reads the environment; settings are passed in. The service packages below import
nothing from this module (a test fails on any import cycle).
"""

from __future__ import annotations

import gc
from typing import Any

import faust

from agents.alerts import AlertPolicy
from agents.ingest import register as register_ingest
from agents.offsets import BrokerProbe, OffsetGate
from agents.pipeline import Pipeline
from agents.state import declare_tables
from agents.windows import WindowPolicy
from app import faust_patches, monitor, web
from app.kafka import iam_token_provider, kafka_client_options, ssl_context
from app.registry import SchemaRegistry
from app.rules import RulesFile, RulesReloader
from app.settings import KafkaSettings, Settings
from models.decode import Decoder
from sinks.alerts import KafkaAlerts
from sinks.base import RetryPolicy
from sinks.clickhouse import raw_writer
from sinks.dead_letters import KafkaDeadLetters
from sinks.scylla import ScyllaAggregateWriter


def broker_credentials(kafka: KafkaSettings) -> Any:
    """faust credentials for the configured security protocol (None for PLAINTEXT)."""
    if kafka.security_protocol == "PLAINTEXT":
        return None
    context = ssl_context(kafka)
    if kafka.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    if kafka.sasl_mechanism == "AWS_MSK_IAM":
        # the consumer, the producers and the admin client all log in with the one token provider
        return faust.OAuthCredentials(oauth_cb=iam_token_provider(kafka), ssl_context=context)
    assert kafka.sasl_password is not None  # enforced by KafkaSettings
    # faust has no SCRAM class: SASLCredentials carries any username/password mechanism
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_password.get_secret_value(),
        mechanism=kafka.sasl_mechanism,
        ssl_context=context,
    )


GC_YOUNG_THRESHOLD = 20_000  # CPython's default is 700 allocations


def collect_garbage_less_often() -> None:
    """Fewer runs of the cyclic garbage collector in the worker, once its start-up is done.

    Every message allocates short-lived containers (rows, tuples, ScyllaDB statements), almost
    none of them in a cycle. With CPython's default first-generation threshold (700) the
    collector ran so often at 20,000 devices that it held 14% of the main thread's samples
    (py-spy --native), each older-generation pass walking everything the worker keeps. So: what
    exists after start-up (modules, faust's objects) is frozen out of collection, and the young
    generation is collected every 20,000 allocations. ``millstream bench``, device sweep, one
    run each way: worker CPU per message at 20,000 devices 438 -> 356 µs, at 200 devices
    114 -> 106 µs, peak RSS within 3%.
    """
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


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
        # A rejected message keeps its original bytes in the DLQ up to the decoder's limit (a
        # larger one, or one the broker refuses, goes truncated: sinks/dead_letters.py).
        producer_max_request_size=max(1_000_000, settings.limits.max_message_bytes + 64 * 1024),
        # faust sends at once by default: each batch's ~one changelog record per device then
        # goes out a request at a time, and its producer buffer (100 records) holds up the
        # conductor until they have. A few ms of linger fill requests (bench: 1.5x the rate).
        producer_linger=kafka.producer_linger_ms / 1000,
        # faust listens on web_bind; web_host is only the address it advertises.
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        # faust's /router and /table pages would serve table contents (device state) to anyone
        # who can reach the port: off. The worker's own pages are in agents/ingest.py.
        web_router_enabled=False,
        web_tables_enabled=False,
        table_cleanup_interval=30.0,
        # No standby replicas. faust 0.15 promotes a standby partition to active without reading
        # its changelog again when the standby's offsets say it is complete, and in the
        # rebalance chaos scenario a promoted partition lacked one device's state (the device's
        # windows restarted from empty after a kill -9; twice in CI).
        # A new owner restores each partition it takes from the changelog: slower, but exact.
        table_standby_replicas=0,
        # Read ahead while a batch is written: with faust's default (4096, below one batch)
        # the fetcher pauses during every write and the worker then idles waiting for data.
        stream_buffer_maxsize=settings.pipeline.buffer_messages,
        # faust's opt-in repair of its Cython stream iterator: take queued events without an
        # await each (see app/faust_patches.py for what millstream changes itself).
        cython_optimizations=True,
    )
    patch_faust(app, settings)
    app.millstream_settings = settings  # type: ignore[attr-defined]
    app.millstream_pipeline = compose(app, settings)  # type: ignore[attr-defined]
    return app


def patch_faust(app: faust.App, settings: Settings) -> None:
    """What millstream changes in faust's behaviour (app/faust_patches.py says why each)."""
    kafka = settings.kafka
    faust_patches.set_fetch_max_wait(kafka.fetch_max_wait_ms)
    faust_patches.configure_producer(kafka.request_timeout_s, lambda app: produced_topics(app, settings))
    faust_patches.install_lean_drain()
    # two batches' changelog records, one per device each at most, plus the DLQ progress
    faust_patches.producer_buffer_holds(2 * settings.pipeline.batch_messages + 100)
    faust_patches.spinner_only_on_a_terminal()
    app.monitor = faust_patches.FaustSensor(metrics=faust_patches.faust_metrics())


def compose(app: faust.App, settings: Settings) -> Pipeline:
    """Topics and tables, the pipeline with its sinks, the agent, its monitoring and pages."""
    kafka, limits, windows = settings.kafka, settings.limits, settings.windows
    source = app.topic(
        kafka.telemetry_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=kafka.partitions,
    )  # fmt: skip
    dlq = app.topic(
        kafka.dlq_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=kafka.partitions, replicas=kafka.replication_factor,
    )  # fmt: skip
    tables = declare_tables(app, settings)
    # Threshold rules on closed windows; their alerts go to the alerts topic (and ScyllaDB).
    rules_file = RulesFile(settings.alerts.rules_file, windows.sizes_s) if settings.alerts.rules_file else None
    rules = rules_file.load() if rules_file is not None else []
    alerts_topic = app.topic(
        kafka.alerts_topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=kafka.partitions, replicas=kafka.replication_factor,
    )  # fmt: skip
    # Schema-registry framed payloads: their schemas are fetched before a batch is decoded.
    registry = SchemaRegistry(settings.registry) if settings.registry.url else None
    pipeline = Pipeline(
        decoder=Decoder.from_limits(limits, registry.book if registry is not None else None),
        schemas=registry,
        # With a rules file, even an empty one: its rules may arrive by a reload (app/rules.py).
        alerts=AlertPolicy(rules, windows.grace_s) if rules_file is not None else None,
        alert_sink=KafkaAlerts(alerts_topic) if rules_file is not None else None,
        windows=WindowPolicy(windows.sizes_s, windows.grace_s, windows.retention_windows, windows.dedup_s),
        state=tables.windows,
        raw_sink=raw_writer(settings.clickhouse),
        aggregate_sink=(
            ScyllaAggregateWriter(settings.scylla, kafka.telemetry_topic) if settings.scylla.enabled else None
        ),
        dead_letters=KafkaDeadLetters(dlq, app.conf.producer_max_request_size),
        retry=RetryPolicy(budget_s=settings.pipeline.retry_budget_s),
        dlq_max_consecutive=limits.dlq_max_consecutive,
        dlq_progress=tables.dlq_progress,
        changelog=tables.acks,
        max_state_bytes=limits.max_state_bytes,
    )  # fmt: skip
    gate = OffsetGate(kafka.telemetry_topic, BrokerProbe(kafka_client_options(kafka)))
    gate.attach(app)  # before faust's fetcher starts (see agents/offsets.py)
    ingest = register_ingest(app, settings, source, pipeline, gate)
    _reload_rules(app, settings, pipeline.alerts, rules_file)
    monitor.register(app, settings, gate)
    web.register(app, ingest, tables.windows.table, settings)
    return pipeline


def _reload_rules(app: faust.App, settings: Settings, policy: AlertPolicy | None, rules_file: RulesFile | None) -> None:
    """Check the rules file every MILLSTREAM_ALERTS__RELOAD_INTERVAL_S (app/rules.py)."""
    interval = settings.alerts.reload_interval_s
    if policy is None or rules_file is None or not interval:
        return
    reloader = RulesReloader(rules_file, policy)

    @app.timer(interval, name="millstream.reload_rules")  # type: ignore[untyped-decorator]
    async def reload_rules() -> None:
        reloader.check()


def produced_topics(app: faust.App, settings: Settings) -> list[str]:
    """Every topic a worker writes to: the table changelogs, the DLQ, the alerts topic if rules are set."""
    topics = [table.changelog_topic.get_topic_name() for table in app.tables.values()] + [settings.kafka.dlq_topic]
    return topics + ([settings.kafka.alerts_topic] if settings.alerts.rules_file else [])
