"""Every Prometheus metric millstream exports, named ``millstream_<noun>_<unit>``.

Served at ``/metrics`` on the worker's web port. Labels stay low-cardinality: no device ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series double the scrape size and nobody graphs them

# Kafka messages taken from the source topic, by outcome (processed, rejected, replayed).
MESSAGES = Counter("millstream_messages_total", "Source messages handled, by outcome", ["outcome"])
# Readings decoded from valid messages (a batched message holds many).
READINGS = Counter("millstream_readings_total", "Readings decoded from valid messages")
# Messages rejected at the decode boundary, by reason code.
REJECTS = Counter("millstream_rejects_total", "Messages rejected to the DLQ, by reason", ["reason"])
# Non-numeric fields beside the metrics of flat messages (strings, flags, objects): not stored.
IGNORED_FIELDS = Counter("millstream_ignored_fields_total", "Non-numeric fields of flat messages, not stored")
# Messages isolated while being applied (internal_error: millstream raised on them; state_too_large).
ISOLATED = Counter(
    "millstream_isolated_messages_total", "Messages dead-lettered because applying them failed", ["reason"]
)
# Messages written to the dead-letter topic.
DLQ_MESSAGES = Counter("millstream_dlq_messages_total", "Messages produced to the dead-letter topic")
# Readings too late for a window size (window end + grace before the device watermark).
LATE_READINGS = Counter("millstream_late_readings_total", "Readings not applied to a window size", ["window_size_s"])
# (metric, event time) pairs re-sent under a new offset and not applied to windows again.
DUPLICATE_READINGS = Counter("millstream_duplicate_readings_total", "Re-sent readings recognised and not counted twice")
# Rows or aggregates per successful sink write.
SINK_BATCH_ROWS = Histogram(
    "millstream_sink_batch_rows", "Rows per successful sink write", ["sink"],
    buckets=(1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000),
)  # fmt: skip
# Wall time of successful sink writes.
SINK_WRITE_SECONDS = Histogram(
    "millstream_sink_write_seconds", "Duration of successful sink writes", ["sink"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip
# Failed sink writes by class: retriable, fatal, exhausted (retry budget spent).
SINK_ERRORS = Counter("millstream_sink_errors_total", "Failed sink writes, by class", ["sink", "kind"])
# Retries of a sink write (same batch, after backoff).
SINK_RETRIES = Counter("millstream_sink_retries_total", "Sink write retries", ["sink"])
# Unix time of the last successful write per sink.
SINK_LAST_SUCCESS = Gauge(
    "millstream_sink_last_success_timestamp_seconds", "Unix time of the last successful write", ["sink"]
)
# Source messages acked after all their writes (commit-after-write).
ACKED = Counter("millstream_acked_messages_total", "Source messages acked after their writes")
# The process's CPU (every thread) from one batch's ack to the next one's: what a batch costs,
# with whatever else the worker did meanwhile (lookup API answers, scrapes, RocksDB). Updated
# with ACKED, so one scrape sees both at the same batch: the bench's CPU per message in a
# stretch of time counts whole batches, not the time between its scrapes.
BATCH_CPU = Histogram(
    "millstream_batch_cpu_seconds", "Process CPU from one batch's ack to the next batch's ack",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)  # fmt: skip
# From a record's producer timestamp to its ack (both sinks written): end-to-end delay.
ACK_LATENCY = Histogram(
    "millstream_ack_latency_seconds", "Producer timestamp of a source record to its ack after both writes",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.25, 1.5, 2, 3, 5, 10, 30, 60, 300),
)  # fmt: skip
# Newest event time written to ClickHouse, unix seconds (freshness = now - this).
NEWEST_EVENT = Gauge("millstream_newest_event_timestamp_seconds", "Newest event time written")
# now - newest event time written, refreshed every few seconds (event-time freshness).
FRESHNESS = Gauge("millstream_event_freshness_seconds", "Now minus the newest event time written")
# Newest event time written per factory (few factories: a bounded label), for "no data" alerts.
FACTORY_NEWEST_EVENT = Gauge(
    "millstream_factory_newest_event_timestamp_seconds", "Newest event time written, per factory", ["factory"]
)
# 1 while faust recovers tables from their changelogs (after start or a rebalance).
RECOVERY_IN_PROGRESS = Gauge("millstream_table_recovery_in_progress", "1 while tables recover from changelogs")
# Partition assignments this worker went through (each one a rebalance).
REBALANCES = Counter("millstream_rebalances_total", "Partition assignments received (rebalances)")
# Messages in a source partition not yet committed: high-water (from fetch responses) - committed.
CONSUMER_LAG = Gauge("millstream_consumer_lag_messages", "High-water minus committed offset", ["partition"])
# Source offsets that do not exist on the broker (transaction markers, compaction, retention), skipped.
SKIPPED_OFFSETS = Counter("millstream_skipped_offsets_total", "Source offsets absent from the broker, skipped")
DEFERRED = Counter(
    "millstream_deferred_events_total",
    "Source events that arrived during a rebalance or table restore, read again after it",
)
SCYLLA_SHADOWED = Counter(
    "millstream_scylla_shadowed_writes_total",
    "Sampled ScyllaDB upserts found with a newer write time than their version (the write lost)",
    ["table"],
)
SCYLLA_WRITE_REQUESTS = Counter(
    "millstream_scylla_write_requests_total",
    "Upsert requests sent to ScyllaDB (an UNLOGGED BATCH of many rows counts once; retries count again)",
)

# Schema-registry lookups (one per schema id, cached), by result: found, unknown, error (retried).
REGISTRY_REQUESTS = Counter(
    "millstream_schema_registry_requests_total", "Schema-registry lookups by result", ["result"]
)
# Schemas held in the worker's cache.
REGISTRY_SCHEMAS = Gauge("millstream_schema_registry_schemas", "Schemas cached from the registry")

# Alerts sent to the alerts topic, by rule and state (raised, cleared); a replay may count one twice.
ALERTS = Counter("millstream_alerts_total", "Alerts sent to the alerts topic", ["rule", "state"])
ALERT_RULES = Gauge("millstream_alert_rules", "Alert rules in force (MILLSTREAM_ALERTS__RULES_FILE)")
ALERT_RULES_RELOADS = Counter(
    "millstream_alert_rules_reloads_total", "Changes of the rules file seen, by outcome (applied, refused)", ["outcome"]
)
# Lookup API answers (app/lookup.py), on a worker's web port or from `millstream api`, by what
# was asked (latest, windows, alerts) and HTTP status; and how long each took.
API_REQUESTS = Counter(
    "millstream_api_requests_total", "Lookup API answers, by endpoint and status", ["endpoint", "status"]
)
API_SECONDS = Histogram(
    "millstream_api_request_seconds", "Time to answer a lookup API request", ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)  # fmt: skip
